"""The sweep job kind: every combination of its axes, one work item per image, batched across jobs.

A sweep is never materialised: items are generated lazily in an order that
keeps items of one batch key (same size, steps, scheduler, guided or not)
adjacent, and the scheduler cuts batches from the items of every job.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from renderfarm.actors.lora import ADAPTERS_PER_MODEL, lora_digest
from renderfarm.cluster import validate as fields
from renderfarm.cluster.config import FarmConfig, LimitsConfig
from renderfarm.cluster.constants import (
    SIZE_MULTIPLE,
    UPSCALE_FACTOR,
)
from renderfarm.cluster.kinds import upscale
from renderfarm.cluster.kinds.upscale import UpscaleSettings
from renderfarm.cluster.model_info import TEXT_TO_IMAGE
from renderfarm.cluster.scheduler import Item
from renderfarm.cluster.validate import ModelLookup
from renderfarm.spec import SCHEDULER_LABELS, ImageSpec, LoraSpec, guided
from renderfarm.v1 import farm_pb2 as pb

STAGE = "denoiser"


@dataclass(frozen=True)
class SweepModel:
    """One model of a sweep, with the size and scheduler its images take where the sweep sets none."""

    name: str
    size: tuple[int, int]
    scheduler: str


@dataclass(frozen=True)
class Sweep:
    """A validated prompt sweep: every axis non-empty (sizes and schedulers: empty means each model's own),
    every value in range."""

    models: tuple[SweepModel, ...]
    prompts: tuple[str, ...]
    negative_prompt: str
    seeds: tuple[int, ...]
    guidance_scales: tuple[float, ...]
    steps: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    schedulers: tuple[str, ...]
    # Each set applied together; None: no LoRA.
    lora_sets: tuple[tuple[LoraSpec, ...] | None, ...] = (None,)
    # Each image goes on through the x4 upscaler, and only the 4x images are results.
    upscale: UpscaleSettings | None = None
    # The farm's batching limits: see batch_shape.
    max_batch: int = 1
    max_batch_pixels: int = 0

    def __post_init__(self):
        # A repeated axis value would repeat images: each spec is one result, once.
        for axis in ("models", "lora_sets", "prompts", "seeds", "guidance_scales", "steps", "sizes", "schedulers"):
            object.__setattr__(self, axis, tuple(dict.fromkeys(getattr(self, axis))))

    @property
    def total(self) -> int:
        axes = (self.models, self.lora_sets, self.prompts, self.seeds, self.guidance_scales, self.steps)
        return math.prod(len(axis) for axis in axes) * (len(self.sizes) or 1) * (len(self.schedulers) or 1)

    def image_sizes(self) -> tuple[tuple[int, int], ...]:
        """Every (width, height) the sweep renders at."""
        return self.sizes or tuple(dict.fromkeys(model.size for model in self.models))

    def specs(self) -> Iterator[ImageSpec]:
        """Every image of the sweep once, lazily. Models outermost, so that a model's images run together and
        replicas load each model once; then the other loop-shaping axes, so batches fill."""
        # Guided and unguided items cannot share a batch (batch_key): each kind's scales run together.
        by_guidance = [
            scales for kind in (False, True) if (scales := [g for g in self.guidance_scales if guided(g) == kind])
        ]
        for model in self.models:
            sizes, schedulers = self.sizes or (model.size,), self.schedulers or (model.scheduler,)
            shaping = itertools.product(self.lora_sets, sizes, self.steps, schedulers, by_guidance)
            for loras, (width, height), steps, scheduler, scales in shaping:
                for prompt, seed, guidance_scale in itertools.product(self.prompts, self.seeds, scales):
                    yield ImageSpec(
                        model=model.name,
                        prompt=prompt,
                        negative_prompt=self.negative_prompt,
                        seed=seed,
                        width=width,
                        height=height,
                        steps=steps,
                        guidance_scale=guidance_scale,
                        scheduler=scheduler,
                        loras=loras,
                    )

    def items(self, job) -> Iterator[Item]:
        """The images `job` (its record in the job store) has no result for yet, lazily."""
        for spec in self.specs():
            if not job.is_done(spec):
                key, shape = (batch_key(spec), self.upscale), batch_shape(spec, self.max_batch, self.max_batch_pixels)
                yield Item(job.id, spec, spec.model, key, self.upscale, job.failures(spec), shape=shape)


def applied_loras(spec: ImageSpec) -> tuple[LoraSpec, ...]:
    """The LoRAs that change an image: one at scale 0 leaves the model as it is, so it is not applied."""
    return tuple(lora for lora in spec.loras or () if lora.scale != 0)


def batch_key(spec: ImageSpec) -> tuple:
    """Items with equal keys can share one denoising loop."""
    loras = tuple((lora.sha256, lora.scale) for lora in applied_loras(spec))
    return (spec.model, loras, spec.width, spec.height, spec.steps, spec.scheduler, guided(spec.guidance_scale))


def batch_shape(spec: ImageSpec, max_batch: int, max_batch_pixels: int) -> int:
    """Images in every denoiser batch of this spec's key, short ones padded: max_batch, or fewer for large
    images, so that a batch holds at most max_batch_pixels pixels; one at least. A function of the key alone,
    so an image's pixels never depend on its batch (README, "The purity rule")."""
    return max(1, min(max_batch, max_batch_pixels // (spec.width * spec.height)))


def validate(request: pb.SweepSpec, config: FarmConfig, model_info: ModelLookup) -> Sweep:
    sweep = _axes(request, config.limits, model_info)
    return dataclasses.replace(
        sweep,
        upscale=_chained_upscale(request, sweep, config, model_info),
        max_batch=config.max_batch,
        max_batch_pixels=config.max_batch_pixels,
    )


def _axes(sweep: pb.SweepSpec, limits: LimitsConfig, model_info: ModelLookup) -> Sweep:
    fields.prompt_count("sweep.prompts", sweep.prompts, limits)
    # Counted from the axes' lengths before any value is read, so a sweep of billions is refused at once.
    axes = (
        sweep.models, sweep.lora_sets, sweep.prompts, sweep.seeds, sweep.guidance_scales, sweep.steps, sweep.sizes,
        sweep.schedulers,
    )  # fmt: skip
    total = math.prod(len(axis) or 1 for axis in axes)
    if total > limits.max_images_per_job:
        raise fields.invalid("sweep", f"{total} images is over the limit of {limits.max_images_per_job} per job")

    axes = fields.render_axes("sweep.", sweep, limits)

    for i, size in enumerate(sweep.sizes):
        for side in ("width", "height"):
            value = getattr(size, side)
            if value <= 0 or value % SIZE_MULTIPLE or value > limits.max_side:
                raise fields.invalid(
                    f"sweep.sizes[{i}].{side}",
                    f"must be a positive multiple of {SIZE_MULTIPLE} up to {limits.max_side} (got {value})",
                )
        fields.pixels(f"sweep.sizes[{i}]", size.width, size.height, limits)

    return Sweep(
        models=_models(sweep, model_info),
        prompts=axes.prompts,
        negative_prompt=axes.negative_prompt,
        seeds=axes.seeds,
        guidance_scales=axes.guidance_scales,
        steps=axes.steps,
        sizes=tuple((s.width, s.height) for s in sweep.sizes),
        schedulers=axes.schedulers,
        lora_sets=lora_sets(sweep),
    )


def _models(sweep: pb.SweepSpec, model_info: ModelLookup) -> tuple[SweepModel, ...]:
    if sweep.models and sweep.model:
        raise fields.invalid("sweep.models", "give model or models, not both")
    named = [(f"sweep.models[{i}]", name) for i, name in enumerate(sweep.models)] or [("sweep.model", sweep.model)]
    models = []
    for field, name in named:
        info = fields.model(field, name, model_info, pipelines=TEXT_TO_IMAGE)
        if not sweep.schedulers and info.scheduler not in SCHEDULER_LABELS:
            raise fields.invalid(
                "sweep.schedulers",
                f"the own scheduler of {name}, {info.scheduler}, is not supported; name one of {sorted(SCHEDULER_LABELS)}",
            )
        models.append(SweepModel(name, (info.width, info.height), info.scheduler))
    return tuple(models)


def lora_sets(sweep: pb.SweepSpec) -> tuple[tuple[LoraSpec, ...] | None, ...]:
    """Each set's LoRAs with their files' digests (the spec names a LoRA by content); an empty set is None."""
    sets = []
    for i, lora_set in enumerate(sweep.lora_sets):
        # A replica holds a set's adapters at once.
        if len(lora_set.loras) > ADAPTERS_PER_MODEL:
            raise fields.invalid(
                f"sweep.lora_sets[{i}]", f"{len(lora_set.loras)} LoRAs is over the limit of {ADAPTERS_PER_MODEL}"
            )
        loras = []
        for j, lora in enumerate(lora_set.loras):
            field = f"sweep.lora_sets[{i}].loras[{j}]"
            if not math.isfinite(lora.scale):
                raise fields.invalid(f"{field}.scale", f"must be a finite number (got {lora.scale})")
            path = fields.file_path(f"{field}.path", lora.path)
            try:
                digest = lora_digest(path)
            except ValueError as error:
                raise fields.invalid(f"{field}.path", str(error)) from None
            if any(earlier.sha256 == digest for earlier in loras):
                raise fields.invalid(f"{field}.path", "is a LoRA this set already holds; give it once, with one scale")
            # -0.0 as 0.0, as guidance scales: the spec must not tell apart what renders alike.
            loras.append(LoraSpec(path=path, sha256=digest, scale=lora.scale + 0.0))
        sets.append(tuple(loras) or None)
    return tuple(sets) or (None,)


def _chained_upscale(
    request: pb.SweepSpec, sweep: Sweep, config: FarmConfig, model_info: ModelLookup
) -> UpscaleSettings | None:
    """The x4 upscale every image of a sweep goes on through, or None."""
    if request.upscale in (0, 1):
        return None
    if request.upscale != UPSCALE_FACTOR:
        raise fields.invalid("sweep.upscale", f"must be 0 or 1 (no upscale) or {UPSCALE_FACTOR} (got {request.upscale})")
    settings, _ = upscale.settings(
        "sweep.upscale_", request.upscale_model, fields.given(request, "upscale_noise_level"),
        fields.given(request, "upscale_steps"), fields.given(request, "upscale_guidance_scale"), request.upscale_tile, config,
        model_info,
    )  # fmt: skip
    max_side = config.limits.max_side
    for width, height in sweep.image_sizes():
        if max(width, height) * UPSCALE_FACTOR > max_side:
            raise fields.invalid("sweep.upscale", f"{width}x{height} images upscale to over {max_side} pixels a side")
        fields.pixels("sweep.upscale", width * UPSCALE_FACTOR, height * UPSCALE_FACTOR, config.limits)
        # The upscaler takes each image's PNG as the decoder makes it in one piece.
        if width * height > config.tiled_decode_above_pixels:
            raise fields.invalid(
                "sweep.upscale",
                f"{width}x{height} images are over the {config.tiled_decode_above_pixels} pixels that chain to the "
                "upscaler (they decode in tiles); upscale them in a job of their own",
            )
    return settings
