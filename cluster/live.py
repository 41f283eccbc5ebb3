"""Live events: a running job's step progress and previews, sent to whoever is watching it, never stored.

Stored events (states, progress, results) live in the job store's log and are
replayed from any seq; live events are only fanned out to the streams open at
the time, each through a bounded queue that drops its oldest events when its
client falls behind, so a slow watcher costs no memory and holds up no batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

from renderfarm.actors.previews import StepReport, Watch
from renderfarm.cluster.constants import LIVE_EVENTS_PER_LISTENER
from renderfarm.cluster.scheduler import Item
from renderfarm.v1 import farm_pb2 as pb


class LiveEvents:
    def __init__(self):
        self._listeners: defaultdict[str, set[asyncio.Queue]] = defaultdict(set)

    @contextlib.contextmanager
    def listen(self, job_id: str) -> Iterator[asyncio.Queue]:
        """A queue of the job's live events from now on, while the context lasts."""
        queue: asyncio.Queue[pb.JobEvent] = asyncio.Queue(LIVE_EVENTS_PER_LISTENER)
        self._listeners[job_id].add(queue)
        try:
            yield queue
        finally:
            self._listeners[job_id].discard(queue)
            if not self._listeners[job_id]:
                del self._listeners[job_id]

    def watched(self, job_id: str) -> bool:
        return job_id in self._listeners

    def publish(self, job_id: str, event: pb.JobEvent) -> None:
        for queue in self._listeners.get(job_id, ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    def watch(self, items: Sequence[Item], preview_every: Callable[[str], int]) -> Watch | None:
        """What a denoiser should report on a batch of `items` (then padded): None if no job of theirs is watched.
        Only watched jobs' previews are made."""
        watched = {item.job: preview_every(item.job) for item in items if self.watched(item.job)}
        if not watched:
            return None
        return Watch(tuple(watched.get(item.job, 0) for item in items), timed=not all(watched.values()))

    def report(self, items: Sequence[Item], report: StepReport, preview_every: Callable[[str], int]) -> None:
        """One denoiser report on a batch of `items`, as each watching job's events: a job with previews
        (`preview_every`, by job id) hears of the steps its previews are due at, with them; one without, of
        the timed reports (a few a second)."""
        by_job: defaultdict[str, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_job[item.job].append(index)
        for job_id, indices in by_job.items():
            every = preview_every(job_id)
            if not self.watched(job_id) or (report.step % every if every else not report.timed):
                continue
            names = [items[index].spec.file_name for index in indices]
            progress = pb.StepProgress(step=report.step, steps=report.steps, names=names)
            self.publish(job_id, pb.JobEvent(job_id=job_id, step_progress=progress))
            for index, name in zip(indices, names):
                if (png := report.previews.get(index)) is not None:
                    preview = pb.Preview(name=name, step=report.step, steps=report.steps, png=png)
                    self.publish(job_id, pb.JobEvent(job_id=job_id, preview=preview))
