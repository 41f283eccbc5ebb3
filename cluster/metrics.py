"""The scheduler's Prometheus metrics, served at /metrics on `metrics_port`.

Base units, and no per-job or per-user labels (their number is unbounded);
labels are the stage, the job kind, the model and the job state. Counters and
histograms are updated where the thing happens (the executor, the engine, the
result sink); gauges are read at scrape time from the job store and the pools.
Each farm has a registry of its own, so farms in one process never mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from renderfarm.cluster import http

# Batch durations run from a tiny model's milliseconds to a 4K upscale's minutes.
DURATION_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class FarmMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.images = Counter(
            "renderfarm_images", "Images finished and recorded, each once", ["kind", "model"], registry=registry
        )
        self.batch_duration = Histogram(
            "renderfarm_batch_duration_seconds", "Time a stage call took, from dispatch to its last result",
            ["stage"], buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "renderfarm_batch_size", "Images in a stage call (a denoiser batch's real images, without its padding)",
            ["stage"], buckets=SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.item_retries = Counter(
            "renderfarm_item_retries", "Images put back to run again after a failure", registry=registry
        )
        self.replica_restarts = Counter(
            "renderfarm_replica_restarts", "Replicas that died and came back (Ray restarted them)", ["stage"],
            registry=registry,
        )  # fmt: skip

    def watch(self, jobs_by_state: Callable[[], dict[str, int]], queued_images: Callable[[], int],
              replicas: Callable[[], dict[str, int]], model_loads: Callable[[], dict[str, int]]) -> None:  # fmt: skip
        """What is read at each scrape: jobs by state, images not yet done of unfinished jobs, replicas up by stage,
        and the scheduler's count of model loads by stage."""
        self.registry.register(_Read(jobs_by_state, queued_images, replicas, model_loads))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Read:
    def __init__(self, jobs_by_state, queued_images, replicas, model_loads):
        self._jobs_by_state = jobs_by_state
        self._queued_images = queued_images
        self._replicas = replicas
        self._model_loads = model_loads

    def collect(self) -> Iterable:
        jobs = GaugeMetricFamily("renderfarm_jobs", "Jobs in the job store, by state", labels=["state"])
        for state, count in self._jobs_by_state().items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            "renderfarm_queue_images", "Images of unfinished jobs not yet done", value=self._queued_images()
        )
        replicas = GaugeMetricFamily("renderfarm_replicas", "Stage replicas up, by stage", labels=["stage"])
        for stage, count in self._replicas().items():
            replicas.add_metric([stage], count)
        yield replicas
        loads = CounterMetricFamily(
            "renderfarm_model_loads", "Models placed on a replica that did not hold them: each a load", labels=["stage"]
        )
        for stage, count in self._model_loads().items():
            loads.add_metric([stage], count)
        yield loads


async def serve(metrics: FarmMetrics, host: str, port: int) -> http.HttpServer:
    """/metrics in Prometheus' text format, without a token: what a scraper in the cluster reads."""

    async def exposition(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", exposition)
    return await http.serve(app, host, port)
