"""ObjectStorage.put_stream on the S3-protocol server: what batch manifests are written with."""

from __future__ import annotations

import hashlib
import uuid

import pytest


def chunks(total: int, size: int = 300_000):
    """Deterministic bytes in chunks that do not line up with the part size."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield hashlib.sha256(str(sent).encode()).digest() * (n // 32) + b"x" * (n % 32)
        sent += n


def test_a_stream_larger_than_a_part_is_one_multipart_object(storage):
    key = f"test-stream/{uuid.uuid4().hex}.jsonl"
    total = 12 * 2**20 + 12_345  # three 5 MiB parts, the last one short
    assert storage.put_stream(key, chunks(total), content_type="application/x-ndjson", part_bytes=5 << 20) == total
    head = storage._client.head_object(Bucket=storage.bucket, Key=key)
    assert head["ContentLength"] == total and head["ContentType"] == "application/x-ndjson"
    assert head["ETag"].strip('"').endswith("-3")  # S3's multipart ETag: three parts
    body = storage._client.get_object(Bucket=storage.bucket, Key=key)["Body"].read()
    assert body == b"".join(chunks(total))
    storage.delete([key])


def test_a_small_stream_is_one_put(storage):
    key = f"test-stream/{uuid.uuid4().hex}.jsonl"
    assert storage.put_stream(key, [b'{"a":1}\n', b'{"b":2}\n'], content_type="application/x-ndjson") == 16
    assert storage.get(key) == b'{"a":1}\n{"b":2}\n'
    assert "-" not in storage._client.head_object(Bucket=storage.bucket, Key=key)["ETag"]
    storage.delete([key])


def test_a_stream_that_fails_midway_leaves_no_object_and_no_open_upload(storage):
    key = f"test-stream/{uuid.uuid4().hex}.jsonl"

    def broken():
        yield from chunks(11 * 2**20)
        raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError):
        storage.put_stream(key, broken(), content_type="application/x-ndjson", part_bytes=5 << 20)
    assert storage.list_keys(key) == []
    uploads = storage._client.list_multipart_uploads(Bucket=storage.bucket, Prefix=key).get("Uploads", [])
    assert uploads == []


def test_chunks_larger_than_a_part_are_sent_as_whole_parts(storage):
    """A manifest chunk can exceed a part (200 job objects of 42 KB with every output): each full
    part is sent as soon as it is there, so memory holds one part and every part but the last is
    exactly the part size (a buffer that kept the surplus grew to a last part of hundreds of MiB)."""
    key = f"test-stream/{uuid.uuid4().hex}.jsonl"
    part = 5 << 20
    total = 3 * (12 << 20)
    assert storage.put_stream(key, chunks(total, size=12 << 20), content_type="application/x-ndjson",
                              part_bytes=part) == total
    head = storage._client.head_object(Bucket=storage.bucket, Key=key)
    count = int(head["ETag"].strip('"').rsplit("-", 1)[1])
    assert count == -(-total // part)  # 8 parts: 7 whole ones and the rest
    sizes = [storage._client.head_object(Bucket=storage.bucket, Key=key, PartNumber=n)["ContentLength"]
             for n in range(1, count + 1)]
    assert sizes[:-1] == [part] * (count - 1) and sum(sizes) == total
    assert storage._client.get_object(Bucket=storage.bucket, Key=key)["Body"].read() == b"".join(
        chunks(total, size=12 << 20))
    storage.delete([key])
