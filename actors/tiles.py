"""Tile geometry for the tiled VAE decode: plain Python, shared by the planner and the replicas."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    """Latent pixels: the core the tile owns (cores partition the latent) and its extent with halo."""

    top: int
    left: int
    bottom: int
    right: int
    halo_top: int
    halo_left: int
    halo_bottom: int
    halo_right: int

    def core(self, tensor, scale: int):
        """The core of an array [..., H, W] of this tile's extent, at `scale` pixels per latent pixel."""
        top, left = (self.top - self.halo_top) * scale, (self.left - self.halo_left) * scale
        return tensor[..., top : top + (self.bottom - self.top) * scale, left : left + (self.right - self.left) * scale]


def plan_tiles(height: int, width: int, core: int, halo: int) -> list[Tile]:
    """Cores of at most `core` latent pixels a side, each grown by `halo` and clamped to the latent."""
    tiles = []
    for top in range(0, height, core):
        for left in range(0, width, core):
            bottom, right = min(top + core, height), min(left + core, width)
            tiles.append(Tile(
                top, left, bottom, right,
                max(top - halo, 0), max(left - halo, 0), min(bottom + halo, height), min(right + halo, width),
            ))  # fmt: skip
    return tiles


def exact_halo(up_blocks: int, resnets_per_block: int) -> int:
    """The reach, in latent pixels, of the decoder's 3x3 convolutions after its mid-block.

    Zero padding at a tile's edge spoils one more pixel per convolution; at s pixels per latent
    pixel that is 1/s latent pixels. A halo this wide keeps every core exact. Taken from the VAE's
    config (up blocks = len(block_out_channels), resnets per block = layers_per_block + 1), so
    planning needs no weights.
    """
    reach, scale = 0.0, 1
    for block in range(up_blocks):
        reach += 2 * resnets_per_block / scale
        if block < up_blocks - 1:  # every up block but the last ends in a 2x upsample and a conv
            scale *= 2
            reach += 1 / scale
    return math.ceil(reach + 1 / scale)  # + conv_out


def segment_count(up_blocks: int, resnets_per_block: int) -> int:
    """GroupNorms after the mid-block: two per resnet, plus the output norm."""
    return 2 * up_blocks * resnets_per_block + 1
