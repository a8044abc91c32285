"""gunicorn settings: `gunicorn -c python:api.gunicorn_conf api.wsgi:app`.

With PROMETHEUS_MULTIPROC_DIR set, each worker process writes its metrics to files there and
/metrics merges them; a dead worker's live gauges are dropped here.
"""

from __future__ import annotations

from typing import Any

# gunicorn answers request lines over 4,094 bytes with its own HTML 414 (the fuzzer found it);
# 0 lets lines up to 1 MiB through, and the app answers those over MAX_URI_BYTES with a problem.
limit_request_line = 0


def child_exit(server: object, worker: Any) -> None:
    import os

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
