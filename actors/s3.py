"""Object storage through boto3: s3:// URLs, the client, and the worker side of the S3 result store.

Endpoint and credentials come from boto3's standard chain (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles): the same
for the scheduler and every worker, which the chart passes to all its pods.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass

SCHEME = "s3://"
# S3's error codes for a bucket that is not there, and for credentials that may not use it; the bare
# HTTP statuses are what HEAD requests (and some S3-compatible stores) give instead.
NO_BUCKET = {"NoSuchBucket", "404"}
DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def is_s3_url(text: str) -> bool:
    return text.startswith(SCHEME)


def parse_s3_url(url: str) -> tuple[str, str]:
    """"s3://bucket/some/prefix/" -> ("bucket", "some/prefix"); raises ValueError for one without a bucket."""
    if not is_s3_url(url):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket (s3://BUCKET/PREFIX)")
    return bucket, prefix.strip("/")


def error_code(error) -> str:
    """The S3 error code of a botocore ClientError."""
    return error.response.get("Error", {}).get("Code", "")


@functools.lru_cache(maxsize=1)
def client():
    """One client per process (boto3 clients are thread-safe), from the standard chain."""
    import boto3

    return boto3.client("s3")


@dataclass(frozen=True)
class S3Target:
    """Where workers put the PNGs they make: the scheduler then receives a StoredImage, never the bytes."""

    bucket: str


@dataclass(frozen=True)
class StoredImage:
    """A PNG a worker put into the bucket: what the scheduler records of it."""

    key: str
    size: int
    sha256: str


def put_png(target: S3Target, key: str, png: bytes) -> StoredImage:
    """One PUT: S3 makes the object visible whole or not at all (nothing to abort, unlike a multipart
    upload), and checks the bytes against their SHA-256 on arrival."""
    digest = hashlib.sha256(png).digest()
    client().put_object(
        Bucket=target.bucket,
        Key=key,
        Body=png,
        ContentType="image/png",
        ChecksumSHA256=base64.b64encode(digest).decode(),
    )
    return StoredImage(key=key, size=len(png), sha256=digest.hex())
