"""What happens after a commit that finished jobs: the one place that decides it.

A finishing transition returns its effects (`shared.jobs.Finished`); callers commit, collect
them with `Effects.of(...)` and call `after_commit`, which sends the new webhook deliveries now
and asks for `finalize` of each batch that has no unfinished job left.

Whether a batch is done is decided here, after the commit, on purpose: two workers finishing a
batch's last two jobs in concurrent transactions would each still see the other's job as
unfinished before committing, and neither would finalize. Best effort: if Redis is down, the
periodic dispatcher and the reconciler do it later (the tables are the truth).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from shared.batches import has_unfinished
from shared.jobs import Finished
from shared.queue import DELIVER_TASK, FINALIZE_TASK, RETRY_POLICY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Effects:
    delivery_ids: tuple[str, ...] = ()
    batch_ids: tuple[str, ...] = ()  # batches whose last job may have just finished

    @classmethod
    def of(cls, finished: Iterable[Finished | None] = (), *, delivery_ids: Iterable[str] = (),
           batch_ids: Iterable[str] = ()) -> Effects:
        done = [f for f in finished if f is not None]
        deliveries = [*delivery_ids, *(d for f in done for d in f.delivery_ids)]
        batches = dict.fromkeys([*batch_ids, *(f.batch_id for f in done if f.batch_id)])
        return cls(tuple(deliveries), tuple(batches))

    def __bool__(self) -> bool:
        return bool(self.delivery_ids or self.batch_ids)


def after_commit(app: Celery, sessions: sessionmaker[Session], effects: Effects) -> None:
    """Send the deliveries now and ask for finalize of each batch with nothing left to run."""
    if not effects:
        return
    try:
        if effects.delivery_ids:
            app.send_task(DELIVER_TASK, args=[list(effects.delivery_ids)], retry=True, retry_policy=RETRY_POLICY)
        for batch_id in effects.batch_ids:
            with sessions() as session:
                done = not has_unfinished(session, batch_id)
            if done:
                app.send_task(FINALIZE_TASK, args=[batch_id], retry=True, retry_policy=RETRY_POLICY)
    except Exception as exc:  # noqa: BLE001 - the table is the truth; the sweeps catch up
        log.warning("could not enqueue follow-up work: %s", exc, extra={"batch_ids": list(effects.batch_ids)})
