"""RFC 9457 problem documents and the one place that maps errors to them."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from shared.errors import IdempotencyKeyReused, QueueFull, QueueUnavailable, StorageFailed
from shared.presets import PresetError
from shared.tuned_models import ModelError

log = logging.getLogger(__name__)

TITLES = {
    400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 413: "Payload Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 429: "Too Many Requests", 500: "Internal Server Error",
    503: "Service Unavailable",
}


class ApiProblem(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self, status: int, code: str, detail: str, *,
        errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.errors = errors or []
        self.headers = headers or {}


def problem_response(problem: ApiProblem) -> Response:
    body: dict[str, Any] = {
        "type": f"https://clipmask.dev/problems/{problem.code}",
        "title": TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
    }
    if problem.errors:
        body["errors"] = problem.errors
    resp = jsonify(body)
    resp.status_code = problem.status
    resp.mimetype = "application/problem+json"
    for name, value in problem.headers.items():
        resp.headers[name] = value
    if problem.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="clipmask"'
    return resp


MAX_URI_BYTES = 8192


def refuse_long_uri() -> None:
    """before_request: a path and query over MAX_URI_BYTES is a 414 problem, on every route."""
    from flask import request

    if len(request.full_path) > MAX_URI_BYTES:
        raise ApiProblem(414, "uri_too_long", f"The path and query are longer than {MAX_URI_BYTES} bytes.")


HTTP_CODES = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed",
    413: "payload_too_large", 415: "unsupported_media_type",
}


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiProblem, problem_response)

    @app.errorhandler(QueueFull)
    def queue_full(exc: QueueFull) -> Response:
        return problem_response(ApiProblem(429, exc.code, exc.message, headers={"Retry-After": "30"}))

    @app.errorhandler(IdempotencyKeyReused)
    def key_reused(exc: IdempotencyKeyReused) -> Response:
        return problem_response(ApiProblem(409, exc.code, exc.message))

    @app.errorhandler(QueueUnavailable)
    def queue_down(exc: QueueUnavailable) -> Response:
        return problem_response(ApiProblem(503, exc.code, exc.message, headers={"Retry-After": "5"}))

    @app.errorhandler(PresetError)
    def preset_error(exc: PresetError) -> Response:
        field = "labels" if exc.code == "too_many_labels" else "preset"
        return problem_response(ApiProblem(exc.status, exc.code, exc.message,
                                           errors=[{"field": field, "message": exc.message}]))

    @app.errorhandler(ModelError)
    def model_error(exc: ModelError) -> Response:
        return problem_response(ApiProblem(exc.status, exc.code, exc.message,
                                           errors=[{"field": exc.field, "message": exc.message}]))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        detail = exc.description or TITLES.get(status, "Error")
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            detail = f"The request body is larger than the limit of {limit} bytes."
        resp = problem_response(ApiProblem(status, HTTP_CODES.get(status, "http_error"), detail))
        if status == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp

    def unavailable(what: str, exc: Exception) -> Response:
        log.warning("dependency unavailable: %s: %s", what, exc)
        return problem_response(ApiProblem(
            503, "dependency_unavailable", f"{what} is not answering; try again shortly.",
            headers={"Retry-After": "5"},
        ))

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def database_down(exc: Exception) -> Response:
        return unavailable("The database", exc)

    @app.errorhandler(BrokerError)
    @app.errorhandler(RedisConnectionError)
    def broker_down(exc: Exception) -> Response:
        return unavailable("The queue (Redis)", exc)

    @app.errorhandler(StorageFailed)
    def storage_down(exc: Exception) -> Response:
        return unavailable("Object storage", exc)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem_response(ApiProblem(500, "internal", "An unexpected error occurred; it has been logged."))
