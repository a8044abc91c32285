"""Object storage from the client's side: SeaweedFS (the native stack's and the tests' S3 server now)
against moto's server mode (what they ran before), in the same run.

Each server runs in a process of its own on this machine; the figures are this process's CPU per
operation (what the worker or the API pays), and the wall time per operation:
- PUT of a mask-sized PNG (`--bytes`, 20 KB) through ObjectStorage.put (obstore, the worker's path)
  and through boto3;
- GET of a presigned URL (the client downloading a mask) through a kept urllib3 connection;
- the server's own start: seconds until an authenticated request answers.

  python bench/storage.py [--objects 400] [--bytes 20000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.dev_s3 import Ports, wait_ready
from cli.dev_s3 import start as start_seaweedfs
from shared.settings import Settings
from shared.storage import ObjectStorage

KEYS = {"access_key": "bench", "secret_key": "bench-secret"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_ready(f"http://127.0.0.1:{port}", timeout=60, proc=proc, **KEYS)
    return proc


def measure(endpoint: str, objects: int, size: int) -> dict[str, float]:
    payload = os.urandom(size)
    row: dict[str, float] = {}
    for client in ("obstore", "boto3"):
        storage = ObjectStorage(Settings(s3_endpoint_url=endpoint, s3_bucket=f"bench-{uuid.uuid4().hex[:8]}",
                                         s3_access_key_id=KEYS["access_key"],
                                         s3_secret_access_key=KEYS["secret_key"], s3_put_client=client))
        storage.ensure_bucket()
        keys = [f"masks/bench/{i}.png" for i in range(objects)]
        storage.put(keys[0], payload, content_type="image/png")  # connections and clients warm
        cpu, wall = time.process_time(), time.perf_counter()
        for key in keys:
            storage.put(key, payload, content_type="image/png")
        row[f"put_{client}_cpu_ms"] = (time.process_time() - cpu) / objects * 1000
        row[f"put_{client}_wall_ms"] = (time.perf_counter() - wall) / objects * 1000
        if client == "obstore":
            urls = [storage.presign_get(key) for key in keys]
            http = urllib3.PoolManager(maxsize=1)
            assert http.request("GET", urls[0]).data == payload
            cpu, wall = time.process_time(), time.perf_counter()
            for url in urls:
                answer = http.request("GET", url)
                assert answer.status == 200 and len(answer.data) == size
            row["presigned_get_cpu_ms"] = (time.process_time() - cpu) / objects * 1000
            row["presigned_get_wall_ms"] = (time.perf_counter() - wall) / objects * 1000
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--bytes", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipmask-storage-bench-"))
    rows = {}
    ports = Ports(*(free_port() for _ in range(8)))
    started = time.perf_counter()
    seaweed = start_seaweedfs(work / "seaweedfs", ports, log_path=work / "seaweedfs.log", **KEYS)
    seaweed_start = time.perf_counter() - started
    moto_port = free_port()
    started = time.perf_counter()
    moto = start_moto(moto_port)
    moto_start = time.perf_counter() - started
    try:
        rows["seaweedfs"] = {"start_s": seaweed_start, **measure(f"http://127.0.0.1:{ports.s3}", args.objects,
                                                                  args.bytes)}
        rows["moto"] = {"start_s": moto_start, **measure(f"http://127.0.0.1:{moto_port}", args.objects, args.bytes)}
    finally:
        for proc in (seaweed, moto):
            proc.kill()
            proc.wait()
    if args.json:
        print(json.dumps({"objects": args.objects, "bytes": args.bytes, "servers": rows}, indent=2))
        return
    print(f"{args.objects} objects of {args.bytes} bytes; this process's CPU ms and wall ms per operation")
    columns = ["start_s", "put_obstore_cpu_ms", "put_obstore_wall_ms", "put_boto3_cpu_ms", "put_boto3_wall_ms",
               "presigned_get_cpu_ms", "presigned_get_wall_ms"]
    print(f"{'server':10} " + " ".join(f"{c:>21}" for c in columns))
    for name, row in rows.items():
        print(f"{name:10} " + " ".join(f"{row[c]:21.2f}" for c in columns))


if __name__ == "__main__":
    main()
