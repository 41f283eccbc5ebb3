"""The same sweep through the farm (embedded, via the SDK) and through a plain
diffusers pipeline loop, in one process on one machine.

    python bench/sweep_vs_diffusers.py [--model REF] [--prompts N] [--seeds N] [--steps N] [--size PX]

Prints images/s of each and the ratio farm / diffusers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

import renderfarm as rf
from renderfarm.actors.models import resolve_model
from renderfarm.actors.txt2img import SDXL_PIPELINE
from renderfarm.cluster.config import FarmConfig, PoolConfig
from renderfarm.cluster.embedded import EmbeddedFarm

PROMPTS = ["a red fox", "a lighthouse", "a mountain lake", "a city at night"]


def load_pipeline(model_dir: Path) -> DiffusionPipeline:
    """The model's own pipeline class (its model_index.json's), as a diffusers user loads it: fp16 on CUDA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipeline = json.loads((model_dir / "model_index.json").read_text())["_class_name"]
    # The farm does not watermark SDXL images; nor does the baseline.
    options = {"add_watermarker": False} if pipeline == SDXL_PIPELINE else {}
    pipe = DiffusionPipeline.from_pretrained(model_dir, dtype=dtype, **options).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_loop(pipe: DiffusionPipeline, prompts, seeds, steps: int, size: int, batch: int = 1) -> float:
    """Images/s of the loop a diffusers user writes: one pipeline call per `batch` images (a seed's generator
    each), after one untimed call, as a running pipeline would be warm."""
    work = [(prompt, seed) for prompt in prompts for seed in seeds]
    calls = [work[start : start + batch] for start in range(0, len(work), batch)]

    def call(images) -> None:
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in images]
        pipe([prompt for prompt, _ in images], num_inference_steps=steps, width=size, height=size, generator=generators)

    call(calls[0])
    started = time.perf_counter()
    for images in calls:
        call(images)
    return len(work) / (time.perf_counter() - started)


def farm_sweep(config: FarmConfig, model: str, prompts, seeds, steps: int, size: int) -> float:
    """Images/s through a fresh farm, from submission to the last result received."""
    with EmbeddedFarm(config) as farm:
        return timed_sweep(farm, model, prompts, seeds, steps, size)


def timed_sweep(farm: EmbeddedFarm, model: str, prompts, seeds, steps: int, size: int) -> float:
    """Images/s through a running farm, from submission to the last result received."""
    with rf.Client(farm.address) as client:
        # Warm the replicas (model loading) outside the timed run, as a running farm would be.
        client.sweep(prompts[0], steps=1, width=size, height=size, model=model).wait()
        started = time.perf_counter()
        count = sum(1 for _ in client.sweep(prompts, seeds=seeds, steps=steps, width=size, height=size, model=model).results())
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-sd")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--denoisers", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "models"
        config = FarmConfig(
            output_dir=Path(scratch) / "output",
            model_cache_dir=cache,
            state_dir=Path(scratch) / "state",
            port=0,
            metrics_port=None,
            web_port=None,
            max_batch=args.max_batch,
            denoisers=PoolConfig(replicas=args.denoisers, num_gpus=1.0 if torch.cuda.is_available() else 0.0),
        )
        prompts, seeds = PROMPTS[: args.prompts], list(range(args.seeds))
        model_dir = resolve_model(args.model, cache)
        baseline = diffusers_loop(load_pipeline(model_dir), prompts, seeds, args.steps, args.size)
        farm = farm_sweep(config, args.model, prompts, seeds, args.steps, args.size)

    images = len(prompts) * len(seeds)
    print(f"sweep: {args.model}, {images} images, {args.steps} steps, {args.size}x{args.size}, "
          f"{args.denoisers} denoiser(s), max batch {args.max_batch}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"diffusers loop : {baseline:8.2f} images/s")
    print(f"renderfarm     : {farm:8.2f} images/s")
    print(f"ratio farm/diffusers: {farm / baseline:.2f}x")


if __name__ == "__main__":
    main()
