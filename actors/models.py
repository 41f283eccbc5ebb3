"""Model references resolved to a local diffusers directory.

Only building a builtin imports torch and diffusers; an s3:// model is listed and downloaded through
boto3, and the other forms are checked from files alone.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from renderfarm.actors import builtin, s3

BUILTIN_PREFIX = "builtin:"
MODEL_INDEX = "model_index.json"
# Hugging Face's "org/name" form; a bare name would be too easily a mistyped local path.
HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
EXPECTED_FORMS = (
    f"expected {' or '.join(repr(BUILTIN_PREFIX + name) for name in builtin.BUILTIN_MODELS)}, "
    f"a local diffusers directory (one containing {MODEL_INDEX}), "
    "the id ('org/name') of a Hugging Face repo already in the local cache, "
    "or an s3://BUCKET/PREFIX/ holding a diffusers directory"
)
# S3's rule for bucket names; checked here because the name becomes a directory of the model cache.
S3_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Hex digits of the SHA-256 digests that name an s3 model's cache directories: 64 bits tell prefixes
# (and versions of one prefix) apart, and keep the paths short.
S3_DIGEST_CHARS = 16


class ModelNotFoundError(ValueError):
    """A model reference that names no usable local model."""


def resolve_model(ref: str, cache_dir: Path) -> Path:
    """The absolute diffusers directory that `ref` names.

    `ref` is "builtin:NAME" (built under `cache_dir` on first use), a local diffusers directory,
    the id of a Hugging Face repo in the local cache ("org/name"), or "s3://BUCKET/PREFIX/"
    (downloaded under `cache_dir`, again whenever its objects change).
    """
    if ref.startswith(BUILTIN_PREFIX):
        return _materialise_builtin(_builtin_name(ref), Path(cache_dir).expanduser().absolute())
    if s3.is_s3_url(ref):
        return _materialise_s3(ref, Path(cache_dir).expanduser().absolute())
    return _resolve_external(ref)


def silence_progress_bars() -> None:
    """Loading and saving components draws progress bars; on a farm they only garble the logs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def read_config(model_dir: Path, component: str) -> dict:
    """A component's config.json, e.g. read_config(model_dir, "vae")."""
    return _read_json(Path(model_dir) / component / "config.json")


def default_image_size(model_dir: Path) -> tuple[int, int]:
    """The model's native (width, height), from its config files alone."""
    unet_config = read_config(model_dir, "unet")
    vae_config = read_config(model_dir, "vae")
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    sample_size = unet_config["sample_size"]
    # diffusers allows a non-square sample size, given as (height, width).
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return width * vae_scale_factor, height * vae_scale_factor


def scheduler_class_name(model_dir: Path) -> str:
    """The class name of the model's own scheduler, e.g. "PNDMScheduler"."""
    return _read_json(Path(model_dir) / "scheduler" / "scheduler_config.json")["_class_name"]


def _builtin_name(ref: str) -> str:
    name = ref.removeprefix(BUILTIN_PREFIX)
    if name not in builtin.BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + known_name for known_name in builtin.BUILTIN_MODELS)
        raise ModelNotFoundError(f"Unknown builtin model {ref!r}; the builtins are: {known}.")
    return name


def _materialise_builtin(name: str, cache_dir: Path) -> Path:
    target = cache_dir / "builtin" / f"{name}-{builtin.BUILTIN_VERSION}"
    if (target / MODEL_INDEX).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename it into place: the rename is atomic, so a directory at
    # `target` is always complete, and processes building at the same time cannot mix their files.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    silence_progress_bars()
    try:
        builtin.BUILTIN_MODELS[name](staging)
        # mkdtemp makes the directory private; the cache is shared with the farm's other processes.
        staging.chmod(0o755)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its build into place first; builds are identical, so use it.
            if not (target / MODEL_INDEX).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _materialise_s3(ref: str, cache_dir: Path) -> Path:
    """cache_dir/s3/BUCKET/PREFIX_DIGEST/VERSION_DIGEST: the version is a digest of the objects' keys and
    ETags, so a directory, once there, always holds the same bytes, and changed objects make a new one.

    Every call LISTs the prefix to learn the current version. That is one round trip per 1,000 objects, and
    calls are rare: a replica resolves when it loads a model (not per batch), the scheduler once per model
    (model_info is cached), against the seconds that loading the weights takes.
    """
    try:
        bucket, prefix = s3.parse_s3_url(ref)
    except ValueError as error:
        raise ModelNotFoundError(str(error)) from None
    if not S3_BUCKET_NAME.fullmatch(bucket):
        raise ModelNotFoundError(
            f"{ref}: {bucket!r} is not an S3 bucket name (3 to 63 lowercase letters, digits, '.' or '-')"
        )
    files = _s3_model_files(ref, bucket, prefix)
    home = cache_dir / "s3" / bucket / _short_digest(prefix)
    target = home / _short_digest(json.dumps(sorted(files.values())))
    if target.is_dir():
        return target
    home.mkdir(parents=True, exist_ok=True)
    # One download per model cache: replicas starting together wait here for the first, then find its directory.
    with open(home / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            _download_s3_model(ref, bucket, files, home, target)
    # Older versions stay: a replica may still be loading one. Removing them is left to whoever owns the disk.
    return target


def _s3_model_files(ref: str, bucket: str, prefix: str) -> dict[PurePosixPath, tuple[str, str]]:
    """The model's files under the prefix, as relative path -> (key, ETag), from one paginated LIST."""
    listed_prefix = f"{prefix}/" if prefix else ""
    files = {}
    with _s3_errors(ref, bucket):
        for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=listed_prefix):
            for entry in page.get("Contents", []):
                key = entry["Key"]
                # Zero-byte "folder" objects, which S3 consoles create; the files below them make the folders.
                if key.endswith("/"):
                    continue
                path = PurePosixPath(key[len(listed_prefix) :])
                # A key is a path the download writes to: one out of the model's directory is refused outright.
                if path.is_absolute() or ".." in path.parts:
                    raise ModelNotFoundError(
                        f"{ref}: key {key!r} of bucket {bucket!r} leads out of the model's directory; "
                        "a model's keys must be relative paths under the prefix, without '..'"
                    )
                files[path] = (key, entry["ETag"])
    if PurePosixPath(MODEL_INDEX) not in files:
        raise ModelNotFoundError(
            f"{ref}: no {MODEL_INDEX} under prefix {listed_prefix!r} of bucket {bucket!r}, so it is not a "
            "diffusers pipeline; point at the pipeline's top directory (the one holding unet/, vae/, ...)."
        )
    return files


