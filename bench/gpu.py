"""One GPU, no internet: full-size SD1.5 and SDXL with random weights made here, plain diffusers against the
farm on the same GPU in the same run, written as a markdown table.

    python bench/gpu.py [--out TABLE.md] [--images 32] [--compile default] [--cache DIR]
    python bench/gpu.py --smoke --out TABLE.md    # tiny models and sizes, on a CPU too: proves the bench runs

For each model (SD1.5 512x512, 50 steps; SDXL 1024x1024, 20 steps; both with CFG): images/s of its diffusers
pipeline at batch 1 and batch 8, then of the farm (one replica of each stage, sharing the GPU) at max batch 8
and 16, and at 16 with the speed options (channels_last and torch.compile, on the denoiser and VAE pools); the
UNet's achieved TFLOP/s (its FLOPs per image, counted with FlopCounterMode on one step and times the steps,
times images/s); peak GPU memory. Then a 4K tiled decode on the SD VAE, through diffusers' enable_tiling and
through the farm: seconds and GPU memory.

The models are built once into --cache (about 9 GB, on the GPU): builtin:tiny-sd's and builtin:tiny-sdxl's
layout, tokenizer and scheduler, with parts of the published architectures in fp16, whose parameter counts are
checked against the published models'. --smoke runs builtin:tiny-sd and builtin:tiny-sdxl themselves (fp32 on
a CPU) through one farm (max batch 8, no speed options), and checks the full-size parts' shapes on the meta
device.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import UNet2DConditionModel
from sweep_vs_diffusers import PROMPTS, diffusers_loop, load_pipeline, timed_sweep
from tiled_decode import diffusers_decode, latents, sd_vae, timed_decode
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from renderfarm.actors.models import resolve_model, silence_progress_bars
from renderfarm.cluster.config import FarmConfig, PoolConfig
from renderfarm.cluster.embedded import EmbeddedFarm

GIB = 2**30
DIFFUSERS_BATCHES = (1, 8)
FARM_BATCHES = (8, 16)
# GPU shares of the farm's pools, which one replica each places on the one GPU.
GPU_SHARES = {"encoders": 0.25, "denoisers": 0.5, "decoders": 0.25}
# The pools the speed options act on: their UNets and VAEs.
SPEED_POOLS = ("denoisers", "decoders")
DECODE_SIZE, DECODE_TILE = (3840, 2160), 512
# --smoke: builtin:tiny-sd and builtin:tiny-sdxl as they are, a few images of few steps, and one farm (each
# takes most of the smoke run's time to start on a small CPU).
SMOKE_SIZE, SMOKE_STEPS, SMOKE_IMAGES = 64, 2, 8
SMOKE_FARM_BATCHES = (8,)
SMOKE_DECODE_SIZE, SMOKE_DECODE_TILE = (256, 144), 64

# The published architectures, as their diffusers and transformers configs give them.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    # diffusers' name for SDXL's heads per level.
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# OpenAI's CLIP ViT-L/14 text encoder (SD1.5's, and SDXL's first), and OpenCLIP's ViT-bigG/14 (SDXL's second).
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
OPENCLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
SDXL_VAE = dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def progress(message: str) -> None:
    """What the bench is doing, on stderr: a full run takes a while."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def text_encoder(tokenizer: CLIPTokenizer, config: dict, with_projection: bool = False) -> torch.nn.Module:
    """A CLIP text encoder of `config`'s size; its special tokens are the (builtin) tokenizer's."""
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return model_class(CLIPTextConfig(**config, **special))


@dataclass(frozen=True)
class Family:
    name: str
    # The builtin model whose layout, tokenizers and scheduler the full-size model takes; --smoke runs it.
    builtin: str
    size: int
    steps: int
    # By component directory: a maker of the full-size part (given the tokenizer), and the published model's
    # parameter count, which the part must have.
    parts: dict[str, tuple[Callable[[CLIPTokenizer], torch.nn.Module], int]]


