"""Bodies over the limit, sent by the Python clients users have, to the API under gunicorn as the
stack runs it: every one reads the 413 (before, urllib died of a broken pipe and requests/httpx
could too), and so is a 401 given before a large body was read."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import httpx
import pytest
import requests

from tests.support.services import ROOT, free_port, settings_env

BIG = 40 * 1024 * 1024  # the limit is 25 MiB


@pytest.fixture(scope="module")
def gunicorn_api(settings, storage, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("gunicorn") / "api.log", "wb")  # closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:api.gunicorn_conf", "--workers", "2",
                             "--bind", f"127.0.0.1:{port}", "api.wsgi:app"],
                            cwd=ROOT, env={**os.environ, **settings_env(settings)}, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(30)
    log.close()


def _urllib(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _requests(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    resp = requests.post(url, data=body, headers=headers, timeout=60)
    return resp.status_code, resp.json()


def _httpx(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    resp = httpx.post(url, content=body, headers=headers, timeout=60)
    return resp.status_code, resp.json()


@pytest.mark.parametrize("send", [_urllib, _requests, _httpx], ids=["urllib", "requests", "httpx"])
def test_every_python_client_reads_the_413(gunicorn_api, tenant, send):
    headers = {**tenant.headers, "Content-Type": "application/json"}
    body = b'{"prompts": ["a"], "image_base64": "' + b"A" * BIG + b'"}'
    status, problem = send(f"{gunicorn_api}/v1/jobs", body, headers)
    assert (status, problem["code"]) == (413, "payload_too_large")


def test_a_multipart_upload_over_the_limit_is_a_413_too(gunicorn_api, tenant):
    resp = requests.post(f"{gunicorn_api}/v1/jobs", headers=tenant.headers, timeout=60,
                         files={"image": ("big.jpg", io.BytesIO(b"\xff" * BIG), "image/jpeg")}, data={"prompts": "a"})
    assert resp.status_code == 413 and resp.json()["code"] == "payload_too_large"


def test_a_401_before_a_large_body_is_read_too(gunicorn_api):
    status, problem = _urllib(f"{gunicorn_api}/v1/jobs", b"{" + b" " * (10 * 1024 * 1024) + b"}",
                              {"Authorization": "Bearer nobody", "Content-Type": "application/json"})
    assert (status, problem["code"]) == (401, "unauthorized")


def test_the_next_request_on_the_same_server_is_served(gunicorn_api, tenant):
    resp = requests.post(f"{gunicorn_api}/v1/jobs", headers=tenant.headers, timeout=30,
                         json={"image_url": "https://example.com/a.jpg", "prompts": ["a"]})
    assert resp.status_code == 202
