"""Image-to-image and inpainting, stage by stage, written to match StableDiffusionImg2ImgPipeline,
StableDiffusionXLImg2ImgPipeline and StableDiffusionInpaintPipeline (9-channel UNets) step for step.

As in txt2img.py, parity with diffusers is by construction. One split the pipelines do not make: a VAE
replica encodes each source once per job and model, for every seed, so it returns the latent distribution's
parameters and the denoiser samples them with each item's own generator. Each generator is drawn from in the
pipeline's order:

- img2img: the image latents' sample, the noise, then whatever the scheduler draws at each step;
- inpainting: the image latents' sample (only where strength < 1), the noise, the masked image latents'
  sample, then the scheduler's draws.

The denoiser's latents decode with txt2img.decode, as the pipelines decode theirs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from renderfarm.actors import txt2img
from renderfarm.actors.schedulers import make_scheduler

# The UNet input channels of img2img (the latents alone) and of inpainting (the latents, the mask and the
# masked image's latents).
IMG2IMG_CHANNELS = 4
INPAINT_CHANNELS = 9


@dataclass(frozen=True)
class SourceLatents:
    """One source image as a VAE replica encodes it: the same for every seed. CPU tensors, for Ray's object store,
    in the layout the VAE returns (channels-last, which pickling keeps): the denoiser's rounding depends on it."""

    image_moments: torch.Tensor  # [1, 2C, h, w]: the image's latent_dist.parameters (means, then log-variances)
    # Inpainting's: the masked image's latent_dist.parameters, and the binarised mask (1 repaints) resized to
    # the latents, [1, 1, h, w] float32.
    masked_moments: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def source_size(image: PIL.Image.Image, vae_scale_factor: int) -> tuple[int, int]:
    """The (width, height) the img2img pipelines render a source at: its own, each rounded down to a multiple of
    the VAE's scale factor. (Given none, the inpainting pipeline renders at the model's default size instead.)"""
    width, height = image.size
    return width - width % vae_scale_factor, height - height % vae_scale_factor


