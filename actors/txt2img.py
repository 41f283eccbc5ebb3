"""Text-to-image, stage by stage, written to match StableDiffusionPipeline and
StableDiffusionXLPipeline step for step.

Parity with diffusers (the same pixels as its pipeline) is by construction: each
function below does what the model's pipeline's ``__call__`` does for its
stage, in the same order and with the same tensors, so at batch 1 on CPU fp32
the pixels are identical. Batching adds per-item generators and guidance scales.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from renderfarm.actors.models import MODEL_INDEX, read_config
from renderfarm.actors.schedulers import make_scheduler
from renderfarm.actors.speed import TEXT_ENCODER_ATTENTION, Speed
from renderfarm.spec import guided

# model_index.json's _class_name of the pipelines whose stages these are; the x4 upscaler's
# prompts and latents go through the SD functions here too.
SD_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
# The pipelines that decode with an fp16 model's VAE upcast to fp32 where its config says force_upcast (load_vae
# is the farm's one place for that rule); StableDiffusionPipeline decodes in the model's dtype whatever the config says.
UPCAST_VAE_PIPELINES = (SDXL_PIPELINE, UPSCALE_PIPELINE)


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


@dataclass(frozen=True)
class TextEmbedding:
    """One text's embedding, as the denoiser takes it. Replicas hand it on through Ray's object store."""

    hidden: torch.Tensor  # [1, 77, D]: the UNet's encoder_hidden_states
    pooled: torch.Tensor | None = None  # [1, P], SDXL's only: text_encoder_2's projected pooled output

    def cpu(self) -> TextEmbedding:
        # Ray's object store holds CPU memory.
        return TextEmbedding(self.hidden.cpu(), None if self.pooled is None else self.pooled.cpu())


@dataclass(frozen=True)
class TextEncoders:
    """A model's tokenizers and text encoders, paired in the pipeline's order."""

    pipeline: str
    tokenizers: tuple[CLIPTokenizer, ...]
    encoders: tuple[CLIPTextModel | CLIPTextModelWithProjection, ...]
    # The SDXL pipeline's force_zeros_for_empty_prompt: no negative prompt embeds as zeros.
    zeros_for_empty_prompt: bool


@dataclass(frozen=True)
class DenoiseComponents:
    """What the scheduler loop needs of a model."""

    pipeline: str
    unet: UNet2DConditionModel
    scheduler_config: Mapping
    vae_scale_factor: int
    # The VAE's config: img2img scales the latents it samples from a source's encoding as the VAE's pipeline does.
    vae_config: Mapping


def load_text_encoders(model_dir: Path, device, dtype: torch.dtype) -> TextEncoders:
    index = _model_index(model_dir)
    xl = index["_class_name"] == SDXL_PIPELINE
    pairs = [("tokenizer", "text_encoder", CLIPTextModel)]
    if xl:
        pairs.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    return TextEncoders(
        pipeline=index["_class_name"],
        tokenizers=tuple(CLIPTokenizer.from_pretrained(model_dir, subfolder=name) for name, _, _ in pairs),
        encoders=tuple(
            model_class.from_pretrained(
                model_dir, subfolder=name, dtype=dtype, use_safetensors=True, attn_implementation=TEXT_ENCODER_ATTENTION
            )
            .to(device)
            .eval()
            for _, name, model_class in pairs
        ),
        # True is the SDXL pipeline's default, for a model_index.json without the setting.
        zeros_for_empty_prompt=xl and index.get("force_zeros_for_empty_prompt", True),
    )


def load_denoiser(model_dir: Path, device, dtype: torch.dtype, speed: Speed = Speed()) -> DenoiseComponents:
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=dtype, use_safetensors=True)
    unet = unet.to(device).eval()
    speed.apply(unet, compiled=unet)
    vae_config = read_config(model_dir, "vae")
    return DenoiseComponents(
        pipeline=_model_index(model_dir)["_class_name"],
        unet=unet,
        # The scheduler's config alone: each batch builds a fresh scheduler of the class it names.
        scheduler_config=DDIMScheduler.load_config(model_dir, subfolder="scheduler"),
        vae_scale_factor=vae_scale_factor(vae_config),
        vae_config=vae_config,
    )


def load_vae(model_dir: Path, device, dtype: torch.dtype, speed: Speed = Speed()) -> AutoencoderKL:
    """The VAE, which decodes and encodes in `dtype`, or in fp32 where the model's pipeline upcasts it."""
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=dtype, use_safetensors=True)
    pipeline = _model_index(model_dir)["_class_name"]
    if dtype == torch.float16 and vae.config.force_upcast and pipeline in UPCAST_VAE_PIPELINES:
        # As those pipelines decode: their VAE overflows in fp16, so it runs in fp32 (the weights as loaded in fp16).
        vae.to(dtype=torch.float32)
    vae = vae.to(device).eval()
    # The tiled decode runs the decoder's parts one by one, uncompiled; a whole decode runs the compiled decoder.
    speed.apply(vae, compiled=vae.decoder)
    return vae


