"""Text-to-image, stage by stage, written to match StableDiffusionPipeline step for step.

Parity with diffusers (DESIGN.md invariant 2) is by construction: each
function below does what the pipeline's ``__call__`` does for its stage, in
the same order and with the same tensors, so at batch 1 on CPU fp32 the
pixels are identical. Batching adds per-item generators and guidance scales.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from renderfarm.actors.schedulers import make_scheduler
from renderfarm.spec import guided


@dataclass(frozen=True)
class DenoiseItem:
    seed: int
    guidance_scale: float


@dataclass(frozen=True)
class DenoiseBatch:
    """Items that share everything that shapes the loop; only seeds and guidance differ."""

    width: int
    height: int
    steps: int
    scheduler: str
    items: tuple[DenoiseItem, ...]

    @property
    def guided(self) -> bool:
        # The pipeline skips the unconditional pass when guidance_scale <= 1; the planner
        # never mixes guided and unguided items in a batch.
        return guided(self.items[0].guidance_scale)


def encode_text(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, text: str) -> torch.Tensor:
    """One prompt's embedding [1, 77, D], encoded alone as the pipeline encodes it."""
    ids = tokenizer(
        [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).attention_mask.to(text_encoder.device)
    with torch.inference_mode():
        embedding = text_encoder(ids.to(text_encoder.device), attention_mask=attention_mask)[0]
    return embedding.to(dtype=text_encoder.dtype)


def denoise(
    unet: UNet2DConditionModel,
    scheduler_config,
    vae_scale_factor: int,
    batch: DenoiseBatch,
    prompt_embeds: Sequence[torch.Tensor],
    negative_embeds: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The whole scheduler loop in one call; returns the final latents [B, C, h, w]."""
    device, dtype = unet.device, unet.dtype
    scheduler = make_scheduler(batch.scheduler, scheduler_config)
    embeds = torch.cat([e.to(device=device, dtype=dtype) for e in prompt_embeds])
    if batch.guided:
        embeds = torch.cat([torch.cat([e.to(device=device, dtype=dtype) for e in negative_embeds]), embeds])
    scheduler.set_timesteps(batch.steps, device=device)
    timesteps = scheduler.timesteps

    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch.items]
    shape = (len(batch.items), unet.config.in_channels, batch.height // vae_scale_factor, batch.width // vae_scale_factor)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * scheduler.init_noise_sigma

    step_kwargs = scheduler_step_kwargs(scheduler, generators)
    guidance = _guidance(batch, device, dtype)

    with torch.inference_mode():
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if batch.guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if batch.guided:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance * (noise_text - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def scheduler_step_kwargs(scheduler, generator) -> dict:
    """The pipelines' prepare_extra_step_kwargs: eta=0 and the generator, for the schedulers that take them."""
    parameters = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in parameters:
        kwargs["eta"] = 0.0
    if "generator" in parameters:
        kwargs["generator"] = generator
    return kwargs


def _guidance(batch: DenoiseBatch, device, dtype) -> float | torch.Tensor:
    scales = [item.guidance_scale for item in batch.items]
    if len(set(scales)) == 1:
        return scales[0]  # a Python float, exactly as the pipeline multiplies
    return torch.tensor(scales, device=device, dtype=dtype).view(-1, 1, 1, 1)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Latents to images, through the pipeline's own post-processing."""
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    with torch.inference_mode():
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae)).postprocess(
        images, output_type="pil", do_denormalize=[True] * images.shape[0]
    )


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
