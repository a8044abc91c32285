"""`Prefer: wait` under load, against a running stack (`make bench-wait` starts a private one).

1. Baseline: p50/p99 of another tenant's plain `GET /v1/jobs/{id}` from --probe-clients threads,
   and of `GET /healthz`, nobody waiting.
2. --waiters clients of one tenant (its rate limit off) each ask `GET /v1/jobs/{id}` with
   `Prefer: wait=60` on a job of their own that can't finish meanwhile (its image server answers
   after --hold seconds, so the worker is stuck fetching). The API holds those under its caps
   (CLIPMASK_WAIT_MAX_PER_PROCESS, CLIPMASK_WAIT_MAX_PER_TENANT) and answers the rest at once,
   without Preference-Applied; the other tenant's GETs and /healthz are measured again meanwhile.
3. Every job is canceled (8 clients): how long after its cancel returned each held waiter got
   its answer (the NOTIFY path end to end), and whether every one came back 200 with `canceled`.

With --json the last line is one JSON object of every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.db import make_engine, make_session_factory, session_scope
from shared.settings import Settings
from shared.tables import Tenant
from shared.tenants import create_tenant

HOLD_S = [30.0]


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 180, 160)).save(buf, format="JPEG")
    return buf.getvalue()


IMAGE = jpeg()


class Slow(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(HOLD_S[0])
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, *args: object) -> None:
        pass


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


PROBE_TIMEOUT_S = 10.0


def plain_gets(base_url: str, headers: dict[str, str], path: str, clients: int, total: int) -> list[float]:
    """Latencies of `total` GETs of `path`; one that got no answer within PROBE_TIMEOUT_S counts as
    that long (the API had no thread for it), and the caller sees it in the p99."""
    latencies: list[float] = []
    lock = threading.Lock()

    def run(_: int) -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=PROBE_TIMEOUT_S) as http:
            for _ in range(total // clients):
                start = time.perf_counter()
                try:
                    assert http.get(path).status_code == 200
                except httpx.TimeoutException:
                    pass
                with lock:
                    latencies.append(time.perf_counter() - start)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    return latencies


def figures(label: str, values: list[float]) -> str:
    timed_out = sum(1 for v in values if v >= PROBE_TIMEOUT_S)
    return (f"{label:<34} p50 {pct(values, 50) * 1000:6.1f} ms  p99 {pct(values, 99) * 1000:6.1f} ms"
            + (f"  ({timed_out} of {len(values)} unanswered in {PROBE_TIMEOUT_S:g} s)" if timed_out else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--waiters", type=int, default=200)
    parser.add_argument("--probe-clients", type=int, default=4)
    parser.add_argument("--probes", type=int, default=800, help="plain GETs per measurement")
    parser.add_argument("--hold", type=float, default=45.0, help="seconds the image server holds each fetch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    HOLD_S[0] = args.hold

    port = int(os.environ.get("CLIPMASK_BENCH_IMAGE_PORT", "18199"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    settings = Settings()
    sessions = make_session_factory(make_engine(settings.database_url, pool_size=2))
    with session_scope(sessions) as session:
        tenant, other = create_tenant(session, name="bench-wait"), create_tenant(session, name="bench-other")
        row = session.get(Tenant, tenant.tenant_id)
        row.rate_limit_per_s, row.max_queued_jobs = 0.0, 1_000_000
        session.get(Tenant, other.tenant_id).rate_limit_per_s = 0.0  # (the probes' own pace)
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    probe_headers = {"Authorization": f"Bearer {other.api_key}"}
    http = httpx.Client(base_url=args.base_url, headers=headers, timeout=120)
    body = {"image_url": f"http://127.0.0.1:{port}/slow.jpg", "prompts": ["shirt"]}

    probe_job = httpx.post(f"{args.base_url}/v1/jobs", json=body, headers=probe_headers).json()["id"]
    httpx.post(f"{args.base_url}/v1/jobs/{probe_job}/cancel", headers=probe_headers)
    probe = f"/v1/jobs/{probe_job}"
    print(f"waiters={args.waiters} (one tenant) probes={args.probes} probe_clients={args.probe_clients} "
          "(another tenant)", flush=True)
    plain_gets(args.base_url, probe_headers, probe, args.probe_clients, args.probes // 4)  # warm-up
    quiet = plain_gets(args.base_url, probe_headers, probe, args.probe_clients, args.probes)
    quiet_health = plain_gets(args.base_url, {}, "/healthz", args.probe_clients, args.probes)
    print(figures("other tenant's GET, nobody waiting:", quiet), flush=True)
    print(figures("/healthz, nobody waiting:", quiet_health), flush=True)

    job_ids = [http.post("/v1/jobs", json=body).json()["id"] for _ in range(args.waiters)]
    answered: dict[str, tuple[float, int, str, bool]] = {}
    lock = threading.Lock()

    def wait(job_id: str) -> None:
        with httpx.Client(base_url=args.base_url, headers=headers, timeout=120) as own:
            resp = own.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=60"})
            with lock:
                answered[job_id] = (time.monotonic(), resp.status_code, resp.json().get("status", "?"),
                                    "Preference-Applied" in resp.headers)

    threads = [threading.Thread(target=wait, args=(job_id,), daemon=True) for job_id in job_ids]
    for t in threads:
        t.start()
    time.sleep(3.0)  # every waiter connected: held, or answered at once past the caps
    early = len(answered)
    at_once = sum(1 for _, code, status, applied in answered.values() if code == 200 and not applied)
    busy = plain_gets(args.base_url, probe_headers, probe, args.probe_clients, args.probes)
    busy_health = plain_gets(args.base_url, {}, "/healthz", args.probe_clients, args.probes)
    still_waiting = args.waiters - len(answered)
    print(f"{still_waiting} held waiting, {at_once} answered at once past the caps", flush=True)
    print(figures(f"other tenant's GET, {still_waiting} waiting:", busy), flush=True)
    print(figures(f"/healthz, {still_waiting} waiting:", busy_health), flush=True)

    canceled_at: dict[str, float] = {}

    def cancel(job_id: str) -> None:
        with httpx.Client(base_url=args.base_url, headers=headers, timeout=60) as own:
            code = own.post(f"/v1/jobs/{job_id}/cancel").status_code
            assert code in (200, 409), code  # 409: it failed first (its fetch timed out)
            if code == 200:
                canceled_at[job_id] = time.monotonic()  # the cancel committed (its NOTIFY sent) by now

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(cancel, job_ids))
    for t in threads:
        t.join(timeout=90)
    held = [j for j in job_ids if j in answered and answered[j][3]]
    wake = [max(0.0, answered[j][0] - canceled_at[j]) for j in held if j in canceled_at] or [0.0]
    ok = sum(1 for j in held if answered[j][1] == 200 and answered[j][2] in ("canceled", "failed"))
    print(f"after canceling all {args.waiters}: {ok} of {len(held)} held waiters answered 200 final "
          f"({early} answered before the cancel); a held waiter's answer after its cancel returned: "
          f"p50 {pct(wake, 50) * 1000:.0f} ms, p99 {pct(wake, 99) * 1000:.0f} ms, last {max(wake) * 1000:.0f} ms",
          flush=True)
    report = {
        "waiters": args.waiters, "held_during_probe": still_waiting, "answered_at_once": at_once,
        "other_get_p50_ms_idle": pct(quiet, 50) * 1000, "other_get_p99_ms_idle": pct(quiet, 99) * 1000,
        "other_get_p50_ms_waiting": pct(busy, 50) * 1000, "other_get_p99_ms_waiting": pct(busy, 99) * 1000,
        "healthz_p99_ms_idle": pct(quiet_health, 99) * 1000, "healthz_p99_ms_waiting": pct(busy_health, 99) * 1000,
        "answered_canceled": ok, "answered_before_cancel": early,
        "wake_p50_ms": pct(wake, 50) * 1000, "wake_p99_ms": pct(wake, 99) * 1000,
    }
    if args.json:
        print(json.dumps(report))
    server.shutdown()
    every_answer_200 = all(code == 200 for _, code, _, _ in answered.values()) and len(answered) == args.waiters
    return 0 if ok == len(held) and every_answer_200 else 1


if __name__ == "__main__":
    sys.exit(main())