SD15 = Family("SD1.5", "tiny-sd", 512, 50, {
    "text_encoder": (lambda tokenizer: text_encoder(tokenizer, CLIP_L), 123_060_480),
    "unet": (lambda _: UNet2DConditionModel(**SD15_UNET), 859_520_964),
    "vae": (lambda _: sd_vae(), 83_653_863),
})  # fmt: skip
SDXL = Family("SDXL", "tiny-sdxl", 1024, 20, {
    "text_encoder": (lambda tokenizer: text_encoder(tokenizer, CLIP_L), 123_060_480),
    "text_encoder_2": (lambda tokenizer: text_encoder(tokenizer, OPENCLIP_BIGG, with_projection=True), 694_659_840),
    "unet": (lambda _: UNet2DConditionModel(**SDXL_UNET), 2_567_463_684),
    "vae": (lambda _: sd_vae(**SDXL_VAE), 83_653_863),
})  # fmt: skip
FAMILIES = (SD15, SDXL)


def full_size_parts(family: Family, tokenizer: CLIPTokenizer, device: str):
    """(component, module) of each full-size part, made on `device` (random weights; "meta": shapes alone)."""
    for part, (make, published) in family.parts.items():
        with torch.device(device):
            module = make(tokenizer)
        if (count := sum(parameter.numel() for parameter in module.parameters())) != published:
            raise AssertionError(f"{family.name} {part}: {count:,} parameters, the published model has {published:,}")
        yield part, module


def full_size_model(family: Family, cache: Path) -> Path:
    """The family's full-size diffusers directory in `cache`, made on the GPU the first time."""
    target = cache / f"{family.name.lower()}-random"
    if target.exists():
        return target
    progress(f"building {target}")
    building = cache / f"{target.name}.building"
    shutil.rmtree(building, ignore_errors=True)
    shutil.copytree(resolve_model(f"builtin:{family.builtin}", cache), building)
    tokenizer = CLIPTokenizer.from_pretrained(building / "tokenizer")
    torch.manual_seed(0)
    for part, module in full_size_parts(family, tokenizer, "cuda"):
        shutil.rmtree(building / part)
        module.to(torch.float16).save_pretrained(building / part)
    torch.cuda.empty_cache()  # the build's memory, before anything is measured
    # Whole or not at all: an interrupted build is made again.
    building.rename(target)
    return target


def check_full_size_parts(cache: Path) -> None:
    """What --smoke can check of the full-size models without a GPU: their parts' shapes."""
    for family in FAMILIES:
        tokenizer = CLIPTokenizer.from_pretrained(resolve_model(f"builtin:{family.builtin}", cache) / "tokenizer")
        for _ in full_size_parts(family, tokenizer, "meta"):
            pass


@dataclass
class Memory:
    """GPU memory while a measure() block ran, in bytes; None on a CPU."""

    # torch's peak allocation in this process (torch.cuda.max_memory_allocated): the diffusers runs'.
    allocated: int | None = None
    # The device's memory in use, every process's and their CUDA contexts too (sampled): the farm's.
    in_use: int | None = None
    # ... less what was in use when the block began.
    added: int | None = None


@contextlib.contextmanager
def measure():
    memory = Memory()
    if not torch.cuda.is_available():
        yield memory
        return

    def in_use() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            memory.in_use = max(memory.in_use, in_use())

    torch.cuda.reset_peak_memory_stats()
    memory.in_use = at_start = in_use()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield memory
    finally:
        stop.set()
        sampler.join()
        memory.in_use = max(memory.in_use, in_use())
        memory.allocated = torch.cuda.max_memory_allocated()
        memory.added = memory.in_use - at_start


@dataclass(frozen=True)
class Run:
    """One model as the bench renders it."""

    name: str
    model: str  # a farm model reference
    directory: Path
    size: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.size}x{self.size}, {self.steps} steps, CFG"


@dataclass(frozen=True)
class Row:
    run: Run
    who: str
    batch: str
    images_per_s: float
    unet_tflop_per_s: float
    allocated: int | None
    in_use: int | None


def unet_flops_per_image(pipe, run: Run) -> float:
    """The UNet's FLOPs for one image: one step's call as the pipeline makes it (CFG's two halves in one batch),
    counted by FlopCounterMode, times the steps."""
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        pipe(PROMPTS[0], num_inference_steps=1, width=run.size, height=run.size, output_type="latent")
    finally:
        hook.remove()
    ((args, kwargs),) = calls
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipe.unet(*args, **kwargs)
    return counter.get_total_flops() * run.steps


