"""Webhook events and their delivery, per Standard Webhooks (standardwebhooks.com).

- Events are rows (`webhook_deliveries`) written in the same transaction that finishes the job or
  batch, so no event is lost between the two. The body is frozen then; every attempt sends the
  same bytes under the same `webhook-id`, signed afresh with the tenant's `whsec_` secret.
- `dispatch` claims due rows (SKIP LOCKED, a claim lease), sends them and records the outcome:
  2xx -> succeeded; 410 -> failed at once; an address that is not allowed -> failed at once;
  anything else (or no answer within the timeout) -> the next attempt per the schedule, with
  +-10% jitter, until the schedule is spent -> failed.
- Workers kick `dispatch` right after a commit that created rows; a periodic run (beat) sends
  retries and anything a crash left behind. The table is the truth.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import urllib3
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from shared.clock import isoformat, utcnow
from shared.db import session_scope
from shared.enums import DeliveryStatus, EventType, JobEvent
from shared.errors import ImageFetchFailed
from shared.fetch import AddressRefused, FetchPolicy, exchange_deadline, guarded_pool, policy_from_settings
from shared.settings import Settings
from shared.tables import Job, Tenant, WebhookDelivery

log = logging.getLogger(__name__)



def new_delivery(*, tenant_id: str, event_type: EventType, url: str, data: dict[str, Any], job_id: str | None = None,
                 batch_id: str | None = None) -> WebhookDelivery:
    created = utcnow()
    body = json.dumps({"type": event_type, "timestamp": isoformat(created), "data": data}, separators=(",", ":"))
    return WebhookDelivery(
        id=f"msg_{uuid.uuid4().hex}", tenant_id=tenant_id, event_type=event_type, job_id=job_id, batch_id=batch_id,
        url=url, payload=body, status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=created, created_at=created,
    )


def wants_event(job: Job, event: JobEvent) -> bool:
    """job.started only when named; the final events when named, or when no list was given."""
    if not job.webhook_url:
        return False
    if job.webhook_events is None:
        return event != JobEvent.STARTED
    return event in job.webhook_events


def job_event(session: Session, job: Job, data: dict[str, Any], event: JobEvent | None = None) -> str | None:
    """Add the delivery for a job that just finished (or `event`), if it has a webhook and wants it."""
    event = event or JobEvent.for_status(job.status)
    if event is None or not job.webhook_url or not wants_event(job, event):
        return None
    delivery = new_delivery(tenant_id=job.tenant_id, event_type=event, url=job.webhook_url, data=data,
                            job_id=job.id, batch_id=job.batch_id)
    session.add(delivery)
    return delivery.id


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    permanent: bool = False  # no point retrying (410, an address that is not allowed)

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def sign_headers(delivery_id: str, payload: str, secret: str, at: dt.datetime) -> dict[str, str]:
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(delivery_id, at, payload),
    }


def send(delivery_id: str, url: str, payload: str, secret: str, policy: FetchPolicy, timeout_s: float) -> Outcome:
    """One POST, no redirects followed, the same address rules as image fetching."""
    headers = {"Content-Type": "application/json", "User-Agent": "clipmask-webhooks/1",
               **sign_headers(delivery_id, payload, secret, utcnow())}
    try:
        pool, path = guarded_pool(url, policy)
    except ImageFetchFailed as exc:
        return Outcome(None, str(exc), permanent=True)
    # one deadline for the whole exchange: a receiver that answers a byte at a time is a failed
    # attempt when it passes, and the dispatcher's slot comes back
    with exchange_deadline(timeout_s) as exchange:
        try:
            resp = pool.urlopen("POST", path, body=payload.encode(), headers=headers, redirect=False, retries=False,
                                timeout=urllib3.Timeout(total=timeout_s), preload_content=False)
            try:
                resp.read(64 * 1024)  # drain a little; the body is not used
            finally:
                resp.release_conn()
            status = resp.status
            if exchange.expired:
                return Outcome(None, f"no whole answer within {timeout_s:g} s")
            if 200 <= status < 300:
                return Outcome(status, None)
            return Outcome(status, f"HTTP {status}", permanent=status == 410)
        except AddressRefused as exc:
            return Outcome(None, str(exc), permanent=True)
        except (urllib3.exceptions.HTTPError, OSError, ImageFetchFailed) as exc:
            if exchange.expired:
                return Outcome(None, f"no whole answer within {timeout_s:g} s")
            return Outcome(None, f"{type(exc).__name__}: {exc}"[:500])
        finally:
            pool.close()


@dataclass(frozen=True)
class Dispatcher:
    sessions: sessionmaker[Session]
    policy: FetchPolicy
    schedule_s: tuple[float, ...]  # delay before retry 1, 2, ...; attempts = 1 + len(schedule)
    timeout_s: float = 15.0
    max_parallel: int = 8
    # A claimed row is invisible to other dispatchers this long; after it, a dispatcher that died
    # mid-send (SIGKILL) is presumed gone and the row is sent again, with the same webhook-id.
    claim_s: float = 120.0

    def next_delay(self, attempts: int) -> float | None:
        """Seconds until the next attempt after `attempts` failed ones, or None when spent."""
        if attempts > len(self.schedule_s):
            return None
        return self.schedule_s[attempts - 1] * random.uniform(0.9, 1.1)

    def claim(self, *, ids: Iterable[str] | None = None, limit: int = 100) -> list[WebhookDelivery]:
        with session_scope(self.sessions) as session:
            due = select(WebhookDelivery.id).where(
                WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt_at <= func.now())
            if ids is not None:
                due = due.where(WebhookDelivery.id.in_(list(ids)))
            due = due.order_by(WebhookDelivery.next_attempt_at).limit(limit).with_for_update(skip_locked=True)
            rows = list(session.execute(
                update(WebhookDelivery).where(WebhookDelivery.id.in_(due.scalar_subquery()))
                .values(next_attempt_at=func.now() + dt.timedelta(seconds=self.claim_s))
                .returning(WebhookDelivery).execution_options(synchronize_session=False)
            ).scalars())
            session.expunge_all()
        return rows

    def dispatch(self, *, ids: Iterable[str] | None = None, limit: int = 100) -> int:
        """Send what is due (optionally only `ids`); returns how many were attempted."""
        rows = self.claim(ids=ids, limit=limit)
        if not rows:
            return 0
        with self.sessions() as session:
            secrets = dict(session.execute(
                select(Tenant.id, Tenant.webhook_secret).where(Tenant.id.in_({r.tenant_id for r in rows}))).all())
        def attempt(row: WebhookDelivery) -> tuple[WebhookDelivery, Outcome]:
            return row, send(row.id, row.url, row.payload, secrets[row.tenant_id], self.policy, self.timeout_s)

        # each outcome is recorded as soon as it is known: a slow endpoint (up to timeout_s) must not
        # hold back the record of the others, which would stay claimed, then be sent again
        with ThreadPoolExecutor(min(self.max_parallel, len(rows))) as pool:
            for future in as_completed([pool.submit(attempt, row) for row in rows]):
                row, outcome = future.result()
                with session_scope(self.sessions) as session:
                    self._record(session, row, outcome)
        return len(rows)

    def _record(self, session: Session, row: WebhookDelivery, outcome: Outcome) -> None:
        attempts = row.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_status_code": outcome.status_code,
                                  "last_error": outcome.error}
        ctx = {"delivery_id": row.id, "job_id": row.job_id, "batch_id": row.batch_id, "tenant_id": row.tenant_id,
               "status_code": outcome.status_code}
        delay = None if outcome.ok or outcome.permanent else self.next_delay(attempts)
        if outcome.ok:
            values.update(status=DeliveryStatus.SUCCEEDED, delivered_at=func.now(), next_attempt_at=None)
            log.info("webhook delivered (%s, attempt %d)", row.event_type, attempts, extra=ctx)
        elif delay is None:
            values.update(status=DeliveryStatus.FAILED, next_attempt_at=None)
            log.warning("webhook failed for good after %d attempts: %s", attempts, outcome.error, extra=ctx)
        else:
            values.update(next_attempt_at=func.now() + dt.timedelta(seconds=delay))
            log.info("webhook attempt %d failed (%s); next in %.0f s", attempts, outcome.error, delay, extra=ctx)
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == row.id).values(**values)
                        .execution_options(synchronize_session=False))


def dispatcher_from_settings(settings: Settings, sessions: sessionmaker[Session]) -> Dispatcher:
    return Dispatcher(sessions, policy_from_settings(settings), tuple(settings.webhook_retry_schedule_s),
                      timeout_s=settings.webhook_timeout_s, claim_s=settings.webhook_claim_s)


def retry_now(delivery: WebhookDelivery) -> None:
    """Make a delivery due now, whatever its state (a manual redelivery keeps its webhook-id)."""
    delivery.status = DeliveryStatus.PENDING
    delivery.next_attempt_at = utcnow()
