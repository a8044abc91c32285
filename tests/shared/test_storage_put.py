"""ObjectStorage.put through obstore (the default where keys are set) and through boto3: the same
object either way, read back with boto3; an unreachable store is StorageFailed within the
settings' attempts, never a hang."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from shared.errors import StorageFailed
from shared.storage import ObjectStorage
from tests.support.services import free_port


def test_keys_set_means_obstore_and_no_keys_means_boto3(settings):
    assert ObjectStorage(settings).put_client == "obstore"
    assert ObjectStorage(settings.model_copy(update={"s3_put_client": "boto3"})).put_client == "boto3"
    no_keys = settings.model_copy(update={"s3_access_key_id": None, "s3_secret_access_key": None})
    assert ObjectStorage(no_keys).put_client == "boto3"  # obstore doesn't read ~/.aws: boto3's chain does


@pytest.mark.parametrize("client", ["obstore", "boto3"])
def test_either_client_writes_the_same_object(settings, storage, client):
    store = ObjectStorage(settings.model_copy(update={"s3_put_client": client}))
    key = f"test-put/{uuid.uuid4().hex}.png"
    data = os.urandom(50_000)
    store.put(key, data, content_type="image/png")
    head = storage._client.head_object(Bucket=storage.bucket, Key=key)
    assert head["ContentType"] == "image/png" and head["ContentLength"] == len(data)
    assert storage.get(key) == data
    store.put(key, b"again", content_type="image/png")  # an overwrite, as a rerun of a job does
    assert storage.get(key) == b"again"
    storage.delete([key])


def test_an_unreachable_store_is_storage_failed_soon(settings):
    dead = settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}", "s3_max_attempts": 2,
                                       "s3_connect_timeout_s": 1.0, "s3_read_timeout_s": 2.0})
    store = ObjectStorage(dead)
    assert store.put_client == "obstore"
    started = time.monotonic()
    with pytest.raises(StorageFailed, match="could not write"):
        store.put("k", b"x", content_type="image/png")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("client", ["obstore", "boto3"])
def test_a_bucket_that_is_not_there_is_storage_failed(settings, client):
    """What a store restarted empty answers (or a bucket deleted under the service): storage_failed,
    which the runner retries, not a job failed as `internal` (obstore raised FileNotFoundError)."""
    store = ObjectStorage(settings.model_copy(update={"s3_put_client": client,
                                                      "s3_bucket": f"missing-{uuid.uuid4().hex[:8]}"}))
    with pytest.raises(StorageFailed, match="could not write"):
        store.put("masks/x/0.png", b"\x89PNG", content_type="image/png")
