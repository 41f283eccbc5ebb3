"""The tiled decode's plain functions, without Ray: geometry, and equality with the one-piece decode."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

from renderfarm.actors.tiled_decode import tiled_decode
from renderfarm.actors.tiles import exact_halo, plan_tiles, segment_count


def test_tile_cores_partition_the_latent_and_halos_stay_inside():
    tiles = plan_tiles(270, 480, core=64, halo=13)
    covered = np.zeros((270, 480), dtype=int)
    for t in tiles:
        covered[t.top : t.bottom, t.left : t.right] += 1
        assert 0 <= t.halo_top <= t.top and t.bottom <= t.halo_bottom <= 270
        assert t.top - t.halo_top in (0, 13) and t.halo_right - t.right in (0, 13)
    assert (covered == 1).all()
    assert len(tiles) == 5 * 8


def test_exact_halo_and_segments_of_the_sd_decoder():
    # SD's VAE: 4 up blocks of 3 resnets. Convolution reach: 6 + 1/2 + 3 + 1/4 + 3/2 + 1/8 + 3/4 + 1/8 latent pixels.
    assert exact_halo(up_blocks=4, resnets_per_block=3) == 13
    assert segment_count(up_blocks=4, resnets_per_block=3) == 25


@pytest.fixture(scope="module")
def narrow_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        layers_per_block=2,
    ).eval()


def decode_one_piece(vae, latents) -> np.ndarray:
    with torch.inference_mode():
        sample = vae.decode(latents / vae.config.scaling_factor).sample
    return np.asarray(VaeImageProcessor(vae_scale_factor=8).postprocess(sample, output_type="pil")[0]).astype(int)


def test_tiles_with_the_exact_halo_equal_the_one_piece_decode(narrow_vae):
    latents = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(0))
    one_piece = decode_one_piece(narrow_vae, latents)
    tiled = np.asarray(tiled_decode(narrow_vae, latents, core=16)).astype(int)
    assert tiled.shape == one_piece.shape == (320, 448, 3)
    # Only the order of floating-point sums differs: at most one level, in a handful of pixels.
    assert np.abs(tiled - one_piece).max() <= 1
    assert (tiled != one_piece).mean() < 0.001


def test_a_too_narrow_halo_shows(narrow_vae):
    latents = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(0))
    one_piece = decode_one_piece(narrow_vae, latents)
    seamed = np.asarray(tiled_decode(narrow_vae, latents, core=16, halo=1)).astype(int)
    assert np.abs(seamed - one_piece).max() > 1
