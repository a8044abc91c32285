"""The reconciler's choices (pure: no services): when a queue may have lost messages, which jobs
to enqueue again, and how a message names its job."""

from __future__ import annotations

import json

import pytest

from shared.queue import SEGMENT_TASK, _task_message, segment_job_id
from shared.reconcile import QueueCheck, lost

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("queued", "held", "may_have_lost"), [
    (0, 0, False),  # nothing waits
    (2000, 2000, False),  # a backlog is not a loss: the flood came from treating it as one
    (2000, 3000, False),  # duplicates or messages of canceled jobs: nothing to add
    (2000, 0, True),  # the queue was deleted (FLUSHALL, a Redis restart without persistence)
    (2000, 1999, True),  # one message lost (the API died between commit and enqueue)
])
def test_a_queue_may_have_lost_messages_only_when_it_holds_fewer_than_wait(queued, held, may_have_lost):
    assert QueueCheck("bulk", queued, held).may_have_lost is may_have_lost


def test_only_stale_jobs_the_broker_does_not_hold_are_enqueued_again_in_their_order():
    assert lost(["a", "b", "c", "d"], held={"b", "d", "x"}) == ["a", "c"]
    assert lost(["a"], held={"a"}) == []


def test_the_job_id_is_read_from_the_message_the_api_pushes():
    message = json.loads(_task_message(SEGMENT_TASK, ["job-123"], "bulk", origin="test", reply_to="r"))
    assert message["headers"]["task"] == SEGMENT_TASK
    assert segment_job_id(message) == "job-123"


@pytest.mark.parametrize("message", [
    {}, {"headers": {"task": "clipmask.deliver_webhooks"}, "body": "W1tdLHt9XQ=="},
    {"headers": {"task": SEGMENT_TASK}, "body": "not base64 json", "properties": {"body_encoding": "base64"}},
    {"headers": {"task": SEGMENT_TASK}, "body": "[[], {}, {}]"},
])
def test_other_or_broken_messages_name_no_job(message):
    assert segment_job_id(message) is None
