"""Operator commands: jobs list/retry, tenant list/disable, key create/revoke, retention.

Output is one JSON object per line, so it pipes into jq and scripts.

`jobs retry` submits a new job with the failed job's input (and its uploaded image) through the
same submission service as the API, so the tenant's queued-jobs cap applies. The contract's
state machine has no edge out of `failed`, so the original keeps its history and its id; the new
job's metadata is the original's. The new job is a single job, not part of the original's
batch: that batch's counts and manifest were final when it completed, and a job that joined it
afterwards would be counted nowhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.clock import isoformat, utcnow
from shared.db import make_engine, make_session_factory, session_scope
from shared.enums import JobStatus
from shared.errors import SubmissionRefused
from shared.settings import Settings
from shared.tables import Job, Tenant
from shared.tenants import tenants_changed


def sessions_for(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings.database_url, pool_size=1))


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str))


def jobs_list(args: argparse.Namespace, settings: Settings) -> int:
    query = select(Job).order_by(Job.created_at.desc()).limit(args.limit)
    if args.status:
        query = query.where(Job.status == args.status)
    if args.tenant:
        query = query.where(Job.tenant_id == args.tenant)
    with sessions_for(settings)() as session:
        for job in session.execute(query).scalars():
            _emit({"id": job.id, "tenant_id": job.tenant_id, "status": job.status,
                   "created_at": isoformat(job.created_at), "error": job.error,
                   "prompts": job.prompts, "input": job.input, "attempts": job.attempts})
    return 0


def jobs_retry(args: argparse.Namespace, settings: Settings) -> int:
    from shared.queue import make_celery
    from shared.storage import ObjectStorage
    from shared.submit import JobSpec, SubmitPolicy, Submitter

    if not args.job_id and not args.failed:
        print("give a job id or --failed", file=sys.stderr)
        return 2
    sessions = sessions_for(settings)
    query = select(Job).where(Job.status == JobStatus.FAILED)
    if args.job_id:
        query = query.where(Job.id == args.job_id)
    if args.tenant:
        query = query.where(Job.tenant_id == args.tenant)
    with sessions() as session:
        originals = session.execute(query.order_by(Job.created_at).limit(args.limit)).scalars().all()
    if args.job_id and not originals:
        print(f"job {args.job_id} does not exist or is not failed", file=sys.stderr)
        return 1
    storage = ObjectStorage(settings)
    submitter = Submitter(policy=SubmitPolicy.from_settings(settings), storage=storage, celery=make_celery(settings))
    refused = 0
    for old in originals:
        spec = JobSpec.again(old)
        with sessions() as session:
            tenant = session.get(Tenant, old.tenant_id)
            assert tenant is not None  # jobs are deleted with their tenant
            try:
                accepted = submitter.submit_job(session, tenant=tenant, spec=spec)
            except SubmissionRefused as exc:
                refused += 1
                _emit({"retried": old.id, "refused": exc.code, "message": exc.message, "tenant_id": old.tenant_id})
                continue
        _emit({"retried": old.id, "new_job_id": accepted.id, "tenant_id": old.tenant_id})
    return 1 if refused else 0


def tenant_list(args: argparse.Namespace, settings: Settings) -> int:
    with sessions_for(settings)() as session:
        for tenant in session.execute(select(Tenant).order_by(Tenant.created_at)).scalars():
            _emit({"tenant_id": tenant.id, "name": tenant.name, "created_at": isoformat(tenant.created_at),
                   "disabled_at": isoformat(tenant.disabled_at)})
    return 0


def tenant_disable(args: argparse.Namespace, settings: Settings) -> int:
    with session_scope(sessions_for(settings)) as session:
        changed = session.execute(
            update(Tenant).where(Tenant.id == args.tenant_id, Tenant.disabled_at.is_(None))
            .values(disabled_at=utcnow()).returning(Tenant.id)
        ).scalar_one_or_none()
    if not changed:
        print(f"no enabled tenant {args.tenant_id}", file=sys.stderr)
        return 1
    tenants_changed(settings)  # its keys answer 401 from the next request on, in every API process
    _emit({"tenant_id": args.tenant_id, "disabled": True})
    return 0


def tenant_limits(args: argparse.Namespace, settings: Settings) -> int:
    """Set a tenant's own limits; a negative value returns it to the deployment default.

    0 means 0 for the queued-jobs cap (nothing more is accepted) and "off" for the rate, as the
    deployment setting does; a burst of 0 could never admit a request, so it is refused.
    """
    if args.rate_limit_burst == 0:
        print("--burst must be at least 1 (or -1 for the default)", file=sys.stderr)
        return 2
    values: dict[str, float | int | None] = {}
    for field in ("rate_limit_per_s", "rate_limit_burst", "max_queued_jobs"):
        value = getattr(args, field)
        if value is not None:
            values[field] = None if value < 0 else value
    with session_scope(sessions_for(settings)) as session:
        tenant = session.get(Tenant, args.tenant_id)
        if tenant is None:
            print(f"no tenant {args.tenant_id}", file=sys.stderr)
            return 1
        for field, value in values.items():
            setattr(tenant, field, value)
        if args.no_input_buckets:
            tenant.input_buckets = None
        if args.input_buckets:
            tenant.input_buckets = sorted(set(tenant.input_buckets or []) | set(args.input_buckets))
        answer = {"tenant_id": tenant.id, "rate_limit_per_s": tenant.rate_limit_per_s,
                  "rate_limit_burst": tenant.rate_limit_burst, "max_queued_jobs": tenant.max_queued_jobs,
                  "input_buckets": tenant.input_buckets or [],
                  "defaults": {"rate_limit_per_s": settings.rate_limit_per_s,
                               "rate_limit_burst": settings.rate_limit_burst,
                               "max_queued_jobs": settings.max_queued_jobs}}
    tenants_changed(settings)  # the API processes read the new limits from their next request on
    _emit(answer)
    return 0


def key_create(args: argparse.Namespace, settings: Settings) -> int:
    from shared.tenants import create_api_key

    with session_scope(sessions_for(settings)) as session:
        if session.get(Tenant, args.tenant_id) is None:
            print(f"no tenant {args.tenant_id}", file=sys.stderr)
            return 1
        key = create_api_key(session, tenant_id=args.tenant_id)
    _emit({"tenant_id": args.tenant_id, "api_key": key})
    return 0


def key_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoke by the key itself or by its id (key_...); the key answers 401 from then on."""
    from shared.tenants import revoke_key

    with session_scope(sessions_for(settings)) as session:
        key = revoke_key(session, key=args.key)
        if key is None:
            print("no such active key", file=sys.stderr)
            return 1
        answer = {"key_id": key.id, "tenant_id": key.tenant_id, "revoked": True}
    tenants_changed(settings)
    _emit(answer)
    return 0


