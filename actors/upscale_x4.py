"""The x4 upscaler, stage by stage, written to match StableDiffusionUpscalePipeline step for step.

As in txt2img.py, parity with diffusers is by construction: each function below
does what the pipeline's ``__call__`` does for its stage, in the same order and
with the same tensors, so for one image on CPU fp32 the pixels are identical.
Prompts are encoded with txt2img.encode_text: the pipeline's encode_prompt is
the text-to-image pipeline's, copied; the latents decode with txt2img.decode,
the VAE loaded by txt2img.load_vae (which upcasts it as the pipeline does).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from renderfarm.actors import txt2img
from renderfarm.spec import guided


def preprocess(image: PIL.Image.Image, vae_scale_factor: int) -> torch.Tensor:
    """The low-resolution image as the pipeline takes it: [1, 3, h, w] in [-1, 1].

    Like the pipeline's, this rounds the width and height down to multiples of
    `vae_scale_factor`, resizing bicubically.
    """
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor, resample="bicubic").preprocess(image)


@dataclass(frozen=True)
class Share:
    """This replica's part of an image whose UNet windows are spread over `parties` replicas.

    It runs windows rank, rank + parties, ...; `gather` takes this replica's per-window values
    (window index -> tensor) and returns every window's, once all parties have given theirs.
    """

    rank: int = 0
    parties: int = 1
    gather: Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]] = field(default=lambda values: values)


def upscale_latents(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    low_res_scheduler: DDPMScheduler,
    image: torch.Tensor,
    prompt_embeds: txt2img.TextEmbedding,
    negative_embeds: txt2img.TextEmbedding | None,
    steps: int,
    guidance_scale: float,
    noise_level: int,
    seed: int,
    tile: int | None = None,
    share: Share = Share(),
) -> torch.Tensor:
    """The whole scheduler loop for one image; returns the final latents [1, C, h, w], at the image's size.

    `image` comes from preprocess(). `negative_embeds` is only used when
    guidance_scale > 1, where the pipeline encodes "" if no negative prompt is given.
    With `tile` (pixels of the low-resolution image), the UNet runs on overlapping
    windows of at most tile x tile whose predictions are blended with feathered
    weights at every step (MultiDiffusion); the noise is still drawn once over the
    whole canvas, so overlapping windows share it and a one-window image is the
    pipeline's exactly. With a `share`, every party runs this same loop over the whole
    (small) latent canvas but the UNet on its share of the windows only, and all parties
    end with the same latents.
    """
    # The pipeline keeps the image and the latents in the text encoder's dtype, which there is the UNet's; the
    # farm's encoders may run in another.
    device, dtype = unet.device, unet.dtype
    with_guidance = guided(guidance_scale)
    embeds = prompt_embeds.hidden.to(device=device, dtype=dtype)
    if with_guidance:
        embeds = torch.cat([negative_embeds.hidden.to(device=device, dtype=dtype), embeds])

    with torch.inference_mode():
        image = image.to(device=device, dtype=dtype)
        scheduler.set_timesteps(steps, device=device)

        # One generator for everything, drawn in the pipeline's order: the low-resolution
        # image's noise first, then the latents, then whatever the scheduler's steps draw.
        generator = torch.Generator("cpu").manual_seed(seed)
        noise_level = torch.tensor([noise_level], dtype=torch.long, device=device)
        noise = randn_tensor(image.shape, generator=generator, device=device, dtype=dtype)
        image = low_res_scheduler.add_noise(image, noise, noise_level)
        if with_guidance:
            image = torch.cat([image] * 2)
        # The UNet takes the noise level as its class label, one per batch row.
        noise_level = torch.cat([noise_level] * image.shape[0])

        # The UNet's input is the latents and the image, stacked along channels.
        latent_channels = unet.config.in_channels - image.shape[1]
        shape = (1, latent_channels, image.shape[2], image.shape[3])
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma

        step_kwargs = txt2img.scheduler_step_kwargs(scheduler, generator)

        align = unet_alignment(unet.config.block_out_channels)
        windows = tile_windows(image.shape[2], image.shape[3], tile, align)
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if with_guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image], dim=1)

            def predict(window_input: torch.Tensor) -> torch.Tensor:
                return unet(
                    window_input, t, encoder_hidden_states=embeds, class_labels=noise_level, return_dict=False
                )[0]

            noise_pred = blended(predict, model_input, windows, latent_channels, share)
            if with_guidance:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def unet_alignment(block_out_channels) -> int:
    """Latent pixels per pixel of the UNet's deepest level: windows start and end on multiples of it."""
    return 2 ** (len(block_out_channels) - 1)


# Overlap between neighbouring windows, as a fraction of the tile.
WINDOW_OVERLAP = 0.5


@dataclass(frozen=True)
class Window:
    """A UNet window in latent pixels, and the part of the canvas it owns for normalisation statistics."""

    top: int
    bottom: int
    left: int
    right: int
    own_top: int
    own_bottom: int
    own_left: int
    own_right: int


