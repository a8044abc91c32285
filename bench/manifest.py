"""Peak memory of writing a batch manifest, the old way (the whole JSONL built in memory, then one
PUT) against now (`shared.batches.write_manifest`: rows read a few hundred at a time, a multipart
upload holding one 8 MiB part), on the same batch in the same run.

Against a running stack's Postgres and S3 (`make bench-manifest` starts a private one): a batch of
--items succeeded jobs is inserted directly, each with `embed: image` (a 512-float embedding, as
the production checkpoint gives) and --labels results each with its mask embedding too. Each way
runs in a child process of its own, which reports its peak RSS (ru_maxrss) over the baseline of a
child that only imported the same modules. With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.batches import insert_batch, manifest_key, write_manifest  # noqa: E402
from shared.clock import utcnow  # noqa: E402
from shared.db import make_engine, make_session_factory, session_scope  # noqa: E402
from shared.enums import BatchStatus, JobStatus  # noqa: E402
from shared.present import job_object  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.storage import ObjectStorage  # noqa: E402
from shared.tables import Batch, Job  # noqa: E402
from shared.tenants import create_tenant  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def old_way(sessions, storage: ObjectStorage, batch: Batch) -> str:
    """write_manifest before: every line into one BytesIO, then one PUT of all of it."""
    import io

    from sqlalchemy import select

    buf = io.BytesIO()
    with sessions() as session:
        rows = session.execute(
            select(Job).where(Job.batch_id == batch.id, Job.tenant_id == batch.tenant_id)
            .order_by(Job.created_at, Job.id).execution_options(yield_per=2000)
        ).scalars()
        for job in rows:
            line = json.dumps(job_object(job, storage, long_urls=True), separators=(",", ":"))
            buf.write(line.encode() + b"\n")
    key = manifest_key(tenant_id=batch.tenant_id, batch_id=batch.id)
    storage.put(key, buf.getvalue(), content_type="application/x-ndjson")
    return key


def child(way: str, batch_id: str) -> None:
    settings = Settings()
    sessions = make_session_factory(make_engine(settings.database_url, pool_size=1))
    storage = ObjectStorage(settings)
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        session.expunge(batch)
    start = time.perf_counter()
    size = 0
    if way != "baseline":
        key = (old_way if way == "old" else write_manifest)(sessions, storage, batch)
        size = storage._client.head_object(Bucket=storage.bucket, Key=key)["ContentLength"]
    print(json.dumps({"way": way, "peak_rss_mib": peak_mib(), "seconds": time.perf_counter() - start,
                      "bytes": size}))


def run_child(way: str, batch_id: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", way, "--batch", batch_id], check=True,
                         capture_output=True, text=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="(ignored: bench_stack.sh passes it)")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=1, help="results per job, each with its mask embedding")
    parser.add_argument("--child", choices=["baseline", "old", "new"])
    parser.add_argument("--batch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch)
        return 0

    import numpy as np

    settings = Settings()
    sessions = make_session_factory(make_engine(settings.database_url, pool_size=1))
    storage = ObjectStorage(settings)
    storage.ensure_bucket()
    rng = np.random.default_rng(0)

    def vector() -> list[float]:
        v = rng.normal(size=512).astype(np.float32)
        return [float(f"{x:.7g}") for x in (v / np.linalg.norm(v)).tolist()]

    vectors = [vector() for _ in range(64)]  # reused across rows: the bench measures the writer, not numpy
    start = time.perf_counter()
    with session_scope(sessions) as session:
        tenant = create_tenant(session, name="bench-manifest")
        batch = Batch(id=f"batch_{uuid.uuid4().hex}", tenant_id=tenant.tenant_id, status=BatchStatus.COMPLETED,
                      created_at=utcnow(), total=args.items, metadata_={})
        now = utcnow()
        rows = []
        for i in range(args.items):
            results = [{"prompt": f"label {k}", "source": "text", "bbox": [1, 2, 30, 40], "area_fraction": 0.1,
                        "score": 0.9, "mask_key": f"masks/{tenant.tenant_id}/x{i}/{k}.png",
                        "embedding": vectors[(i + k + 1) % 64]} for k in range(args.labels)]
            rows.append({"id": str(uuid.uuid4()), "tenant_id": tenant.tenant_id, "status": JobStatus.SUCCEEDED,
                         "created_at": now, "finished_at": now, "input": {"image_url": f"https://example.com/{i}.jpg"},
                         "prompts": [r["prompt"] for r in results], "threshold": 0.4, "results": results,
                         "metadata_": {"sku": str(i)}, "batch_id": batch.id, "attempts": 1,
                         "labels": [], "outputs_requested": ["mask"], "output_keys": {}, "embed": ["image", "masks"],
                         "embedding": vectors[i % 64], "embedding_model": "CIDAS/clipseg-rd64-refined",
                         "image_prompts": []})
        insert_batch(session, batch, rows)
        del rows
    print(f"{args.items} jobs with embed (image + {args.labels} label(s)) inserted in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    base = run_child("baseline", batch.id)
    report: dict[str, object] = {"items": args.items, "labels": args.labels,
                                 "baseline_rss_mib": round(base["peak_rss_mib"], 1)}
    for way in ("old", "new"):
        got = run_child(way, batch.id)
        grown = got["peak_rss_mib"] - base["peak_rss_mib"]
        label = "before (built in memory, one PUT)" if way == "old" else "now (streamed, multipart)"
        print(f"{label:<36} peak RSS {got['peak_rss_mib']:7.0f} MiB (+{grown:6.0f} over the baseline)  "
              f"{got['seconds']:6.1f} s  manifest {got['bytes'] / 2**20:6.0f} MiB", flush=True)
        report[way] = {"peak_rss_mib": round(got["peak_rss_mib"], 1), "over_baseline_mib": round(grown, 1),
                       "seconds": round(got["seconds"], 1), "manifest_mib": round(got["bytes"] / 2**20, 1)}
    with session_scope(sessions) as session:  # leave nothing behind in the stack's database
        session.query(Job).filter(Job.batch_id == batch.id).delete()
        session.query(Batch).filter(Batch.id == batch.id).delete()
    storage.delete([manifest_key(tenant_id=tenant.tenant_id, batch_id=batch.id)])
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
