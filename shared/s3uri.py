"""`image_s3_uri` inputs: s3://bucket/key, from buckets an operator allowed for the tenant."""

from __future__ import annotations

import re

BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MAX_KEY_BYTES = 1024


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; ValueError with a sentence for anything else."""
    if not uri.startswith("s3://"):
        raise ValueError("must look like s3://bucket/key")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"{bucket!r} is not a valid bucket name")
    if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise ValueError(f"the key must be 1 to {MAX_KEY_BYTES} bytes")
    return bucket, key


def input_refusal(bucket: str, key: str, *, tenant_id: str, allowed: list[str] | None,
                  own_bucket: str) -> str | None:
    """Why a tenant may not read s3://bucket/key, or None when it may.

    Only buckets the operator named for the tenant (clipmask tenant limits --input-bucket); none by
    default. The deployment's own bucket holds every tenant's uploads, masks and examples: even when
    an operator names it, a tenant reads only its own uploads there (`uploads/<tenant id>/...`), and
    no key with `.` or `..` segments (a server that normalises paths must not walk out of them)."""
    if bucket not in (allowed or []):
        return f"bucket {bucket!r} is not open to this tenant's jobs"
    if bucket == own_bucket:
        prefix = f"uploads/{tenant_id}/"
        if not key.startswith(prefix) or {".", ".."} & set(key.split("/")):
            return (f"in the deployment's own bucket {bucket!r} only this tenant's uploads "
                    f"({prefix}...) may be read")
    return None