def diffusers_rows(run: Run, prompts, seeds) -> tuple[list[Row], float]:
    """The plain pipeline's rows, and the UNet's FLOPs per image."""
    pipe = load_pipeline(run.directory)
    flops = unet_flops_per_image(pipe, run)
    rows = []
    for batch in DIFFUSERS_BATCHES:
        with measure() as memory:
            rate = diffusers_loop(pipe, prompts, seeds, run.steps, run.size, batch)
        progress(f"{run.label}: diffusers at batch {batch}, {rate:.3g} images/s")
        rows.append(Row(run, "diffusers", str(batch), rate, rate * flops / 1e12, memory.allocated, memory.in_use))
    return rows, flops


def farm_config(scratch: Path, cache: Path, max_batch: int, runs: list[Run], options: dict) -> FarmConfig:
    """A farm of one replica per stage on the GPU; `options`: PoolConfig's speed options, for SPEED_POOLS."""
    gpu = torch.cuda.is_available()
    pools = {
        name: PoolConfig(num_gpus=share if gpu else 0.0, **(options if name in SPEED_POOLS else {}))
        for name, share in GPU_SHARES.items()
    }
    return FarmConfig(
        output_dir=scratch / "output",
        model_cache_dir=cache,
        # A job store of its own: a farm resumes the unfinished jobs it finds in one.
        state_dir=Path(tempfile.mkdtemp(dir=scratch)),
        port=0,
        metrics_port=None,
        web_port=None,
        max_batch=max_batch,
        # max_batch images of every model in one batch, SDXL's 1024x1024 too.
        max_batch_pixels=max_batch * max(run.size for run in runs) ** 2,
        **pools,
    )


