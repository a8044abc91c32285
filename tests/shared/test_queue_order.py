"""A search query's embed task is served before the jobs already waiting on its queue (real Redis,
kombu's list layout: producers LPUSH, workers BRPOP)."""

from __future__ import annotations

import json
import uuid

import redis

from shared.queue import EMBED_TASK, SEGMENT_TASK, enqueue_next, enqueue_segments, make_celery


def test_the_embed_task_jumps_the_queued_jobs(settings):
    app = make_celery(settings)
    queue = f"order-{uuid.uuid4().hex[:8]}"  # nobody consumes it
    client = redis.Redis.from_url(settings.redis_url)
    key = f"{settings.redis_key_prefix}{queue}"
    try:
        enqueue_segments(app, job_ids=[f"job-{i}" for i in range(50)], queue=queue)
        enqueue_next(app, task=EMBED_TASK, args=["reply-key", {"text": "red dress"}, 0.0], queue=queue)
        assert client.llen(key) == 51
        first = json.loads(client.brpop([key], timeout=1)[1])
        second = json.loads(client.brpop([key], timeout=1)[1])
    finally:
        client.delete(key)
        client.close()
    assert first["headers"]["task"] == EMBED_TASK and first["headers"]["argsrepr"].startswith("['reply-key'")
    assert second["headers"]["task"] == SEGMENT_TASK and second["headers"]["argsrepr"] == "['job-0']"
