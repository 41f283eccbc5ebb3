"""Model references resolved to a local diffusers directory.

Only building a builtin imports torch and diffusers; the other forms are checked from files alone.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from renderfarm.actors import builtin

BUILTIN_PREFIX = "builtin:"
MODEL_INDEX = "model_index.json"
# Hugging Face's "org/name" form; a bare name would be too easily a mistyped local path.
HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
EXPECTED_FORMS = (
    f"expected {' or '.join(repr(BUILTIN_PREFIX + name) for name in builtin.BUILTIN_MODELS)}, "
    f"a local diffusers directory (one containing {MODEL_INDEX}), "
    "or the id ('org/name') of a Hugging Face repo already in the local cache"
)


class ModelNotFoundError(ValueError):
    """A model reference that names no usable local model."""


def resolve_model(ref: str, cache_dir: Path) -> Path:
    """The absolute diffusers directory that `ref` names.

    `ref` is "builtin:NAME" (built under `cache_dir` on first use), a local diffusers directory,
    or the id of a Hugging Face repo in the local cache ("org/name").
    """
    if ref.startswith(BUILTIN_PREFIX):
        return _materialise_builtin(_builtin_name(ref), Path(cache_dir).expanduser().absolute())
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
