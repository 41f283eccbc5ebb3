"""The executor: the only code that talks to Ray. It carries out the scheduler's batches on the stage pools.

Stages hand each other ObjectRefs: embeddings go to a denoiser by ref, its
latents to a decoder by ref, and the scheduler only ever pulls finished PNGs
(a sweep image chained to the upscaler goes there by ref too). A batch holds
its place on its denoiser until its images are recorded, so work between the
stages stays bounded; with two places a replica, the next batch is queued on
the denoiser while this one is decoded.

Each batch runs at its fixed shape: a short batch is padded with copies of its
first item, whose outputs are dropped, so an image's pixels never depend on
how many companions it had (README, "Cross-job batching and purity").

What a failure means (`classify`) is decided here too, because only here are
Ray's exceptions and the cluster's nodes known.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

import ray
import torch

from renderfarm.actors import stages
from renderfarm.actors.previews import StepReport
from renderfarm.actors.txt2img import DenoiseBatch, DenoiseItem
from renderfarm.actors.upscale_x4 import tile_windows
from renderfarm.cluster import calls
from renderfarm.cluster.config import FarmConfig, PoolConfig
from renderfarm.cluster.constants import (
    BATCHES_IN_FLIGHT_PER_REPLICA,
    CLUSTER_CHECK_TIMEOUT_S,
    EXCHANGE_JOIN_TIMEOUT_S,
    EXCHANGE_ROUND_TIMEOUT_S,
    REPLICAS_READY_TIMEOUT_S,
    SOURCE_CACHE_ENTRIES,
    TEXT_CACHE_ENTRIES,
    UPSCALE_FACTOR,
)
from renderfarm.cluster.kinds.img2img import Source
from renderfarm.cluster.kinds.sweep import applied_loras
from renderfarm.cluster.kinds.upscale import UpscaleSettings
from renderfarm.cluster.live import LiveEvents
from renderfarm.cluster.metrics import FarmMetrics
from renderfarm.cluster.model_info import model_info
from renderfarm.cluster.results import ResultStore
from renderfarm.cluster.scheduler import Batch, Item, Scheduler
from renderfarm.cluster.stats import STAGES, FarmStats, ReplicaStats, StageStats
from renderfarm.spec import EditedImageSpec, ImageSpec, LoraSpec, guided

log = logging.getLogger(__name__)

ACTOR_CLASSES = {
    "encoder": stages.TextEncoder,
    "denoiser": stages.Denoiser,
    "decoder": stages.Decoder,
    "upscaler": stages.Upscaler,
}
# Results of a batch, as they finish: (item, the result's spec, PNG bytes or, in an object store, its StoredImage).
Record = Callable[[list[tuple[Item, object, object]]], Awaitable[None]]


class Failure(enum.Enum):
    # The item's own doing (it raised, or its replica died on a live node): spends an attempt.
    ITEM = "item"
    # Not the item's doing (a replica restarting, a node gone, an input object lost with its node): waits.
    UNAVAILABLE = "unavailable"
    # The batch ran out of accelerator memory: split before it counts.
    OUT_OF_MEMORY = "out of memory"
    # The Ray cluster itself (the scheduler's own raylet, or its GCS) is gone: nothing can run.
    CLUSTER_GONE = "cluster gone"


class ClusterGoneError(RuntimeError):
    """The Ray cluster the farm runs on is gone; a supervisor should restart the scheduler."""


class _Pool:
    """One stage's replicas, and the node each was last seen on."""

    def __init__(self, actor_class, config: PoolConfig, model_cache_dir: str):
        options = dict(
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            # Ray restarts a replica whose process (or node) died, and the pool keeps its size; the
            # engine, not Ray, retries the work, so that it can count attempts.
            max_restarts=-1,
            max_task_retries=0,
        )
        self.actors = [actor_class.options(**options).remote(model_cache_dir, config) for _ in range(config.replicas)]
        self.nodes: list[str | None] = [None] * len(self.actors)
        # Each replica's actor id, by which a RayActorError names it.
        self.ids: list[str | None] = [None] * len(self.actors)
        self._turn = itertools.cycle(self.actors)

    def next(self):
        """Replicas in turn: for the tiles of a tiled decode, which go to every replica."""
        return next(self._turn)

    async def ready(self) -> None:
        ready = await asyncio.gather(*(calls.ready(actor) for actor in self.actors))
        self.nodes, self.ids = [node for node, _ in ready], [actor_id for _, actor_id in ready]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class Executor:
    def __init__(self, config: FarmConfig, scheduler: Scheduler, store: ResultStore, metrics: FarmMetrics,
                 live: LiveEvents, preview_every: Callable[[str], int]):  # fmt: skip
        """`live`: where a batch's step reports go; `preview_every`: a job's preview interval in steps, by job id."""
        self._config = config
        self._metrics = metrics
        # (stage, replica) of replicas whose process died, until they run a batch again.
        self._down: set[tuple[str, int]] = set()
        self._live = live
        self._preview_every = preview_every
        # With an object store, decoders put each PNG there (under the store's key) and return its StoredImage.
        self._store = store
        self._cache_dir = str(config.model_cache_dir)
        self._scheduler = scheduler
        self._pools: dict[str, _Pool] = {}
        for stage in ("encoder", "denoiser", "decoder"):
            self._start_pool(stage)
        # Started by the first job that upscales.
        self._exchange = None
        # _text_key(model, LoRAs, text) -> embedding ref, least recently used first; shared by every job.
        self._embeddings: OrderedDict[tuple, ray.ObjectRef] = OrderedDict()
        self._text_cache_hits = 0
        # (model, source) -> SourceLatents ref (img2img, inpaint), least recently used first.
        self._sources: OrderedDict[tuple[str, Source], ray.ObjectRef] = OrderedDict()
        self._batches: Counter[str] = Counter()
        self._batch_sizes: dict[str, Counter[int]] = {stage: Counter() for stage in STAGES}

    def _start_pool(self, stage: str) -> _Pool:
        pool = self._pools[stage] = _Pool(ACTOR_CLASSES[stage], getattr(self._config, f"{stage}s"), self._cache_dir)
        self._scheduler.add_replicas(stage, len(pool.actors), BATCHES_IN_FLIGHT_PER_REPLICA)
        return pool

    async def ready(self) -> None:
        pools = asyncio.gather(*(pool.ready() for pool in self._pools.values()))
        try:
            await asyncio.wait_for(pools, REPLICAS_READY_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(
                f"the stage replicas did not start within {REPLICAS_READY_TIMEOUT_S:g} s: "
                "does the Ray cluster have the CPUs and GPUs their pools ask for?"
            ) from None

    def start_upscalers(self) -> None:
        if "upscaler" not in self._pools:
            self._start_pool("upscaler")
            self._exchange = stages.WindowExchange.remote(EXCHANGE_JOIN_TIMEOUT_S, EXCHANGE_ROUND_TIMEOUT_S)

    def shutdown(self) -> None:
        for pool in self._pools.values():
            pool.kill()
        if self._exchange is not None:
            ray.kill(self._exchange)

    # -- running batches -----------------------------------------------------------------------------

    async def run(self, batch: Batch, record: Record) -> None:
        """Runs one batch, calling `record` with its results as they finish. Raises the first failure."""
        ended = self._call(batch.stage, len(batch.items))
        try:
            await self._run(batch, record)
        except ray.exceptions.RayActorError as error:
            self._down.update(
                (stage, index) for stage, pool in self._pools.items() for index, actor_id in enumerate(pool.ids)
                if actor_id == error.actor_id
            )  # fmt: skip
            raise
        finally:
            ended()
        self._answered(batch.stage, batch.replica)

    def _answered(self, stage: str, index: int) -> None:
        """A call on the replica succeeded: if it had died, Ray has brought it back."""
        if (stage, index) in self._down:
            self._down.discard((stage, index))
            self._metrics.replica_restarts.labels(stage).inc()

    def _call(self, stage: str, size: int) -> Callable[[], None]:
        """Counts one stage call of `size` images (for Farm.stats() and the metrics); returns what to call when
        it has ended, which times it."""
        self._batches[stage] += 1
        self._batch_sizes[stage][size] += 1
        self._metrics.batch_size.labels(stage).observe(size)
        started = time.monotonic()
        return lambda: self._metrics.batch_duration.labels(stage).observe(time.monotonic() - started)

    def replicas_up(self) -> dict[str, int]:
        """Replicas by stage, less those whose process died and has not run a batch since."""
        return {stage: len(pool.actors) - sum(1 for down, _ in self._down if down == stage)
                for stage, pool in self._pools.items()}  # fmt: skip

    async def _run(self, batch: Batch, record: Record) -> None:
        actor = self._pools[batch.stage].actors[batch.replica]
        if batch.stage == "denoiser":
            await self._render(actor, batch, record)
        elif batch.stage == "decoder":
            (item,) = batch.items
            latents, core, halo = item.payload
            png = await calls.tiled_decode_image(
                self._pools["decoder"].next, item.model, self._info(item.model), ray.put(latents), 0, item.spec, core, halo,
                *self._destination(item, item.spec),
            )  # fmt: skip
            await record([(item, item.spec, png)])
        else:
            (item,) = batch.items
            await record([(item, item.spec, await self._upscale_image(batch.replica, item, item.payload, item.spec))])

    def _destination(self, item: Item, spec) -> tuple:
        """(target, key) of the item's result in an object store; (None, None) with a local store."""
        if self._store.target is None:
            return None, None
        return self._store.target, self._store.key(item.job, spec.file_name)

    async def _render(self, actor, batch: Batch, record: Record) -> None:
        items, model = batch.items, batch.model
        specs = [item.spec for item in items]
        padded = specs + [specs[0]] * (batch.shape - len(specs))
        first = specs[0]
        denoise_batch = DenoiseBatch(
            width=first.width,
            height=first.height,
            steps=first.steps,
            scheduler=first.scheduler,
            items=tuple(DenoiseItem(seed=s.seed, guidance_scale=s.guidance_scale) for s in padded),
        )
        sourced = isinstance(first, EditedImageSpec)
        # Items share their key, so their LoRAs too.
        loras = () if sourced else applied_loras(first)
        prompts = await self._embed(model, loras, [s.prompt for s in padded])
        negatives = await self._embed(model, loras, [s.negative_prompt for s in padded]) if denoise_batch.guided else []
        watch = self._live.watch(items, self._preview_every)

        def on_report(report: StepReport) -> None:
            self._live.report(items, report, self._preview_every)

        if sourced:
            sources = [item.payload for item in items] + [items[0].payload] * (batch.shape - len(items))
            latents = await calls.denoise_sources(
                actor, model, denoise_batch, first.strength, prompts, negatives, self._source_latents(model, sources),
                watch, on_report,
            )  # fmt: skip
        else:
            latents = await calls.denoise(actor, model, loras, denoise_batch, prompts, negatives, watch, on_report)
        upscale: UpscaleSettings | None = None if sourced else items[0].payload
        if upscale is not None:
            await self._upscale_chained(items, latents, upscale, record)
        elif self._tiled(first):
            info = self._info(model)
            core = self._config.decode_tile // info.vae_scale_factor
            for index, item in enumerate(items):
                png = await calls.tiled_decode_image(
                    self._pools["decoder"].next, model, info, latents, index, item.spec, core, info.decode_halo,
                    *self._destination(item, item.spec),
                )  # fmt: skip
                await record([(item, item.spec, png)])
        else:
            target = self._store.target
            keys = None if target is None else [self._destination(item, item.spec)[1] for item in items]
            pngs = await self._on_replica(
                "decoder", model, len(specs), lambda decoder: calls.decode(decoder, model, latents, specs, target, keys)
            )
            await record(list(zip(items, specs, pngs, strict=True)))

    async def _on_replica(self, stage: str, model: str, size: int, call: Callable[[object], Awaitable]):
        """Runs a follow-on call of `size` images on the replica of `stage` the scheduler picks, counted there
        while it runs."""
        index = self._scheduler.pick(stage, model)
        ended = self._call(stage, size)
        try:
            result = await call(self._pools[stage].actors[index])
        finally:
            ended()
            self._scheduler.release(stage, index)
        self._answered(stage, index)
        return result

    async def _embed(self, model: str, loras: tuple[LoraSpec, ...], texts: list[str]) -> list[ray.ObjectRef]:
        """Each text's embedding ref: from the cache, else encoded, the missing ones in one encoder call."""
        keys = {text: _text_key(model, loras, text) for text in texts}
        missing = [text for text, key in keys.items() if key not in self._embeddings]
        self._text_cache_hits += len(keys) - len(missing)
        if missing:
            index = self._scheduler.pick("encoder", model)
            ended = self._call("encoder", len(missing))
            refs, done = calls.encode(self._pools["encoder"].actors[index], model, loras, missing)
            for text, ref in zip(missing, refs, strict=True):
                self._embeddings[keys[text]] = ref
            while len(self._embeddings) > TEXT_CACHE_ENTRIES:
                self._embeddings.popitem(last=False)
            # Counted on its replica until the call ends, without pulling the embeddings here.
            asyncio.ensure_future(done).add_done_callback(lambda call: self._ended(call, "encoder", index, ended))
        for key in keys.values():
            self._embeddings.move_to_end(key)
        return [self._embeddings[keys[text]] for text in texts]

    def _source_latents(self, model: str, sources: list[Source]) -> list[ray.ObjectRef]:
        """Each source's SourceLatents ref: from the cache, else encoded on a VAE replica, once for every seed and
        prompt that renders from it."""
        for source in dict.fromkeys(sources):
            if (model, source) in self._sources:
                continue
            index = self._scheduler.pick("decoder", model)
            ended = self._call("decoder", 1)
            ref, done = calls.encode_source(self._pools["decoder"].actors[index], model, source)
            self._sources[model, source] = ref
            while len(self._sources) > SOURCE_CACHE_ENTRIES:
                self._sources.popitem(last=False)
            asyncio.ensure_future(done).add_done_callback(
                lambda call, index=index, ended=ended: self._ended(call, "decoder", index, ended)
            )
        for source in sources:
            self._sources.move_to_end((model, source))
        return [self._sources[model, source] for source in sources]

    def _ended(self, call: asyncio.Future, stage: str, index: int, ended: Callable[[], None]) -> None:
        ended()
        self._scheduler.release(stage, index)
        if not call.cancelled() and call.exception() is None:  # a failure is the batches' to report
            self._answered(stage, index)

    def forget_inputs(self, batch: Batch) -> None:
        """After a failure the batch's cached embeddings and encoded sources may be what failed (lost with a
        node): encode them afresh."""
        for item in batch.items:
            loras = applied_loras(item.spec) if isinstance(item.spec, ImageSpec) else ()
            for text in (getattr(item.spec, "prompt", None), getattr(item.spec, "negative_prompt", None)):
                self._embeddings.pop(_text_key(item.model, loras, text), None)
            if isinstance(item.spec, EditedImageSpec):
                self._sources.pop((item.model, item.payload), None)

    def _tiled(self, spec) -> bool:
        return spec.width * spec.height > self._config.tiled_decode_above_pixels

    def _info(self, model: str):
        return model_info(model, self._config.model_cache_dir)

    async def _upscale_chained(self, items: list[Item], latents, upscale: UpscaleSettings, record: Record) -> None:
        """Sends each image of a denoised batch on through the x4 upscaler; only the 4x images are results."""
        specs = [item.spec for item in items]
        pngs, digests = await self._on_replica(
            "decoder", items[0].model, len(specs),
            lambda decoder: calls.decode_apart(decoder, items[0].model, latents, specs),
        )  # fmt: skip

        async def one(item: Item, png, digest: str) -> None:
            spec = upscale.chained(item.spec, digest)
            index = self._scheduler.pick("upscaler", spec.model)
            try:
                result = await self._upscale_image(index, item, png, spec)
            finally:
                self._scheduler.release("upscaler", index)
            await record([(item, spec, result)])

        await asyncio.gather(*(one(item, png, digest) for item, png, digest in zip(items, pngs, digests, strict=True)))

    async def _upscale_image(self, first: int, item: Item, image, spec):
        """Upscales one image (encoded bytes, or a ref to them) of `item` starting on replica `first`; returns the
        4x PNG (bytes, or its StoredImage in an object store)."""
        texts = [spec.prompt] + ([spec.negative_prompt] if guided(spec.guidance_scale) else [])
        embeds = await self._embed(spec.model, (), texts)
        info = self._info(spec.model)
        windows = tile_windows(spec.height // UPSCALE_FACTOR, spec.width // UPSCALE_FACTOR, spec.tile, info.unet_alignment)
        actors = self._pools["upscaler"].actors
        parties = min(len(actors), len(windows))
        if parties == 1:
            latents = calls.upscale(actors[first], spec.model, image, spec, embeds)
        else:
            latents = await self._spread(
                [actors[(first + rank) % len(actors)] for rank in range(parties)], image, spec, embeds
            )
        target, key = self._destination(item, spec)
        if self._tiled(spec):
            core = self._config.decode_tile // info.vae_scale_factor
            return await calls.tiled_decode_image(
                self._pools["decoder"].next, spec.model, info, latents, 0, spec, core, info.decode_halo, target, key
            )
        keys = None if key is None else [key]
        (png,) = await self._on_replica(
            "decoder", spec.model, 1, lambda decoder: calls.decode(decoder, spec.model, latents, [spec], target, keys)
        )
        return png

    async def _spread(self, actors: list, image, spec, embeds: list):
        """One image's UNet windows spread over `actors`; returns its final latents ref."""
        session = uuid.uuid4().hex
        latents, ends = calls.upscale_parts(actors, spec.model, image, spec, embeds, self._exchange, session)
        # The session is closed once every part has ended, however the image ends.
        asyncio.gather(*ends, return_exceptions=True).add_done_callback(
            lambda _: calls.close_session(self._exchange, session)
        )
        done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_EXCEPTION)
        if failed := [end.exception() for end in done if end.exception()]:
            calls.abort_session(self._exchange, session, f"{type(failed[0]).__name__}: {failed[0]}")
            raise failed[0]
        return latents

    # -- failures ------------------------------------------------------------------------------------

    async def classify(self, error: BaseException) -> Failure:
        if isinstance(error, (ray.exceptions.LocalRayletDiedError, ray.exceptions.RaySystemError)):
            return Failure.CLUSTER_GONE
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, torch.OutOfMemoryError):
            return Failure.OUT_OF_MEMORY
        # A replica that cannot be reached may be restarting, or on a lost node, or the whole cluster may be
        # gone (its GCS dead, or this scheduler's own raylet): only the GCS tells them apart, so ask it first.
        unavailable = isinstance(error, ray.exceptions.ActorUnavailableError)
        lost_object = isinstance(error, ray.exceptions.ObjectLostError) or (
            isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, ray.exceptions.ObjectLostError)
        )
        if isinstance(error, ray.exceptions.RayActorError) or lost_object:
            view = await _ask_cluster()
            if view is None:  # the GCS does not answer
                return Failure.CLUSTER_GONE
            own_node_alive, alive = view
            if not own_node_alive:
                return Failure.CLUSTER_GONE
            if self._forget_lost_nodes(alive) or lost_object or unavailable:
                return Failure.UNAVAILABLE
        return Failure.ITEM

    def _forget_lost_nodes(self, alive: set[str]) -> bool:
        """Whether a replica's last node is dead; such replicas are looked for again where Ray restarts them."""
        lost = False
        for stage, pool in self._pools.items():
            for index, node in enumerate(pool.nodes):
                if node is not None and node not in alive:
                    lost = True
                    pool.nodes[index] = None
                    self._scheduler.forget_models(stage, index)
                    asyncio.ensure_future(self._find(pool, index))
        return lost

    async def _find(self, pool: _Pool, index: int) -> None:
        try:
            pool.nodes[index], _ = await calls.ready(pool.actors[index])
        except ray.exceptions.RayError:
            pass  # still restarting: the next failure looks again

    # -- the public view -----------------------------------------------------------------------------

    def stats(self) -> FarmStats:
        """Blocks on the replicas: call from any thread but the farm's event loop."""
        view = {}
        for stage in STAGES:
            pool = self._pools.get(stage)
            replicas = ()
            if pool is not None:
                replicas = tuple(ReplicaStats(*values) for values in ray.get([calls.stats(actor) for actor in pool.actors]))
            view[stage] = StageStats(replicas, self._batches[stage], dict(self._batch_sizes[stage]))
        exchange = ()
        if self._exchange is not None:
            exchange = ray.get(calls.exchange_stats(self._exchange))
        return FarmStats(view, self._text_cache_hits, *exchange)


