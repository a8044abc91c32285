"""gunicorn settings: `gunicorn -c python:api.gunicorn_conf api.wsgi:app`.

With PROMETHEUS_MULTIPROC_DIR set, each worker process writes its metrics to files there and
/metrics merges them; a dead worker's live gauges are dropped here.
"""

from __future__ import annotations

import os
from typing import Any

# gthread: a request waiting with `Prefer: wait` sleeps in one of a worker's threads without CPU or
# a database connection (api/waiting.py), and idle keep-alive connections wait in the worker's
# poller, not in threads. Sync workers would be pinned by each waiting request (and killed at
# `timeout`); gthread's heartbeat comes from the main thread, so a 60 s wait is not a stuck worker.
worker_class = "gthread"
threads = int(os.environ.get("CLIPMASK_API_THREADS", "128"))
workers = int(os.environ.get("CLIPMASK_API_WORKERS", "2"))

# gunicorn answers request lines over 4,094 bytes with its own HTML 414 (the fuzzer found it);
# 0 lets lines up to 1 MiB through, and the app answers those over MAX_URI_BYTES with a problem.
limit_request_line = 0


def child_exit(server: object, worker: Any) -> None:
    import os

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
