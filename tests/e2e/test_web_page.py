"""The try-it page at GET /, in a real headless Chromium (Debian's `chromium`, driven by
Playwright) against the real API, worker, Postgres, Redis and S3 server.

Screenshots (before, during, after, bad key) go to docs/screenshots/, which the README shows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, Page, Route, sync_playwright

from api import create_app
from tests.support.images import make_image
from tests.support.services import ROOT, serving

SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page_url(settings, storage, worker):
    with serving(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: make install-browser"
    with sync_playwright() as p:
        # root in a container: Chromium's sandbox needs user namespaces it may not get
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def fresh_page(browser: Browser) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    complaints: list[str] = []  # CSP violations and script errors show up here
    page.on("console", lambda m: complaints.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: complaints.append(str(e)))
    return page, complaints


def rendered(page: Page, selector: str) -> bool:
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


def save_key(page: Page, key: str) -> None:
    page.fill("#key", key)
    page.click("#save-key")


def test_segmenting_a_photo_with_the_clothing_preset(browser, page_url, tenant, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "look.png"
    photo.write_bytes(make_image(240, 320, fmt="PNG"))
    page, complaints = fresh_page(browser)
    page.goto(page_url + "/")
    assert "clipmask" in page.title()
    save_key(page, tenant.api_key)
    assert "Key saved" in page.text_content("#key-state")
    page.wait_for_selector("#preset option[value=clothing]", state="attached")
    page.set_input_files("#file", str(photo))
    page.select_option("#preset", "clothing")
    page.screenshot(path=str(SHOTS / "1-before.png"), full_page=True)

    held: list[Route] = []  # hold the create until the "during" screenshot is taken
    page.route("**/v1/jobs", lambda route: held.append(route))
    page.click("#submit")
    page.wait_for_selector("#spinner", state="visible")
    page.wait_for_function("() => document.getElementById('status').textContent.length > 0")
    assert page.is_disabled("#submit")
    page.screenshot(path=str(SHOTS / "2-during.png"), full_page=True)
    page.wait_for_timeout(50)  # lets the held route reach its handler
    assert len(held) == 1
    held[0].continue_()

    page.wait_for_selector("#result-section", state="visible", timeout=60_000)
    assert "succeeded" in page.text_content("#status") and page.is_hidden("#spinner")
    cards = page.query_selector_all(".label-card")
    assert [c.get_attribute("data-label") for c in cards] == ["upper_body", "lower_body", "full_body"]
    page.wait_for_load_state("networkidle")
    assert rendered(page, "#overlay")
    for i in range(len(cards)):
        for img in (f".label-card:nth-child({i + 1}) img:nth-of-type(1)",
                    f".label-card:nth-child({i + 1}) img:nth-of-type(2)"):
            assert rendered(page, img), img
    page.screenshot(path=str(SHOTS / "3-after.png"), full_page=True)
    job_id = page.text_content("#status").split()[1].rstrip(":")
    job = requests.get(f"{page_url}/v1/jobs/{job_id}", headers=tenant.headers, timeout=10).json()
    boxes = page.query_selector_all("#instance-boxes rect")  # each instance's box drawn over the overlay
    assert len(boxes) == sum(len(r["instances"]) for r in job["results"]) > 0
    for box, (label, instance) in zip(boxes, [(r["prompt"], i) for r in job["results"] for i in r["instances"]],
                                      strict=True):
        x0, y0, x1, y1 = instance["bbox"]
        assert [box.get_attribute(k) for k in ("x", "y", "width", "height")] == [str(x0), str(y0), str(x1 - x0),
                                                                                  str(y1 - y0)]
        assert box.text_content() == f"{label} {instance['score']:.2f}"

    links = page.query_selector_all(".label-card a")
    assert [a.text_content() for a in links[:2]] == ["mask", "cutout"]
    got = requests.get(links[0].get_attribute("href"), timeout=10)
    assert got.status_code == 200 and got.content[:8] == b"\x89PNG\r\n\x1a\n"
    mask = tmp_path / "mask.png"
    mask.write_bytes(got.content)
    assert Image.open(mask).size == (240, 320)
    assert complaints == []


def test_a_bad_key_gets_a_plain_message(browser, page_url, tmp_path):
    page, complaints = fresh_page(browser)
    page.goto(page_url + "/")
    save_key(page, "cm_not-a-real-key")
    page.wait_for_selector("#problem", state="visible")
    assert "Your API key was not accepted" in page.text_content("#problem")
    photo = tmp_path / "x.png"
    photo.write_bytes(make_image(32, 32, fmt="PNG"))
    page.set_input_files("#file", str(photo))
    page.fill("#prompts", "shirt")
    page.click("#submit")
    page.wait_for_function("() => !document.getElementById('submit').disabled")
    assert "Your API key was not accepted" in page.text_content("#problem")
    assert page.is_hidden("#result-section")
    page.screenshot(path=str(SHOTS / "4-bad-key.png"), full_page=True)
    # the 401 answers are the only errors the browser reports: no CSP violation, no script error
    assert all("401" in c for c in complaints), complaints


def test_the_page_is_served_with_a_content_security_policy(page_url, settings):
    resp = requests.get(page_url + "/", timeout=10)
    csp = resp.headers["Content-Security-Policy"]
    assert resp.status_code == 200 and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert settings.s3_endpoint_url.rstrip("/") in csp  # masks are on the storage host
    assert requests.get(page_url + "/web/app.js", timeout=10).headers["Content-Type"].startswith("text/javascript")
    assert requests.get(page_url + "/web/secrets.txt", timeout=10).status_code == 404
