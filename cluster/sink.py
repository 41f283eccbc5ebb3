"""The result sink: the one writer of results, by group commit.

Every result that arrives while a flush runs waits for the next one, which
writes all their PNGs (and manifest lines) in one trip to a worker thread and
records them in one job-store transaction. A caller returns once its results
are durable, and followers see them only after the commit.

A result is PNG bytes (a local store: written here) or a StoredImage (an
object store: a worker put it into the bucket, and only its name, size and
digest come here). An object store's manifest is rewritten from the results
index when a job's last result is recorded, and at most every
MANIFEST_REWRITE_INTERVAL_S while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from renderfarm.actors.s3 import StoredImage
from renderfarm.cluster.constants import MANIFEST_REWRITE_INTERVAL_S
from renderfarm.cluster.jobs import JobRecord, JobStore, item_key
from renderfarm.cluster.metrics import FarmMetrics
from renderfarm.cluster.results import ResultStore
from renderfarm.spec import AnySpec

log = logging.getLogger(__name__)

Result = tuple[JobRecord, AnySpec, bytes | StoredImage]


class ResultSink:
    def __init__(self, jobs: JobStore, store: ResultStore, metrics: FarmMetrics):
        self._jobs = jobs
        self._store = store
        self._metrics = metrics
        self._waiting: list[tuple[list[Result], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        # When each running job's manifest was last rewritten (object stores).
        self._manifest_at: dict[str, float] = {}
        # PNG bytes that reached the scheduler: with an object store, none should.
        self.bytes_received = 0

    async def record(self, results: list[Result]) -> None:
        """Stores and records each new result once; a result of a finished job, or one already recorded, is dropped."""
        self.bytes_received += sum(len(png) for _, _, png in results if isinstance(png, bytes))
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((results, done))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, []
                try:
                    await self._commit([result for results, _ in waiting for result in results])
                except Exception as error:
                    for _, done in waiting:
                        done.set_exception(error)
                else:
                    for _, done in waiting:
                        done.set_result(None)
        finally:
            self._flusher = None

    async def _commit(self, results: list[Result]) -> None:
        # The sink is the results' only writer, so what is new is known before anything is written.
        new, seen = [], set()
        for job, spec, png in results:
            key = (job.id, item_key(spec))
            if job.state.finished or job.is_done(spec) or key in seen:
                continue
            seen.add(key)
            new.append((job, spec, png))
        if not new:
            return
        if self._store.rewrites_manifest:
            recorded = self._jobs.add_results([(job, spec, spec.file_name, stored) for job, spec, stored in new])
            await self._rewrite_manifests({job.id: job for job, _, _ in new}.values())
        else:
            await asyncio.to_thread(self._write, new)
            recorded = self._jobs.add_results([(job, spec, spec.file_name, None) for job, spec, _ in new])
        for job, spec, _, _ in recorded:
            self._metrics.images.labels(job.summary.WhichOneof("kind"), spec.model).inc()

    def _write(self, results: list[Result]) -> None:
        """PNGs first, then manifest lines: a crash in between leaves files that a redo rewrites identically."""
        by_job = defaultdict(list)
        for job, spec, png in results:
            by_job[job.id].append((spec, png))
        for job_id, written in by_job.items():
            self._store.write(job_id, written)
        for job_id, written in by_job.items():
            self._store.add_to_manifest(job_id, [spec for spec, _ in written])

    async def _rewrite_manifests(self, jobs) -> None:
        now = time.monotonic()
        due = [job for job in jobs if job.completed == job.total
               or now - self._manifest_at.get(job.id, 0.0) >= MANIFEST_REWRITE_INTERVAL_S]  # fmt: skip
        for job in due:
            self._manifest_at[job.id] = now
            await self.rewrite_manifest(job)

    async def rewrite_manifest(self, job: JobRecord) -> None:
        """The job's manifest afresh from the results index (read here, on the loop: the index's one reader)."""
        results = list(job.results())
        await asyncio.to_thread(self._store.rewrite_manifest, job.id, results)

    async def job_ended(self, job: JobRecord) -> None:
        """An object store's manifest may lag by the rewrite interval: bring it up to date for good."""
        if self._manifest_at.pop(job.id, None) is None or job.completed == job.total:
            return
        try:
            await self.rewrite_manifest(job)
        except Exception as error:  # the results index stays the record; a resume or delete still works
            log.warning("job %s: could not rewrite its manifest: %s", job.id, error)
