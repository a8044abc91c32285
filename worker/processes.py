"""A GPU host's worker layout: CLIPMASK_WORKER_PROCESSES Celery worker processes, supervised.

    python -m worker.processes [--name celery] -- -Q interactive,bulk,events --concurrency 16 -E
    python -m worker.processes --ping          # exit 0 when every process of this host answers

One Python process does a job's host side (fetch, decode, encode, PUTs, commits) on one core at
a time: about 50 mask-only jobs/s of a core here (bench/README.md), where a GPU serves about 1,000.
So a GPU host runs N processes, each `celery worker --pool threads` with its own engine (model
copy) on the same device, taking ids from the same queues; the queue spreads the jobs. How to
size N from the cores is in README "A GPU worker's layout".

Process i (1-based) is named `<name>-<i>@<host>` (N = 1: `<name>@<host>`, as before) and serves
its metrics on CLIPMASK_WORKER_METRICS_PORT + i - 1. A process that exits (a crash, the kernel's
OOM killer) is started again after a backoff (1 s, doubling to 30 s; reset once it has run a
minute); its jobs come back through their leases. SIGTERM or SIGINT is passed to every process
(Celery's warm shutdown: running jobs finish) and the supervisor exits when all have.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from shared.logs import configure_logging
from shared.settings import Settings

log = logging.getLogger("worker.processes")

BACKOFF_S, MAX_BACKOFF_S, STEADY_S = 1.0, 30.0, 60.0


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux), so no
    worker process outlives it unsupervised."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def node_names(name: str, processes: int, host: str) -> list[str]:
    if processes == 1:
        return [f"{name}@{host}"]
    return [f"{name}-{i}@{host}" for i in range(1, processes + 1)]


@dataclass
class Child:
    index: int  # 1-based
    command: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_S
    due: float = 0.0  # when it may start again

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, env=self.env, preexec_fn=_die_with_parent)
        self.started = time.monotonic()
        log.info("worker process %d started (pid %d)", self.index, self.proc.pid)


def children(settings: Settings, name: str, celery_args: list[str]) -> list[Child]:
    out = []
    for index, node in enumerate(node_names(name, settings.worker_processes, "%h"), start=1):
        env = dict(os.environ)
        if settings.worker_metrics_port:
            env["CLIPMASK_WORKER_METRICS_PORT"] = str(settings.worker_metrics_port + index - 1)
        command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "threads",
                   "-n", node, *celery_args]
        out.append(Child(index, command, env))
    return out


def supervise(kids: list[Child], *, grace_s: float = 120.0) -> int:
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        if not stopping:
            log.info("signal %d: stopping %d worker processes (warm shutdown)", signum, len(kids))
        stopping.append(signum)
        for kid in kids:
            if kid.proc is not None and kid.proc.poll() is None:
                kid.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for kid in kids:
        kid.start()
    while not stopping:
        now = time.monotonic()
        for kid in kids:
            if kid.proc is None:
                if now >= kid.due and not stopping:
                    kid.start()
                continue
            code = kid.proc.poll()
            if code is None:
                if now - kid.started > STEADY_S:
                    kid.backoff = BACKOFF_S
                continue
            log.warning("worker process %d (pid %d) exited with %s; starting it again in %.0f s",
                        kid.index, kid.proc.pid, code, kid.backoff)
            kid.proc, kid.due = None, now + kid.backoff
            kid.backoff = min(kid.backoff * 2, MAX_BACKOFF_S)
        time.sleep(0.2)
    deadline = time.monotonic() + grace_s
    for kid in kids:
        if kid.proc is None:
            continue
        try:
            kid.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker process %d outstayed the %.0f s grace; killed", kid.index, grace_s)
            kid.proc.kill()
            kid.proc.wait()
    log.info("all worker processes stopped")
    return 0


def ping(settings: Settings, name: str, timeout: float) -> int:
    """Every process of this host answers Celery's ping (the container's health check)."""
    from shared.queue import make_celery

    names = node_names(name, settings.worker_processes, socket.gethostname())
    replies = make_celery(settings).control.ping(destination=names, timeout=timeout)
    answered = {node for reply in replies for node in reply}
    missing = sorted(set(names) - answered)
    if missing:
        print(f"no answer from {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"{len(names)} worker processes answered")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="celery", help="node name stem (default celery)")
    parser.add_argument("--ping", action="store_true", help="check that every process of this host answers")
    parser.add_argument("--timeout", type=float, default=10.0, help="--ping: seconds to wait for answers")
    parser.add_argument("celery_args", nargs=argparse.REMAINDER, help="after --: options for `celery worker`")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    if args.ping:
        return ping(settings, args.name, args.timeout)
    celery_args = args.celery_args[1:] if args.celery_args[:1] == ["--"] else args.celery_args
    if any(arg in ("-n", "--hostname") or arg.startswith("--hostname=") for arg in celery_args):
        parser.error("the node names are the supervisor's (--name); leave -n/--hostname out")
    log.info("starting %d worker processes", settings.worker_processes)
    return supervise(children(settings, args.name, celery_args))


if __name__ == "__main__":
    sys.exit(main())