def _spans(length: int, tile: int, align: int) -> list[tuple[int, int, int, int]]:
    """(start, end, own_start, own_end) along one axis: windows overlapping by half, starts aligned."""
    if length <= tile:
        return [(0, length, 0, length)]
    stride = max(align, int(tile * (1 - WINDOW_OVERLAP)) // align * align)
    starts = sorted({*range(0, length - tile, stride), (length - tile) // align * align})
    ends = [start + tile for start in starts[:-1]] + [length]
    # Each window owns the canvas up to the middle of its overlap with the next one.
    middles = [((end + start) // 2) // align * align for end, start in zip(ends[:-1], starts[1:])]
    owns = [0, *middles, length]
    return [(s, e, owns[i], owns[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]


def tile_windows(height: int, width: int, tile: int | None, align: int = 1) -> list[Window]:
    """Windows of about tile x tile covering the canvas; their owned parts partition it."""
    tile = max(height, width) if tile is None else tile
    return [
        Window(top, bottom, left, right, own_top, own_bottom, own_left, own_right)
        for top, bottom, own_top, own_bottom in _spans(height, tile, align)
        for left, right, own_left, own_right in _spans(width, tile, align)
    ]


def feather(window: Window, height: int, width: int, ramp: int) -> torch.Tensor:
    """[1, 1, h, w] weights rising linearly over `ramp` pixels from each window edge inside the canvas."""

    def profile(start: int, end: int, length: int) -> torch.Tensor:
        position = torch.arange(end - start, dtype=torch.float32)
        rising = (position + 1) / ramp if start > 0 else torch.ones(end - start)
        falling = (end - start - position) / ramp if end < length else torch.ones(end - start)
        return torch.minimum(rising, falling).clamp(max=1)

    rows = profile(window.top, window.bottom, height)
    columns = profile(window.left, window.right, width)
    return (rows[:, None] * columns[None, :])[None, None]


def blended(
    predict, model_input: torch.Tensor, windows: list[Window], out_channels: int, share: Share = Share()
) -> torch.Tensor:
    """The UNet's prediction over the whole canvas: one call, or feathered windows run in lockstep.

    Windows run on threads that meet at every GroupNorm, which then normalises with the
    statistics of the whole canvas (summed over the windows' owned parts), as one call would.
    With a `share`, this replica runs its share of the windows and the meetings and the
    blend take in every party's windows. Sums and the blend go in window order, from the
    values of single windows, so the result has the same bits for any number of parties.
    """
    if len(windows) == 1:
        return predict(model_input)
    batch, _, height, width = model_input.shape
    here = range(share.rank, len(windows), share.parties)
    meeting = _Meeting(len(here), share.gather)
    predictions: dict[int, torch.Tensor] = {}

    def run(index: int) -> None:
        window = windows[index]
        _window_context.value = (meeting, index, window)
        try:
            with torch.inference_mode():  # grad mode is per thread
                predictions[index] = predict(model_input[..., window.top : window.bottom, window.left : window.right])
        except BaseException:
            meeting.barrier.abort()
            raise
        finally:
            _window_context.value = None

    with ThreadPoolExecutor(len(here)) as pool:
        for future in [pool.submit(run, index) for index in here]:
            future.result()
    predictions = share.gather(predictions)

    total = torch.zeros((batch, out_channels, height, width), dtype=model_input.dtype, device=model_input.device)
    weights = torch.zeros((1, 1, height, width), dtype=model_input.dtype, device=model_input.device)
    ramp = max(1, int((windows[0].bottom - windows[0].top) * WINDOW_OVERLAP))
    for index, window in enumerate(windows):
        weight = feather(window, height, width, ramp).to(model_input)
        total[..., window.top : window.bottom, window.left : window.right] += predictions[index] * weight
        weights[..., window.top : window.bottom, window.left : window.right] += weight
    return total / weights


_window_context = threading.local()


class _Meeting:
    """Where this replica's window threads meet, once per GroupNorm: each gets every window's value.

    The last thread to arrive merges this replica's values with the other parties' (`gather`)
    before any thread goes on.
    """

    def __init__(self, threads: int, gather):
        self._gather = gather
        self._values: dict[int, torch.Tensor] = {}
        self._merged: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.barrier = threading.Barrier(threads, action=self._merge)

    def _merge(self) -> None:
        self._merged, self._values = self._gather(self._values), {}

    def all_windows(self, index: int, value: torch.Tensor) -> dict[int, torch.Tensor]:
        with self._lock:
            self._values[index] = value
        self.barrier.wait()
        # No thread can start the next round's merge before this one has read this round's.
        return self._merged


def _group_norm_forward(norm: nn.GroupNorm, tensor: torch.Tensor) -> torch.Tensor:
    context = getattr(_window_context, "value", None)
    if context is None:
        return F.group_norm(tensor, norm.num_groups, norm.weight, norm.bias, norm.eps)
    meeting, index, window = context
    batch, channels, height, width = tensor.shape
    # This level's pixels per latent pixel, from the window's size (windows are aligned to it).
    scale_y, scale_x = (window.bottom - window.top) / height, (window.right - window.left) / width
    owned = tensor[
        ...,
        round((window.own_top - window.top) / scale_y) : round((window.own_bottom - window.top) / scale_y),
        round((window.own_left - window.left) / scale_x) : round((window.own_right - window.left) / scale_x),
    ].double().reshape(batch, norm.num_groups, -1)
    partial = torch.stack(
        [torch.full_like(owned[..., 0], owned.shape[-1]), owned.sum(-1), owned.square().sum(-1)], dim=-1
    )
    partials = meeting.all_windows(index, partial)
    # In window order, so every window and every party gets the same bits.
    count, total, squares = sum(partials[i] for i in sorted(partials)).unbind(-1)
    mean = total / count
    inverse_std = torch.rsqrt(squares / count - mean.square() + norm.eps)
    grouped = tensor.float().reshape(batch, norm.num_groups, -1)
    normed = ((grouped - mean.float()[..., None]) * inverse_std.float()[..., None]).reshape(tensor.shape)
    return normed.to(tensor.dtype) * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def synchronise_group_norms(unet: UNet2DConditionModel) -> None:
    """Lets the UNet's GroupNorms take whole-canvas statistics when run inside blended()'s windows."""
    for module in unet.modules():
        if isinstance(module, nn.GroupNorm):
            module.forward = partial(_group_norm_forward, module)