def tenant_update(args: argparse.Namespace, settings: Settings) -> int:
    """A tenant's share of the bulk lane: its weight (1 to 100; -1: the default, 1) and the cap on its
    items sent to workers and not finished (-1: no cap; 0 holds its batches back)."""
    if args.weight is not None and args.weight != -1 and not 1 <= args.weight <= 100:
        print("--weight is 1 to 100 (or -1 for the default, 1)", file=sys.stderr)
        return 2
    if args.max_running is not None and args.max_running < -1:
        print("--max-running is 0 or more (or -1 for no cap)", file=sys.stderr)
        return 2
    with session_scope(sessions_for(settings)) as session:
        tenant = session.get(Tenant, args.tenant_id)
        if tenant is None:
            print(f"no tenant {args.tenant_id}", file=sys.stderr)
            return 1
        if args.weight is not None:
            tenant.weight = None if args.weight == -1 else args.weight
        if args.max_running is not None:
            tenant.max_running = None if args.max_running == -1 else args.max_running
        answer = {"tenant_id": tenant.id, "weight": tenant.weight or 1, "max_running": tenant.max_running}
    _emit(answer)
    return 0


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    """The bulk lane's dispatcher in the foreground (for CLIPMASK_DISPATCHER=off deployments, or a
    standby beside the embedded ones): leads while it holds the lane's lock, until SIGTERM/SIGINT."""
    import signal
    import threading

    from shared.queue import make_celery
    from shared.scheduler import LeaderLock, dispatcher_from_settings, run

    engine = make_engine(settings.database_url, pool_size=1)
    dispatcher = dispatcher_from_settings(settings, sessions=make_session_factory(engine),
                                          celery=make_celery(settings))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(dispatcher, LeaderLock(engine, f"clipmask.dispatch:{settings.bulk_queue}"), stop=stop,
        interval_s=settings.dispatch_interval_s)
    return 0


