"""The img2img job kind: each source image noised to a strength, then denoised under every combination of the
axes (StableDiffusionImg2ImgPipeline), one work item per image, batched across jobs like sweeps.

The inpaint kind (kinds/inpaint.py) is the same work with a mask: what the two share lives here.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from renderfarm.actors.img2img import denoising_steps
from renderfarm.actors.img2img import source_size as rendered_size
from renderfarm.cluster import validate as fields
from renderfarm.cluster.config import FarmConfig, LimitsConfig
from renderfarm.cluster.constants import DEFAULT_IMG2IMG_STRENGTH
from renderfarm.cluster.kinds.sweep import batch_shape
from renderfarm.cluster.model_info import IMAGE_TO_IMAGE, ModelInfo
from renderfarm.cluster.scheduler import Item
from renderfarm.cluster.validate import ModelLookup
from renderfarm.spec import SCHEDULER_LABELS, EditedImageSpec, guided
from renderfarm.v1 import farm_pb2 as pb

STAGE = "denoiser"


@dataclass(frozen=True)
class Source:
    """A source image as the replicas take it: its encoded bytes (and its mask's), by digest, at the size it
    renders at (the image's, rounded down to whole latent cells, as the pipelines round it)."""

    sha256: str
    width: int
    height: int
    mask_sha256: str | None = None
    # Compared and hashed by digest: the bytes can be megabytes.
    image: bytes = field(default=b"", compare=False, repr=False)
    mask: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Edit:
    """A validated img2img or inpaint job: every axis non-empty (schedulers: empty is the model's own)."""

    model: str
    scheduler: str  # the model's own, for an empty schedulers axis
    sources: tuple[Source, ...]
    prompts: tuple[str, ...]
    negative_prompt: str
    strengths: tuple[float, ...]
    seeds: tuple[int, ...]
    guidance_scales: tuple[float, ...]
    steps: tuple[int, ...]
    schedulers: tuple[str, ...]
    max_batch: int = 1
    max_batch_pixels: int = 0

    def __post_init__(self):
        # A repeated value would repeat images: each spec is one result, once.
        for axis in ("sources", "prompts", "strengths", "seeds", "guidance_scales", "steps", "schedulers"):
            object.__setattr__(self, axis, tuple(dict.fromkeys(getattr(self, axis))))

    @property
    def total(self) -> int:
        axes = (self.sources, self.prompts, self.strengths, self.seeds, self.guidance_scales, self.steps)
        return math.prod(len(axis) for axis in axes) * (len(self.schedulers) or 1)

    def specs(self) -> Iterator[tuple[EditedImageSpec, Source]]:
        """Every image once, lazily, with its source; loop-shaping axes outermost, sources of one size together."""
        by_guidance = [
            scales for kind in (False, True) if (scales := [g for g in self.guidance_scales if guided(g) == kind])
        ]
        sizes = dict.fromkeys((source.width, source.height) for source in self.sources)
        shaping = itertools.product(sizes, self.steps, self.schedulers or (self.scheduler,), self.strengths, by_guidance)
        for (width, height), steps, scheduler, strength, scales in shaping:
            sources = [source for source in self.sources if (source.width, source.height) == (width, height)]
            for source, prompt, seed, guidance_scale in itertools.product(sources, self.prompts, self.seeds, scales):
                spec = EditedImageSpec(
                    model=self.model, source_sha256=source.sha256, prompt=prompt, negative_prompt=self.negative_prompt,
                    seed=seed, width=width, height=height, steps=steps, guidance_scale=guidance_scale,
                    scheduler=scheduler, strength=strength, mask_sha256=source.mask_sha256,
                )  # fmt: skip
                yield spec, source

    def items(self, job) -> Iterator[Item]:
        """The images `job` (its record in the job store) has no result for yet, lazily; each carries its source."""
        for spec, source in self.specs():
            if not job.is_done(spec):
                shape = batch_shape(spec, self.max_batch, self.max_batch_pixels)
                yield Item(job.id, spec, spec.model, batch_key(spec), source, job.failures(spec), shape=shape)


def batch_key(spec: EditedImageSpec) -> tuple:
    """Items with equal keys can share one denoising loop: the strength decides where it starts."""
    return (
        "edit", spec.model, spec.width, spec.height, spec.steps, spec.scheduler, guided(spec.guidance_scale),
        spec.strength, spec.mask_sha256 is not None,
    )  # fmt: skip


def validate(request: pb.Img2ImgSpec, config: FarmConfig, model_info: ModelLookup) -> Edit:
    limits = config.limits
    _count("img2img", request, len(request.images), limits)
    if not request.images:
        raise fields.invalid("img2img.images", "must hold at least one image")
    info = fields.model("img2img.model", request.model, model_info, pipelines=IMAGE_TO_IMAGE)
    sources = []
    for i, data in enumerate(request.images):
        image = fields.decoded_image(f"img2img.images[{i}]", data, limits)
        width, height = source_size(f"img2img.images[{i}]", image, info, limits)
        sources.append(Source(hashlib.sha256(data).hexdigest(), width, height, image=data))
    return edit("img2img.", request, tuple(sources), info, DEFAULT_IMG2IMG_STRENGTH, config)


def _count(kind: str, request, sources: int, limits: LimitsConfig) -> None:
    """The job's image count from the axes' lengths, before any value is read; the sources' bytes in all."""
    axes = (request.prompts, request.strengths, request.seeds, request.guidance_scales, request.steps, request.schedulers)
    total = sources * math.prod(len(axis) or 1 for axis in axes)
    if total > limits.max_images_per_job:
        raise fields.invalid(kind, f"{total} images is over the limit of {limits.max_images_per_job} per job")
    size = request.ByteSize()
    if size > limits.max_source_bytes:
        raise fields.invalid(kind, f"{size} bytes of images is over the limit of {limits.max_source_bytes}")


def source_size(field: str, image, info: ModelInfo, limits: LimitsConfig) -> tuple[int, int]:
    """The size a source image renders at: the pipelines round it down to whole latent cells."""
    width, height = rendered_size(image, info.vae_scale_factor)
    if min(width, height) < info.vae_scale_factor or max(width, height) > limits.max_side:
        raise fields.invalid(
            field, f"is {image.width}x{image.height}; each side must be {info.vae_scale_factor} to {limits.max_side} pixels"
        )
    return width, height


def edit(prefix: str, request, sources: tuple[Source, ...], info: ModelInfo, default_strength: float,
         config: FarmConfig) -> Edit:  # fmt: skip
    """The work of an img2img or inpaint request whose sources are checked; errors name f"{prefix}strengths[0]"."""
    axes = fields.render_axes(prefix, request, config.limits)
    if not axes.schedulers and info.scheduler not in SCHEDULER_LABELS:
        raise fields.invalid(
            f"{prefix}schedulers",
            f"the model's own scheduler {info.scheduler} is not supported; name one of {sorted(SCHEDULER_LABELS)}",
        )
    strengths = tuple(request.strengths) or (default_strength,)
    for i, strength in enumerate(strengths):
        if not (math.isfinite(strength) and 0 < strength <= 1):
            raise fields.invalid(f"{prefix}strengths[{i}]", f"must be in (0, 1] (got {strength})")
        # No denoising step would leave the noised image as it is.
        if denoising_steps(min(axes.steps), strength) < 1:
            raise fields.invalid(
                f"{prefix}strengths[{i}]", f"{strength:g} of {min(axes.steps)} steps runs no denoising step"
            )
    return Edit(
        model=request.model, scheduler=info.scheduler, sources=sources, prompts=axes.prompts,
        negative_prompt=axes.negative_prompt, strengths=strengths, seeds=axes.seeds,
        guidance_scales=axes.guidance_scales, steps=axes.steps, schedulers=axes.schedulers,
        max_batch=config.max_batch, max_batch_pixels=config.max_batch_pixels,
    )  # fmt: skip
