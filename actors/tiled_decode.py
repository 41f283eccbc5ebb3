"""Tiled VAE decode that equals the one-piece decode, with memory bounded by the tile.

The decoder's conv_in and mid-block (with its attention) run once, untiled, at
latent resolution. The rest (up blocks and output head) is cut into segments
that each begin at a GroupNorm. Every tile runs a segment with that norm's
statistics over the whole image, aggregated from per-tile partial sums over
the tiles' non-overlapping cores, and reports the partial sums of the next
norm's input. Tiles carry a halo as wide as the convolutions' reach, so their
cores are what the one-piece decode computes; only the order of
floating-point sums differs.

The functions here run without Ray; `drive` is the one driver of their
steps: `tiled_decode` runs them in one process through it, and the farm's
executor runs the same steps across VAE replicas through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL
from torch import nn

from renderfarm.actors.tiles import Tile, exact_halo, plan_tiles
from renderfarm.actors.txt2img import unscale_latents

# A tile's activations between segments: the resnet input "x" and, mid-resnet, its branch "h".
TileState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Segment:
    norm: nn.GroupNorm
    activation: nn.Module
    source: str  # the state tensor the norm reads
    run: Callable[[TileState, torch.Tensor], TileState]  # the rest, given the normed, activated source
    scale: int  # pixels per latent pixel of the state the segment produces


def segments(vae: AutoencoderKL) -> list[Segment]:
    """The decoder after its mid-block, cut at each GroupNorm."""
    decoder, scale, cut = vae.decoder, 1, []
    for block in decoder.up_blocks:
        for index, resnet in enumerate(block.resnets):
            last = index == len(block.resnets) - 1
            upsamplers = block.upsamplers if last and block.upsamplers else ()
            cut.append(Segment(resnet.norm1, resnet.nonlinearity, "x", _first_half(resnet), scale))
            scale *= 2 if upsamplers else 1
            cut.append(Segment(resnet.norm2, resnet.nonlinearity, "h", _second_half(resnet, upsamplers), scale))
    cut.append(Segment(decoder.conv_norm_out, decoder.conv_act, "x", lambda _, a: {"x": decoder.conv_out(a)}, scale))
    return cut


def _first_half(resnet) -> Callable[[TileState, torch.Tensor], TileState]:
    # ResnetBlock2D.forward up to norm2 (decoder resnets have no time embedding, up- or downsampling).
    return lambda state, activated: {"x": state["x"], "h": resnet.conv1(activated)}


def _second_half(resnet, upsamplers) -> Callable[[TileState, torch.Tensor], TileState]:
    def run(state: TileState, activated: torch.Tensor) -> TileState:
        h = resnet.conv2(resnet.dropout(activated))
        x = resnet.conv_shortcut(state["x"]) if resnet.conv_shortcut is not None else state["x"]
        out = (x + h) / resnet.output_scale_factor
        for upsampler in upsamplers:
            out = upsampler(out)
        return {"x": out}

    return run


def partial_sums(tensor: torch.Tensor, groups: int) -> np.ndarray:
    """[groups, 3]: count, sum and sum of squares per group; float64, so tiles add up as one piece."""
    values = tensor.reshape(groups, -1).double()
    count = torch.full((groups,), values.shape[1], dtype=torch.float64, device=values.device)
    return torch.stack([count, values.sum(1), values.square().sum(1)], dim=1).cpu().numpy()


def group_norm(tensor: torch.Tensor, norm: nn.GroupNorm, sums: np.ndarray) -> torch.Tensor:
    """`norm` applied with whole-image statistics (biased variance, as torch's group_norm)."""
    count, total, squares = torch.tensor(sums, device=tensor.device).unbind(1)
    mean = total / count
    inverse_std = torch.rsqrt(squares / count - mean.square() + norm.eps)
    groups, (batch, channels, height, width) = norm.num_groups, tensor.shape
    grouped = tensor.float().reshape(batch, groups, -1)
    normed = (grouped - mean.float()[None, :, None]) * inverse_std.float()[None, :, None]
    normed = normed.reshape(batch, channels, height, width).to(tensor.dtype)
    return normed * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def prepare(vae: AutoencoderKL, latents: torch.Tensor, tiles: list[Tile]) -> tuple[list[TileState], np.ndarray]:
    """The untiled part: conv_in and the mid-block. Returns each tile's input and the first norm's sums."""
    decoder = vae.decoder
    with torch.inference_mode():
        z = unscale_latents(vae, latents.to(device=vae.device, dtype=vae.dtype))
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        sample = decoder.mid_block(decoder.conv_in(z), None)
        sample = sample.to(next(iter(decoder.up_blocks.parameters())).dtype)
    states = [
        {"x": sample[..., t.halo_top : t.halo_bottom, t.halo_left : t.halo_right].clone()} for t in tiles
    ]
    return states, partial_sums(sample, decoder.up_blocks[0].resnets[0].norm1.num_groups)


def run_segment(
    cut: list[Segment], index: int, tile: Tile, state: TileState, sums: np.ndarray
) -> tuple[TileState, np.ndarray | None]:
    """Runs segment `index` on one tile; returns its new state and the next norm's partial sums over its core."""
    segment = cut[index]
    with torch.inference_mode():
        activated = segment.activation(group_norm(state[segment.source], segment.norm, sums))
        state = segment.run(state, activated)
    if index + 1 == len(cut):
        return state, None
    following = cut[index + 1]
    return state, partial_sums(tile.core(state[following.source], segment.scale), following.norm.num_groups)


def to_pixels(tile: Tile, state: TileState, scale: int) -> np.ndarray:
    """A finished tile's core as uint8 RGB, post-processed as txt2img.decode does: in fp32, as VaeImageProcessor."""
    core = tile.core(state["x"], scale)[0].float()
    image = (core / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (image * 255).round().astype("uint8")


def assemble(tiles: list[Tile], pixels: list[np.ndarray], scale: int) -> PIL.Image.Image:
    height, width = max(t.bottom for t in tiles) * scale, max(t.right for t in tiles) * scale
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    for tile, core in zip(tiles, pixels, strict=True):
        canvas[tile.top * scale : tile.bottom * scale, tile.left * scale : tile.right * scale] = core
    return PIL.Image.fromarray(canvas)


async def drive(segment_count: int, prepare, run_segment) -> list:
    """The tiled-decode driver, wherever its steps run: `prepare()` awaits (tile states, first sums);
    `run_segment(index, tile_number, state, sums)` returns (new state, awaitable partial sums). Every segment runs
    on every tile with its norm's statistics summed over all tiles' cores; returns the tiles' final states."""
    states, sums = await prepare()
    for index in range(segment_count):
        results = [run_segment(index, number, state, sums) for number, state in enumerate(states)]
        states = [state for state, _ in results]
        if index + 1 < segment_count:
            sums = sum(await asyncio.gather(*(tile_sums for _, tile_sums in results)))
    return states


def tiled_decode(vae: AutoencoderKL, latents: torch.Tensor, core: int, halo: int | None = None) -> PIL.Image.Image:
    """One image's tiled decode in this process. `core` and `halo` are in latent pixels."""
    config = vae.config
    if halo is None:
        halo = exact_halo(len(config.block_out_channels), config.layers_per_block + 1)
    tiles = plan_tiles(latents.shape[-2], latents.shape[-1], core, halo)
    cut = segments(vae)

    async def prepare_here():
        return prepare(vae, latents, tiles)

    def segment_here(index: int, number: int, state: TileState, sums: np.ndarray):
        state, next_sums = run_segment(cut, index, tiles[number], state, sums)
        return state, _resolved(next_sums)

    states = asyncio.run(drive(len(cut), prepare_here, segment_here))
    scale = cut[-1].scale
    return assemble(tiles, [to_pixels(tile, state, scale) for tile, state in zip(tiles, states)], scale)


async def _resolved(value):
    return value
