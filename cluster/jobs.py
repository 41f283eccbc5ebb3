"""Jobs and their event logs, held by the scheduler.

Each job has an append-only log of events numbered 1, 2, 3, ...; a stream
replays the log after a sequence number and then follows it. Result events
keep the spec and the file name only: image bytes live in the result store,
never here (DESIGN.md invariant 4).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from renderfarm._wire import JobState
from renderfarm.cluster.planner import Work
from renderfarm.spec import AnySpec, DecodedImageSpec, UpscaledImageSpec
from renderfarm.v1 import farm_pb2 as pb

STATE_TO_PB = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}


def result_to_pb(spec: AnySpec, name: str) -> pb.ImageResult:
    if isinstance(spec, DecodedImageSpec):
        return pb.ImageResult(decoded=pb.DecodedImageSpec(**vars(spec)), name=name)
    if isinstance(spec, UpscaledImageSpec):
        fields = vars(spec) | {"source": None if spec.source is None else pb.ImageSpec(**vars(spec.source))}
        return pb.ImageResult(upscaled=pb.UpscaledImageSpec(**fields), name=name)
    return pb.ImageResult(spec=pb.ImageSpec(**vars(spec)), name=name)


class JobRecord:
    def __init__(self, job_id: str, request: pb.SubmitJobRequest, work: Work):
        self.id = job_id
        self.request = request
        self.work = work
        self.total = work.total
        self.created_at = time.time()
        self.state = JobState.QUEUED
        self.completed = 0
        self.error = ""
        self.cancel_requested = False
        self._events: list[pb.JobEvent] = []
        self._appended = asyncio.Event()
        self._append(state=STATE_TO_PB[JobState.QUEUED])

    def _append(self, **kind) -> None:
        self._events.append(pb.JobEvent(seq=len(self._events) + 1, job_id=self.id, **kind))
        # Wake every follower, then arm a fresh event for the next append.
        self._appended.set()
        self._appended = asyncio.Event()

    def set_running(self) -> None:
        self.state = JobState.RUNNING
        self._append(state=STATE_TO_PB[JobState.RUNNING])

    def add_result(self, spec: AnySpec, name: str) -> None:
        self.completed += 1
        self._append(result=result_to_pb(spec, name))
        self._append(progress=pb.Progress(completed=self.completed, total=self.total))

    def finish(self, state: JobState, error: str = "") -> None:
        self.state, self.error = state, error
        self._append(state=STATE_TO_PB[state], error=error)

    def to_pb(self) -> pb.Job:
        job = pb.Job(
            id=self.id,
            state=STATE_TO_PB[self.state],
            total=self.total,
            completed=self.completed,
            error=self.error,
            created_at=self.created_at,
        )
        kind = self.request.WhichOneof("kind")
        getattr(job, kind).CopyFrom(getattr(self.request, kind))
        # Inputs can be megabytes that a status call does not need.
        if kind == "decode":
            job.decode.ClearField("latents_npy")
        elif kind == "upscale":
            job.upscale.ClearField("images")
        return job

    async def follow(self, after_seq: int) -> AsyncIterator[pb.JobEvent]:
        """The events after `after_seq`, then new ones as they come, until the job's final event."""
        seq = max(0, after_seq)
        while True:
            appended = self._appended
            while seq < len(self._events):
                seq += 1
                yield self._events[seq - 1]
            if self.state.finished:
                return
            await appended.wait()


class JobStore:
    def __init__(self):
        self._jobs: dict[str, JobRecord] = {}
        self._by_request_id: dict[str, str] = {}

    def create(self, request: pb.SubmitJobRequest, work: Work) -> JobRecord:
        job = JobRecord(uuid.uuid4().hex[:16], request, work)
        self._jobs[job.id] = job
        if request.request_id:
            self._by_request_id[request.request_id] = job.id
        return job

    def by_request_id(self, request_id: str) -> JobRecord | None:
        job_id = self._by_request_id.get(request_id)
        return self._jobs[job_id] if job_id else None

    def get(self, job_id: str) -> JobRecord | None:
        return self._jobs.get(job_id)

    def all(self) -> list[JobRecord]:
        return list(self._jobs.values())