def reconcile_now(args: argparse.Namespace, settings: Settings) -> int:
    from shared.queue import make_celery
    from shared.reconcile import reconcile_from_settings

    report = reconcile_from_settings(settings, sessions=sessions_for(settings), celery=make_celery(settings),
                                     queued_after_s=args.queued_after)
    _emit({"requeued_running": report.requeued_running, "reenqueued_queued": report.reenqueued_queued,
           "batches_finalized": report.batches})
    return 0


def retention(args: argparse.Namespace, settings: Settings) -> int:
    from shared.retention import purge_from_settings
    from shared.storage import ObjectStorage

    purged = purge_from_settings(settings, sessions=sessions_for(settings), storage=ObjectStorage(settings),
                                 days=args.days)
    _emit({"deleted_jobs": purged.jobs, "deleted_webhook_deliveries": purged.deliveries,
           "deleted_batches": purged.batches,
           "older_than_days": args.days if args.days is not None else settings.retention_days})
    return 0


def add_commands(sub: argparse._SubParsersAction, tenant_sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="inspect and retry jobs").add_subparsers(dest="jobs_command", required=True)
    listing = jobs.add_parser("list", help="newest first, one JSON object per line")
    listing.add_argument("--status", choices=[str(s) for s in JobStatus])
    listing.add_argument("--tenant")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=jobs_list)
    retry = jobs.add_parser("retry", help="resubmit a failed job (or all failed jobs) as new jobs")
    retry.add_argument("job_id", nargs="?")
    retry.add_argument("--failed", action="store_true", help="every failed job (bounded by --limit)")
    retry.add_argument("--tenant")
    retry.add_argument("--limit", type=int, default=1000)
    retry.set_defaults(func=jobs_retry)

    tenant_sub.add_parser("list", help="all tenants").set_defaults(func=tenant_list)
    disable = tenant_sub.add_parser("disable", help="refuse the tenant's keys from now on")
    disable.add_argument("tenant_id")
    disable.set_defaults(func=tenant_disable)
    limits = tenant_sub.add_parser("limits", help="set a tenant's rate limit and queued-jobs cap (-1: default)")
    limits.add_argument("tenant_id")
    limits.add_argument("--rate-limit", dest="rate_limit_per_s", type=float, help="requests per second, 0: none")
    limits.add_argument("--burst", dest="rate_limit_burst", type=int)
    limits.add_argument("--max-queued", dest="max_queued_jobs", type=int)
    limits.add_argument("--input-bucket", dest="input_buckets", action="append", metavar="BUCKET",
                        help="allow image_s3_uri from this bucket (repeat for more); none are allowed by default")
    limits.add_argument("--no-input-buckets", action="store_true", help="allow no bucket again (applied first)")
    limits.set_defaults(func=tenant_limits)

    keys = sub.add_parser("key", help="API keys").add_subparsers(dest="key_command", required=True)
    create = keys.add_parser("create", help="another key for a tenant (rotation)")
    create.add_argument("tenant_id")
    create.set_defaults(func=key_create)
    revoke = keys.add_parser("revoke", help="revoke a key, given in clear or by id (key_...)")
    revoke.add_argument("key")
    revoke.set_defaults(func=key_revoke)

    share = tenant_sub.add_parser("update", help="set a tenant's share of the bulk lane (fair share)")
    share.add_argument("tenant_id")
    share.add_argument("--weight", type=int, help="1 to 100: its share against other tenants' (-1: default 1)")
    share.add_argument("--max-running", type=int, help="at most this many of its items at workers at once "
                        "(-1: no cap)")
    share.set_defaults(func=tenant_update)

    feed = sub.add_parser("dispatch", help="run the bulk lane's dispatcher in the foreground")
    feed.set_defaults(func=dispatch)

    rec = sub.add_parser("reconcile", help="requeue jobs whose worker died or whose message was lost, now")
    rec.add_argument("--queued-after", type=float, help="seconds a job may stay queued before re-enqueueing")
    rec.set_defaults(func=reconcile_now)

    purge = sub.add_parser("retention", help="delete finished jobs older than the retention period now")
    purge.add_argument("--days", type=float)
    purge.set_defaults(func=retention)
