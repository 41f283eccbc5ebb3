"""Tiled decode on the full-size SD VAE decoder architecture (random weights): the farm's
tiled decode across 1 and 2 VAE replicas against diffusers' own tiled decode, in one run.

    python bench/tiled_decode.py [--width 3840 --height 2160] [--psnr-size 1024] [--tile 512]

Prints wall time and peak RSS per process for the large decode, and PSNR against the one-piece
decode at a size where the one-piece decode fits.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

import renderfarm as rf
from renderfarm.actors.models import resolve_model
from renderfarm.cluster.config import FarmConfig, LimitsConfig, PoolConfig
from renderfarm.cluster.embedded import EmbeddedFarm

GIB = 2**30


def sd_vae(**config) -> AutoencoderKL:
    """Stable Diffusion 1.x's VAE architecture (its config, which `config` overrides: SDXL's VAE has the same
    layout), with seeded random weights."""
    torch.manual_seed(0)
    sd_config = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    return AutoencoderKL(**sd_config | config).eval()


def model_dir(scratch: Path) -> Path:
    """A diffusers model directory: builtin:tiny-sd's parts with the full-size VAE in place of its own."""
    target = scratch / "sd-vae-model"
    shutil.copytree(resolve_model("builtin:tiny-sd", scratch / "cache"), target)
    shutil.rmtree(target / "vae")
    sd_vae().save_pretrained(target / "vae")
    return target


def latents(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 4, height // 8, width // 8)).astype(np.float32)


def to_pixels(sample: torch.Tensor) -> np.ndarray:
    return np.asarray(VaeImageProcessor(vae_scale_factor=8).postprocess(sample, output_type="pil")[0])


def diffusers_decode(directory: Path, z: np.ndarray, tiled: bool, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, float]:  # fmt: skip
    vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", dtype=dtype).to(device).eval()
    if tiled:
        vae.enable_tiling()
    started = time.perf_counter()
    with torch.inference_mode():
        sample = vae.decode(torch.from_numpy(z).to(device, dtype) / vae.config.scaling_factor).sample
    # The pixels first: on a GPU, copying them to the CPU waits for the decode to end.
    return to_pixels(sample), time.perf_counter() - started


def _diffusers_child(directory: Path, z: np.ndarray, queue) -> None:
    _, seconds = diffusers_decode(directory, z, tiled=True)
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def diffusers_tiled_in_own_process(directory: Path, z: np.ndarray) -> tuple[float, int]:
    """Wall time and peak RSS of diffusers' tiled decode, in a fresh process so its peak is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_diffusers_child, args=(directory, z, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def farm_decode(config: FarmConfig, model: str, z: np.ndarray, tile: int) -> tuple[np.ndarray, float, list[int]]:
    """The image, wall time and each VAE replica's peak RSS, on a fresh farm."""
    with EmbeddedFarm(config) as farm:
        return timed_decode(farm, model, z, tile)


def timed_decode(farm: EmbeddedFarm, model: str, z: np.ndarray, tile: int) -> tuple[np.ndarray, float, list[int]]:
    """The image, wall time and each VAE replica's peak RSS (so far), on a running farm."""
    with rf.Client(farm.address) as client:
        client.decode(latents(64, 64), model=model, tile=tile).wait()  # load the VAE outside the timing
        started = time.perf_counter()
        (result,) = client.decode(z, model=model, tile=tile).results()
        seconds = time.perf_counter() - started
    peaks = [replica.peak_rss_bytes for replica in farm.farm.stats().stages["decoder"].replicas]
    return np.asarray(result.image), seconds, peaks


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = ((image.astype(float) - reference.astype(float)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=3840)
    parser.add_argument("--height", type=int, default=2160)
    parser.add_argument("--psnr-size", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        directory = model_dir(Path(scratch))
        model = str(directory)

        def config(decoders: int) -> FarmConfig:
            return FarmConfig(
                output_dir=Path(scratch) / "output",
                model_cache_dir=Path(scratch) / "cache",
                state_dir=Path(scratch) / f"state-{decoders}",
                port=0,
                metrics_port=None,
                web_port=None,
                decoders=PoolConfig(replicas=decoders),
                limits=LimitsConfig(max_side=max(args.width, args.height, 4096)),
            )

        small = latents(args.psnr_size, args.psnr_size)
        one_piece, _ = diffusers_decode(directory, small, tiled=False)
        diffusers_tiled, _ = diffusers_decode(directory, small, tiled=True)
        ours_small, _, _ = farm_decode(config(1), model, small, args.tile)

        large = latents(args.height, args.width)
        runs = {n: farm_decode(config(n), model, large, args.tile) for n in (1, 2)}
        baseline_seconds, baseline_peak = diffusers_tiled_in_own_process(directory, large)
        identical = np.array_equal(runs[1][0], runs[2][0])

    print(f"SD VAE decoder (random weights), {args.width}x{args.height}, tile {args.tile}px, torch threads per replica 1")
    print(f"{'decode':<34}{'wall s':>8}{'peak RSS GiB (per process)':>30}")
    print(f"{'diffusers enable_tiling (1 proc)':<34}{baseline_seconds:>8.1f}{baseline_peak / GIB:>30.2f}")
    for n, (_, seconds, peaks) in runs.items():
        peaks_text = ", ".join(f"{p / GIB:.2f}" for p in peaks)
        print(f"{f'renderfarm, {n} VAE replica(s)':<34}{seconds:>8.1f}{peaks_text:>30}")
    print(f"1 vs 2 replicas pixel-identical: {identical}")
    print(f"PSNR vs one-piece decode at {args.psnr_size}x{args.psnr_size}:")
    print(f"  renderfarm tiled      {psnr(ours_small, one_piece):6.1f} dB")
    print(f"  diffusers tiled       {psnr(diffusers_tiled, one_piece):6.1f} dB")


if __name__ == "__main__":
    main()
