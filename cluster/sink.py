"""The result sink: the one writer of results, by group commit.

Every result that arrives while a flush runs waits for the next one, which
writes all their PNGs (and manifest lines) in one trip to a worker thread and
records them in one job-store transaction. A caller returns once its results
are durable, and followers see them only after the commit.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from renderfarm.cluster.jobs import JobRecord, JobStore, item_key
from renderfarm.cluster.results import LocalResultStore
from renderfarm.spec import AnySpec

Result = tuple[JobRecord, AnySpec, bytes]


class ResultSink:
    def __init__(self, jobs: JobStore, store: LocalResultStore):
        self._jobs = jobs
        self._store = store
        self._waiting: list[tuple[list[Result], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def record(self, results: list[Result]) -> None:
        """Stores and records each new result once; a result of a finished job, or one already recorded, is dropped."""
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
        await asyncio.to_thread(self._write, new)
        self._jobs.add_results([(job, spec, spec.file_name) for job, spec, _ in new])

    def _write(self, results: list[Result]) -> None:
        """PNGs first, then manifest lines: a crash in between leaves files that a redo rewrites identically."""
        by_job = defaultdict(list)
        for job, spec, png in results:
            by_job[job.id].append((spec, png))
        for job_id, written in by_job.items():
            self._store.write(job_id, written)
        for job_id, written in by_job.items():
            self._store.add_to_manifest(job_id, [spec for spec, _ in written])
