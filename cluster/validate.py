"""Request validation: a wire request becomes a Sweep, or InvalidJobError naming the field.

Nothing is created before validation passes, so a bad request leaves no trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from renderfarm.cluster.config import LimitsConfig
from renderfarm.cluster.constants import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    MAX_SEED,
    SIZE_MULTIPLE,
)
from renderfarm.cluster.planner import Sweep
from renderfarm.errors import InvalidJobError
from renderfarm.spec import SCHEDULER_LABELS
from renderfarm.v1 import farm_pb2 as pb


@dataclass(frozen=True)
class ModelDefaults:
    """What an unset axis means for a model: its native size and its own scheduler."""

    width: int
    height: int
    scheduler: str


def invalid(field: str, message: str) -> InvalidJobError:
    return InvalidJobError(f"{field}: {message}", field=field)


def validate_sweep(
    request: pb.SubmitJobRequest,
    limits: LimitsConfig,
    model_defaults: Callable[[str], ModelDefaults],
) -> Sweep:
    """`model_defaults` raises ValueError for a model that cannot be resolved."""
    if request.WhichOneof("kind") != "sweep":
        raise invalid("kind", "the request names no job (set sweep)")
    sweep = request.sweep
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

    # Checked before the model, so an oversized sweep is refused without touching it.
    axes = (prompts, seeds, guidance_scales, steps, sweep.sizes or [None], sweep.schedulers or [None])
    total = math.prod(len(axis) for axis in axes)
    if total > limits.max_images_per_job:
        raise invalid("sweep", f"{total} images is over the limit of {limits.max_images_per_job} per job")

    if not sweep.model:
        raise invalid("sweep.model", "must name a model, e.g. builtin:tiny-sd")
    try:
        defaults = model_defaults(sweep.model)
    except ValueError as error:
        raise invalid("sweep.model", str(error)) from None
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


def _prompts(sweep: pb.SweepSpec, limits: LimitsConfig) -> tuple[str, ...]:
    if not sweep.prompts:
        raise invalid("sweep.prompts", "must hold at least one prompt")
    if len(sweep.prompts) > limits.max_prompts_per_job:
        raise invalid("sweep.prompts", f"{len(sweep.prompts)} prompts is over the limit of {limits.max_prompts_per_job}")
    for i, prompt in enumerate(sweep.prompts):
        _text(f"sweep.prompts[{i}]", prompt, limits)
        if not prompt.strip():
            raise invalid(f"sweep.prompts[{i}]", "must not be blank")
    return tuple(sweep.prompts)


def _text(field: str, text: str, limits: LimitsConfig) -> None:
    if len(text) > limits.max_prompt_chars:
        raise invalid(field, f"{len(text)} characters is over the limit of {limits.max_prompt_chars}")
    if "\x00" in text:
        raise invalid(field, "must not contain NUL characters")
