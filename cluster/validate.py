"""Field checks shared by the job kinds: each raises InvalidJobError naming the field.

Nothing is created before a request's validation passes, so a bad request leaves no trace.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import PIL.Image

from renderfarm.cluster.config import LimitsConfig
from renderfarm.cluster.constants import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    MAX_MODEL_REF_CHARS,
    MAX_SEED,
    SAFE_ID_PATTERN,
)
from renderfarm.cluster.model_info import ModelInfo
from renderfarm.errors import InvalidJobError
from renderfarm.spec import SCHEDULER_LABELS

ModelLookup = Callable[[str], ModelInfo]
# Of an error message: it must fit gRPC's trailer, with room for the field name.
MAX_MESSAGE_CHARS = 2000
SAFE_ID = re.compile(SAFE_ID_PATTERN)


def invalid(field: str, message: str) -> InvalidJobError:
    # Clipped: a message echoes values, and a 20 KB one helps nobody; rpc.abort fits what is sent to gRPC's limits.
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " [...]"
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
    except OSError as error:  # a broken or unreadable model directory, a path the file system refuses
        raise invalid(field, f"{model} cannot be read as a model: {error.strerror or error}") from None
    except KeyError as error:  # a config file without a field every model has
        raise invalid(field, f"{model} has a config without {error}; is it a whole diffusers pipeline?") from None
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


# Modes the pipelines' conversion to RGB takes as a picture (not 16-bit, float or CMYK data).
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "1")


def decoded_image(field: str, data: bytes, limits: LimitsConfig) -> PIL.Image.Image:
    """The image with its pixels decoded in full, so that a corrupt file is refused here, not by a replica
    after the job was created; its size is checked against the pixel limit before the pixels are decoded."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except Exception as error:  # Pillow raises many types for a malformed image
        raise invalid(field, f"is not an image Pillow can read ({error})") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise invalid(field, f"is {width}x{height}, over the limit of {limits.max_pixels} pixels")
    if image.mode not in IMAGE_MODES:
        raise invalid(field, f"has mode {image.mode}; the farm takes {', '.join(IMAGE_MODES)} images")
    try:
        image.load()
    except Exception as error:
        raise invalid(field, f"has pixel data Pillow cannot decode ({error})") from None
    return image


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


@dataclass(frozen=True)
class RenderAxes:
    """The axes every rendering kind shares, checked; empty ones defaulted (schedulers: empty is the model's own)."""

    prompts: tuple[str, ...]
    negative_prompt: str
    seeds: tuple[int, ...]
    guidance_scales: tuple[float, ...]
    steps: tuple[int, ...]
    schedulers: tuple[str, ...]


def prompt_count(field: str, prompts, limits: LimitsConfig) -> None:
    if not prompts:
        raise invalid(field, "must hold at least one prompt")
    if len(prompts) > limits.max_prompts_per_job:
        raise invalid(field, f"{len(prompts)} prompts is over the limit of {limits.max_prompts_per_job}")


def render_axes(prefix: str, message, limits: LimitsConfig) -> RenderAxes:
    """`message`'s prompts, negative_prompt, seeds, guidance_scales, steps and schedulers; errors name
    f"{prefix}seeds[2]" and so on."""
    prompt_count(f"{prefix}prompts", message.prompts, limits)
    for i, prompt in enumerate(message.prompts):
        text(f"{prefix}prompts[{i}]", prompt, limits)
        if not prompt.strip():
            raise invalid(f"{prefix}prompts[{i}]", "must not be blank")
    text(f"{prefix}negative_prompt", message.negative_prompt, limits)
    seeds = tuple(message.seeds) or (DEFAULT_SEED,)
    for i, seed in enumerate(seeds):
        if not 0 <= seed <= MAX_SEED:
            raise invalid(f"{prefix}seeds[{i}]", f"must be in [0, {MAX_SEED}] (got {seed})")
    guidance_scales = tuple(
        guidance_scale(f"{prefix}guidance_scales[{i}]", scale)
        for i, scale in enumerate(message.guidance_scales or (DEFAULT_GUIDANCE_SCALE,))
    )
    steps = tuple(message.steps) or (DEFAULT_STEPS,)
    for i, count in enumerate(steps):
        if not 1 <= count <= limits.max_steps:
            raise invalid(f"{prefix}steps[{i}]", f"must be in [1, {limits.max_steps}] (got {count})")
    for i, name in enumerate(message.schedulers):
        if name not in SCHEDULER_LABELS:
            raise invalid(f"{prefix}schedulers[{i}]", f"unknown scheduler {name!r}; use one of {sorted(SCHEDULER_LABELS)}")
    return RenderAxes(
        tuple(message.prompts), message.negative_prompt, seeds, guidance_scales, steps, tuple(message.schedulers)
    )
