"""Hostile inputs, one table: each case with the answer a client gets, against the real API and
a real worker process that refuses private networks. None may give a 5xx or kill the worker;
afterwards a normal job still succeeds on the same worker."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from api import create_app
from tests.support.api import wait_for_job
from tests.support.images import make_image
from tests.support.services import start_worker, stop_process

MIB = 1024 * 1024


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


class Hostile(BaseHTTPRequestHandler):
    """Misbehaving image servers, by path."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        path = self.path
        if path == "/ok.jpg":
            self._send(200, make_image(40, 30))
        elif path == "/drip":  # headers, then one byte a second
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(30):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(1)
        elif path == "/liar":  # promises 5000 bytes, sends 100, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(make_image(40, 30)[:100])
            self.close_connection = True
        elif path == "/huge-headers":
            self.send_response(200)
            self.send_header("X-Padding", "a" * 100_000)
            self.end_headers()
        elif path == "/many-headers":
            self.send_response(200)
            for i in range(500):
                self.send_header(f"X-H{i}", "v")
            self.end_headers()
        elif path == "/loop":
            self._redirect(f"http://127.0.0.1:{port}/loop")
        elif path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/iam/")
        elif path == "/to-redis":
            self._redirect("http://127.0.0.1:6379/")
        elif path == "/to-localhost":
            self._redirect(f"http://localhost:{port}/ok.jpg")
        elif path == "/html":
            self._send(200, b"<html><body>not an image</body></html>", "image/jpeg")
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, to: str) -> None:
        self.send_response(302)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Case:
    name: str
    send: Callable[[Any, dict[str, str], str], Any]  # (client, headers, hostile base URL) -> response
    status: int  # the HTTP answer
    code: str | None = None  # the problem's code (status >= 400)
    job: tuple[str, str | None] | None = None  # for 202: the job's final (status, error code)


def upload(data: bytes, filename: str = "image.jpg", content_type: str = "image/jpeg", **fields: Any):
    def send(client, headers, _base):
        form: dict[str, Any] = {"prompts": fields.pop("prompts", ["shirt"]), **fields}
        form["image"] = (io.BytesIO(data), filename, content_type)
        return client.post("/v1/jobs", data=form, headers=headers, content_type="multipart/form-data")
    return send


def as_json(body: Any):
    def send(client, headers, _base):
        return client.post("/v1/jobs", data=json.dumps(body), headers=headers, content_type="application/json")
    return send


def raw(data: bytes, content_type: str = "application/json"):
    def send(client, headers, _base):
        return client.post("/v1/jobs", data=data, headers=headers, content_type=content_type)
    return send


def url(target: str):
    def send(client, headers, base):
        return client.post("/v1/jobs", json={"image_url": target.format(base=base), "prompts": ["shirt"]},
                           headers=headers)
    return send


def fields(**extra: Any):
    return as_json({"image_url": "https://example.com/a.jpg", "prompts": ["shirt"], **extra})


BOMB = encode(Image.new("1", (20_000, 20_000)), "PNG")  # 400 megapixels in about 50 kB
JPEG = make_image(120, 90)


def corrupt_png() -> bytes:
    data = bytearray(encode(Image.new("RGB", (64, 48), (1, 2, 3)), "PNG"))
    data[data.find(b"IDAT") + 10] ^= 0xFF  # header intact, compressed pixels broken
    return bytes(data)


CORRUPT_PNG = corrupt_png()
FAILED_FETCH = ("failed", "image_fetch_failed")
OK = ("succeeded", None)

