"""Similarity search on pgvector: latency at growing sizes, HNSW recall, and what `embed` costs.

Part 1 (search): a database of its own on the Postgres with pgvector (scripts/pgvector.sh),
migrated to head; synthetic 512-d unit vectors (the production checkpoint's length, so the partial
HNSW index over their half-precision copies serves them, re-ranked exactly) inserted directly with
a binary COPY, in clusters (a mixture of 2,000 centres plus noise: catalog embeddings are
clustered, and uniform random vectors are HNSW's worst case, which would understate recall). One
tenant holds 90% of the rows and others the rest. At each size: p50/p99 of `shared.search.search`
(the API's query, tenant filter included) for 200 queries near stored vectors at each
`hnsw.ef_search` of --ef-search, and recall@10 against the exact answer (every matching row's fp32
distance, sorted, as search() does for few rows) on the first --exact-queries of them, after one
untimed pass of other queries (the exact scans push the index out of the cache). The plain way for
comparison: that exact scan's latency at the same size.

Part 2 (embed cost): the fast engine on the tiny random-weight model (CPU) per image: masks
alone, + embed image, + embed masks (4 labels), over the same images.

    .venv/bin/python bench/search.py --sizes 10000,100000,1000000 --ef-search 40,100,200
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from shared.migrate import upgrade  # noqa: E402
from shared.search import Query, _exact, _filters, search, vector_literal  # noqa: E402

DIMS = 512
MODEL = "bench-model"


def pg_port() -> int:
    venv = str(Path(sys.executable).parents[1])
    out = subprocess.run([str(ROOT / "scripts" / "pgvector.sh"), "ensure"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "VENV": venv})
    return int(out.stdout.split()[-1])


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    pick = rng.integers(0, len(centres), n)
    v = centres[pick] + rng.normal(0, 0.5, (n, DIMS))  # cosine to its centre about 0.9
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def load(url: str, total: int, have: int, centres: np.ndarray, rng: np.random.Generator) -> None:
    """Grow the table from `have` to `total` rows with a binary COPY (tenant t0 gets 90%)."""
    import psycopg
    from pgvector.psycopg import register_vector

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        register_vector(conn)
        if have == 0:
            for t in ("t0", "t1", "t2"):
                conn.execute("INSERT INTO tenants (id, name, webhook_secret, created_at) VALUES (%s, %s, 'x', now()) "
                             "ON CONFLICT DO NOTHING", (t, t))
            conn.execute("ALTER TABLE embeddings DROP CONSTRAINT fk_embeddings_job_id_jobs")  # no job rows here
        step = 50_000
        columns = "tenant_id, job_id, result_index, model, dims, metadata, embedding"
        for start in range(have, total, step):
            n = min(step, total - start)
            vectors = clustered(rng, centres, n)
            tenants = np.where(rng.random(n) < 0.9, "t0", np.where(rng.random(n) < 0.5, "t1", "t2"))
            with conn.cursor().copy(f"COPY embeddings ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["varchar", "varchar", "int4", "text", "int4", "jsonb", "vector"])
                for i in range(n):
                    copy.write_row((str(tenants[i]), f"job_{start + i}", None, MODEL, DIMS,
                                    psycopg.types.json.Jsonb({"k": str(i % 10)}), vectors[i]))
        conn.commit()


def timed_queries(sessions: sessionmaker[Session], queries: np.ndarray, *, exact: bool,
                  ef_search: int = 100) -> tuple[list[float], list[list[str]]]:
    times, answers = [], []
    for q in queries:
        with sessions() as session, session.begin():
            query = Query(vector=q.tolist(), model=MODEL, limit=10, ef_search=ef_search)
            start = time.perf_counter()
            if exact:  # what search() does for a few matching rows: every row's fp32 distance, sorted
                where, params = _filters("t0", query)
                rows = _exact(session, "job_id", f"(embedding::vector({DIMS})) <=> CAST(:q AS vector({DIMS}))", where,
                              params | {"q": vector_literal(query.vector), "limit": query.limit})
                ids = [r.job_id for r in rows]
            else:
                ids = [h.job_id for h in search(session, "t0", query)]
            times.append((time.perf_counter() - start) * 1000)
            answers.append(ids)
    return times, answers


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p))


def bench_search(sizes: list[int], n_queries: int, n_exact: int, ef_values: list[int], *, m: int = 16,
                 ef_construction: int = 128) -> None:
    port = pg_port()
    name = f"clipmask_bench_search_{uuid.uuid4().hex[:6]}"
    admin = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"
    try:
        upgrade(url)
        engine = create_engine(url, pool_size=2)
        sessions = sessionmaker(engine)
        # The exact answers on connections of their own: psycopg prepares a statement run five times
        # on a connection, and a generic plan made with index scans off would be reused for the HNSW runs.
        exact_engine = create_engine(url, pool_size=1)
        exact_sessions = sessionmaker(exact_engine)
        rng = np.random.default_rng(0)
        centres = rng.normal(0, 1, (2000, DIMS)).astype(np.float32)
        have = 0
        print(f"search: Postgres on port {port}, {DIMS}-d clustered unit vectors, tenant t0 = 90% of rows, "
              f"{n_queries} queries (recall and the exact scan on the first {n_exact}), limit 10, "
              f"HNSW m={m} ef_construction={ef_construction}", flush=True)
        print(f"{'vectors':>9} {'load s':>7} {'index s':>8} {'ef_search':>9} {'hnsw p50':>9} {'p99':>8} "
              f"{'exact p50':>10} {'p99':>9} {'recall@10':>9}")
        for size in sizes:
            started = time.perf_counter()
            with engine.connect() as conn:  # rebuilt after the load: building once is faster than inserting into it
                conn.execute(text("DROP INDEX IF EXISTS ix_embeddings_hnsw_half_512"))
                conn.commit()
            load(url, size, have, centres, rng)
            loaded = time.perf_counter() - started
            started = time.perf_counter()
            with engine.connect() as conn:
                conn.execute(text("SET maintenance_work_mem = '6GB'"))
                conn.execute(text("SET max_parallel_maintenance_workers = 1"))
                conn.execute(text("CREATE INDEX ix_embeddings_hnsw_half_512 ON embeddings USING hnsw "
                                  "((embedding::halfvec(512)) halfvec_cosine_ops) "
                                  f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)}) WHERE dims = 512"))
                conn.execute(text("ANALYZE embeddings"))
                conn.commit()
            indexed = time.perf_counter() - started
            have = size
            queries = clustered(rng, centres, n_queries)
            exact_ms, want = timed_queries(exact_sessions, queries[:n_exact], exact=True)
            # the exact scans read the whole table and push the index out of the cache; a serving
            # database has it warm: one untimed pass of other queries first
            timed_queries(sessions, clustered(rng, centres, n_queries), exact=False, ef_search=ef_values[0])
            for ef in ef_values:
                hnsw_ms, got = timed_queries(sessions, queries, exact=False, ef_search=ef)
                recall = statistics.mean(len(set(g) & set(w)) / max(1, len(w))
                                         for g, w in zip(got, want, strict=False))
                print(f"{size:>9,} {loaded:>7.1f} {indexed:>8.1f} {ef:>9} {pct(hnsw_ms, 50):>7.2f}ms "
                      f"{pct(hnsw_ms, 99):>6.2f}ms {pct(exact_ms, 50):>8.2f}ms {pct(exact_ms, 99):>7.2f}ms "
                      f"{recall:>9.3f}", flush=True)
        engine.dispose()
        exact_engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def bench_embed(images: int, repeats: int) -> None:
    import torch
    from PIL import Image

    from worker.engine import FastEngine, SegmentRequest, load_clipseg
    from worker.engine.devmodel import write_dev_model

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_clipseg(str(write_dev_model(Path(tmp), size="tiny")), device="cpu", dtype="fp32")
    engine = FastEngine(loaded)
    rng = np.random.default_rng(1)
    pics = [np.asarray(Image.open(io.BytesIO(_jpeg(rng))).convert("RGB")) for _ in range(images)]
    prompts = ["shirt", "pants", "dress", "shoes"]
    variants = {"masks only": {}, "+ embed image": {"embed_image": True}, "+ embed masks": {"embed_masks": True},
                "+ both": {"embed_image": True, "embed_masks": True}}
    print(f"\nembed cost: tiny random-weight CLIPSeg on the CPU (2 threads), {images} images of 640x480, "
          f"{len(prompts)} labels, threshold 0.3, batches of 8, best of {repeats} rounds (variants interleaved)")
    best = dict.fromkeys(variants, float("inf"))
    for round_ in range(repeats + 1):  # round 0 warms every path up and is not counted
        for name, flags in variants.items():
            start = time.perf_counter()
            for i in range(0, images, 8):
                engine.segment_batch([SegmentRequest(p, prompts, 0.3, **flags) for p in pics[i:i + 8]])
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    base = best["masks only"] / images * 1000
    for name in variants:
        per = best[name] / images * 1000
        print(f"  {name:<15} {per:7.2f} ms/image  ({per / base:.2f}x masks only)")


def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    arr = (rng.random((480, 640, 3)) * 60 + np.linspace(0, 190, 640)[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-queries", type=int, default=100, help="recall and exact-scan timing on this many")
    parser.add_argument("--ef-search", default="40,100,200", help="hnsw.ef_search values to compare")
    parser.add_argument("--m", type=int, default=16, help="HNSW m (default 16, pgvector's and migration 0009's)")
    parser.add_argument("--ef-construction", type=int, default=128,
                        help="HNSW ef_construction (default 128, as migration 0009 builds it)")
    parser.add_argument("--embed-images", type=int, default=32)
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-embed", action="store_true")
    args = parser.parse_args()
    if not args.skip_search:
        bench_search([int(s) for s in args.sizes.split(",")], args.queries, min(args.exact_queries, args.queries),
                     [int(e) for e in args.ef_search.split(",")], m=args.m, ef_construction=args.ef_construction)
    if not args.skip_embed:
        bench_embed(args.embed_images, repeats=3)


if __name__ == "__main__":
    main()
