"""FarmConfig: one frozen root config, built at the edge (CLI, serve) and passed down."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from renderfarm.cluster.constants import (
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    DEFAULT_WEB_PORT,
    REQUEST_BYTES_BESIDES_SOURCES,
)


class ConfigValueError(ValueError):
    """A setting out of its range. The message names the key as its own dataclass spells it
    (`replicas must be at least 1 (got 0)`); whoever puts that dataclass under a table name
    (the farm.toml loader, the CLI) prefixes it with under("denoisers.")."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem

    def under(self, prefix: str) -> ConfigValueError:
        return ConfigValueError(prefix + self.key, self.problem)


def _at_least(config, minimum, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if not value >= minimum:  # `not >=`, so that NaN is refused too
            raise ConfigValueError(key, f"must be at least {minimum} (got {value})")


def _one_of(config, key: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, key)
    if value is not None and value not in allowed:
        raise ConfigValueError(key, f"must be one of {', '.join(allowed)} (got {value!r})")


# The dtypes a pool's models can run in, by torch's names.
DTYPES = ("float16", "bfloat16", "float32")
# torch.compile's modes.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class PoolConfig:
    """One stage's actor pool: how many replicas, what share of a GPU each takes, and how its models run."""

    replicas: int = 1
    num_gpus: float = 0.0
    # CPUs each replica reserves. 0 lets a small machine place every stage; a
    # replica then runs torch on one thread (Ray sets OMP_NUM_THREADS).
    num_cpus: float = 0.0
    # One of DTYPES; None: float16 on CUDA, float32 on CPU (where the pixels are diffusers' exactly).
    dtype: str | None = None
    # The UNet's and the VAE's weights in channels-last memory format: faster convolutions on most GPUs,
    # and pixels that may differ by a level.
    channels_last: bool = False
    # torch.compile of the UNet and the VAE decoder in one of COMPILE_MODES; None runs them eagerly.
    compile: str | None = None

    def __post_init__(self):
        _at_least(self, 1, "replicas")
        _at_least(self, 0, "num_gpus", "num_cpus")
        _one_of(self, "dtype", DTYPES)
        _one_of(self, "compile", COMPILE_MODES)


@dataclass(frozen=True)
class LimitsConfig:
    max_images_per_job: int = 100_000
    max_side: int = 4096
    max_prompt_chars: int = 10_000
    max_prompts_per_job: int = 10_000
    max_steps: int = 1000
    # Output pixels of one image (a sweep image, a decode, an upscale's 4x result).
    max_pixels: int = 4096 * 4096
    # Encoded bytes of the images an img2img or inpaint request carries, in all.
    max_source_bytes: int = 64 * 1024 * 1024
    # Jobs queued or running at once; one more is refused with RESOURCE_EXHAUSTED.
    max_concurrent_jobs: int = 64
    # Serialized bytes of one request: gRPC refuses a larger one (RESOURCE_EXHAUSTED) from its length
    # prefix, unread. The default holds max_source_bytes of images and 16 MiB of everything else.
    max_request_bytes: int = 80 * 1024 * 1024

    def __post_init__(self):
        # Every limit is a count or a size that 0 would make useless; one that means
        # something at 0 needs its own rule here.
        _at_least(self, 1, *(field.name for field in dataclasses.fields(self)))
        if not self.max_request_bytes >= (least := self.max_source_bytes + REQUEST_BYTES_BESIDES_SOURCES):
            raise ConfigValueError(
                "max_request_bytes",
                f"must be at least max_source_bytes + {REQUEST_BYTES_BESIDES_SOURCES}, {least} (got {self.max_request_bytes})",
            )


@dataclass(frozen=True)
class RetryConfig:
    """How a work item whose actor died or raised is retried before it fails its job."""

    # Tries of one work item, the first included.
    max_attempts: int = 5
    # Delay before the first retry; it doubles with each retry, up to max_backoff_s.
    # The defaults wait ~15 s in all, time for Ray to restart a replica elsewhere.
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self):
        _at_least(self, 1, "max_attempts")
        _at_least(self, 0, "backoff_s")
        if not self.max_backoff_s >= self.backoff_s:
            raise ConfigValueError(
                "max_backoff_s", f"must be at least backoff_s, {self.backoff_s} (got {self.max_backoff_s})"
            )


