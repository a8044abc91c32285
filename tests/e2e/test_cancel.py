"""Cancel stops the work: a job canceled while its image downloads is never decoded, segmented or
stored, and the worker says so in its log."""

from __future__ import annotations

import json
import threading
import time
from http.server import ThreadingHTTPServer

from tests.support.images import SlowImage


def test_cancel_mid_fetch_writes_no_mask_and_the_worker_logs_it(client, tenant, storage, worker):
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)  # about 2 s to send the image
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job = client.post("/v1/jobs", json={"image_url": f"http://127.0.0.1:{server.server_address[1]}/slow.jpg",
                                            "prompts": ["shirt", "pants"]}, headers=tenant.headers).get_json()
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).get_json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        canceled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
        assert canceled.status_code == 200 and canceled.get_json()["status"] == "canceled"

        deadline = time.monotonic() + 30
        logged = []
        while not logged:
            assert time.monotonic() < deadline, "the worker never said it stopped"
            lines = [json.loads(line) for line in worker.read_text().splitlines() if line.startswith("{")]
            logged = [line for line in lines if line.get("job_id") == job["id"] and "canceled" in line["msg"]]
            time.sleep(0.2)
        assert logged[0]["msg"] == "job canceled during the fetch; stopped before decoding"
        final = client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).get_json()
        assert final["status"] == "canceled" and final["image"] is None  # never decoded
        assert storage.list_keys(f"masks/{tenant.tenant_id}/{job['id']}/") == []
    finally:
        server.shutdown()