def encode_text(encoders: TextEncoders, text: str) -> TextEmbedding:
    """One text's embedding, encoded alone (batch 1) as the model's pipeline encodes a prompt.

    The farm's empty negative prompt is the pipeline's negative_prompt=None: for SD that encodes "", and
    for an SDXL model with zeros_for_empty_prompt it is zeros. Prompts are never empty.
    """
    if encoders.pipeline != SDXL_PIPELINE:
        return TextEmbedding(_encode_sd(encoders.tokenizers[0], encoders.encoders[0], text))
    penultimate, pooled = [], None
    for tokenizer, text_encoder in zip(encoders.tokenizers, encoders.encoders, strict=True):
        with torch.inference_mode():
            output = text_encoder(_tokens(tokenizer, text).input_ids.to(text_encoder.device), output_hidden_states=True)
        # Only the encoder with a projection has a 2-D first output: the pooled embedding.
        if pooled is None and output[0].ndim == 2:
            pooled = output[0]
        penultimate.append(output.hidden_states[-2])
    hidden = torch.concat(penultimate, dim=-1)
    if text == "" and encoders.zeros_for_empty_prompt:
        hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    return TextEmbedding(hidden.to(dtype=encoders.encoders[-1].dtype), pooled)


def _encode_sd(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, text: str) -> torch.Tensor:
    tokens = _tokens(tokenizer, text)
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(text_encoder.device)
    with torch.inference_mode():
        embedding = text_encoder(tokens.input_ids.to(text_encoder.device), attention_mask=attention_mask)[0]
    return embedding.to(dtype=text_encoder.dtype)


def _tokens(tokenizer: CLIPTokenizer, text: str):
    return tokenizer(
        [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )


def denoise(
    components: DenoiseComponents,
    batch: DenoiseBatch,
    prompt_embeds: Sequence[TextEmbedding],
    negative_embeds: Sequence[TextEmbedding],
) -> torch.Tensor:
    """The whole scheduler loop in one call; returns the final latents [B, C, h, w]."""
    return final_latents(denoising(components, batch, prompt_embeds, negative_embeds))


def denoising(
    components: DenoiseComponents,
    batch: DenoiseBatch,
    prompt_embeds: Sequence[TextEmbedding],
    negative_embeds: Sequence[TextEmbedding],
) -> Iterator[Step]:
    """denoise(), step by step."""
    unet, vae_scale_factor = components.unet, components.vae_scale_factor
    device, dtype = unet.device, unet.dtype
    scheduler = make_scheduler(batch.scheduler, components.scheduler_config)
    embeds, added_cond_kwargs = text_conditioning(components, batch, prompt_embeds, negative_embeds)
    scheduler.set_timesteps(batch.steps, device=device)
    timesteps = scheduler.timesteps

    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch.items]
    shape = (len(batch.items), unet.config.in_channels, batch.height // vae_scale_factor, batch.width // vae_scale_factor)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * scheduler.init_noise_sigma

    step_kwargs = scheduler_step_kwargs(scheduler, generators)
    guidance = guidance_scales(batch, device, dtype)
    if components.pipeline == SDXL_PIPELINE and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)

    yield from sample(unet, scheduler, timesteps, latents, embeds, added_cond_kwargs, batch, guidance, step_kwargs)


@dataclass(frozen=True)
class Step:
    """The loop after step `index` (1 to `count`): its latents, and the scheduler's estimate of the final sample
    where its step gives one (else the latents), which previews show."""

    index: int
    count: int
    latents: torch.Tensor
    denoised: torch.Tensor