def table(rows: list[Row], flops: dict[Run, float], decodes: list[tuple[str, float, Memory]], header: str) -> str:
    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GIB:.1f}"

    lines = [
        header,
        "",
        "| model | run | batch | images/s | vs best diffusers | UNet TFLOP/s | peak allocated GiB | GPU in use GiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        best = max(other.images_per_s for other in rows if other.run == row.run and other.who == "diffusers")
        lines.append(
            f"| {row.run.label} | {row.who} | {row.batch} | {row.images_per_s:.2f} | {row.images_per_s / best:.3f} "
            f"| {row.unet_tflop_per_s:.3g} | {gib(row.allocated)} | {gib(row.in_use)} |"
        )
    lines += [
        "",
        "UNet TFLOP/s: the UNet's FLOPs per image (FlopCounterMode on one step, times the steps: "
        + ", ".join(f"{run.name} {value / 1e12:.3g} TFLOP" for run, value in flops.items())
        + ") times images/s, whose time includes text encoding and decoding. Peak allocated: torch.cuda.max_memory_allocated of the diffusers process; GPU in use: the device's"
        " memory in use, every process's (the farm's stage replicas, CUDA contexts and every loaded model"
        " included), sampled every 50 ms.",
        "",
        "| tiled decode | seconds | peak allocated GiB | GPU memory added GiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, seconds, memory in decodes:
        lines.append(f"| {label} | {seconds:.2f} | {gib(memory.allocated)} | {gib(memory.added)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="builtin tiny models, tiny sizes, few steps")
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--images", type=int, help=f"images per run (default 32; --smoke {SMOKE_IMAGES})")
    parser.add_argument("--compile", default="default", help="the speed runs' torch.compile mode")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/renderfarm/bench-gpu").expanduser())
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not (args.smoke or gpu):
        parser.error("no CUDA GPU here; --smoke runs on a CPU")
    images = args.images or (SMOKE_IMAGES if args.smoke else 32)
    if images % max(DIFFUSERS_BATCHES):
        parser.error(f"--images must be a multiple of {max(DIFFUSERS_BATCHES)}, so that every batch is full")
    args.cache.mkdir(parents=True, exist_ok=True)
    silence_progress_bars()
    if not gpu:
        # One thread, as each farm replica has (Ray sets OMP_NUM_THREADS=1): the same race on a CPU.
        torch.set_num_threads(1)

    # (max batch, pool options, the rows' name)
    farms = [(max_batch, {}, "renderfarm") for max_batch in (SMOKE_FARM_BATCHES if args.smoke else FARM_BATCHES)]
    if args.smoke:
        check_full_size_parts(args.cache)
        runs = [
            Run(family.builtin, f"builtin:{family.builtin}", resolve_model(f"builtin:{family.builtin}", args.cache),
                SMOKE_SIZE, SMOKE_STEPS)
            for family in FAMILIES
        ]  # fmt: skip
        decode_size, tile = SMOKE_DECODE_SIZE, SMOKE_DECODE_TILE
        # No speed runs: compiling takes longer than the whole smoke run, and pays off on a GPU only.
    else:
        runs = []
        for family in FAMILIES:
            directory = full_size_model(family, args.cache)
            runs.append(Run(family.name, str(directory), directory, family.size, family.steps))
        decode_size, tile = DECODE_SIZE, DECODE_TILE
        speed = {"channels_last": True, "compile": args.compile}
        farms.append((max(FARM_BATCHES), speed, f"renderfarm, channels_last, compile={args.compile}"))

    with tempfile.TemporaryDirectory() as scratch:
        # Every farm's config before anything runs, so that a bad setting fails now, not after the diffusers runs.
        configs = [(farm_config(Path(scratch), args.cache, max_batch, runs, options), who)
                   for max_batch, options, who in farms]  # fmt: skip
        rows, flops, decodes = measure_all(runs, configs, images, latents(decode_size[1], decode_size[0]), tile)

    device = torch.cuda.get_device_name() if gpu else "CPU (no GPU)"
    header = (
        f"bench/gpu.py{' --smoke' if args.smoke else ''} on {device}, {datetime.date.today()}: {images} images per"
        f" run, {'fp16' if gpu else 'fp32'}, torch {torch.__version__}, diffusers {diffusers.__version__},"
        f" transformers {transformers.__version__}; tiled decode {decode_size[0]}x{decode_size[1]}, tile {tile},"
        f" on {runs[0].name}'s VAE"
    )
    text = table(rows, flops, decodes, header)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


def measure_all(runs: list[Run], configs: list[tuple[FarmConfig, str]], images: int, z, tile: int):
    """Every row: the diffusers runs, then each farm's; and the tiled decode of latents `z` on runs[0]'s VAE."""
    gpu = torch.cuda.is_available()
    # Two prompts, so that the farm encodes more than one text, as a sweep does.
    prompts, seeds = PROMPTS[:2], list(range(images // 2))
    rows, flops = [], {}
    for run in runs:
        run_rows, flops[run] = diffusers_rows(run, prompts, seeds)
        rows += run_rows
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()  # the pipelines' memory, for the farm

    decoder = runs[0]
    with measure() as memory:
        _, seconds = diffusers_decode(decoder.directory, z, tiled=True, device="cuda" if gpu else "cpu",
                                      dtype=torch.float16 if gpu else torch.float32)  # fmt: skip
    progress(f"tiled decode: diffusers, {seconds:.3g} s")
    decodes = [("diffusers enable_tiling", seconds, memory)]

    for index, (config, who) in enumerate(configs):
        with EmbeddedFarm(config) as farm:
            if index == 0:
                # First, while the farm holds nothing else: what its decode adds on the GPU is its own.
                with measure() as memory:
                    _, seconds, _ = timed_decode(farm, decoder.model, z, tile)
                progress(f"tiled decode: renderfarm, {seconds:.3g} s")
                decodes.append(("renderfarm, 1 VAE replica", seconds, Memory(added=memory.added)))
            for run in runs:
                with measure() as memory:
                    rate = timed_sweep(farm, run.model, prompts, seeds, run.steps, run.size)
                progress(f"{run.label}: {who} at max batch {config.max_batch}, {rate:.3g} images/s")
                rows.append(Row(run, who, f"max {config.max_batch}", rate, rate * flops[run] / 1e12, None,
                                memory.in_use))  # fmt: skip
    rows.sort(key=lambda row: runs.index(row.run))
    return rows, flops, decodes


if __name__ == "__main__":
    main()
