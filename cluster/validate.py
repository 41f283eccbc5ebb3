"""Field checks shared by the job kinds: each raises InvalidJobError naming the field.

Nothing is created before a request's validation passes, so a bad request leaves no trace.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable

import PIL.Image

from renderfarm.cluster.config import LimitsConfig
from renderfarm.cluster.constants import MAX_MODEL_REF_CHARS, SAFE_ID_PATTERN
from renderfarm.cluster.model_info import ModelInfo
from renderfarm.errors import InvalidJobError

ModelLookup = Callable[[str], ModelInfo]
SAFE_ID = re.compile(SAFE_ID_PATTERN)


def invalid(field: str, message: str) -> InvalidJobError:
    return InvalidJobError(f"{field}: {message}", field=field)


def check_id(field: str, value: str) -> None:
    if not SAFE_ID.fullmatch(value):
        raise invalid(field, f"must be 1 to 64 letters, digits, '_' or '-' (got {value[:80]!r})")


def model(field: str, model: str, model_info: ModelLookup, pipelines: tuple[str, ...] | None = None) -> ModelInfo:
    """The model's info; with `pipelines`, the model must be one of those diffusers pipeline classes."""
    if not model:
        raise invalid(field, "must name a model, e.g. builtin:tiny-sd")
    _reference(field, model)
    try:
        info = model_info(model)
    except ValueError as error:
        raise invalid(field, str(error)) from None
    if pipelines is not None and info.pipeline not in pipelines:
        raise invalid(field, f"{model} is a {info.pipeline}; this takes a {' or '.join(pipelines)}")
    return info


def file_path(field: str, path: str) -> str:
    """A file the farm's workers read (a LoRA), absolute: relative to the scheduler's working directory."""
    if not path:
        raise invalid(field, "must name a file")
    _reference(field, path)
    return os.path.abspath(os.path.expanduser(path))


def _reference(field: str, reference: str) -> None:
    if len(reference) > MAX_MODEL_REF_CHARS:
        raise invalid(field, f"{len(reference)} characters is over the limit of {MAX_MODEL_REF_CHARS}")
    # A reference names a file or directory itself, never a way out of one: refused before any file is looked at.
    if ".." in re.split(r"[/:]", reference) or "\\" in reference or any(ord(c) < 32 for c in reference):
        raise invalid(field, "must not hold '..' path segments, backslashes or control characters")


def given(message, field: str):
    """An optional field's value, or None where it is unset."""
    return getattr(message, field) if message.HasField(field) else None


def image_size(field: str, data: bytes) -> tuple[int, int]:
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.verify()
            return image.size
    except Exception as error:  # Pillow raises many types for a malformed image
        raise invalid(field, f"is not an image Pillow can read ({error})") from None


def guidance_scale(field: str, value: float) -> float:
    """A finite scale >= 0, with -0.0 as 0.0: both render alike, so the spec, the file name and the
    `parameters` chunk must not tell them apart."""
    if not math.isfinite(value) or value < 0:
        raise invalid(field, f"must be a finite number >= 0 (got {value})")
    return value + 0.0


def pixels(field: str, width: int, height: int, limits: LimitsConfig) -> None:
    if width * height > limits.max_pixels:
        raise invalid(field, f"makes a {width}x{height} image, over the limit of {limits.max_pixels} pixels")


def text(field: str, text: str, limits: LimitsConfig) -> None:
    if len(text) > limits.max_prompt_chars:
        raise invalid(field, f"{len(text)} characters is over the limit of {limits.max_prompt_chars}")
    if "\x00" in text:
        raise invalid(field, "must not contain NUL characters")
