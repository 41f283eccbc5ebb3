"""The dispatcher: runs jobs on the stage pools, batch by batch, with backpressure.

Stages hand each other ObjectRefs: the scheduler passes embedding refs to a
denoiser and the latents ref to a decoder, and only ever pulls the finished
PNG bytes, which it stores at once.

A work item (a sweep batch, a decode, an upscaled image) whose replica died or
raised is run again, with backoff, up to the configured attempts; Ray restarts
the dead replica. Items are pure functions of their specs, so a retried item
gives the very same pixels, and the job store counts each result once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import ray
import torch

from renderfarm._wire import JobState
from renderfarm.actors import stages
from renderfarm.actors.tiles import plan_tiles
from renderfarm.actors.txt2img import DenoiseBatch, DenoiseItem
from renderfarm.actors.upscale_x4 import tile_windows
from renderfarm.cluster.config import FarmConfig, PoolConfig
from renderfarm.cluster.constants import (
    BATCHES_IN_FLIGHT_PER_DENOISER,
    EXCHANGE_JOIN_TIMEOUT_S,
    EXCHANGE_ROUND_TIMEOUT_S,
    REPLICAS_READY_TIMEOUT_S,
    UPSCALE_FACTOR,
)
from renderfarm.cluster.jobs import JobRecord
from renderfarm.cluster.model_info import model_info
from renderfarm.cluster.planner import Decode, Sweep, Upscale, UpscaleSettings, Work, batches
from renderfarm.cluster.results import LocalResultStore
from renderfarm.spec import ImageSpec, UpscaledImageSpec

log = logging.getLogger(__name__)


class Pool:
    """A stage's replicas, called in turn."""

    def __init__(self, actor_class, config: PoolConfig, model_cache_dir: str):
        options = dict(
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            # Ray restarts a replica whose process died, and the pool keeps its size; the
            # dispatcher, not Ray, retries the work, so that it can count attempts.
            max_restarts=-1,
            max_task_retries=0,
        )
        self.actors = [actor_class.options(**options).remote(model_cache_dir) for _ in range(config.replicas)]
        self._turn = itertools.cycle(self.actors)

    def next(self):
        return next(self._turn)

    async def ready(self) -> None:
        await asyncio.gather(*(actor.ready.remote() for actor in self.actors))

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class Dispatcher:
    def __init__(self, config: FarmConfig, store: LocalResultStore):
        cache = str(config.model_cache_dir)
        self._config = config
        self._store = store
        self._encoders = Pool(stages.TextEncoder, config.encoders, cache)
        self._denoisers = Pool(stages.Denoiser, config.denoisers, cache)
        self._decoders = Pool(stages.Decoder, config.decoders, cache)
        # Started by the first upscale job.
        self._upscalers: Pool | None = None
        self._exchange = None
        # Shared by all jobs: batches beyond this wait before being dispatched.
        self._slots = asyncio.Semaphore(BATCHES_IN_FLIGHT_PER_DENOISER * config.denoisers.replicas)
        self._stopping = False

    async def ready(self) -> None:
        pools = asyncio.gather(self._encoders.ready(), self._denoisers.ready(), self._decoders.ready())
        try:
            await asyncio.wait_for(pools, REPLICAS_READY_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(
                f"the stage replicas did not start within {REPLICAS_READY_TIMEOUT_S:g} s: "
                "does the Ray cluster have the CPUs and GPUs their pools ask for?"
            ) from None

    def shutdown(self) -> None:
        for pool in (self._encoders, self._denoisers, self._decoders, self._upscalers):
            if pool is not None:
                pool.kill()
        if self._exchange is not None:
            ray.kill(self._exchange)

    def stop_dispatching(self) -> None:
        """No new work items start; those in flight finish. Unfinished jobs stay unfinished, to be resumed."""
        self._stopping = True

    def _dispatching(self, job: JobRecord) -> bool:
        return not (job.cancel_requested or self._stopping)

    async def run(self, job: JobRecord, work: Work) -> None:
        """Renders every image of the job not yet in its results; ends it SUCCEEDED, FAILED or CANCELLED.

        A job whose scheduler is stopping is left RUNNING in the job store, for the next one to resume.
        """
        if job.state != JobState.RUNNING:
            job.set_running()
        try:
            if isinstance(work, Decode):
                await self._decode(job, work)
            elif isinstance(work, Upscale):
                await self._upscale(job, work)
            else:
                await self._sweep(job, work)
        except Exception as error:  # a poison item fails its job, never the farm
            log.exception("job %s failed", job.id)
            job.finish(JobState.FAILED, str(error) if isinstance(error, ItemFailedError) else _describe(error))
            return
        if job.cancel_requested:
            job.finish(JobState.CANCELLED)
        elif not self._stopping or job.completed == job.total:
            job.finish(JobState.SUCCEEDED)

    async def _with_retries(
        self, job: JobRecord, item: str, attempt: Callable[[int], Awaitable[None]], splittable: bool = False
    ) -> None:
        """Runs attempt(1), attempt(2), ... until one succeeds; backoff doubles between failures.

        A call refused because its replica is restarting spends no attempt: the item
        waits for a replica, up to REPLICAS_READY_TIMEOUT_S. A `splittable` batch that
        ran out of accelerator memory is not retried here: the caller splits it.
        """
        policy = self._config.retries
        number, waiting_since = 1, None
        while True:
            try:
                return await attempt(number)
            except ray.exceptions.ActorUnavailableError as error:
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since > REPLICAS_READY_TIMEOUT_S:
                    raise ItemFailedError(f"{item} found no replica for {REPLICAS_READY_TIMEOUT_S:g} s") from error
                await asyncio.sleep(policy.backoff_s)
                continue
            except ray.exceptions.RayError as error:
                if splittable and out_of_memory(error):
                    raise
                if number == policy.max_attempts:
                    raise ItemFailedError(f"{item} failed {number} times; the last error: {_describe(error)}") from error
                delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** (number - 1))
                log.warning("job %s: %s failed (attempt %d of %d), retrying in %.1f s: %s",
                            job.id, item, number, policy.max_attempts, delay, _describe(error))  # fmt: skip
                await asyncio.sleep(delay)
                number, waiting_since = number + 1, None

    async def _sweep(self, job: JobRecord, sweep: Sweep) -> None:
        if sweep.upscale is not None:
            self._start_upscalers()
        embeddings: dict[tuple[str, str], ray.ObjectRef] = {}
        in_flight: set[asyncio.Task] = set()
        try:
            # Batches are cut from the whole sweep, done items included, so a resumed job
            # batches its remaining items exactly as a fault-free run did: batching can
            # change pixels by 1/255. A partly done batch runs again whole.
            for batch in batches(sweep.specs(), self._config.max_batch):
                if all(job.is_done(spec) for spec in batch):
                    continue
                await self._slots.acquire()
                if not self._dispatching(job):
                    self._slots.release()
                    break
                task = asyncio.create_task(self._render(job, batch, embeddings, sweep.upscale))
                task.add_done_callback(lambda _: self._slots.release())
                in_flight.add(task)
                in_flight = await _reap(in_flight)
            await asyncio.gather(*in_flight)
        except Exception:
            for task in in_flight:
                task.cancel()
            raise

    async def _decode(self, job: JobRecord, decode: Decode) -> None:
        if job.is_done(decode.spec):
            return
        latents = ray.put(decode.latents)

        async def attempt(_: int) -> None:
            png = await self._tiled_decode(decode.spec.model, latents, 0, decode.spec, decode.core, decode.halo)
            await self._store_result(job, decode.spec, png)

        async with self._slots:
            await self._with_retries(job, "the decode", attempt)

    def _start_upscalers(self) -> None:
        if self._upscalers is None:
            self._upscalers = Pool(stages.Upscaler, self._config.upscalers, str(self._config.model_cache_dir))
            self._exchange = stages.WindowExchange.remote(EXCHANGE_JOIN_TIMEOUT_S, EXCHANGE_ROUND_TIMEOUT_S)

    async def _upscale(self, job: JobRecord, upscale: Upscale) -> None:
        self._start_upscalers()
        embeddings: dict[tuple[str, str], ray.ObjectRef] = {}
        tasks = [
            asyncio.create_task(self._upscale_one(job, image, spec, embeddings))
            for image, spec in zip(upscale.images, upscale.specs)
        ]
        try:
            await asyncio.gather(*tasks)
        except Exception:
            for task in tasks:
                task.cancel()
            raise

    async def _upscale_one(self, job: JobRecord, image: bytes, spec: UpscaledImageSpec, embeddings: dict) -> None:
        async def attempt(number: int) -> None:
            # A retry encodes its texts afresh: a cached ref may be what failed.
            await self._upscale_image(job, image, spec, embeddings if number == 1 else {})

        if job.is_done(spec):
            return
        async with self._slots:
            if self._dispatching(job):
                await self._with_retries(job, f"the upscale of {spec.source_sha256[:12]}", attempt)

    async def _upscale_image(self, job: JobRecord, image, spec: UpscaledImageSpec, embeddings: dict) -> None:
        """Upscales one image (encoded bytes, or a ref to them) and stores the 4x PNG."""
        embeds = [self._embedding(embeddings, spec.model, spec.prompt)]
        if spec.guidance_scale > 1:
            embeds.append(self._embedding(embeddings, spec.model, spec.negative_prompt))
        latents = await self._upscale_latents(image, spec, embeds)
        png = await self._decode_latents(spec.model, latents, spec)
        await self._store_result(job, spec, png)

    def _embedding(self, embeddings: dict, model: str, text: str) -> ray.ObjectRef:
        """Each unique text of a job is encoded once per model; its ref serves every image that uses it."""
        if (model, text) not in embeddings:
            embeddings[model, text] = self._encoders.next().encode.remote(model, text)
        return embeddings[model, text]

    async def _upscale_latents(self, image, spec: UpscaledImageSpec, embeds: list) -> ray.ObjectRef:
        """The final latents of one image, its UNet windows spread over up to every upscaler replica."""
        alignment = model_info(spec.model, self._config.model_cache_dir).unet_alignment
        windows = tile_windows(spec.height // UPSCALE_FACTOR, spec.width // UPSCALE_FACTOR, spec.tile, alignment)
        parties = min(len(self._upscalers.actors), len(windows))
        if parties == 1:
            return self._upscalers.next().upscale.remote(spec.model, image, spec, *embeds)
        session = uuid.uuid4().hex
        # A replica runs one call at a time, in the order the scheduler submitted them. All parts of an
        # image are submitted in this one loop, with no await in between, so every replica runs the
        # parts of spread images in the same order, and two spread images never wait on each other.
        parts = [
            self._upscalers.next().upscale_part.options(num_returns=2).remote(
                spec.model, image, spec, *embeds, spread=stages.Spread(self._exchange, session, rank, parties)
            )
            for rank in range(parties)
        ]
        ends = [asyncio.ensure_future(end) for _, end in parts]
        # The session is closed once every part has ended, however the image ends.
        asyncio.gather(*ends, return_exceptions=True).add_done_callback(
            lambda _: self._exchange.close.remote(session)
        )
        done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_EXCEPTION)
        if failed := [end.exception() for end in done if end.exception()]:
            # Releases the parties that wait for the failed one.
            self._exchange.abort.remote(session, f"{type(failed[0]).__name__}: {failed[0]}")
            raise failed[0]
        return parts[0][0]

    def _tiled(self, spec) -> bool:
        return spec.width * spec.height > self._config.tiled_decode_above_pixels

    async def _decode_latents(self, model: str, latents, spec, item: int = 0) -> bytes:
        """One image's PNG: in tiles over the VAE pool if it is large, else in one piece.

        A large image may be item `item` of a batch of latents; the one-piece path takes a batch of one.
        """
        if self._tiled(spec):
            info = model_info(model, self._config.model_cache_dir)
            core = self._config.decode_tile // info.vae_scale_factor
            return await self._tiled_decode(model, latents, item, spec, core, info.decode_halo)
        (png,) = await self._decoders.next().decode.remote(model, latents, [spec])
        return png

    async def _store_result(self, job: JobRecord, spec, png: bytes) -> None:
        name = await asyncio.to_thread(self._store.write, job.id, spec, png)
        if job.add_result(spec, name):
            await asyncio.to_thread(self._store.add_to_manifest, job.id, name, spec)

    async def _tiled_decode(self, model: str, latents, item: int, spec, core: int, halo: int) -> bytes:
        """One image decoded in tiles spread over the VAE pool; each norm's statistics gathered between segments."""
        info = model_info(model, self._config.model_cache_dir)
        scale = info.vae_scale_factor
        tiles = plan_tiles(spec.height // scale, spec.width // scale, core, halo)
        *states, sums = self._decoders.next().tiled_prepare.options(num_returns=len(tiles) + 1).remote(
            model, latents, item, tiles
        )
        sums = await sums
        for index in range(info.decode_segments):
            calls = [
                self._decoders.next().tiled_segment.options(num_returns=2).remote(model, index, tile, state, sums)
                for tile, state in zip(tiles, states)
            ]
            states = [state for state, _ in calls]
            if index + 1 < info.decode_segments:
                sums = sum(await asyncio.gather(*(tile_sums for _, tile_sums in calls)))
        return await self._decoders.next().tiled_assemble.remote(tiles, spec, *states)

    async def _render(
        self, job: JobRecord, batch: list[ImageSpec], embeddings: dict, upscale: UpscaleSettings | None
    ) -> None:
        """One batch, retried; a batch that runs out of accelerator memory is split in halves first."""

        async def attempt(number: int) -> None:
            # A retry encodes its texts afresh: a cached ref may be what failed.
            await self._render_once(job, batch, embeddings if number == 1 else {}, upscale)

        try:
            item = f"the batch of {len(batch)} from {batch[0].file_name}"
            await self._with_retries(job, item, attempt, splittable=len(batch) > 1)
        except ray.exceptions.RayError as error:
            if not out_of_memory(error):
                raise
            log.warning("job %s: a batch of %d ran out of memory; splitting it", job.id, len(batch))
            middle = len(batch) // 2
            await asyncio.gather(
                self._render(job, batch[:middle], {}, upscale), self._render(job, batch[middle:], {}, upscale)
            )

    async def _render_once(
        self, job: JobRecord, batch: list[ImageSpec], embeddings: dict, upscale: UpscaleSettings | None
    ) -> None:
        first, model = batch[0], batch[0].model
        denoise_batch = DenoiseBatch(
            width=first.width,
            height=first.height,
            steps=first.steps,
            scheduler=first.scheduler,
            items=tuple(DenoiseItem(seed=s.seed, guidance_scale=s.guidance_scale) for s in batch),
        )
        embeds = [self._embedding(embeddings, model, s.prompt) for s in batch]
        if denoise_batch.guided:
            embeds += [self._embedding(embeddings, model, s.negative_prompt) for s in batch]
        latents = self._denoisers.next().denoise.remote(model, denoise_batch, *embeds)
        if upscale is not None:
            await self._upscale_sweep_images(job, batch, latents, upscale, embeddings)
            return
        if self._tiled(first):
            for item, spec in enumerate(batch):
                await self._store_result(job, spec, await self._decode_latents(model, latents, spec, item))
            return
        pngs = await self._decoders.next().decode.remote(model, latents, batch)
        for spec, png in zip(batch, pngs, strict=True):
            await self._store_result(job, spec, png)

    async def _upscale_sweep_images(
        self, job: JobRecord, batch: list[ImageSpec], latents, upscale: UpscaleSettings, embeddings: dict
    ) -> None:
        """Sends each image of a denoised batch on through the x4 upscaler; only the 4x images are results."""
        # Each PNG is an object of its own that goes to the upscaler by ref, never through the scheduler.
        *pngs, digests = self._decoders.next().decode_apart.options(num_returns=len(batch) + 1).remote(
            batch[0].model, latents, batch
        )
        specs = [upscale.chained(spec, digest) for spec, digest in zip(batch, await digests, strict=True)]
        await asyncio.gather(*(self._upscale_image(job, png, spec, embeddings) for png, spec in zip(pngs, specs)))


class ItemFailedError(Exception):
    """A work item failed every attempt: it fails its job."""


def out_of_memory(error: ray.exceptions.RayError) -> bool:
    return isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, torch.OutOfMemoryError)


def _describe(error: Exception) -> str:
    if isinstance(error, ray.exceptions.RayTaskError):
        error = error.cause  # the replica's own exception, without Ray's traceback dump
    if isinstance(error, ray.exceptions.RayActorError):
        return "the replica's process died"
    return f"{type(error).__name__}: {error}"


async def _reap(tasks: set[asyncio.Task]) -> set[asyncio.Task]:
    """Drops finished tasks, re-raising the first failure among them."""
    done = {task for task in tasks if task.done()}
    for task in done:
        task.result()
    return tasks - done
