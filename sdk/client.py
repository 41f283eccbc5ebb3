"""The blocking client: submit jobs, stream their results, manage them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from renderfarm import _wire, grid
from renderfarm._common import ClientBase, JobBase
from renderfarm._wire import JobState, JobStatus, Result
from renderfarm.errors import JobFailedError
from renderfarm.v1 import farm_pb2 as pb


class Client(ClientBase["Job"]):
    """A blocking connection to a farm, e.g. ``Client("farm.example:50051", token=...)`` (every argument:
    ``help(Client.__init__)``). Submit methods return a Job; use it as a context manager, or close() it."""

    def _open_channel(self, target: str, credentials, options: tuple) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def _submit(self, request: pb.SubmitJobRequest) -> Job:
        return Job(self, self._call(self._stub.SubmitJob, request).job)

    def close(self) -> None:
        """Closes the connection; the farm's jobs go on."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        if not self._connected:
            ready = grpc.channel_ready_future(self._channel)
            try:
                ready.result(timeout=self._connect_timeout)
            except grpc.FutureTimeoutError:
                ready.cancel()
                raise _wire.unreachable(self.address, self._connect_timeout) from None
            self._connected = True
        try:
            # wait_for_ready: a farm restarting is waited for, up to the deadline.
            return method(request, timeout=self._timeout, metadata=self._metadata, wait_for_ready=True)
        except grpc.RpcError as error:
            raise _wire.translate(error, self._timeout, request) from None

    def job(self, job_id: str) -> Job:
        """The job with this id (raises JobNotFoundError if the caller may see none)."""
        return Job(self, self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id)).job)

    def delete(self, job_id: str) -> None:
        """Removes a finished job's results from the farm's result store and the job from its job store.
        A job still queued or running raises RenderfarmError (FAILED_PRECONDITION): cancel it first."""
        self._call(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id))

    def jobs(
        self, owner: str | None = None, *, state=None, limit: int | None = None, page_token: str = ""
    ) -> _wire.JobList:
        """The jobs the caller may see (a member: their own; an admin: everyone's), oldest first: only
        `owner`'s, only those in `state` (a JobState or its name, or a list of them), at most `limit` (default:
        all), from `page_token` on (a previous list's ``next_page_token``, "" when it was the last). A member
        naming another user raises PermissionDeniedError."""
        pages = _wire.list_pages(owner, state, limit, page_token)
        request = next(pages)
        try:
            while True:  # page by page, so that no reply is large
                request = pages.send(self._call(self._stub.ListJobs, request))
        except StopIteration as listed:
            return listed.value


class Job(JobBase):
    """A submitted job. ``results()`` streams its images as they finish."""

    def status(self) -> JobStatus:
        """The job's state and counts now."""
        return _wire.job_status(self._client._call(self._client._stub.GetJob, pb.GetJobRequest(job_id=self.id)).job)

    def cancel(self) -> JobStatus:
        """Starts no more of the job's images (those running finish); returns its status. A job that already
        ended raises RenderfarmError (FAILED_PRECONDITION)."""
        request = pb.CancelJobRequest(job_id=self.id)
        return _wire.job_status(self._client._call(self._client._stub.CancelJob, request).job)

    def delete(self) -> None:
        """See Client.delete."""
        self._client.delete(self.id)

    def _events(
        self, omit_images: bool = False, live: bool = False, timeout: float | None = None
    ) -> Iterator[pb.JobEvent]:
        """Every stored event once, in order, resuming after a dropped stream from the last seq seen; with
        `live`, the live events (step progress, previews) sent while the stream is open too. Raises
        FarmTimeoutError if the job has not ended `timeout` seconds from now."""
        client, last_seq = self._client, 0
        delays, deadline = _wire.reconnect_delays(), _wire.Deadline(timeout, self.id)
        while True:
            request = pb.StreamJobEventsRequest(job_id=self.id, after_seq=last_seq, omit_images=omit_images, live=live)
            stream = client._stub.StreamJobEvents(request, metadata=client._metadata, timeout=deadline.remaining())
            try:
                for event in stream:
                    # Live events (seq 0) are not stored, so a resumed stream cannot start after them.
                    last_seq, delays = event.seq or last_seq, _wire.reconnect_delays()
                    yield event
                    if _wire.final_state(event):
                        return
            except grpc.RpcError as error:
                deadline.check(error)
                if not _wire.is_transient(error):
                    raise _wire.translate(error) from None
            finally:
                stream.cancel()
            time.sleep(deadline.cap(_wire.next_delay(delays, self.id)))

    def events(self, images: bool = True, timeout: float | None = None) -> Iterator[_wire.Event]:
        """Everything that happens to the job, in order, until it ends: StateChange, Progress and Result
        (each once, as results() gives them; without `images`, results carry no PNG), and while the stream is
        open the live events too: StepProgress as batches denoise, and with preview_every a Preview of each
        image every that many steps. A failed job ends with StateChange(FAILED, error); nothing is raised
        but FarmTimeoutError, if the job has not ended `timeout` seconds from now."""
        for event in self._events(omit_images=not images, live=True, timeout=timeout):
            yield _wire.event(event)

    def results(self, timeout: float | None = None) -> Iterator[Result]:
        """Each result exactly once, in completion order; raises JobFailedError if the job fails, and
        FarmTimeoutError (a TimeoutError) if it has not ended `timeout` seconds from now."""
        for event in self._events(timeout=timeout):
            kind = event.WhichOneof("kind")
            if kind == "result":
                yield _wire.result(event.result)
            elif _wire.final_state(event) == JobState.FAILED:
                raise JobFailedError(self.id, event.error)

    def grid(self, x: str, y: str | None = None) -> list[grid.Sheet]:
        """Waits for the job's results and lays them out as labelled contact sheets: spec field `x` across,
        `y` down (e.g. x="seed", y="guidance_scale"), one sheet per combination of the other fields that
        vary. Each sheet has `.image` (PIL) and `.save(path)`. Raises JobFailedError if the job fails, and
        ValueError naming the axis if it is not a field of the job's specs."""
        return grid.grids(((result.spec, result.image) for result in self.results()), x, y)

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Blocks until the job ends; raises JobFailedError if it failed, and FarmTimeoutError (a TimeoutError)
        if it has not ended within `timeout` seconds (the job goes on)."""
        for event in self._events(omit_images=True, timeout=timeout):
            if _wire.final_state(event) == JobState.FAILED:
                raise JobFailedError(self.id, event.error)
        return self.status()
