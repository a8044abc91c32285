"""Model families on the wire: which queues a base's jobs wait on, what each family refuses, and the
reconciler's queues per base (pure functions; the end-to-end runs are tests/e2e/test_model_families.py)."""

from __future__ import annotations

import pytest

from cli.remote import _boxes
from shared.families import CAPABILITIES, unsupported_fields
from shared.queue import base_queues, segment_queue
from shared.reconcile import queue_conditions
from shared.settings import Settings

pytestmark = pytest.mark.unit


def settings(**update: object) -> Settings:
    return Settings(_env_file=None, **{"model": "CIDAS/clipseg-rd64-refined", **update})  # type: ignore[call-arg, arg-type]


def test_the_default_base_keeps_the_plain_queues_and_another_gets_its_own():
    s = settings()
    assert base_queues(s, None) == base_queues(s, s.model) == (s.interactive_queue, s.bulk_queue)
    sam3 = base_queues(s, "facebook/sam3")
    assert sam3[0].startswith(f"{s.interactive_queue}.facebook-sam3-") and sam3[1].startswith(f"{s.bulk_queue}.")
    assert base_queues(s, "/models/sam3") != sam3  # the digest keeps similar names apart
    # a worker serving the extra base names the same queues as the API: it keeps the default base
    worker = settings(model="facebook/sam3", default_model="CIDAS/clipseg-rd64-refined")
    assert base_queues(worker, worker.model) == sam3
    assert base_queues(worker, "CIDAS/clipseg-rd64-refined") == (s.interactive_queue, s.bulk_queue)


def test_a_jobs_lane_picks_its_queue():
    s = settings()
    assert segment_queue(s, None) == s.interactive_queue and segment_queue(s, "batch_1") == s.bulk_queue
    assert segment_queue(s, None, "interactive.x") == "interactive.x"


def test_what_each_family_refuses():
    fields = {"image_prompts": True, "box_prompts": True, "embed": True}
    assert unsupported_fields("sam3", fields) == ["image_prompts", "embed"]
    assert unsupported_fields("clipseg", fields) == ["box_prompts"]
    assert unsupported_fields("sam3", {"image_prompts": False, "box_prompts": True, "embed": False}) == []
    assert {"instances"} <= set(CAPABILITIES["sam3"]) & set(CAPABILITIES["clipseg"])


def test_the_reconciler_checks_every_base_s_queues():
    s = settings()
    queues = queue_conditions(s, ["facebook/sam3"])
    assert set(queues) == {s.interactive_queue, s.bulk_queue, *base_queues(s, "facebook/sam3")}


def test_cli_box_prompts_group_by_label():
    assert _boxes(["a=1,2,30,40", "a=-5,5,9,9", "b=0,0,3,3"]) == [
        {"label": "a", "boxes": [[1, 2, 30, 40]], "negative_boxes": [[5, 5, 9, 9]]},
        {"label": "b", "boxes": [[0, 0, 3, 3]], "negative_boxes": []}]
    with pytest.raises(SystemExit):
        _boxes(["a=1,2,3"])
