"""Sweep expansion and batching: plain bookkeeping, no Ray, no torch.

A sweep is never materialised: items are generated lazily in an order that
keeps compatible items (same size, steps, scheduler, guided or not) adjacent,
and batches are cut from that stream.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from renderfarm.cluster.constants import UPSCALE_FACTOR
from renderfarm.spec import DecodedImageSpec, ImageSpec, UpscaledImageSpec


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
class Sweep:
    """A validated prompt sweep: every axis non-empty, every value in range."""

    model: str
    prompts: tuple[str, ...]
    negative_prompt: str
    seeds: tuple[int, ...]
    guidance_scales: tuple[float, ...]
    steps: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    schedulers: tuple[str, ...]
    # Each image goes on through the x4 upscaler, and only the 4x images are results.
    upscale: UpscaleSettings | None = None

    def __post_init__(self):
        # A repeated axis value would repeat images: each spec is one result, once.
        for axis in ("prompts", "seeds", "guidance_scales", "steps", "sizes", "schedulers"):
            object.__setattr__(self, axis, tuple(dict.fromkeys(getattr(self, axis))))

    @property
    def total(self) -> int:
        return math.prod(
            len(axis)
            for axis in (self.prompts, self.seeds, self.guidance_scales, self.steps, self.sizes, self.schedulers)
        )

    def specs(self) -> Iterator[ImageSpec]:
        """Every image of the sweep once, lazily; loop-shaping axes outermost."""
        for (width, height), steps, scheduler in itertools.product(self.sizes, self.steps, self.schedulers):
            for prompt, seed, guidance_scale in itertools.product(self.prompts, self.seeds, self.guidance_scales):
                yield ImageSpec(
                    model=self.model,
                    prompt=prompt,
                    negative_prompt=self.negative_prompt,
                    seed=seed,
                    width=width,
                    height=height,
                    steps=steps,
                    guidance_scale=guidance_scale,
                    scheduler=scheduler,
                )


@dataclass(frozen=True)
class Decode:
    """A validated decode job: one image from given latents, in tiles of `core` latent pixels with `halo`."""

    latents: object  # numpy float32 [1, C, h, w]
    spec: DecodedImageSpec
    core: int
    halo: int
    total: int = 1


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


Work = Sweep | Decode | Upscale


def batch_key(spec: ImageSpec) -> tuple:
    """Items with equal keys can share one denoising loop."""
    return (spec.model, spec.width, spec.height, spec.steps, spec.scheduler, spec.guidance_scale > 1)


def batches(specs: Iterable[ImageSpec], max_batch: int) -> Iterator[list[ImageSpec]]:
    """Runs of compatible consecutive specs, each at most max_batch long."""
    for _, run in itertools.groupby(specs, key=batch_key):
        while batch := list(itertools.islice(run, max_batch)):
            yield batch
