"""The upscale job kind: each input image 4x through the diffusion upscaler, one work item per image."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from renderfarm.cluster import validate as fields
from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.constants import (
    DEFAULT_NOISE_LEVEL,
    DEFAULT_UPSCALE_GUIDANCE_SCALE,
    DEFAULT_UPSCALE_STEPS,
    MAX_SEED,
    TILE_MULTIPLE,
    UPSCALE_FACTOR,
)
from renderfarm.cluster.model_info import ModelInfo
from renderfarm.cluster.scheduler import Item
from renderfarm.cluster.validate import ModelLookup
from renderfarm.spec import ImageSpec, UpscaledImageSpec
from renderfarm.v1 import farm_pb2 as pb

STAGE = "upscaler"


@dataclass(frozen=True)
class UpscaleSettings:
    """A validated x4 upscale of each image of a sweep; prompts and seeds are the images' own."""

    model: str
    noise_level: int
    steps: int
    guidance_scale: float
    tile: int

    def spec(self, image_sha256: str, width: int, height: int, prompt: str, negative_prompt: str, seed: int,
             source: ImageSpec | None = None) -> UpscaledImageSpec:  # fmt: skip
        """The spec of an image's 4x image: `image_sha256` hashes the encoded image, `width` x `height` is its
        size as the upscaler takes it, `source` the sweep image's spec where it is one."""
        return UpscaledImageSpec(
            model=self.model, source_sha256=image_sha256, prompt=prompt, negative_prompt=negative_prompt,
            noise_level=self.noise_level, steps=self.steps, guidance_scale=self.guidance_scale, seed=seed,
            width=width * UPSCALE_FACTOR, height=height * UPSCALE_FACTOR, tile=self.tile, source=source,
        )  # fmt: skip

    def chained(self, source: ImageSpec, source_sha256: str) -> UpscaledImageSpec:
        """The spec of a sweep image's 4x image; `source_sha256` hashes its PNG."""
        return self.spec(
            source_sha256, source.width, source.height, source.prompt, source.negative_prompt, source.seed, source
        )


@dataclass(frozen=True)
class Upscale:
    """A validated upscale job: one work item per input image."""

    images: tuple[bytes, ...]
    specs: tuple[UpscaledImageSpec, ...]

    def __post_init__(self):
        # The same image twice is one result.
        unique = dict(zip(self.specs, self.images))
        object.__setattr__(self, "specs", tuple(unique))
        object.__setattr__(self, "images", tuple(unique.values()))

    @property
    def total(self) -> int:
        return len(self.images)


    def items(self, job) -> Iterator[Item]:
        """The images `job` (its record in the job store) has no result for yet."""
        for image, spec in zip(self.images, self.specs):
            if not job.is_done(spec):
                yield Item(job.id, spec, spec.model, ("upscale", spec.file_name), image, job.failures(spec))


def validate(upscale: pb.UpscaleSpec, config: FarmConfig, model_info: ModelLookup) -> Upscale:
    limits = config.limits
    if not upscale.images:
        raise fields.invalid("upscale.images", "must hold at least one image")
    if len(upscale.images) > limits.max_images_per_job:
        raise fields.invalid("upscale.images", f"{len(upscale.images)} images is over the limit of {limits.max_images_per_job}")
    fields.text("upscale.prompt", upscale.prompt, limits)
    fields.text("upscale.negative_prompt", upscale.negative_prompt, limits)
    if not 0 <= upscale.seed <= MAX_SEED:
        raise fields.invalid("upscale.seed", f"must be in [0, {MAX_SEED}] (got {upscale.seed})")
    chosen, info = settings(
        "upscale.", upscale.model, fields.given(upscale, "noise_level"), fields.given(upscale, "steps"),
        fields.given(upscale, "guidance_scale"), upscale.tile, config, model_info,
    )  # fmt: skip
    specs = []
    for i, data in enumerate(upscale.images):
        width, height = fields.decoded_image(f"upscale.images[{i}]", data, limits).size
        # The pipeline rounds the input down to multiples of the VAE's scale factor.
        width, height = width // info.vae_scale_factor * info.vae_scale_factor, height // info.vae_scale_factor * info.vae_scale_factor
        if min(width, height) < TILE_MULTIPLE or max(width, height) * UPSCALE_FACTOR > limits.max_side:
            raise fields.invalid(
                f"upscale.images[{i}]",
                f"upscales to {width * UPSCALE_FACTOR}x{height * UPSCALE_FACTOR}; each side must be "
                f"{TILE_MULTIPLE * UPSCALE_FACTOR} to {limits.max_side} pixels",
            )
        fields.pixels(f"upscale.images[{i}]", width * UPSCALE_FACTOR, height * UPSCALE_FACTOR, limits)
        digest = hashlib.sha256(data).hexdigest()
        specs.append(chosen.spec(digest, width, height, upscale.prompt, upscale.negative_prompt, upscale.seed))
    return Upscale(images=tuple(upscale.images), specs=tuple(specs))


def settings(
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
        raise fields.invalid(f"{prefix}steps", f"must be in [1, {limits.max_steps}] (got {steps})")
    guidance = fields.guidance_scale(
        f"{prefix}guidance_scale", DEFAULT_UPSCALE_GUIDANCE_SCALE if guidance is None else guidance
    )
    info = fields.model(f"{prefix}model", model, model_info)
    if not info.is_upscaler:
        raise fields.invalid(f"{prefix}model", f"{model} is not an x4 upscaler (its UNet takes no low-resolution image)")
    noise_level = DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
    if not 0 <= noise_level <= info.max_noise_level:
        raise fields.invalid(f"{prefix}noise_level", f"must be in [0, {info.max_noise_level}] (got {noise_level})")
    tile = tile or config.upscale_tile
    if not TILE_MULTIPLE <= tile <= limits.max_side or tile % TILE_MULTIPLE:
        raise fields.invalid(f"{prefix}tile", f"must be a multiple of {TILE_MULTIPLE} up to {limits.max_side} (got {tile})")
    return UpscaleSettings(model, noise_level, steps, guidance, tile), info
