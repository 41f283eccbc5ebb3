"""The asyncio client: the same surface as Client, awaitable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from renderfarm import _wire, grid
from renderfarm._common import ClientBase, JobBase
from renderfarm._wire import JobState, JobStatus, Result
from renderfarm.errors import JobFailedError
from renderfarm.v1 import farm_pb2 as pb


class AsyncClient(ClientBase["Awaitable[AsyncJob]"]):
    """An asyncio connection to a farm: Client's arguments and methods, awaited (``async with AsyncClient(...)
    as client``); submit methods return an AsyncJob. Create it inside the event loop that uses it."""

    def _open_channel(self, target: str, credentials, options: tuple) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def _submit(self, request: pb.SubmitJobRequest) -> AsyncJob:
        return AsyncJob(self, (await self._call(self._stub.SubmitJob, request)).job)

    async def close(self) -> None:
        """See Client.close."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request):
        if not self._connected:
            try:
                await asyncio.wait_for(self._channel.channel_ready(), self._connect_timeout)
            except asyncio.TimeoutError:
                raise _wire.unreachable(self.address, self._connect_timeout) from None
            self._connected = True
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata, wait_for_ready=True)
        except grpc.RpcError as error:
            raise _wire.translate(error, self._timeout, request) from None

    async def job(self, job_id: str) -> AsyncJob:
        """See Client.job."""
        return AsyncJob(self, (await self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))).job)

    async def delete(self, job_id: str) -> None:
        """See Client.delete."""
        await self._call(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id))

    async def jobs(
        self, owner: str | None = None, *, state=None, limit: int | None = None, page_token: str = ""
    ) -> _wire.JobList:
        """See Client.jobs."""
        pages = _wire.list_pages(owner, state, limit, page_token)
        request = next(pages)
        try:
            while True:
                request = pages.send(await self._call(self._stub.ListJobs, request))
        except StopIteration as listed:
            return listed.value


class AsyncJob(JobBase):
    """A submitted job, for asyncio code; see Job."""

    async def status(self) -> JobStatus:
        """See Job.status."""
        response = await self._client._call(self._client._stub.GetJob, pb.GetJobRequest(job_id=self.id))
        return _wire.job_status(response.job)

    async def cancel(self) -> JobStatus:
        """See Job.cancel."""
        response = await self._client._call(self._client._stub.CancelJob, pb.CancelJobRequest(job_id=self.id))
        return _wire.job_status(response.job)

    async def delete(self) -> None:
        """See Client.delete."""
        await self._client.delete(self.id)

    async def _events(
        self, omit_images: bool = False, live: bool = False, timeout: float | None = None
    ) -> AsyncIterator[pb.JobEvent]:
        """See Job._events."""
        client, last_seq = self._client, 0
        delays, deadline = _wire.reconnect_delays(), _wire.Deadline(timeout, self.id)
        while True:
            request = pb.StreamJobEventsRequest(job_id=self.id, after_seq=last_seq, omit_images=omit_images, live=live)
            stream = client._stub.StreamJobEvents(request, metadata=client._metadata, timeout=deadline.remaining())
            try:
                async for event in stream:
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
            await asyncio.sleep(deadline.cap(_wire.next_delay(delays, self.id)))

    async def events(self, images: bool = True, timeout: float | None = None) -> AsyncIterator[_wire.Event]:
        """See Job.events."""
        async for event in self._events(omit_images=not images, live=True, timeout=timeout):
            yield _wire.event(event)

    async def results(self, timeout: float | None = None) -> AsyncIterator[Result]:
        """See Job.results."""
        async for event in self._events(timeout=timeout):
            if event.WhichOneof("kind") == "result":
                yield _wire.result(event.result)
            elif _wire.final_state(event) == JobState.FAILED:
                raise JobFailedError(self.id, event.error)

    async def grid(self, x: str, y: str | None = None) -> list[grid.Sheet]:
        """See Job.grid."""
        results = [result async for result in self.results()]
        # Off the event loop: images are decoded (and fetched, from an object store) here.
        return await asyncio.to_thread(lambda: grid.grids([(result.spec, result.image) for result in results], x, y))

    async def wait(self, timeout: float | None = None) -> JobStatus:
        """See Job.wait."""
        async for event in self._events(omit_images=True, timeout=timeout):
            if _wire.final_state(event) == JobState.FAILED:
                raise JobFailedError(self.id, event.error)
        return await self.status()
