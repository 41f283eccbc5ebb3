"""Request validation: a wire request becomes a Sweep, or InvalidJobError naming the field.

Nothing is created before validation passes, so a bad request leaves no trace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
from collections.abc import Callable

import numpy as np
import PIL.Image

from renderfarm.cluster.config import FarmConfig, LimitsConfig
from renderfarm.cluster.constants import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NOISE_LEVEL,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_UPSCALE_GUIDANCE_SCALE,
    DEFAULT_UPSCALE_STEPS,
    MAX_MODEL_REF_CHARS,
    MAX_SEED,
    SAFE_ID_PATTERN,
    SIZE_MULTIPLE,
    TILE_MULTIPLE,
    UPSCALE_FACTOR,
)
from renderfarm.cluster.model_info import ModelInfo
from renderfarm.cluster.planner import Decode, Sweep, Upscale, UpscaleSettings
from renderfarm.errors import InvalidJobError
from renderfarm.spec import SCHEDULER_LABELS, DecodedImageSpec
from renderfarm.v1 import farm_pb2 as pb

ModelLookup = Callable[[str], ModelInfo]
SAFE_ID = re.compile(SAFE_ID_PATTERN)


def invalid(field: str, message: str) -> InvalidJobError:
    return InvalidJobError(f"{field}: {message}", field=field)


def validate(request: pb.SubmitJobRequest, config: FarmConfig, model_info: ModelLookup) -> Sweep | Decode:
    """`model_info` raises ValueError for a model that cannot be resolved."""
    if request.request_id:
        check_id("request_id", request.request_id)
    kind = request.WhichOneof("kind")
    if kind == "sweep":
        sweep = validate_sweep(request.sweep, config.limits, model_info)
        return dataclasses.replace(sweep, upscale=validate_chained_upscale(request.sweep, sweep, config, model_info))
    if kind == "decode":
        return validate_decode(request.decode, config, model_info)
    if kind == "upscale":
        return validate_upscale(request.upscale, config, model_info)
    raise invalid("kind", "the request names no job (set sweep, decode or upscale)")


def check_id(field: str, value: str) -> None:
    if not SAFE_ID.fullmatch(value):
        raise invalid(field, f"must be 1 to 64 letters, digits, '_' or '-' (got {value[:80]!r})")


def _model(field: str, model: str, model_info: ModelLookup) -> ModelInfo:
    if not model:
        raise invalid(field, "must name a model, e.g. builtin:tiny-sd")
    if len(model) > MAX_MODEL_REF_CHARS:
        raise invalid(field, f"{len(model)} characters is over the limit of {MAX_MODEL_REF_CHARS}")
    # A reference names a model directory itself, never a way out of one: refused before any file is looked at.
    if ".." in re.split(r"[/:]", model) or "\\" in model or any(ord(c) < 32 for c in model):
        raise invalid(field, "must not hold '..' path segments, backslashes or control characters")
    try:
        return model_info(model)
    except ValueError as error:
        raise invalid(field, str(error)) from None


def validate_sweep(sweep: pb.SweepSpec, limits: LimitsConfig, model_info: ModelLookup) -> Sweep:
    if not sweep.prompts:
        raise invalid("sweep.prompts", "must hold at least one prompt")
    if len(sweep.prompts) > limits.max_prompts_per_job:
        raise invalid("sweep.prompts", f"{len(sweep.prompts)} prompts is over the limit of {limits.max_prompts_per_job}")
    # Counted from the axes' lengths before any value is read, so a sweep of billions is refused at once.
    axes = (sweep.prompts, sweep.seeds, sweep.guidance_scales, sweep.steps, sweep.sizes, sweep.schedulers)
    total = math.prod(len(axis) or 1 for axis in axes)
    if total > limits.max_images_per_job:
        raise invalid("sweep", f"{total} images is over the limit of {limits.max_images_per_job} per job")

    prompts = _prompts(sweep, limits)
    _text("sweep.negative_prompt", sweep.negative_prompt, limits)

    seeds = tuple(sweep.seeds) or (DEFAULT_SEED,)
    for i, seed in enumerate(seeds):
        if not 0 <= seed <= MAX_SEED:
            raise invalid(f"sweep.seeds[{i}]", f"must be in [0, {MAX_SEED}] (got {seed})")

    guidance_scales = tuple(sweep.guidance_scales) or (DEFAULT_GUIDANCE_SCALE,)
    for i, scale in enumerate(guidance_scales):
        if not math.isfinite(scale) or scale < 0:
            raise invalid(f"sweep.guidance_scales[{i}]", f"must be a finite number >= 0 (got {scale})")

    steps = tuple(sweep.steps) or (DEFAULT_STEPS,)
    for i, count in enumerate(steps):
        if not 1 <= count <= limits.max_steps:
            raise invalid(f"sweep.steps[{i}]", f"must be in [1, {limits.max_steps}] (got {count})")

    for i, name in enumerate(sweep.schedulers):
        if name not in SCHEDULER_LABELS:
            raise invalid(f"sweep.schedulers[{i}]", f"unknown scheduler {name!r}; use one of {sorted(SCHEDULER_LABELS)}")

    for i, size in enumerate(sweep.sizes):
        for side in ("width", "height"):
            value = getattr(size, side)
            if value <= 0 or value % SIZE_MULTIPLE or value > limits.max_side:
                raise invalid(
                    f"sweep.sizes[{i}].{side}",
                    f"must be a positive multiple of {SIZE_MULTIPLE} up to {limits.max_side} (got {value})",
                )
        _pixels(f"sweep.sizes[{i}]", size.width, size.height, limits)

    defaults = _model("sweep.model", sweep.model, model_info)
    if not sweep.schedulers and defaults.scheduler not in SCHEDULER_LABELS:
        raise invalid(
            "sweep.schedulers",
            f"the model's own scheduler {defaults.scheduler} is not supported; name one of {sorted(SCHEDULER_LABELS)}",
        )

    return Sweep(
        model=sweep.model,
        prompts=prompts,
        negative_prompt=sweep.negative_prompt,
        seeds=seeds,
        guidance_scales=guidance_scales,
        steps=steps,
        sizes=tuple((s.width, s.height) for s in sweep.sizes) or ((defaults.width, defaults.height),),
        schedulers=tuple(sweep.schedulers) or (defaults.scheduler,),
    )


def validate_decode(decode: pb.DecodeSpec, config: FarmConfig, model_info: ModelLookup) -> Decode:
    latents = _latents(decode.latents_npy)
    if not np.isfinite(latents).all():
        raise invalid("decode.latents_npy", "must hold finite numbers only")
    info = _model("decode.model", decode.model, model_info)
    scale, limits = info.vae_scale_factor, config.limits
    if latents.shape[1] != info.latent_channels:
        raise invalid("decode.latents_npy", f"has {latents.shape[1]} channels; the model's VAE takes {info.latent_channels}")
    height, width = latents.shape[2] * scale, latents.shape[3] * scale
    if max(height, width) > limits.max_side:
        raise invalid("decode.latents_npy", f"decodes to {width}x{height}, over the limit of {limits.max_side} a side")
    _pixels("decode.latents_npy", width, height, limits)
    tile = decode.tile or config.decode_tile
    if tile <= 0 or tile % scale or tile > limits.max_side:
        raise invalid("decode.tile", f"must be a positive multiple of {scale} up to {limits.max_side} (got {tile})")
    overlap = decode.overlap or info.decode_halo * scale
    if overlap < 0 or overlap % scale or overlap > limits.max_side:
        raise invalid("decode.overlap", f"must be a multiple of {scale} from 0 to {limits.max_side} (got {overlap})")
    latents = latents.astype(np.float32)
    spec = DecodedImageSpec(
        model=decode.model,
        latents_sha256=hashlib.sha256(np.ascontiguousarray(latents).tobytes()).hexdigest(),
        width=width,
        height=height,
        tile=tile,
        overlap=overlap,
    )
    return Decode(latents=latents, spec=spec, core=tile // scale, halo=overlap // scale)


def _latents(npy: bytes) -> np.ndarray:
    field, stream = "decode.latents_npy", io.BytesIO(npy)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, _, dtype = read_header[version](stream)
    except Exception as error:  # numpy raises several types for a malformed header
        raise invalid(field, f"is not a NumPy .npy array of format 1.0 or 2.0 ({error})") from None
    if dtype.kind != "f" or len(shape) != 4 or shape[0] != 1 or 0 in shape:
        raise invalid(field, f"must be a float array [1, C, h, w] (got {dtype} {shape})")
    # numpy allocates the shape its header claims before reading: check the claim against the bytes sent.
    data_bytes, claimed_bytes = len(npy) - stream.tell(), math.prod(shape) * dtype.itemsize
    if data_bytes != claimed_bytes:
        raise invalid(field, f"holds {data_bytes} bytes of data; its header's {dtype} {shape} needs {claimed_bytes}")
    return np.load(io.BytesIO(npy), allow_pickle=False)


def validate_upscale(upscale: pb.UpscaleSpec, config: FarmConfig, model_info: ModelLookup) -> Upscale:
    limits = config.limits
    if not upscale.images:
        raise invalid("upscale.images", "must hold at least one image")
    if len(upscale.images) > limits.max_images_per_job:
        raise invalid("upscale.images", f"{len(upscale.images)} images is over the limit of {limits.max_images_per_job}")
    _text("upscale.prompt", upscale.prompt, limits)
    _text("upscale.negative_prompt", upscale.negative_prompt, limits)
    if not 0 <= upscale.seed <= MAX_SEED:
        raise invalid("upscale.seed", f"must be in [0, {MAX_SEED}] (got {upscale.seed})")
    settings, info = _upscale_settings(
        "upscale.", upscale.model, _given(upscale, "noise_level"), _given(upscale, "steps"),
        _given(upscale, "guidance_scale"), upscale.tile, config, model_info,
    )  # fmt: skip
    specs = []
    for i, data in enumerate(upscale.images):
        width, height = _image_size(f"upscale.images[{i}]", data)
        # The pipeline rounds the input down to multiples of the VAE's scale factor.
        width, height = width // info.vae_scale_factor * info.vae_scale_factor, height // info.vae_scale_factor * info.vae_scale_factor
        if min(width, height) < TILE_MULTIPLE or max(width, height) * UPSCALE_FACTOR > limits.max_side:
            raise invalid(
                f"upscale.images[{i}]",
                f"upscales to {width * UPSCALE_FACTOR}x{height * UPSCALE_FACTOR}; each side must be "
                f"{TILE_MULTIPLE * UPSCALE_FACTOR} to {limits.max_side} pixels",
            )
        _pixels(f"upscale.images[{i}]", width * UPSCALE_FACTOR, height * UPSCALE_FACTOR, limits)
        digest = hashlib.sha256(data).hexdigest()
        specs.append(settings.spec(digest, width, height, upscale.prompt, upscale.negative_prompt, upscale.seed))
    return Upscale(images=tuple(upscale.images), specs=tuple(specs))


def validate_chained_upscale(
    request: pb.SweepSpec, sweep: Sweep, config: FarmConfig, model_info: ModelLookup
) -> UpscaleSettings | None:
    """The x4 upscale every image of a sweep goes on through, or None."""
    if request.upscale in (0, 1):
        return None
    if request.upscale != UPSCALE_FACTOR:
        raise invalid("sweep.upscale", f"must be 0 or 1 (no upscale) or {UPSCALE_FACTOR} (got {request.upscale})")
    settings, _ = _upscale_settings(
        "sweep.upscale_", request.upscale_model, _given(request, "upscale_noise_level"),
        _given(request, "upscale_steps"), _given(request, "upscale_guidance_scale"), request.upscale_tile, config,
        model_info,
    )  # fmt: skip
    max_side = config.limits.max_side
    for width, height in sweep.sizes:
        if max(width, height) * UPSCALE_FACTOR > max_side:
            raise invalid("sweep.upscale", f"{width}x{height} images upscale to over {max_side} pixels a side")
        _pixels("sweep.upscale", width * UPSCALE_FACTOR, height * UPSCALE_FACTOR, config.limits)
        # The upscaler takes each image's PNG as the decoder makes it in one piece.
        if width * height > config.tiled_decode_above_pixels:
            raise invalid(
                "sweep.upscale",
                f"{width}x{height} images are over the {config.tiled_decode_above_pixels} pixels that chain to the "
                "upscaler (they decode in tiles); upscale them in a job of their own",
            )
    return settings


def _given(message, field: str):
    """An optional field's value, or None where it is unset."""
    return getattr(message, field) if message.HasField(field) else None


