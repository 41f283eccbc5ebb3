"""The render job kind: exactly the images asked for, each a sweep of one image. What renders a result's spec
again (its pixels are a function of the spec alone), or a list of images that is no product of axes.

Each image is validated as a sweep; a LoRA file is read once however many images name it, and one named
with a SHA-256 (a spec's) must still have that content, or the image would not be the one the spec names.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from renderfarm.cluster import validate as fields
from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.kinds import sweep
from renderfarm.cluster.scheduler import Item
from renderfarm.cluster.validate import ModelLookup
from renderfarm.errors import InvalidJobError
from renderfarm.spec import ImageSpec, LoraSpec
from renderfarm.v1 import farm_pb2 as pb

STAGE = sweep.STAGE
# The axes an image of a render holds exactly one value of (sizes and schedulers: one, or none for the
# model's own).
ONE_VALUE = ("prompts", "seeds", "guidance_scales", "steps")
AT_MOST_ONE = ("sizes", "schedulers", "lora_sets")


@dataclass(frozen=True)
class Render:
    """The images of a render, in the order given, each once."""

    images: tuple[sweep.Sweep, ...]

    @property
    def total(self) -> int:
        return len(self.images)

    def specs(self) -> Iterator[ImageSpec]:
        for image in self.images:
            yield from image.specs()

    def items(self, job) -> Iterator[Item]:
        for image in self.images:
            yield from image.items(job)


def validate(request: pb.RenderSpec, config: FarmConfig, model_info: ModelLookup) -> Render:
    if not request.images:
        raise fields.invalid("render.images", "must hold at least one image")
    if len(request.images) > config.limits.max_images_per_job:
        raise fields.invalid(
            "render.images", f"{len(request.images)} images is over the limit of {config.limits.max_images_per_job} per job"
        )
    lora_sets: dict[bytes, tuple[LoraSpec, ...] | None] = {}
    images, seen = [], set()
    for index, image in enumerate(request.images):
        prefix = f"render.images[{index}]"
        _one_image(prefix, image)
        without_loras = pb.SweepSpec()
        without_loras.CopyFrom(image)
        without_loras.ClearField("lora_sets")
        with _named_within(prefix):
            one = sweep.validate(without_loras, config, model_info)
            key = image.lora_sets[0].SerializeToString(deterministic=True) if image.lora_sets else b""
            if key not in lora_sets:
                lora_sets[key] = sweep.lora_sets(image)[0]
        _check_digests(prefix, image, lora_sets[key])
        one = dataclasses.replace(one, lora_sets=(lora_sets[key],))
        [spec] = one.specs()
        if spec not in seen:  # a repeated image is one result, once
            seen.add(spec)
            images.append(one)
    return Render(tuple(images))


def _one_image(prefix: str, image: pb.SweepSpec) -> None:
    if image.models:
        raise fields.invalid(f"{prefix}.models", "an image of a render has one model: set model")
    for axis in ONE_VALUE:
        if len(getattr(image, axis)) != 1:
            raise fields.invalid(f"{prefix}.{axis}", f"must hold exactly one value (got {len(getattr(image, axis))}): "
                                 "an image of a render is one image; a sweep has axes")  # fmt: skip
    for axis in AT_MOST_ONE:
        if len(getattr(image, axis)) > 1:
            raise fields.invalid(f"{prefix}.{axis}", f"must hold at most one value (got {len(getattr(image, axis))})")
    if image.upscale:
        raise fields.invalid(f"{prefix}.upscale", "a render's images are not upscaled; upscale its results after")


def _check_digests(prefix: str, image: pb.SweepSpec, loras: tuple[LoraSpec, ...] | None) -> None:
    for index, (asked, found) in enumerate(zip(image.lora_sets[0].loras if image.lora_sets else (), loras or ())):
        if asked.sha256 and asked.sha256 != found.sha256:
            raise fields.invalid(
                f"{prefix}.lora_sets[0].loras[{index}].sha256",
                f"the file at {found.path} now has SHA-256 {found.sha256[:12]}..., not {asked.sha256[:12]}...: "
                "it is not the LoRA the image was rendered with",
            )


@contextlib.contextmanager
def _named_within(prefix: str):
    """Names a sweep's InvalidJobError as the render image's: "sweep.steps[0]" as "render.images[3].steps[0]"."""
    try:
        yield
    except InvalidJobError as error:
        if not (error.field or "").startswith("sweep"):
            raise
        message = str(error).removeprefix(f"{error.field}: ")
        raise fields.invalid(prefix + error.field.removeprefix("sweep"), message) from None