def _download_s3_model(
    ref: str, bucket: str, files: dict[PurePosixPath, tuple[str, str]], home: Path, target: Path
) -> None:
    # Downloaded beside the target and renamed into place, as builtins are built: a directory at `target` is
    # complete, and one that a killed process left half done is never taken for the model.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=home))
    try:
        with _s3_errors(ref, bucket):
            for path, (key, etag) in files.items():
                destination = staging / path
                destination.parent.mkdir(parents=True, exist_ok=True)
                # IfMatch: an object replaced since the LIST fails (PreconditionFailed, not the job's fault)
                # instead of filing its new bytes under the old version's name.
                body = s3.client().get_object(Bucket=bucket, Key=key, IfMatch=etag)["Body"]
                with body, open(destination, "wb") as file:
                    shutil.copyfileobj(body, file)
        # mkdtemp makes the directory private; the cache is shared with the farm's other processes.
        staging.chmod(0o755)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _s3_errors(ref: str, bucket: str):
    """A missing bucket or refused credentials as a ModelNotFoundError naming them; other S3 errors (throttling,
    an unreachable endpoint) are the farm's trouble, not the reference's, and pass unchanged."""
    from botocore.exceptions import ClientError

    try:
        yield
    except ClientError as error:
        code = s3.error_code(error)
        if code in s3.NO_BUCKET:
            raise ModelNotFoundError(f"{ref}: no bucket named {bucket!r}") from None
        if code in s3.DENIED:
            raise ModelNotFoundError(
                f"{ref}: the farm's S3 credentials may not read bucket {bucket!r} ({code})"
            ) from None
        raise


def _short_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:S3_DIGEST_CHARS]


def _resolve_external(ref: str) -> Path:
    local_path = Path(ref).expanduser()
    if ref.startswith((".", "~")) or local_path.is_absolute() or local_path.is_dir():
        return _local_model_dir(ref, local_path)
    if HF_REPO_ID.fullmatch(ref):
        return _cached_hf_snapshot(ref)
    raise ModelNotFoundError(f"Unrecognised model reference {ref!r}: {EXPECTED_FORMS}.")


def _local_model_dir(ref: str, path: Path) -> Path:
    if not path.is_dir():
        raise ModelNotFoundError(f"Model directory {ref!r} does not exist ({EXPECTED_FORMS}).")
    if not (path / MODEL_INDEX).is_file():
        raise ModelNotFoundError(
            f"Model directory {ref!r} has no {MODEL_INDEX}, so it is not a diffusers pipeline; "
            "point at the pipeline's top directory (the one holding unet/, vae/, ...)."
        )
    return path.resolve()


def _cached_hf_snapshot(repo_id: str) -> Path:
    # Imported here: the Hub client is only needed for this form of reference.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        # local_files_only: the farm never downloads; weights are fetched once, deliberately.
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as error:
        raise ModelNotFoundError(
            f"Model {repo_id!r} is not a local directory, and no complete snapshot of the Hugging Face repo "
            f"{repo_id!r} is in the local cache ({constants.HF_HUB_CACHE}). The farm never downloads: "
            f"fetch it once with `hf download {repo_id}`, or pass a local diffusers directory."
        ) from error
    if not (snapshot / MODEL_INDEX).is_file():
        raise ModelNotFoundError(
            f"Hugging Face repo {repo_id!r} is cached at {snapshot} but has no {MODEL_INDEX}, "
            "so it is not a diffusers pipeline."
        )
    return snapshot


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
