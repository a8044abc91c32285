"""The clipmask HTTP API (Flask). Build it with create_app(settings); it never imports torch."""

from __future__ import annotations

from flask import Flask

from api import batches, deliveries, health, jobs, metrics, models, openapi, presets, search, web
from api.body import DrainUnreadBody
from api.problems import refuse_long_uri, register_error_handlers
from api.services import Services, close_db
from shared.settings import Settings


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> Flask:
    settings = settings or Settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # Non-file form fields share the body limit (werkzeug's default is 500 kB).
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["clipmask"] = services or Services.build(settings)
    app.teardown_appcontext(close_db)
    register_error_handlers(app)
    app.before_request(refuse_long_uri)
    metrics.install(app)
    for module in (health, jobs, batches, presets, models, search, deliveries, metrics, openapi, web):
        app.register_blueprint(module.bp)
    # answers given before the body was read (413, 401) reach clients that write it all first
    app.wsgi_app = DrainUnreadBody(app.wsgi_app, limit=settings.drain_body_bytes)  # type: ignore[method-assign]
    return app