@dataclass(frozen=True)
class AuthConfig:
    """Who may call the farm; see the README's "Teams"."""

    # A TOML file of users ([[users]]: name, role, token_sha256, weight, quotas), re-read when it
    # changes. Without it (and without RENDERFARM_TOKEN) the API is open to whoever reaches the port.
    keys_file: Path | None = None


@dataclass(frozen=True)
class FarmConfig:
    # Where builtin models are materialised, and s3:// models downloaded.
    model_cache_dir: Path
    # The durable job store (SQLite, WAL): jobs, work items, results index, event log.
    state_dir: Path
    # Where result PNGs and manifests go, one of: a local directory, OUTPUT_DIR/<job id>/ ...
    output_dir: Path | None = None
    # ... or a bucket, "s3://BUCKET/PREFIX": PREFIX/<job id>/ objects, put there by the workers.
    output: str | None = None
    # How long the presigned URL of an S3 result (what its event carries) stays valid.
    presign_expiry_s: float = 3600.0
    # Finished jobs older than this are deleted, results and all; None keeps them.
    retention_days: float | None = None
    host: str = "127.0.0.1"
    # 0 picks a free port.
    port: int = DEFAULT_PORT
    # PEM files: with both, the port serves TLS only; with a client CA too, clients must present a
    # certificate it signed (mTLS). Renewed files are picked up by new connections.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # A second, plaintext port serving only grpc.health.v1: Kubernetes' gRPC probes cannot speak TLS.
    health_port: int | None = None
    # Prometheus metrics at /metrics (plaintext, no token: what a scraper reads), and the web page (the same
    # tokens as the API); None turns either off, 0 picks a free port.
    metrics_port: int | None = DEFAULT_METRICS_PORT
    web_port: int | None = DEFAULT_WEB_PORT
    # None starts a local Ray instance; "auto" or an address joins a running cluster.
    ray_address: str | None = None
    # Images per denoiser batch; every batch runs at this shape (short ones padded), so that
    # batching never changes a pixel.
    max_batch: int = 8
    # ... but no more pixels than this in one batch: larger images get smaller batches (a 1024x1024
    # image's are 2, a 1536x1536 image runs alone), of a fixed shape too.
    max_batch_pixels: int = 8 * 512 * 512
    # How long a newly arrived item waits for companions before a short batch starts: items
    # of jobs submitted together share a batch instead of each taking a padded one.
    batch_wait_s: float = 0.05
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
    auth: AuthConfig = field(default_factory=AuthConfig)

    def __post_init__(self):
        # Its own settings only: each table (pools, limits, retries) checks itself when built.
        if (self.output_dir is None) == (self.output is None):
            raise ConfigValueError("output_dir", "or output (s3://BUCKET/PREFIX): give exactly one")
        if self.output is not None and not (self.output.startswith("s3://") and self.output[5:].split("/")[0]):
            raise ConfigValueError("output", f"must be s3://BUCKET or s3://BUCKET/PREFIX (got {self.output!r})")
        _at_least(self, 1, "presign_expiry_s")
        if self.retention_days is not None:
            _at_least(self, 0, "retention_days")
        for key in ("port", "health_port", "metrics_port", "web_port"):
            port = getattr(self, key)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigValueError(key, f"must be in 1-65535, or 0 for a free port (got {port})")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigValueError("tls_cert_file", "and tls_key_file go together: give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigValueError("tls_client_ca_file", "needs tls_cert_file and tls_key_file (mTLS is TLS first)")
        _at_least(self, 1, "max_batch", "max_batch_pixels", "tiled_decode_above_pixels", "decode_tile", "upscale_tile")
        _at_least(self, 0, "batch_wait_s")
        for key, reason in _NOT_POOL_OPTIONS.items():
            pool, option = key.split(".")
            if getattr(getattr(self, pool), option):
                raise ConfigValueError(key, f"is not an option: {reason}")


# The speed options that a pool refuses, and why.
_NOT_POOL_OPTIONS = {
    "encoders.channels_last": "it acts on UNets and VAEs, and the text encoders have neither",
    "encoders.compile": "it acts on UNets and VAEs, and the text encoders have neither",
    "upscalers.compile": "an upscale's UNet windows meet on threads at every GroupNorm, which torch.compile "
    "cannot trace",
}
