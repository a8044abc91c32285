"""Object storage over the S3 protocol (AWS, MinIO, moto's server), through boto3; single-object
PUTs through obstore where settings.s3_put_client allows (a fifth of boto3's CPU per PUT)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.errors import ImageFetchFailed, StorageFailed
from shared.settings import Settings

log = logging.getLogger(__name__)


def upload_key(*, tenant_id: str, job_id: str) -> str:
    return f"uploads/{tenant_id}/{job_id}"


def example_key(*, tenant_id: str, digest: str) -> str:
    """A base64 image prompt, stored once per tenant by content (a batch of 100,000 items sharing an
    example stores it once); kept while the tenant exists."""
    return f"examples/{tenant_id}/{digest}"


def examples_lock(tenant_id: str) -> str:
    """The advisory lock's name under which a tenant's examples are written (shared) or deleted
    (exclusive): shared/submit.py, shared/retention.py."""
    return f"clipmask.examples:{tenant_id}"


def job_prefix(*, tenant_id: str, job_id: str) -> str:
    """Where every output object of a job lives (masks and the rest)."""
    return f"masks/{tenant_id}/{job_id}/"


def mask_key(*, tenant_id: str, job_id: str, index: int) -> str:
    """Deterministic: a re-run of the same job overwrites the same objects."""
    return f"{job_prefix(tenant_id=tenant_id, job_id=job_id)}{index}.png"


def output_key(*, tenant_id: str, job_id: str, name: str) -> str:
    """A job's other outputs, as deterministic as its masks: `0.soft.png`, `0.cutout.png`,
    `label_map.png`, `overlay.jpg`."""
    return f"{job_prefix(tenant_id=tenant_id, job_id=job_id)}{name}"


def job_object_keys(results: list[dict[str, Any]] | None, output_keys: dict[str, str] | None) -> list[str]:
    """Every object a job's row points at (masks, soft maps, cutouts, label map, overlay)."""
    keys = [value for item in results or [] for name, value in item.items() if name.endswith("_key") and value]
    return keys + [key for key in (output_keys or {}).values() if key]


