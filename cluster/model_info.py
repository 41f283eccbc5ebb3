"""What the scheduler needs to know of a model, read from its config files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from renderfarm.actors.tiles import exact_halo, segment_count

# The diffusers pipelines the farm runs, by model_index.json's _class_name.
TEXT_TO_IMAGE = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# A text-to-image model's components also make its img2img pipeline.
IMAGE_TO_IMAGE = TEXT_TO_IMAGE
INPAINTING = ("StableDiffusionInpaintPipeline",)
UPSCALER = "StableDiffusionUpscalePipeline"
SUPPORTED_PIPELINES = (*TEXT_TO_IMAGE, *INPAINTING, UPSCALER)
# Components whose weights the stages load; each must hold them as safetensors.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelInfo:
    """A model's pipeline class, native size, its own scheduler, and its VAE's geometry."""

    pipeline: str
    width: int
    height: int
    scheduler: str
    vae_scale_factor: int
    latent_channels: int
    decode_segments: int
    decode_halo: int  # latent pixels that make a tiled decode exact
    # An x4 upscaler's UNet also takes the low-resolution image; its pipeline caps the noise level.
    is_upscaler: bool
    max_noise_level: int
    # Latent pixels per pixel of the UNet's deepest level: where upscale windows may start.
    unet_alignment: int


@cache
def model_info(model: str, model_cache_dir: Path) -> ModelInfo:
    """Raises ValueError (ModelNotFoundError) for a reference that resolves to no model, or to one the farm
    does not run: another pipeline, or weights stored as pickles."""
    from renderfarm.actors.models import default_image_size, read_config, resolve_model, scheduler_class_name
    from renderfarm.actors.schedulers import SCHEDULER_CLASSES
    from renderfarm.actors.upscale_x4 import unet_alignment

    model_dir = resolve_model(model, model_cache_dir)
    pipeline = json.loads((model_dir / "model_index.json").read_text())
    class_name = pipeline.get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"{model} is a {class_name}, which the farm does not run; it runs {', '.join(SUPPORTED_PIPELINES)}"
        )
    _check_weights(model, model_dir)
    width, height = default_image_size(model_dir)
    scheduler = scheduler_class_name(model_dir)
    names = [name for name, cls in SCHEDULER_CLASSES.items() if cls.__name__ == scheduler]
    vae = read_config(model_dir, "vae")
    unet = read_config(model_dir, "unet")
    up_blocks, resnets = len(vae["block_out_channels"]), vae["layers_per_block"] + 1
    return ModelInfo(
        pipeline=class_name,
        width=width,
        height=height,
        scheduler=names[0] if names else scheduler,
        vae_scale_factor=2 ** (up_blocks - 1),
        latent_channels=vae["latent_channels"],
        decode_segments=segment_count(up_blocks, resnets),
        decode_halo=exact_halo(up_blocks, resnets),
        is_upscaler=class_name == UPSCALER,
        max_noise_level=pipeline.get("max_noise_level", 0),
        unet_alignment=unet_alignment(unet["block_out_channels"]),
    )


def _check_weights(model: str, model_dir: Path) -> None:
    """Every weight-bearing component holds safetensors: a pickle can run code when loaded, so none is."""
    for component in WEIGHT_COMPONENTS:
        directory = model_dir / component
        if not directory.is_dir() or any(directory.glob("*.safetensors")):
            continue
        pickles = sorted(path.name for path in directory.iterdir() if path.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{model}: {component}/ holds its weights as pickles ({', '.join(pickles)}), which can run code when "
                "loaded; the farm loads safetensors only: convert them (e.g. load the pipeline and save_pretrained "
                "it with safe_serialization=True)"
            )
        raise ValueError(f"{model}: {component}/ holds no weights (no .safetensors file)")