def encode_source(
    vae: AutoencoderKL, image: PIL.Image.Image, width: int, height: int, mask: PIL.Image.Image | None = None
) -> SourceLatents:
    """An RGB source (and, to inpaint, its mask: white repaints) preprocessed to (width, height) and encoded, as the
    pipelines do before they sample."""
    scale = txt2img.vae_scale_factor(vae.config)
    if width % scale or height % scale:
        raise ValueError(f"width and height must be multiples of {scale}, not {width}x{height}: see source_size")
    pixels = VaeImageProcessor(vae_scale_factor=scale).preprocess(image, height=height, width=width)
    if mask is None:
        return SourceLatents(_moments(vae, pixels))
    mask_processor = VaeImageProcessor(
        vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    mask_condition = mask_processor.preprocess(mask, height=height, width=width)
    return SourceLatents(
        image_moments=_moments(vae, pixels),
        masked_moments=_moments(vae, pixels * (mask_condition < 0.5)),
        # As the pipeline resizes it: nearest, in float32, before the denoiser casts it to its dtype.
        mask=torch.nn.functional.interpolate(mask_condition, size=(height // scale, width // scale)),
    )


def _moments(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.parameters.cpu()


def denoising_steps(steps: int, strength: float) -> int:
    """How many of `steps` a run at `strength` takes (the pipelines' get_timesteps): the last ones."""
    return min(int(steps * strength), steps)


def denoise(
    components: txt2img.DenoiseComponents,
    batch: txt2img.DenoiseBatch,
    strength: float,
    sources: Sequence[SourceLatents],
    prompt_embeds: Sequence[txt2img.TextEmbedding],
    negative_embeds: Sequence[txt2img.TextEmbedding],
) -> torch.Tensor:
    """The whole scheduler loop from each item's source; returns the final latents [B, C, h, w].

    A 4-channel UNet runs img2img (sources without masks), a 9-channel one inpaints (sources with masks).
    """
    return txt2img.final_latents(denoising(components, batch, strength, sources, prompt_embeds, negative_embeds))


def denoising(
    components: txt2img.DenoiseComponents,
    batch: txt2img.DenoiseBatch,
    strength: float,
    sources: Sequence[SourceLatents],
    prompt_embeds: Sequence[txt2img.TextEmbedding],
    negative_embeds: Sequence[txt2img.TextEmbedding],
) -> Iterator[txt2img.Step]:
    """denoise(), step by step."""
    inpaint = _check(components, batch, strength, sources)
    unet = components.unet
    device, dtype = unet.device, unet.dtype
    scheduler = make_scheduler(batch.scheduler, components.scheduler_config)
    embeds, added_cond_kwargs = txt2img.text_conditioning(components, batch, prompt_embeds, negative_embeds)
    scheduler.set_timesteps(batch.steps, device=device)
    t_start = (batch.steps - denoising_steps(batch.steps, strength)) * scheduler.order
    timesteps = scheduler.timesteps[t_start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    # Every item is noised to the first timestep taken.
    latent_timestep = timesteps[:1].repeat(len(batch.items))

    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch.items]
    _, moments_channels, h, w = sources[0].image_moments.shape
    # The latents' shape: the moments are the means and the log-variances, channel for channel.
    shape = (len(batch.items), moments_channels // 2, h, w)
    # Inpainting at full strength starts from noise alone, and never samples the image's latents.
    from_noise = inpaint and strength == 1.0
    image_latents = None if from_noise else _sample(components, [s.image_moments for s in sources], generators)
    if inpaint and not from_noise:
        # The inpainting pipeline repeats its image latents, which lays them out contiguously, whereas the VAE
        # encodes in the preprocessed image's channels-last layout: the layout the loop runs in changes its rounding.
        image_latents = image_latents.contiguous()
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    if from_noise:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, latent_timestep)

    if inpaint:
        mask = torch.cat([source.mask for source in sources]).to(device=device, dtype=dtype)
        masked_latents = _sample(components, [s.masked_moments for s in sources], generators)
        # The unconditional rows take the same conditioning image.
        conditioning = torch.cat([mask, masked_latents], dim=1)
        if batch.guided:
            conditioning = torch.cat([conditioning] * 2)

    step_kwargs = txt2img.scheduler_step_kwargs(scheduler, generators)
    guidance = txt2img.guidance_scales(batch, device, dtype)
    yield from txt2img.sample(
        unet, scheduler, timesteps, latents, embeds, added_cond_kwargs, batch, guidance, step_kwargs,
        conditioning if inpaint else None,
    )  # fmt: skip


def _check(
    components: txt2img.DenoiseComponents,
    batch: txt2img.DenoiseBatch,
    strength: float,
    sources: Sequence[SourceLatents],
) -> bool:
    """Whether the batch inpaints; raises ValueError for what the pipelines refuse or the farm does not run."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], not {strength}")
    if denoising_steps(batch.steps, strength) < 1:
        raise ValueError(
            f"strength {strength} takes none of {batch.steps} steps: raise strength or steps to take at least one"
        )
    if len(sources) != len(batch.items):
        raise ValueError(f"{len(sources)} sources for {len(batch.items)} items: each item needs its own")
    in_channels = components.unet.config.in_channels
    if in_channels not in (IMG2IMG_CHANNELS, INPAINT_CHANNELS):
        raise ValueError(f"img2img and inpainting take a UNet of 4 or 9 input channels, not {in_channels}")
    inpaint = in_channels == INPAINT_CHANNELS
    if inpaint and components.pipeline == txt2img.SDXL_PIPELINE:
        raise ValueError("SDXL inpainting models are not supported: inpaint with an SD 1.x inpainting model")
    for source in sources:
        if inpaint and source.mask is None:
            raise ValueError("an inpainting model takes a mask with every source: use a 4-channel model for img2img")
        if not inpaint and source.mask is not None:
            raise ValueError("inpainting takes an inpainting model (a UNet of 9 input channels); this one runs img2img")
    latent_size = (batch.height // components.vae_scale_factor, batch.width // components.vae_scale_factor)
    for source in sources:
        if tuple(source.image_moments.shape[2:]) != latent_size:
            raise ValueError(
                f"a source encoded at {source.image_moments.shape[3]}x{source.image_moments.shape[2]} latents "
                f"in a {batch.width}x{batch.height} batch: encode it at the batch's width and height"
            )
    return inpaint


def _sample(
    components: txt2img.DenoiseComponents, moments: Sequence[torch.Tensor], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Each item's latents drawn from its encoding with its own generator, then scaled: retrieve_latents, as the
    pipelines call it with one generator per image."""
    device, dtype = components.unet.device, components.unet.dtype
    samples = torch.cat(
        [
            # In the encoding's own dtype, as the pipelines sample in the VAE's.
            DiagonalGaussianDistribution(item.to(device=device)).sample(generator)
            for item, generator in zip(moments, generators, strict=True)
        ]
    )
    return scale_latents(components.vae_config, samples.to(dtype=dtype))


def scale_latents(vae_config: Mapping, latents: torch.Tensor) -> torch.Tensor:
    """Sampled latents as the denoiser takes them, the inverse of txt2img.unscale_latents: normalised with the VAE's
    latents_mean and latents_std where its config has both (as the SDXL pipeline does), else times its scaling factor."""
    if vae_config.get("latents_mean") is not None and vae_config.get("latents_std") is not None:
        mean = torch.tensor(vae_config["latents_mean"]).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(vae_config["latents_std"]).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return (latents - mean) * vae_config["scaling_factor"] / std
    return vae_config["scaling_factor"] * latents
