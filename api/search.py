"""POST /v1/search: the tenant's most similar stored embeddings (shared/search.py does the work)."""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, Response, jsonify
from pydantic import ValidationError

from api.auth import current_tenant, require_tenant
from api.openapi import Answers, spec
from api.parsing import check_image_bytes, decode_base64_image, json_body
from api.problems import ApiProblem
from api.schemas import SEARCH_FIELD_CODES, SearchList, SearchRequest, validation_problem
from api.services import db, services
from shared import search
from shared.tables import Job

log = logging.getLogger(__name__)

bp = Blueprint("search", __name__, url_prefix="/v1/search")
bp.before_request(require_tenant)

QUERIES = ("text", "image_url", "image_base64", "job_id")
_redis: dict[str, redis.Redis] = {}


def _client(url: str, timeout_s: float) -> redis.Redis:
    if url not in _redis:  # BLPOP holds its connection up to the timeout: allow for it
        _redis[url] = redis.Redis.from_url(url, socket_timeout=timeout_s + 5, socket_connect_timeout=2)
    return _redis[url]


def _query_vector(parsed: SearchRequest) -> tuple[list[float], str]:
    tenant = current_tenant()
    if parsed.job_id is not None:
        row = search.stored_vector(db(), tenant.id, parsed.job_id, parsed.result_index)
        if row is None:
            if db().query(Job.id).filter(Job.id == parsed.job_id, Job.tenant_id == tenant.id).first() is None:
                raise ApiProblem(404, "not_found", f"No job {parsed.job_id!r}.")
            what = "its image" if parsed.result_index is None else f"result {parsed.result_index}"
            raise ApiProblem(422, "no_embedding", f"Job {parsed.job_id} has no stored embedding of {what}: run jobs "
                             "with embed: [\"image\"] or [\"masks\"] to search by them.",
                             errors=[{"field": "job_id", "message": "no embedding"}])
        return [float(x) for x in row.embedding], row.model
    image = None  # base64 (or a data: URI) decoded as POST /v1/jobs decodes it; the worker gets bytes
    if parsed.text is not None:
        query = {"text": parsed.text}
    elif parsed.image_url is not None:
        query = {"image_url": parsed.image_url}
    else:
        assert parsed.image_base64 is not None
        image = decode_base64_image(parsed.image_base64)
        check_image_bytes(image, "image_base64")
        query = {}
    svc = services()
    timeout = svc.settings.search_timeout_s
    try:
        return search.request_embedding(svc.settings, svc.celery, _client(svc.settings.redis_url, timeout), query,
                                        timeout_s=timeout, image=image)
    except search.EmbeddingUnavailable as exc:
        log.warning("search query not embedded: %s", exc.message, extra={"tenant_id": tenant.id})
        raise ApiProblem(503, "search_unavailable", f"No worker embedded the query in time ({exc.message}); "
                         "try again shortly.", headers={"Retry-After": "5"}) from exc
    except search.QueryRefused as exc:
        field = "image_url" if parsed.image_url is not None else "image_base64"
        raise ApiProblem(422, exc.code, f"The query image: {exc.message}",
                         errors=[{"field": field, "message": exc.message}]) from exc


@bp.post("")
@spec.validate(json=SearchRequest, resp=Answers(200, SearchList, "Best first.", 400, 404, 413, 415, 422, 503),
               operation_id="search", tags=["search"], skip_validation=True)
def search_embeddings() -> Response:
    """Find your most similar images or label crops

    By text ("red floral dress"), by image, or by a stored job or result. Only jobs run with `embed`
    are found, and only yours. A text or image query is embedded by a worker: none answering within
    15 s gives 503 with Retry-After.
    """
    body = json_body(SEARCH_FIELD_CODES)
    try:
        parsed = SearchRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_problem(exc, SEARCH_FIELD_CODES) from exc
    given = [name for name in QUERIES if getattr(parsed, name) is not None]
    if len(given) != 1:
        raise ApiProblem(422, "invalid_search_query",
                         "Give exactly one query: text, image_url, image_base64 or job_id.",
                         errors=[{"field": name, "message": "exactly one query"} for name in (given or ["text"])])
    if parsed.result_index is not None and parsed.job_id is None:
        raise ApiProblem(422, "invalid_result_index", "result_index goes with job_id.",
                         errors=[{"field": "result_index", "message": "needs job_id"}])
    vector, model = _query_vector(parsed)
    query = search.Query(vector=vector, model=model, scope=parsed.scope, limit=parsed.limit,
                         batch_id=parsed.batch_id, metadata=parsed.metadata,
                         ef_search=services().settings.search_ef_search)
    tenant_id = current_tenant().id
    hits = search.search(db(), tenant_id, query)
    keys = search.mask_keys(db(), tenant_id, hits)
    storage = services().storage
    data = []
    for hit in hits:
        key = None if hit.result_index is None else keys.get((hit.job_id, hit.result_index))
        data.append({"job_id": hit.job_id, "result_index": hit.result_index, "prompt": hit.prompt,
                     "score": round(hit.score, 6), "metadata": hit.metadata,
                     "mask_url": None if key is None else storage.presign_get(key)})
    log.info("search answered", extra={"tenant_id": tenant_id, "hits": len(data), "query": given[0]})
    return jsonify({"object": "list", "data": data})
