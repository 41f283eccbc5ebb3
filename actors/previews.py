"""What a denoiser reports while a batch runs: its steps, and previews of its images.

A preview is the step's denoised estimate (the scheduler's predicted original
sample, else the latents) through a fixed linear latent-to-RGB map, one pixel
per latent pixel: what A1111 calls "Approx cheap" and ComfyUI's latent
previews do, with no model of its own. It reads the loop's tensors and never
writes them, so previews change no pixel of the result.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import PIL.Image
import torch

from renderfarm.actors.txt2img import SDXL_PIPELINE, Step
from renderfarm.cluster.constants import STEP_REPORT_INTERVAL_S

# Rows: latent channels; columns: R, G, B. ComfyUI's latent_rgb_factors (comfy/latent_formats.py) for SD 1.x/2.x
# and SDXL latents, as the loop holds them (scaled by the VAE's scaling factor).
SD_LATENT_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))
SDXL_LATENT_RGB = ((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755), (-0.3112, -0.2359, -0.2076))


@dataclass(frozen=True)
class Watch:
    """What a batch's watchers asked for: each item's preview interval in steps (0: none; the batch's padding
    has none), and whether timed step reports are wanted (by a watcher without previews)."""

    preview_every: tuple[int, ...]
    timed: bool


@dataclass(frozen=True)
class StepReport:
    step: int  # steps done
    steps: int
    timed: bool  # one of the few-a-second reports; otherwise only previews were due
    previews: dict[int, bytes] = field(default_factory=dict)  # item index -> PNG


@dataclass(frozen=True)
class Denoised:
    """The last report of a denoise call: the value after it is the batch's latents."""


def latent_rgb(pipeline: str) -> torch.Tensor:
    """The [C, 3] latent-to-RGB map of a pipeline's latents."""
    return torch.tensor(SDXL_LATENT_RGB if pipeline == SDXL_PIPELINE else SD_LATENT_RGB)


def preview_png(latents: torch.Tensor, factors: torch.Tensor) -> bytes:
    """One item's latents [C, h, w] as an h x w RGB PNG, through `factors` [C, 3]."""
    with torch.inference_mode():
        rgb = torch.einsum("chw,cr->hwr", latents.float().cpu(), factors)
        pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels.numpy(), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Reporter:
    """Decides, step by step, what a watched batch reports: previews when an item's are due, and otherwise at
    most one timed report each STEP_REPORT_INTERVAL_S."""

    def __init__(self, watch: Watch | None, pipeline: str, clock: Callable[[], float] = time.monotonic):
        self._watch = watch
        self._clock = clock
        self._last = clock()
        self._factors = latent_rgb(pipeline)

    def at(self, step: Step) -> StepReport | None:
        if self._watch is None:
            return None
        due = [index for index, every in enumerate(self._watch.preview_every) if every and step.index % every == 0]
        now = self._clock()
        timed = self._watch.timed and now - self._last >= STEP_REPORT_INTERVAL_S
        if not due and not timed:
            return None
        if timed:
            self._last = now
        previews = {index: preview_png(step.denoised[index], self._factors) for index in due}
        return StepReport(step.index, step.count, timed, previews)