def _text_key(model: str, loras: tuple[LoraSpec, ...], text: str) -> tuple:
    """What a text's embedding is a function of: the model, the LoRAs (by content and scale), the text."""
    return model, tuple((lora.sha256, lora.scale) for lora in loras), text


def _cluster_view() -> tuple[bool, set[str]]:
    """(whether this scheduler's own node is alive, the ids of every live node); blocks on the GCS."""
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    return ray.get_runtime_context().get_node_id() in alive, alive


async def _ask_cluster() -> tuple[bool, set[str]] | None:
    """_cluster_view(), or None if the GCS gives no answer within CLUSTER_CHECK_TIMEOUT_S.

    Asked on a daemon thread of its own, not the loop's executor: a call into a dead GCS blocks for Ray's
    own reconnect timeout (60 s, after which Ray aborts the process), and asyncio.run() would wait for an
    executor thread before the scheduler could exit with its own status."""
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    def reply(view) -> None:
        if not answer.done():
            answer.set_result(view)

    def ask() -> None:
        try:
            view = _cluster_view()
        except Exception:
            view = None
        try:
            loop.call_soon_threadsafe(reply, view)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    threading.Thread(target=ask, name="renderfarm-cluster-check", daemon=True).start()
    try:
        return await asyncio.wait_for(answer, CLUSTER_CHECK_TIMEOUT_S)
    except TimeoutError:
        return None


def describe(error: BaseException) -> str:
    if isinstance(error, ray.exceptions.RayTaskError):
        error = error.cause  # the replica's own exception, without Ray's traceback dump
    if isinstance(error, ray.exceptions.RayActorError):
        return "the replica's process died"
    return f"{type(error).__name__}: {error}"
