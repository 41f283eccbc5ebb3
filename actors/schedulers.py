"""Scheduler names the farm accepts, each built from the model's own scheduler config."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from renderfarm.spec import SCHEDULER_LABELS

SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
assert SCHEDULER_CLASSES.keys() == SCHEDULER_LABELS.keys()


def make_scheduler(name: str, model_config) -> SchedulerMixin:
    """A fresh scheduler (they are stateful): Class.from_config(model's config), no other overrides."""
    return SCHEDULER_CLASSES[name].from_config(model_config)
