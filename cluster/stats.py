"""The public view of a running farm, `Farm.stats()`: what tests, benchmarks and operators read."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("encoder", "denoiser", "decoder", "upscaler")


@dataclass(frozen=True)
class ReplicaStats:
    node_id: str
    # The replica process's peak resident memory (Linux's ru_maxrss).
    peak_rss_bytes: int
    # Models this replica has loaded from disk, reloads after an eviction included.
    model_loads: int
    # Texts encoded (encoders) or shares of spread upscales run (upscalers); 0 for the other stages.
    work_done: int


@dataclass(frozen=True)
class StageStats:
    replicas: tuple[ReplicaStats, ...] = ()
    # Calls the scheduler made to this stage's replicas for whole batches (denoiser: batches; encoder:
    # encoder calls, each encoding several texts; decoder: decode calls; upscaler: images).
    batches: int = 0
    # Real items per batch (padding excluded) -> how many batches had that many.
    batch_sizes: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FarmStats:
    stages: dict[str, StageStats]
    # Text encodings served from the scheduler's cache instead of an encoder call.
    text_cache_hits: int
    # Upscale exchange sessions still open (0 once every spread image has ended), and the exchange's peak memory.
    exchange_sessions: int = 0
    exchange_peak_rss_bytes: int = 0
    # PNG bytes of results that reached the scheduler process: with an object store (the workers put
    # them there), none; with a local store, every image's.
    result_bytes_received: int = 0

    @property
    def texts_encoded(self) -> int:
        return sum(replica.work_done for replica in self.stages["encoder"].replicas)

    @property
    def model_loads(self) -> int:
        return sum(replica.model_loads for stage in self.stages.values() for replica in stage.replicas)

    @property
    def peak_rss_bytes(self) -> list[int]:
        """Every replica's peak memory, stage by stage, then the upscale exchange's (where it runs)."""
        peaks = [replica.peak_rss_bytes for stage in self.stages.values() for replica in stage.replicas]
        return peaks + ([self.exchange_peak_rss_bytes] if self.exchange_peak_rss_bytes else [])