def _upscale_settings(
    prefix: str,
    model: str,
    noise_level: int | None,
    steps: int | None,
    guidance: float | None,
    tile: int,
    config: FarmConfig,
    model_info: ModelLookup,
) -> tuple[UpscaleSettings, ModelInfo]:
    """An upscale's settings, unset ones (None, or tile 0) defaulted; errors name f"{prefix}steps" and so on."""
    limits = config.limits
    steps = DEFAULT_UPSCALE_STEPS if steps is None else steps
    if not 1 <= steps <= limits.max_steps:
        raise invalid(f"{prefix}steps", f"must be in [1, {limits.max_steps}] (got {steps})")
    guidance = DEFAULT_UPSCALE_GUIDANCE_SCALE if guidance is None else guidance
    if not math.isfinite(guidance) or guidance < 0:
        raise invalid(f"{prefix}guidance_scale", f"must be a finite number >= 0 (got {guidance})")
    info = _model(f"{prefix}model", model, model_info)
    if not info.is_upscaler:
        raise invalid(f"{prefix}model", f"{model} is not an x4 upscaler (its UNet takes no low-resolution image)")
    noise_level = DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
    if not 0 <= noise_level <= info.max_noise_level:
        raise invalid(f"{prefix}noise_level", f"must be in [0, {info.max_noise_level}] (got {noise_level})")
    tile = tile or config.upscale_tile
    if not TILE_MULTIPLE <= tile <= limits.max_side or tile % TILE_MULTIPLE:
        raise invalid(f"{prefix}tile", f"must be a multiple of {TILE_MULTIPLE} up to {limits.max_side} (got {tile})")
    return UpscaleSettings(model, noise_level, steps, guidance, tile), info


def _image_size(field: str, data: bytes) -> tuple[int, int]:
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.verify()
            return image.size
    except Exception as error:  # Pillow raises many types for a malformed image
        raise invalid(field, f"is not an image Pillow can read ({error})") from None


def _prompts(sweep: pb.SweepSpec, limits: LimitsConfig) -> tuple[str, ...]:
    for i, prompt in enumerate(sweep.prompts):
        _text(f"sweep.prompts[{i}]", prompt, limits)
        if not prompt.strip():
            raise invalid(f"sweep.prompts[{i}]", "must not be blank")
    return tuple(sweep.prompts)


def _pixels(field: str, width: int, height: int, limits: LimitsConfig) -> None:
    if width * height > limits.max_pixels:
        raise invalid(field, f"makes a {width}x{height} image, over the limit of {limits.max_pixels} pixels")


def _text(field: str, text: str, limits: LimitsConfig) -> None:
    if len(text) > limits.max_prompt_chars:
        raise invalid(field, f"{len(text)} characters is over the limit of {limits.max_prompt_chars}")
    if "\x00" in text:
        raise invalid(field, "must not contain NUL characters")
