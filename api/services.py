"""What a request handler needs, built once per app from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.keys import KeyCache
from api.limits import RateLimiter
from api.waiting import FinishedJobs
from shared.db import make_engine, make_session_factory
from shared.queue import make_celery
from shared.settings import Settings
from shared.storage import ObjectStorage
from shared.submit import SubmitPolicy, Submitter


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: ObjectStorage
    celery: Celery
    limiter: RateLimiter
    submitter: Submitter
    finished: FinishedJobs  # for Prefer: wait (its listener starts on first use)
    keys: KeyCache

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings.database_url)
        storage, celery = ObjectStorage(settings), make_celery(settings)
        submitter = Submitter(policy=SubmitPolicy.from_settings(settings), storage=storage, celery=celery)
        limiter = RateLimiter(settings)
        return cls(settings, engine, make_session_factory(engine), storage, celery, limiter, submitter,
                   FinishedJobs(settings.database_url, max_waiters=settings.wait_max_per_process,
                                max_per_tenant=settings.wait_max_per_tenant),
                   KeyCache(settings, limiter.client))


def services() -> Services:
    svc: Services = current_app.extensions["clipmask"]
    return svc


def db() -> Session:
    """The request's session (closed at teardown)."""
    if "db" not in g:
        g.db = services().sessions()
    session: Session = g.db
    return session


def close_db(_exc: BaseException | None = None) -> None:
    session = g.pop("db", None)
    if session is not None:
        session.close()
