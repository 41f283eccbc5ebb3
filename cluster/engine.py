"""The engine: the farm's run path, in one direction: plan -> schedule -> execute -> record.

Jobs come in planned (their kind's lazy items); the scheduler core decides
which batch runs where; the executor runs it on the stage pools; the result
sink records what it yields. Outcomes go back to the scheduler: a failed item
is retried with backoff up to `max_attempts` (counted in the job store, so a
restart grants none afresh), an item whose replica or node is gone waits
without spending an attempt, a batch out of memory is split, and a cluster
that is gone stops the farm for its supervisor.

The engine is the one owner of job states: QUEUED until a job's first item is
dispatched, RUNNING, then one of the finished states through `_finish`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from renderfarm._wire import JobState
from renderfarm.cluster import kinds
from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.constants import MODELS_PER_REPLICA, REPLICAS_READY_TIMEOUT_S
from renderfarm.cluster.executor import ClusterGoneError, Executor, Failure, describe
from renderfarm.cluster.jobs import JobRecord, JobStore
from renderfarm.cluster.live import LiveEvents
from renderfarm.cluster.metrics import FarmMetrics
from renderfarm.cluster.model_info import ModelInfo
from renderfarm.cluster.results import ResultStore
from renderfarm.cluster.scheduler import Batch, Item, Scheduler
from renderfarm.cluster.sink import ResultSink
from renderfarm.errors import InvalidJobError

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: FarmConfig, jobs: JobStore, store: ResultStore,
                 model_info: Callable[[str], ModelInfo], metrics: FarmMetrics):  # fmt: skip
        self._config = config
        self._metrics = metrics
        self._jobs = jobs
        self._store = store
        self._model_info = model_info
        # Upscalers and one-image kinds take one item a call; the denoiser's batch is its fixed shape.
        shapes = {"encoder": 1, "denoiser": config.max_batch, "decoder": 1, "upscaler": 1}
        self._scheduler = Scheduler(shapes, MODELS_PER_REPLICA, config.batch_wait_s)
        # Step progress and previews of running jobs, for whoever watches them; never stored.
        self.live = LiveEvents()
        self.executor = Executor(config, self._scheduler, store, metrics, self.live, self._preview_every)
        self.sink = ResultSink(jobs, store, metrics)
        self._active: dict[str, JobRecord] = {}
        metrics.watch(self._jobs_by_state, self._queued_images, self.executor.replicas_up, self._scheduler.model_loads)
        self._tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = False
        # Set, with why, when the Ray cluster is gone.
        self.cluster_gone: asyncio.Future | None = None

    def _jobs_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys((state.value for state in JobState), 0)
        for job in self._jobs.all():
            counts[job.state.value] += 1
        return counts

    def _queued_images(self) -> int:
        return sum(job.total - job.completed for job in list(self._active.values()))

    def _preview_every(self, job_id: str) -> int:
        job = self._active.get(job_id)
        return job.preview_every if job is not None else 0

    async def start(self) -> None:
        self.cluster_gone = asyncio.get_running_loop().create_future()
        await self.executor.ready()

    # -- jobs in -------------------------------------------------------------------------------------

    def submit(self, job: JobRecord, work: kinds.Work, weight: float) -> None:
        """Queues a planned job; `weight` is its owner's share against other owners (see the scheduler)."""
        request = job.summary
        if request.WhichOneof("kind") == "upscale" or getattr(work, "upscale", None) is not None:
            self.executor.start_upscalers()
        self._active[job.id] = job
        now = asyncio.get_running_loop().time()
        self._scheduler.add_job(job.id, kinds.stage(request), work.items(job), now, priority=job.priority,
                                 owner=job.owner, weight=weight)  # fmt: skip
        self._settle(job)
        self._pump()

    async def resume(self, job: JobRecord, weight: float) -> None:
        """Takes up a job a previous scheduler on this state dir left unfinished; its done items stay done."""
        if job.cancel_requested:
            self._finish(job, JobState.CANCELLED)
            return
        try:
            work = await asyncio.to_thread(kinds.replan, job.request(), self._config, self._model_info)
        except InvalidJobError as error:
            self._finish(job, JobState.FAILED, f"cannot resume: {error}")
            return
        # The manifest may lack the last results, or end in a torn line, if the process died writing it.
        await asyncio.to_thread(self._store.rewrite_manifest, job.id, list(job.results()))
        log.info("resuming job %s: %d of %d images done", job.id, job.completed, job.total)
        self.submit(job, work, weight)

    def cancel(self, job: JobRecord) -> None:
        """No more of the job's items start; those in flight finish and are kept."""
        job.request_cancel()
        if job.id in self._active:
            self._scheduler.drop(job.id)
            self._settle(job)

    async def drain(self) -> None:
        """Nothing new starts; batches in flight finish and are recorded. Unfinished jobs stay unfinished."""
        self._stopping = True
        self._scheduler.stop()
        if self._timer is not None:
            self._timer.cancel()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the loop: schedule -> execute -------------------------------------------------------------------

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        for batch in self._scheduler.schedule(loop.time()):
            for job_id in dict.fromkeys(item.job for item in batch.items):
                job = self._active[job_id]
                if job.state == JobState.QUEUED:
                    job.change_state(JobState.RUNNING)
            self._spawn(self._run(batch))
        self._arm_timer(loop)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Schedules again when the soonest retry becomes ready, or a short batch has waited enough."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self._scheduler.next_wake_at()
        if at is not None and not self._stopping:
            self._timer = loop.call_at(at, self._pump)

    async def _run(self, batch: Batch) -> None:
        try:
            await self.executor.run(batch, self._record)
        except Exception as error:
            self._scheduler.release(batch.stage, batch.replica)
            await self._failed(batch, error)
        else:
            self._scheduler.release(batch.stage, batch.replica)
            self._scheduler.finished(batch.items)
        for job_id in dict.fromkeys(item.job for item in batch.items):
            if job := self._active.get(job_id):
                self._settle(job)
        self._pump()

    async def _record(self, results: list[tuple[Item, object, bytes]]) -> None:
        await self.sink.record([
            (self._active[item.job], spec, png) for item, spec, png in results if item.job in self._active
        ])  # fmt: skip

    # -- outcomes --------------------------------------------------------------------------------------

    async def _failed(self, batch: Batch, error: Exception) -> None:
        failure = await self.executor.classify(error)
        self.executor.forget_inputs(batch)
        if failure == Failure.CLUSTER_GONE:
            self._cluster_gone(error)
            return
        # Items whose results were recorded before the failure (one image of a chained batch) are done.
        left = [item for item in batch.items if (job := self._active.get(item.job)) and not job.is_done(item.spec)]
        self._scheduler.finished([item for item in batch.items if item not in left])
        # However few its items, a batch padded to more than one image can shrink.
        if failure == Failure.OUT_OF_MEMORY and left and batch.shape > 1:
            log.warning("a batch of %d (at shape %d) ran out of memory; splitting it", len(left), batch.shape)
            self._scheduler.split(Batch(batch.stage, batch.replica, batch.model, left, batch.shape))
            return
        now = asyncio.get_running_loop().time()
        policy = self._config.retries
        for item in left:
            job = self._active[item.job]
            if failure == Failure.UNAVAILABLE:
                item.waiting_since = item.waiting_since or now
                if now - item.waiting_since > REPLICAS_READY_TIMEOUT_S:
                    self._fail(job, item, f"found no replica for {REPLICAS_READY_TIMEOUT_S:g} s")
                else:
                    self._metrics.item_retries.inc()
                    self._scheduler.retry([item], now + policy.backoff_s)
                continue
            item.waiting_since = None
            item.failures = job.count_failure(item.spec)
            if item.failures >= policy.max_attempts:
                self._fail(job, item, f"failed {item.failures} times; the last error: {describe(error)}")
                continue
            delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** (item.failures - 1))
            self._metrics.item_retries.inc()
            log.warning("job %s: %s failed (attempt %d of %d), retrying in %.1f s: %s", job.id, _name(item),
                        item.failures, policy.max_attempts, delay, describe(error))  # fmt: skip
            self._scheduler.retry([item], now + delay)

    def _fail(self, job: JobRecord, item: Item, why: str) -> None:
        """A poison item fails its job, never the farm; the job's other items in flight are dropped."""
        self._scheduler.finished([item])
        self._finish(job, JobState.FAILED, f"{_name(item)} {why}")

    def _cluster_gone(self, error: Exception) -> None:
        if not self.cluster_gone.done():
            self.cluster_gone.set_exception(ClusterGoneError(
                f"the Ray cluster this farm runs on is gone ({describe(error)}); unfinished jobs stay in the state "
                "dir for the next scheduler to resume"
            ))  # fmt: skip
        self._stopping = True
        self._scheduler.stop()

    def _settle(self, job: JobRecord) -> None:
        """Ends a job whose items are all done (or dropped by a cancel) and none is in flight."""
        if job.state.finished or not self._scheduler.idle(job.id):
            return
        if job.cancel_requested:
            self._finish(job, JobState.CANCELLED)
        elif not self._stopping or job.completed == job.total:
            self._finish(job, JobState.SUCCEEDED)

    def _finish(self, job: JobRecord, state: JobState, error: str = "") -> None:
        """The one door out: every job ends here."""
        if job.state.finished:
            return
        if state == JobState.FAILED:
            log.error("job %s failed: %s", job.id, error)
        self._scheduler.drop(job.id)
        self._scheduler.remove(job.id)
        self._active.pop(job.id, None)
        job.change_state(state, error)
        self._spawn(self.sink.job_ended(job))

    def _spawn(self, coroutine) -> None:
        """Runs follow-up work that drain() waits for."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _name(item: Item) -> str:
    return f"the item {item.spec.file_name}"