CASES = [
    # --- image bytes --------------------------------------------------------------------------
    Case("decompression bomb png", upload(BOMB, "bomb.png", "image/png"), 202, job=("failed", "image_too_large")),
    Case("truncated jpeg", upload(JPEG[: len(JPEG) // 2]), 202, job=("failed", "image_invalid")),
    Case("corrupt png data (bad IDAT)", upload(CORRUPT_PNG, "c.png", "image/png"), 202,
         job=("failed", "image_invalid")),
    Case("corrupt jpeg header", upload(JPEG[:20] + bytes(range(256)) * 8), 415, "unsupported_image_type"),
    Case("svg named .jpg", upload(b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>"),
         415, "unsupported_image_type"),
    Case("html named .jpg", upload(b"<!doctype html><html><script>alert(1)</script></html>"),
         415, "unsupported_image_type"),
    Case("zip named .png", upload(b"PK\x03\x04" + bytes(200), "x.png", "image/png"), 415, "unsupported_image_type"),
    Case("zero bytes", upload(b""), 422, "empty_image"),
    Case("upload over 25 MiB", upload(b"\xff\xd8\xff" + bytes(25 * MIB + 10)), 413, "payload_too_large"),
    Case("json body over 25 MiB", raw(b'{"image_base64": "' + b"A" * (25 * MIB + 10) + b'"}'),
         413, "payload_too_large"),
    Case("base64 garbage", as_json({"image_base64": "!!!not*base64$$", "prompts": ["a"]}),
         422, "invalid_image_base64"),
    Case("base64 of text", as_json({"image_base64": base64.b64encode(b"hello world").decode(), "prompts": ["a"]}),
         415, "unsupported_image_type"),
    # --- URLs and the servers behind them ------------------------------------------------------
    Case("url 127.0.0.1", url("http://127.0.0.1:6379/"), 202, job=FAILED_FETCH),
    Case("url 10.x", url("http://10.0.0.8/img.jpg"), 202, job=FAILED_FETCH),
    Case("url metadata 169.254.169.254", url("http://169.254.169.254/latest/meta-data/"), 202, job=FAILED_FETCH),
    Case("url [::1]", url("http://[::1]:80/a.jpg"), 202, job=FAILED_FETCH),
    Case("dns name resolving to loopback", url("http://localhost:5432/a.jpg"), 202, job=FAILED_FETCH),
    Case("redirect to metadata", url("{base}/to-metadata"), 202, job=FAILED_FETCH),
    Case("redirect to loopback redis", url("{base}/to-redis"), 202, job=FAILED_FETCH),
    Case("redirect to a name resolving to loopback", url("{base}/to-localhost"), 202, job=FAILED_FETCH),
    Case("redirect loop", url("{base}/loop"), 202, job=FAILED_FETCH),
    Case("server drips a byte a second", url("{base}/drip"), 202, job=FAILED_FETCH),
    Case("content-length that lies", url("{base}/liar"), 202, job=FAILED_FETCH),
    Case("huge response header", url("{base}/huge-headers"), 202, job=FAILED_FETCH),
    Case("500 response headers", url("{base}/many-headers"), 202, job=FAILED_FETCH),
    Case("html served as image/jpeg", url("{base}/html"), 202, job=("failed", "image_invalid")),
    Case("url 404", url("{base}/missing.jpg"), 202, job=FAILED_FETCH),
    Case("file:// url", fields(image_url="file:///etc/passwd"), 422, "invalid_image_url"),
    Case("gopher url", fields(image_url="gopher://127.0.0.1:6379/_FLUSHALL"), 422, "invalid_image_url"),
    # --- bodies and fields -----------------------------------------------------------------------
    Case("invalid utf-8 body", raw(b'{"prompts": ["\xff\xfe"]}'), 400, "malformed_json"),
    Case("malformed json", raw(b'{"prompts": ["a",'), 400, "malformed_json"),
    Case("json array body", raw(b'[{"image_url": "https://example.com/a.jpg"}]'), 400, "invalid_body"),
    Case("json string body", raw(b'"hello"'), 400, "invalid_body"),
    Case("json null body", raw(b"null"), 400, "invalid_body"),
    Case("deeply nested json", raw(b"[" * 100_000 + b"]" * 100_000), 400, "malformed_json"),
    Case("text/plain body", raw(b"image_url=x", "text/plain"), 415, "unsupported_media_type"),
    Case("10,000-character prompt", fields(prompts=["x" * 10_000]), 422, "invalid_prompts"),
    Case("1,000 prompts", fields(prompts=["shirt"] * 1000), 422, "invalid_prompts"),
    Case("prompts not a list", fields(prompts={"a": 1}), 422, "invalid_prompts"),
    Case("blank prompt", fields(prompts=["   "]), 422, "invalid_prompts"),
    Case("17 metadata pairs", fields(metadata={f"k{i}": "v" for i in range(17)}), 422, "invalid_metadata"),
    Case("nested metadata", fields(metadata={"a": {"b": {"c": "d"}}}), 422, "invalid_metadata"),
    Case("10 kB metadata value", fields(metadata={"a": "v" * 10_000}), 422, "invalid_metadata"),
    Case("threshold 0", fields(threshold=0), 422, "invalid_threshold"),
    Case("threshold 1.5", fields(threshold=1.5), 422, "invalid_threshold"),
    Case("threshold NaN string", fields(threshold="NaN"), 422, "invalid_threshold"),
    Case("unknown event name", fields(webhook_events=["job.exploded"]), 422, "invalid_webhook_events"),
    Case("webhook to file://", fields(webhook_url="file:///tmp/x"), 422, "invalid_webhook_url"),
    Case("unknown field", fields(is_admin=True), 422, "unknown_field"),
    # --- odd but valid images: they succeed -----------------------------------------------------
    Case("cmyk jpeg", upload(encode(Image.new("CMYK", (24, 16), (0, 255, 0, 0)), "JPEG")), 202, job=OK),
    Case("16-bit png", upload(encode(Image.fromarray(np.full((16, 24), 40000, dtype=np.uint16)), "PNG"),
                              "a.png", "image/png"), 202, job=OK),
    Case("palette png", upload(encode(Image.new("RGB", (24, 16), (9, 200, 30)).convert("P"), "PNG")), 202, job=OK),
    Case("rgba png", upload(encode(Image.new("RGBA", (24, 16), (255, 0, 0, 0)), "PNG")), 202, job=OK),
    Case("animated gif", upload(animated_gif(), "a.gif", "image/gif"), 202, job=OK),
    Case("webp", upload(encode(Image.new("RGB", (24, 16), (1, 2, 3)), "WEBP")), 202, job=OK),
    Case("1x1 png", upload(encode(Image.new("RGB", (1, 1)), "PNG")), 202, job=OK),
]


@pytest.fixture(scope="module")
def hostile_base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_hostile_inputs_get_their_answer_and_the_worker_survives(settings, make_tenant, hostile_base, tmp_path):
    assert len(CASES) >= 25
    hostile_endpoint = hostile_base.removeprefix("http://")
    strict = settings.model_copy(update={
        "allow_private_networks": False, "fetch_allow_endpoints": [hostile_endpoint],
        "interactive_queue": f"{settings.interactive_queue}-hostile", "worker_metrics_port": 0,
        "fetch_total_timeout_s": 3.0, "fetch_read_timeout_s": 2.0, "fetch_max_redirects": 4,
        "rate_limit_per_s": 0.0,
    })
    client = create_app(strict).test_client()
    tenant = make_tenant()
    worker = start_worker(strict, tmp_path / "worker.log", name=f"hostile-{uuid.uuid4().hex[:6]}")
    try:
        accepted: dict[str, tuple[Case, str]] = {}
        wrong: list[str] = []
        for case in CASES:
            resp = case.send(client, tenant.headers, hostile_base)
            body = resp.get_json(silent=True) or {}
            if resp.status_code != case.status or (case.code and body.get("code") != case.code):
                wrong.append(f"{case.name}: {resp.status_code} {body.get('code')} (want {case.status} {case.code})")
            elif resp.status_code >= 400:
                assert resp.mimetype == "application/problem+json", case.name
            elif case.job:
                accepted[body["id"]] = (case, body)
        for job_id, (case, _) in accepted.items():
            job = wait_for_job(client, tenant, job_id, timeout=60)
            got = (job["status"], (job["error"] or {}).get("code"))
            if got != case.job:
                wrong.append(f"{case.name}: job {got} (want {case.job}) {job['error']}")
            elif got == OK:
                for result in job["results"]:
                    mask = Image.open(io.BytesIO(requests.get(result["mask_url"], timeout=10).content))
                    assert (mask.width, mask.height) == (job["image"]["width"], job["image"]["height"]), case.name
                    assert mask.mode == "L"
        assert not wrong, "\n".join(wrong)

        assert worker.poll() is None, "the worker died"
        normal = client.post("/v1/jobs", json={"image_url": f"{hostile_base}/ok.jpg", "prompts": ["shirt", "pants"]},
                             headers=tenant.headers).get_json()
        done = wait_for_job(client, tenant, normal["id"], timeout=60)
        assert done["status"] == "succeeded" and len(done["results"]) == 2
    finally:
        stop_process(worker)