class ObjectStorage:
    """A bucket with put/get/delete/presign. Every failure surfaces as StorageFailed."""

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.presign_ttl_s = settings.presign_ttl_s
        self.result_url_ttl_s = settings.result_url_ttl_s
        self.max_get_bytes = max(settings.max_body_bytes, settings.max_fetch_bytes)
        common: dict[str, Any] = {
            "region_name": settings.s3_region,
            "aws_access_key_id": settings.s3_access_key_id,
            "aws_secret_access_key": settings.s3_secret_access_key,
        }
        config = Config(
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
            signature_version="s3v4",
            s3={"addressing_style": "path"},
        )
        self._client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config, **common)
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self._presigner = boto3.client("s3", endpoint_url=public, config=config, **common)
        # Readiness probes want a fast "no": one attempt, two-second timeouts.
        probe = config.merge(Config(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1}))
        self._probe = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=probe, **common)
        self.put_client = _put_client(settings)
        self._settings = settings
        self._fast: tuple[int, Callable[[str, bytes, str], None]] | None = None  # (pid, put) of this process
        self._fast_lock = threading.Lock()

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (start-up step)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise StorageFailed(f"cannot reach bucket {self.bucket}: {exc}") from exc
            self._client.create_bucket(Bucket=self.bucket)
        except BotoCoreError as exc:
            raise StorageFailed(f"object storage unreachable: {exc}") from exc

    def ping(self) -> None:
        """Raise StorageFailed unless the bucket answers within about two seconds."""
        try:
            self._probe.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageFailed(f"object storage not ready: {exc}") from exc

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        if self.put_client == "obstore":
            self._obstore_put()(key, data, content_type)
            return
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise StorageFailed(f"could not write {key}: {exc}") from exc

    def _obstore_put(self) -> Callable[[str, bytes, str], None]:
        """This process's obstore client, made on first use (a client made before a fork, in a
        preloading server, would carry the parent's runtime)."""
        with self._fast_lock:
            if self._fast is None or self._fast[0] != os.getpid():
                self._fast = (os.getpid(), _obstore_putter(self._settings))
            return self._fast[1]

    def put_stream(self, key: str, chunks: Iterable[bytes], *, content_type: str,
                   part_bytes: int = 8 << 20) -> int:
        """Write an object of any size from `chunks` holding one part (`part_bytes`, at least S3's 5 MiB)
        in memory at a time: a multipart upload, aborted on any error, or one PUT when it all fits in
        the first part. Returns the object's size."""
        part_bytes = max(part_bytes, 5 << 20)
        buf = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        total = 0
        try:
            for chunk in chunks:
                buf += chunk
                total += len(chunk)
                while len(buf) >= part_bytes:  # every full part goes, however large the chunk was
                    if upload_id is None:
                        upload_id = self._client.create_multipart_upload(
                            Bucket=self.bucket, Key=key, ContentType=content_type)["UploadId"]
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, bytes(buf[:part_bytes])))
                    del buf[:part_bytes]
            if upload_id is None:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(buf), ContentType=content_type)
                return total
            if buf:
                parts.append(self._upload_part(key, upload_id, len(parts) + 1, bytes(buf)))
            self._client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                   MultipartUpload={"Parts": parts})
            return total
        except BaseException as exc:
            if upload_id is not None:
                try:
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except (BotoCoreError, ClientError):
                    pass  # a lifecycle rule for incomplete uploads cleans up what this could not
            if isinstance(exc, BotoCoreError | ClientError):
                raise StorageFailed(f"could not write {key}: {exc}") from exc
            raise

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        answer = self._client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                          Body=data)
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def get(self, key: str) -> bytes:
        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=key)
            body = obj["Body"]
            data: bytes = body.read(self.max_get_bytes + 1)
            body.close()
        except (BotoCoreError, ClientError) as exc:
            raise StorageFailed(f"could not read {key}: {exc}") from exc
        if len(data) > self.max_get_bytes:
            raise StorageFailed(f"object {key} is larger than {self.max_get_bytes} bytes")
        return data

    def read_input(self, bucket: str, key: str, *, max_bytes: int) -> bytes:
        """An input image from any bucket this deployment's credentials reach (image_s3_uri). A missing
        object, a refused read or one over `max_bytes` is ImageFetchFailed (the job fails); storage
        that does not answer is StorageFailed (the job is retried)."""
        try:
            obj = self._client.get_object(Bucket=bucket, Key=key)
            body = obj["Body"]
            data: bytes = body.read(max_bytes + 1)
            body.close()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise ImageFetchFailed(f"could not read s3://{bucket}/{key}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StorageFailed(f"could not read s3://{bucket}/{key}: {exc}") from exc
        if len(data) > max_bytes:
            raise ImageFetchFailed(f"s3://{bucket}/{key} is larger than {max_bytes} bytes")
        return data

    def copy(self, source: str, target: str) -> None:
        try:
            self._client.copy_object(Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket, "Key": source})
        except (BotoCoreError, ClientError) as exc:
            raise StorageFailed(f"could not copy {source}: {exc}") from exc

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            try:
                self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )
            except (BotoCoreError, ClientError) as exc:
                raise StorageFailed(f"could not delete objects: {exc}") from exc

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def presign_get(self, key: str, *, long: bool = False) -> str:
        """A time-limited GET URL, signed for the public endpoint. Pure computation, no I/O.

        `long`: the result lifetime (webhook bodies and manifests, read long after they were made).
        """
        url: str = self._presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.result_url_ttl_s if long else self.presign_ttl_s,
        )
        return url


def _put_client(settings: Settings) -> str:
    if settings.s3_put_client != "auto":
        return settings.s3_put_client
    try:
        import obstore  # noqa: F401
    except ImportError:
        return "boto3"
    keys = settings.s3_access_key_id and settings.s3_secret_access_key
    return "obstore" if keys else "boto3"


def _obstore_putter(settings: Settings) -> Callable[[str, bytes, str], None]:
    """A PUT through obstore with the settings' endpoint, keys, timeouts and attempts; every
    failure is StorageFailed, as boto3's are."""
    import obstore
    from obstore.exceptions import BaseError
    from obstore.store import S3Store

    endpoint = settings.s3_endpoint_url
    where: dict[str, Any] = {"endpoint": endpoint} if endpoint else {}  # none: AWS, by region
    store = S3Store(
        settings.s3_bucket, region=settings.s3_region, access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key, virtual_hosted_style_request=False,
        **where,
        client_options={"allow_http": bool(endpoint and endpoint.startswith("http://")),
                        "connect_timeout": dt.timedelta(seconds=settings.s3_connect_timeout_s),
                        "timeout": dt.timedelta(seconds=settings.s3_read_timeout_s)},
        retry_config={"max_retries": max(0, settings.s3_max_attempts - 1),
                      "backoff": {"init_backoff": dt.timedelta(milliseconds=100),
                                  "max_backoff": dt.timedelta(seconds=2), "base": 2.0},
                      "retry_timeout": dt.timedelta(seconds=settings.s3_read_timeout_s)})

    def put(key: str, data: bytes, content_type: str) -> None:
        try:
            obstore.put(store, key, data, attributes={"Content-Type": content_type})
        # obstore raises its own errors, and Python's for some answers: FileNotFoundError for a
        # bucket that is not there (a store restarted empty), PermissionError for refused keys
        except (BaseError, OSError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise StorageFailed(f"could not write {key}: {first}") from exc

    return put
