"""What the scheduler needs to know of a model, read from its config files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from renderfarm.actors.tiles import exact_halo, segment_count


@dataclass(frozen=True)
class ModelInfo:
    """A model's native size, its own scheduler, and its VAE's geometry."""

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
    """Raises ValueError (ModelNotFoundError) for a reference that resolves to no model."""
    from renderfarm.actors.models import default_image_size, read_config, resolve_model, scheduler_class_name
    from renderfarm.actors.schedulers import SCHEDULER_CLASSES
    from renderfarm.actors.upscale_x4 import unet_alignment

    model_dir = resolve_model(model, model_cache_dir)
    width, height = default_image_size(model_dir)
    class_name = scheduler_class_name(model_dir)
    names = [name for name, cls in SCHEDULER_CLASSES.items() if cls.__name__ == class_name]
    vae = read_config(model_dir, "vae")
    unet = read_config(model_dir, "unet")
    pipeline = json.loads((model_dir / "model_index.json").read_text())
    up_blocks, resnets = len(vae["block_out_channels"]), vae["layers_per_block"] + 1
    return ModelInfo(
        width=width,
        height=height,
        scheduler=names[0] if names else class_name,
        vae_scale_factor=2 ** (up_blocks - 1),
        latent_channels=vae["latent_channels"],
        decode_segments=segment_count(up_blocks, resnets),
        decode_halo=exact_halo(up_blocks, resnets),
        is_upscaler=unet["in_channels"] > vae["latent_channels"],
        max_noise_level=pipeline.get("max_noise_level", 0),
        unet_alignment=unet_alignment(unet["block_out_channels"]),
    )
