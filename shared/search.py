"""Similarity search over stored CLIP embeddings (pgvector), and the short RPC that embeds a query.

Tenant scoping is a hard filter in the WHERE clause of every statement, never a filter applied to
someone else's nearest neighbours. Few matching rows are compared exactly; past EXACT_BELOW, the
HNSW index (vectors of the production length) answers, and a selective filter can leave its scan
short of `limit`: iterative scans (pgvector 0.8's `hnsw.iterative_scan`) keep scanning, and if
the answer is still short, the query is run again as an exact scan over the filtered rows. A
search never returns fewer rows than `min(limit, matching rows)`. The index holds half-precision
copies of the vectors (half the pages to read); a few times `limit` of its candidates are ordered
again by their exact distance.

Text and image queries need the model, which the API never loads: `request_embedding` sends a
task on the interactive queue carrying a Redis reply key and waits on that key (BLPOP) for the
worker's answer, up to a timeout (EmbeddingUnavailable -> 503 with Retry-After).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.errors import ClipmaskError
from shared.queue import EMBED_TASK, enqueue_next
from shared.settings import Settings
from shared.tables import INDEXED_EMBEDDING_DIMS, Embedding, Job

SCOPES = ("images", "masks")


class EmbeddingUnavailable(ClipmaskError):
    code = "search_unavailable"


class QueryRefused(ClipmaskError):
    """The worker could not embed the query (an image that can't be fetched or decoded)."""


# At most this many matching rows are scanned exactly (milliseconds in all) instead of through HNSW.
EXACT_BELOW = 1000
# The HNSW index holds half-precision vectors; this many times `limit` of its nearest are ordered
# again by their exact (fp32) distance, which is also the score (bench/README.md, migration 0009).
RERANK = 4


@dataclass(frozen=True)
class Query:
    vector: list[float]
    model: str
    scope: str = "images"
    limit: int = 10
    batch_id: str | None = None
    metadata: dict[str, str] | None = None
    # HNSW candidate list (pgvector's hnsw.ef_search): recall against latency; at least 2 x limit
    ef_search: int = 200


@dataclass(frozen=True)
class Hit:
    job_id: str
    result_index: int | None
    prompt: str | None
    score: float
    metadata: dict[str, str]


def vector_literal(vector: list[float]) -> str:
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


def _filters(tenant_id: str, query: Query) -> tuple[str, dict[str, Any]]:
    # dims is written into the statement, not bound: psycopg prepares a statement run five times on
    # a connection, and a generic plan can't prove the partial HNSW index's `dims = 512` from `$3`
    clauses = ["tenant_id = :tenant_id", "model = :model", f"dims = {int(len(query.vector))}",
               "result_index IS NULL" if query.scope == "images" else "result_index IS NOT NULL"]
    params: dict[str, Any] = {"tenant_id": tenant_id, "model": query.model}
    if query.batch_id is not None:
        clauses.append("batch_id = :batch_id")
        params["batch_id"] = query.batch_id
    if query.metadata:
        clauses.append("metadata @> CAST(:metadata AS jsonb)")
        params["metadata"] = json.dumps(query.metadata)
    return " AND ".join(clauses), params


def search(session: Session, tenant_id: str, query: Query) -> list[Hit]:
    """The tenant's `limit` nearest stored embeddings by cosine similarity, best first.

    Few matching rows (EXACT_BELOW or fewer: a small tenant, a batch, a narrow metadata filter)
    are scanned exactly, which takes milliseconds. Past that, the HNSW index is made the plan:
    Postgres prices a distance at one operator cost, so left alone it picks a sequential or btree
    scan and a sort, as slow as the exact scan and ten to a hundred times slower than the index
    (bench/README.md, "Figures that were in comments"). With no explicit sort allowed, only the index's
    ordered scan is left; its iterative scan reads past rows the filters exclude, and an answer
    still short of `limit` (the index scan gave up first) is taken exactly instead."""
    where, params = _filters(tenant_id, query)
    dims = len(query.vector)
    params |= {"q": vector_literal(query.vector), "limit": query.limit}
    columns = "job_id, result_index, prompt, metadata"
    if dims != INDEXED_EMBEDDING_DIMS:
        rows = _exact(session, columns, "embedding <=> CAST(:q AS vector)", where, params)
    else:
        distance = f"(embedding::vector({dims})) <=> CAST(:q AS vector({dims}))"
        matching = session.execute(text(
            f"SELECT count(*) FROM (SELECT 1 FROM embeddings WHERE {where} LIMIT :cap) AS found"),
            params | {"cap": EXACT_BELOW + 1}).scalar_one()
        if matching <= EXACT_BELOW:
            rows = _exact(session, columns, distance, where, params)
        else:
            # the expression the partial HNSW index is built on: half-precision copies, whose order
            # is nearly the exact one; RERANK x limit candidates come back with their exact distance
            approximate = f"(embedding::halfvec({dims})) <=> CAST(:q AS halfvec({dims}))"
            session.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
            session.execute(text(f"SET LOCAL hnsw.ef_search = {max(2 * query.limit, min(1000, query.ef_search))}"))
            session.execute(text("SET LOCAL enable_sort = off"))
            candidates = list(session.execute(text(
                f"SELECT {columns}, {distance} AS distance FROM embeddings WHERE {where} "
                f"ORDER BY {approximate} LIMIT :candidates"), params | {"candidates": RERANK * query.limit}).all())
            session.execute(text("SET LOCAL enable_sort = on"))  # the exact fallback sorts
            rows = sorted(candidates, key=lambda r: float(r.distance))[: query.limit]
            if len(rows) < query.limit:  # more than EXACT_BELOW rows match: the index scan was starved
                rows = _exact(session, columns, distance, where, params)
    hits = [Hit(r.job_id, r.result_index, r.prompt, 1.0 - float(r.distance), dict(r.metadata or {})) for r in rows]
    hits.sort(key=lambda h: -h.score)  # relaxed_order may return neighbours slightly out of order
    return hits


def _exact(session: Session, columns: str, distance: str, where: str, params: dict[str, Any]) -> list[Any]:
    """Exact nearest neighbours over the filtered rows (the CTE keeps the planner off the index)."""
    return list(session.execute(text(
        f"WITH scoped AS MATERIALIZED (SELECT {columns}, embedding FROM embeddings WHERE {where}) "
        f"SELECT {columns}, {distance} AS distance FROM scoped ORDER BY distance LIMIT :limit"), params).all())


def stored_vector(session: Session, tenant_id: str, job_id: str, result_index: int | None) -> Embedding | None:
    found = session.query(Embedding).filter(Embedding.tenant_id == tenant_id, Embedding.job_id == job_id)
    found = found.filter(Embedding.result_index.is_(None) if result_index is None
                         else Embedding.result_index == result_index)
    return found.order_by(Embedding.id.desc()).first()


def mask_keys(session: Session, tenant_id: str, hits: list[Hit]) -> dict[tuple[str, int], str | None]:
    """(job id, result index) -> the result's stored mask key, for the tenant's hits that are results
    (the tenant is a filter here too, not only in the search that found the hits)."""
    ids = {h.job_id for h in hits if h.result_index is not None}
    if not ids:
        return {}
    out: dict[tuple[str, int], str | None] = {}
    for job_id, results in session.query(Job.id, Job.results).filter(Job.id.in_(ids), Job.tenant_id == tenant_id):
        for index, result in enumerate(results or []):
            out[(job_id, index)] = result.get("mask_key")
    return out


# ---- the query-embedding RPC ----------------------------------------------------------------------

def reply_key(settings: Settings) -> str:
    return f"{settings.redis_key_prefix}search-reply:{uuid.uuid4().hex}"


def request_embedding(settings: Settings, celery: Celery, client: redis.Redis, query: dict[str, Any],
                      *, timeout_s: float, image: bytes | None = None) -> tuple[list[float], str]:
    """(vector, model id) for {"text"} / {"image_url"} or the bytes of an `image` from a worker;
    raises EmbeddingUnavailable when none answers within `timeout_s`, QueryRefused for a bad image.

    An image's bytes (up to 25 MiB) travel once, raw, under a key beside the reply key that expires
    with the query: the task carries only that key ({"image_key"}), not base64 in its body and again
    in its repr."""
    key = reply_key(settings)
    deadline = time.time() + timeout_s
    keys = [key]
    try:
        if image is not None:
            keys.append(f"{key}:image")
            client.set(keys[1], image, ex=max(1, round(timeout_s)) + 60)
            query = {"image_key": keys[1]}
        # ahead of the queued jobs; the worker drops it once `deadline` has passed
        enqueue_next(celery, task=EMBED_TASK, args=[key, query, deadline], queue=settings.interactive_queue)
        answer = client.blpop([key], timeout=max(1, round(timeout_s)))
    except (redis.RedisError, OSError) as exc:
        raise EmbeddingUnavailable(f"the queue is not answering: {type(exc).__name__}") from exc
    finally:
        try:
            client.delete(*keys)
        except redis.RedisError:
            pass
    if answer is None:
        raise EmbeddingUnavailable(f"no worker embedded the query within {timeout_s:g} s")
    payload = json.loads(answer[1])
    if "error" in payload and payload["error"]["code"] == "internal":  # the worker's fault, not the query's
        raise EmbeddingUnavailable(payload["error"]["message"])
    if "error" in payload:
        raise QueryRefused(payload["error"]["message"], code=payload["error"]["code"])
    return [float(x) for x in payload["vector"]], str(payload["model"])


def answer_embedding(client: redis.Redis, key: str, payload: dict[str, Any], *, ttl_s: int = 60) -> None:
    """The worker's side: push the answer where the API waits; it expires if nobody takes it."""
    pipe = client.pipeline()
    pipe.rpush(key, json.dumps(payload))
    pipe.expire(key, ttl_s)
    pipe.execute()
