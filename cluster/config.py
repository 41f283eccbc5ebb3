"""FarmConfig: one frozen root config, built at the edge (CLI, serve) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from renderfarm.cluster.constants import DEFAULT_PORT


@dataclass(frozen=True)
class PoolConfig:
    """One stage's actor pool: how many replicas, and what share of a GPU each takes."""

    replicas: int = 1
    num_gpus: float = 0.0
    # CPUs each replica reserves. 0 lets a small machine place every stage; a
    # replica then runs torch on one thread (Ray sets OMP_NUM_THREADS).
    num_cpus: float = 0.0


@dataclass(frozen=True)
class LimitsConfig:
    max_images_per_job: int = 100_000
    max_side: int = 4096
    max_prompt_chars: int = 10_000
    max_prompts_per_job: int = 10_000
    max_steps: int = 1000
    # Output pixels of one image (a sweep image, a decode, an upscale's 4x result).
    max_pixels: int = 4096 * 4096
    # Jobs queued or running at once; one more is refused with RESOURCE_EXHAUSTED.
    max_concurrent_jobs: int = 64


@dataclass(frozen=True)
class RetryConfig:
    """How a work item whose actor died or raised is retried before it fails its job."""

    # Tries of one work item, the first included.
    max_attempts: int = 5
    # Delay before the first retry; it doubles with each retry, up to max_backoff_s.
    # The defaults wait ~15 s in all, time for Ray to restart a replica elsewhere.
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


@dataclass(frozen=True)
class FarmConfig:
    # Where result PNGs and manifests go: OUTPUT_DIR/<job id>/.
    output_dir: Path
    # Where builtin models are materialised.
    model_cache_dir: Path
    # The durable job store (SQLite, WAL): jobs, work items, results index, event log.
    state_dir: Path
    host: str = "127.0.0.1"
    # 0 picks a free port.
    port: int = DEFAULT_PORT
    # None starts a local Ray instance; "auto" or an address joins a running cluster.
    ray_address: str | None = None
    max_batch: int = 8
    # Sweep images with more pixels than this decode in tiles across the VAE pool.
    tiled_decode_above_pixels: int = 1024 * 1024
    # Side of a tiled decode's tile core, in pixels, unless a job names its own.
    decode_tile: int = 512
    encoders: PoolConfig = field(default_factory=PoolConfig)
    denoisers: PoolConfig = field(default_factory=PoolConfig)
    decoders: PoolConfig = field(default_factory=PoolConfig)
    # Started with the first upscale job.
    upscalers: PoolConfig = field(default_factory=PoolConfig)
    # Side of an upscale's UNet tile, in input pixels, unless a job names its own.
    upscale_tile: int = 128
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