def final_latents(steps: Iterator[Step]) -> torch.Tensor:
    for step in steps:
        pass
    return step.latents


def sample(unet, scheduler, timesteps, latents, embeds, added_cond_kwargs, batch: DenoiseBatch, guidance, step_kwargs,
           conditioning: torch.Tensor | None = None) -> Iterator[Step]:  # fmt: skip
    """The pipelines' denoising loop, shared by every kind, one Step at a time: the unconditional and text halves
    in one UNet call when guided, then the guidance mix and the scheduler's step. `conditioning`: channels the
    UNet also takes (an inpainting model's mask and masked image), after the scaled latents."""
    for index, t in enumerate(timesteps, 1):
        # Per step, not around the loop: the caller runs between steps, outside the loop's inference mode.
        with torch.inference_mode():
            model_input = torch.cat([latents] * 2) if batch.guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if conditioning is not None:
                model_input = torch.cat([model_input, conditioning], dim=1)
            noise_pred = unet(
                model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added_cond_kwargs, return_dict=False
            )[0]
            if batch.guided:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance * (noise_text - noise_uncond)
            else:
                # A UNet compiled with CUDA graphs (reduce-overhead, max-autotune) reuses its output's memory on
                # its next call, and some schedulers keep the output for later steps (PNDM).
                noise_pred = noise_pred.clone()
            # (prev_sample, pred_original_sample) from the schedulers that estimate it; (prev_sample,) otherwise.
            output = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)
        latents = output[0]
        yield Step(index, len(timesteps), latents, output[1] if len(output) > 1 and output[1] is not None else latents)


def text_conditioning(
    components: DenoiseComponents,
    batch: DenoiseBatch,
    prompt_embeds: Sequence[TextEmbedding],
    negative_embeds: Sequence[TextEmbedding],
) -> tuple[torch.Tensor, dict | None]:
    """The UNet's encoder_hidden_states and, for SDXL, its added_cond_kwargs, for every row of the loop."""
    device, dtype = components.unet.device, components.unet.dtype
    # Unconditional rows first, as the pipelines concatenate them.
    texts = [*negative_embeds, *prompt_embeds] if batch.guided else list(prompt_embeds)
    embeds = torch.cat([e.hidden.to(device=device, dtype=dtype) for e in texts])
    if components.pipeline != SDXL_PIPELINE:
        return embeds, None
    # The pipeline's defaults: original_size = target_size = (height, width), crops_coords_top_left = (0, 0).
    time_ids = [batch.height, batch.width, 0, 0, batch.height, batch.width]
    return embeds, {
        "text_embeds": torch.cat([e.pooled.to(device=device, dtype=dtype) for e in texts]),
        "time_ids": torch.tensor([time_ids], dtype=dtype, device=device).repeat(len(texts), 1),
    }


def scheduler_step_kwargs(scheduler, generator) -> dict:
    """The pipelines' prepare_extra_step_kwargs: eta=0 and the generator, for the schedulers that take them."""
    parameters = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in parameters:
        kwargs["eta"] = 0.0
    if "generator" in parameters:
        kwargs["generator"] = generator
    return kwargs


def guidance_scales(batch: DenoiseBatch, device, dtype) -> float | torch.Tensor:
    """The items' guidance scales, as the loop multiplies the guided noise prediction by them."""
    scales = [item.guidance_scale for item in batch.items]
    if len(set(scales)) == 1:
        return scales[0]  # a Python float, exactly as the pipeline multiplies
    return torch.tensor(scales, device=device, dtype=dtype).view(-1, 1, 1, 1)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Latents to images, through the pipeline's own post-processing."""
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    with torch.inference_mode():
        images = vae.decode(unscale_latents(vae, latents), return_dict=False)[0]
    # Post-processed in fp32 whatever the VAE's dtype: in bf16 the denormalisation would round the pixels again.
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae.config)).postprocess(
        images.float(), output_type="pil", do_denormalize=[True] * images.shape[0]
    )


def unscale_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """The denoiser's latents as the VAE decodes them: denormalised with the VAE's latents_mean and latents_std
    where its config has both (as the SDXL pipeline does), else divided by its scaling factor."""
    config = vae.config
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor


def vae_scale_factor(vae_config: Mapping) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _model_index(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / MODEL_INDEX).read_text(encoding="utf-8"))
