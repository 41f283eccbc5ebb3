"""Result stores: a local directory, OUTPUT_DIR/<job id>/<name>.png plus a manifest.jsonl per job, or a
bucket, PREFIX/<job id>/<name>.png and PREFIX/<job id>/manifest.jsonl.

Names are functions of the spec, so a retried item rewrites an identical file.
The local manifest gets a line only for a result the job store recorded for the
first time; S3 has no append, so a bucket's manifest is rewritten whole from the
results index (the record). A resumed job's manifest is rewritten from the index
too, so either lists every result exactly once whatever crashed where.

With a local store the workers hand PNGs to the scheduler, which writes them;
with S3 the workers put them into the bucket themselves (`target`) and the
scheduler records only names, sizes and digests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from renderfarm.actors import s3
from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.config_file import ConfigError
from renderfarm.spec import MANIFEST, AnySpec, manifest_line
from renderfarm.v1 import farm_pb2 as pb

# Objects one DeleteObjects call removes at most (S3's limit).
DELETE_BATCH = 1000


def _replace_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class LocalResultStore:
    # Workers return PNG bytes; the scheduler writes them (write), appending manifest lines as it goes.
    target = None
    rewrites_manifest = False

    def __init__(self, root: Path):
        self.root = Path(root)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def write(self, job_id: str, results: Iterable[tuple[AnySpec, bytes]]) -> None:
        """Stores each PNG atomically (temp file + rename) under its spec's file name."""
        directory = self.job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        for spec, png in results:
            _replace_atomically(directory / spec.file_name, png)

    def add_to_manifest(self, job_id: str, specs: Iterable[AnySpec]) -> None:
        """Appends a line for each newly recorded result (each stored under its spec's file name)."""
        with open(self.job_dir(job_id) / MANIFEST, "a", encoding="utf-8") as manifest:
            manifest.write("".join(manifest_line(spec.file_name, spec) for spec in specs))

    def rewrite_manifest(self, job_id: str, results: Iterable[tuple[str, AnySpec]]) -> None:
        directory = self.job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        text = "".join(manifest_line(name, spec) for name, spec in results)
        _replace_atomically(directory / MANIFEST, text.encode())

    def attach(self, job_id: str, result: pb.ImageResult) -> None:
        """Puts the PNG into a result event for a client."""
        result.png = (self.job_dir(job_id) / result.name).read_bytes()

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


class S3ResultStore:
    """A bucket, through boto3's standard chain (AWS_ENDPOINT_URL, AWS_* keys, instance roles)."""

    rewrites_manifest = True

    def __init__(self, url: str, presign_expiry_s: float):
        self.url = url
        self.bucket, self.prefix = s3.parse_s3_url(url)
        self.target = s3.S3Target(self.bucket)
        self._expiry_s = int(presign_expiry_s)

    def key(self, job_id: str, name: str) -> str:
        return "/".join(part for part in (self.prefix, job_id, name) if part)

    def check(self) -> None:
        """Fails the farm at start, naming the bucket, if the bucket is missing or the credentials are refused."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            s3.client().head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = s3.error_code(error)
            if code in s3.NO_BUCKET:
                why = f"the bucket {self.bucket!r} does not exist"
            elif code in s3.DENIED:
                why = (f"the store refused access to the bucket {self.bucket!r} ({code}): check the credentials "
                       "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or the instance role)")  # fmt: skip
            else:
                why = f"the bucket {self.bucket!r} cannot be used ({code or error})"
            raise ConfigError(f"output {self.url}: {why}") from None
        except BotoCoreError as error:
            raise ConfigError(f"output {self.url}: cannot reach the bucket {self.bucket!r}: {error}") from None

    def rewrite_manifest(self, job_id: str, results: Iterable[tuple[str, AnySpec]]) -> None:
        text = "".join(manifest_line(name, spec) for name, spec in results)
        s3.client().put_object(
            Bucket=self.bucket, Key=self.key(job_id, MANIFEST), Body=text.encode(), ContentType="application/jsonl"
        )

    def attach(self, job_id: str, result: pb.ImageResult) -> None:
        """Puts a presigned GET URL into a result event: the client fetches the PNG from the store itself."""
        result.url = s3.client().generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(job_id, result.name)}, ExpiresIn=self._expiry_s
        )

    def delete(self, job_id: str) -> None:
        client = s3.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key(job_id, "") + "/")
        keys = [entry["Key"] for page in pages for entry in page.get("Contents", [])]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + DELETE_BATCH]]
            client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


ResultStore = LocalResultStore | S3ResultStore


def result_store(config: FarmConfig) -> ResultStore:
    if config.output is not None:
        return S3ResultStore(config.output, config.presign_expiry_s)
    return LocalResultStore(config.output_dir)
