"""The try-it page at `GET /`: static files (index.html, app.js, app.css) served by the API, so the
page calls /v1 on its own origin with the key the person pasted (kept in local storage).

Content-Security-Policy: scripts, styles and API calls from this origin only; images also from
the object storage's public origin, where the presigned mask, cutout and overlay URLs point.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort

from api.openapi import Answers, spec
from api.services import services
from shared.settings import Settings

bp = Blueprint("web", __name__)
FILES = {"app.js": "text/javascript", "app.css": "text/css"}
HERE = Path(__file__).parent


def storage_origin(settings: Settings) -> str:
    """Where presigned URLs point: the public endpoint's origin, else AWS S3's hosts."""
    endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    if not endpoint:
        return "https://*.amazonaws.com"
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc}"


def _page_headers(response: Response) -> Response:
    images = storage_origin(services().settings)
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        f"img-src 'self' blob: data: {images}; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"  # presigned URLs carry signatures
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/")
@spec.validate(resp=Answers(200, None, "HTML page", public=True), security={}, operation_id="web_page",
               tags=["web"], skip_validation=True)
def page() -> Response:
    """The try-it page: paste a key, drop an image, see the masks and cutouts"""
    return _page_headers(Response((HERE / "index.html").read_bytes(), mimetype="text/html"))


@bp.get("/web/<name>")
@spec.validate(resp=Answers(200, None, "The page's script or style sheet", 404, public=True), security={},
               operation_id="web_asset", tags=["web"], skip_validation=True)
def asset(name: str) -> Response:
    """The page's static files (app.js, app.css)"""
    if name not in FILES:
        abort(404)
    return _page_headers(Response((HERE / name).read_bytes(), mimetype=FILES[name]))
