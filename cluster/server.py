"""The scheduler's gRPC service, and the Farm that wires config, Ray, pools, store and server."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from renderfarm.cluster import kinds, metrics, quotas
from renderfarm.cluster.auth import Users
from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.constants import (
    DAY_S,
    DEFAULT_LIST_PAGE,
    MAX_LIST_PAGE,
    RETENTION_CHECK_INTERVAL_S,
    SERVER_OPTIONS,
    SHUTDOWN_GRACE_S,
)
from renderfarm.cluster.http import HttpServer
from renderfarm.cluster.jobs import STATE_TO_PB, JobRecord, JobStore
from renderfarm.cluster.keys import User
from renderfarm.cluster.metrics import FarmMetrics
from renderfarm.cluster.model_info import ModelInfo, model_info
from renderfarm.cluster.results import ResultStore, result_store
from renderfarm.cluster.rpc import SERVICE_NAME, CallerGuard, abort, abort_invalid, service_handler
from renderfarm.cluster.stats import FarmStats
from renderfarm.cluster.tls import server_credentials
from renderfarm.cluster.validate import check_id
from renderfarm.errors import InvalidJobError
from renderfarm.spec import AnySpec
from renderfarm.v1 import farm_pb2 as pb

log = logging.getLogger(__name__)

# An open farm on these is reachable from this machine only (the embedded farm's case).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The job states a ListJobs filter may name (not UNSPECIFIED, nor a number no state has).
STATE_NUMBERS = frozenset(STATE_TO_PB.values())


def _page_start(token: str) -> tuple[float, str] | None:
    """(created_at, id) of the last job a page listed; (-inf, "") for the first page; None for a bad token."""
    if not token:
        return float("-inf"), ""
    created_at, _, job_id = token.partition("/")
    try:
        return float(created_at), job_id
    except ValueError:
        return None


def _listed(job: pb.Job) -> pb.Job:
    """A listed job: its kind's lists (prompts, seeds, images...) cleared, so that a page's size is bounded."""
    kind = getattr(job, job.WhichOneof("kind"))
    for field in kind.DESCRIPTOR.fields:
        if field.is_repeated:
            kind.ClearField(field.name)
    return job


class FarmStopping(Exception):
    """The scheduler is stopping: a stream of a job's events ends before the job does."""


async def _merged(stored: AsyncIterator[list], live: asyncio.Queue) -> AsyncIterator[list]:
    """Runs of stored events, and each live event as a run of one, as they come, until `stored` ends."""
    next_stored = asyncio.ensure_future(anext(stored))
    next_live = asyncio.ensure_future(live.get())
    try:
        while True:
            await asyncio.wait((next_stored, next_live), return_when=asyncio.FIRST_COMPLETED)
            if next_live.done():
                yield [next_live.result()]
                next_live = asyncio.ensure_future(live.get())
            if next_stored.done():
                try:
                    events = next_stored.result()
                except StopAsyncIteration:
                    return
                yield events
                next_stored = asyncio.ensure_future(anext(stored))
    finally:
        next_live.cancel()
        next_stored.cancel()
        # The generator may be mid-step in the cancelled task: let that end before closing it.
        await asyncio.gather(next_stored, return_exceptions=True)
        await stored.aclose()


class RenderFarmService:
    """The RenderFarm methods; rpc.service_handler calls each with the caller rpc.CallerGuard authenticated."""

    def __init__(self, config: FarmConfig, jobs: JobStore, store: ResultStore, engine, users: Users):
        self._config = config
        self._jobs = jobs
        self._store = store
        self._engine = engine
        self._users = users
        self._draining = False

    async def SubmitJob(self, request, context, caller: User):
        if request.request_id and (existing := self._jobs.by_request_id(caller.name, request.request_id)):
            return await self._same_job(existing, request, context)
        if self._draining:
            await abort(
                context, grpc.StatusCode.UNAVAILABLE, None, "the farm is shutting down; submit again once it is back"
            )
        try:
            # Resolving a model may build or read files: keep it off the event loop.
            work = await asyncio.to_thread(kinds.validate, request, self._config, self._model_info)
        except InvalidJobError as error:
            await abort_invalid(context, error)
        # A retry of this request may have created the job while this one was validated.
        if request.request_id and (existing := self._jobs.by_request_id(caller.name, request.request_id)):
            return await self._same_job(existing, request, context)
        # No await between this check and the create below, so concurrent submissions cannot both pass.
        if refused := quotas.refusal(self._config.limits, caller, self._jobs, work.total, time.time()):
            violation = error_details_pb2.QuotaFailure.Violation(quota_id=refused.limit, description=refused.message)
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, None, refused.message,
                        details=[error_details_pb2.QuotaFailure(violations=[violation])])  # fmt: skip
        job = self._jobs.create(request, work.total, owner=caller.name)
        self._engine.submit(job, work, caller.weight)
        return pb.SubmitJobResponse(job=job.to_pb())

    async def _same_job(self, existing: JobRecord, request, context) -> pb.SubmitJobResponse:
        """A resubmitted request (a retry) gets its job back; a different one under a used request_id is refused,
        where it would silently get a job it did not ask for."""
        if existing.request() != request:
            await abort(
                context, grpc.StatusCode.ALREADY_EXISTS, "request_id",
                f"request_id: {request.request_id!r} already names job {existing.id}, submitted with a different "
                "request; give a new request_id for a new job",
            )  # fmt: skip
        return pb.SubmitJobResponse(job=existing.to_pb())

    def _model_info(self, model: str) -> ModelInfo:
        return model_info(model, self._config.model_cache_dir)

    async def _job(self, job_id: str, context, caller: User) -> JobRecord:
        try:
            check_id("job_id", job_id)
        except InvalidJobError as error:
            await abort_invalid(context, error)
        job = self.visible_job(job_id, caller)
        if job is None:
            message = f"job_id: no job {job_id!r}"
            resource = error_details_pb2.ResourceInfo(
                resource_type=pb.Job.DESCRIPTOR.full_name, resource_name=job_id, description=message
            )
            await abort(context, grpc.StatusCode.NOT_FOUND, "job_id", message, details=[resource])
        return job

    # -- what the web page reads too ----------------------------------------------------------------

    @property
    def users(self) -> Users:
        return self._users

    def visible_job(self, job_id: str, caller: User) -> JobRecord | None:
        """The job, if `caller` may see it. Another user's job is None exactly as a job that does not exist:
        ids leak nothing."""
        job = self._jobs.get(job_id)
        return job if job is not None and caller.may_see(job.owner) else None

    def visible_jobs(self, caller: User, owner: str = "") -> list[JobRecord]:
        """The jobs `caller` may see (or only `owner`'s of them), oldest first."""
        ordered = sorted(self._jobs.all(), key=lambda job: (job.created_at, job.id))
        return [job for job in ordered if caller.may_see(job.owner) and (not owner or job.owner == owner)]

    def cancel(self, job: JobRecord) -> None:
        """No more of an unfinished job's items start."""
        self._engine.cancel(job)

    def result(self, job: JobRecord, name: str) -> tuple[AnySpec, pb.ImageResult] | None:
        """A result of the job by file name: its spec, and its PNG (or an object store's URL); None if the job
        has no such result. Reads files: call off the event loop."""
        for result_name, spec in job.results():
            if result_name == name:
                result = pb.ImageResult(name=name)
                self._store.attach(job.id, result)
                return spec, result
        return None

    async def GetJob(self, request, context, caller: User):
        return pb.GetJobResponse(job=(await self._job(request.job_id, context, caller)).to_pb())

    async def ListJobs(self, request, context, caller: User):
        if request.owner and not caller.may_see(request.owner):
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "owner",
                f"owner: {caller.name} is a member, and members list only their own jobs",
            )
        if not 0 <= request.page_size <= MAX_LIST_PAGE:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "page_size",
                        f"page_size: must be 0 to {MAX_LIST_PAGE} (got {request.page_size})")  # fmt: skip
        after = _page_start(request.page_token)
        if after is None:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "page_token",
                        "page_token: is not one a ListJobs reply gave")  # fmt: skip
        states = set(request.states)
        if unknown := [index for index, state in enumerate(request.states) if state not in STATE_NUMBERS]:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"states[{unknown[0]}]",
                        f"states[{unknown[0]}]: is not a job state (got {request.states[unknown[0]]})")  # fmt: skip
        jobs = (job for job in self.visible_jobs(caller, request.owner)
                if (job.created_at, job.id) > after and (not states or STATE_TO_PB[job.state] in states))  # fmt: skip
        page = list(itertools.islice(jobs, (request.page_size or DEFAULT_LIST_PAGE) + 1))
        listed, more = page[: request.page_size or DEFAULT_LIST_PAGE], len(page) > (request.page_size or DEFAULT_LIST_PAGE)
        token = f"{listed[-1].created_at!r}/{listed[-1].id}" if more else ""
        return pb.ListJobsResponse(jobs=[_listed(job.to_pb()) for job in listed], next_page_token=token)

    async def CancelJob(self, request, context, caller: User):
        job = await self._job(request.job_id, context, caller)
        if job.state.finished:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "job_id",
                f"job_id: job {job.id} already ended {job.state.value}",
            )
        self.cancel(job)
        return pb.CancelJobResponse(job=job.to_pb())

    async def DeleteJob(self, request, context, caller: User):
        job = await self._job(request.job_id, context, caller)
        if not job.state.finished:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "job_id",
                f"job_id: job {job.id} is {job.state.value}: cancel it first, then delete it",
            )
        await self.delete(job)
        return pb.DeleteJobResponse()

    async def delete(self, job: JobRecord) -> None:
        """A finished job's results, then its rows: a crash in between leaves rows a second delete finishes,
        never results no row names."""
        await asyncio.to_thread(self._store.delete, job.id)
        if self._jobs.get(job.id) is job:  # not deleted meanwhile by another call
            self._jobs.delete(job)

    async def keep_retention(self, days: float) -> None:
        """Deletes finished jobs older than `days`, now and every RETENTION_CHECK_INTERVAL_S."""
        while True:
            for job in self._jobs.finished_before(time.time() - days * DAY_S):
                try:
                    await self.delete(job)
                except Exception as error:  # the next round tries again
                    log.warning("retention: could not delete job %s: %s", job.id, error)
                else:
                    log.info("retention: deleted job %s, finished over %g days ago", job.id, days)
            await asyncio.sleep(RETENTION_CHECK_INTERVAL_S)

    async def StreamJobEvents(self, request, context, caller: User):
        job = await self._job(request.job_id, context, caller)
        try:
            async for event in self.job_events(job, request.after_seq, live=request.live, images=not request.omit_images):
                yield event
        except FarmStopping:
            await abort(
                context, grpc.StatusCode.UNAVAILABLE, None, "the scheduler is stopping; resume from the last seq"
            )

    async def job_events(self, job: JobRecord, after_seq: int, *, live: bool, images: bool) -> AsyncIterator[pb.JobEvent]:
        """The job's stored events after `after_seq` until its final one (with each result's PNG or URL if
        `images`) and, if `live`, its live events from now on among them. Raises FarmStopping if the scheduler
        stops first. What StreamJobEvents and the web page stream."""
        stored = self._stored_events(job, after_seq, images)
        if not live:
            async for events in stored:
                for event in events:
                    yield event
            return
        with self._engine.live.listen(job.id) as queue:
            async for events in _merged(stored, queue):
                for event in events:
                    yield event

    async def _stored_events(self, job: JobRecord, after_seq: int, images: bool) -> AsyncIterator[list[pb.JobEvent]]:
        async for events in self._jobs.follow(job, after_seq):
            if events is None:
                raise FarmStopping()
            yield (await asyncio.to_thread(self._with_images, job.id, events)) if images else events

    def _with_images(self, job_id: str, events: list[pb.JobEvent]) -> list[pb.JobEvent]:
        """The events with each result's PNG (or its presigned URL) put in; one trip to a thread for a whole
        read of the log."""
        for event in events:
            if event.WhichOneof("kind") == "result":
                self._store.attach(job_id, event.result)
        return events

    async def drain(self) -> None:
        """Refuses new jobs, stops dispatching and lets in-flight items finish and be stored.

        Unfinished jobs stay unfinished in the job store, for the next scheduler on
        the state dir to resume; their streams end UNAVAILABLE, which clients resume from.
        """
        self._draining = True
        await self._engine.drain()
        self._jobs.stop_following()


class Farm:
    """A running farm: Ray (started or joined), the stage pools and the gRPC server."""

    def __init__(self, config: FarmConfig, token: str | None = None):
        """`token`: when set, it is the token of an admin named `admin` (RENDERFARM_TOKEN); the keys file
        (config.auth.keys_file) names the other users. With neither, the API is open."""
        self.config = config
        self._token = token
        self.port: int | None = None
        # The plaintext health-only port (config.health_port), when there is one; the same for /metrics and the
        # web page.
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self.web_port: int | None = None
        self._metrics = FarmMetrics()
        self._http_servers: list[HttpServer] = []
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._retention: asyncio.Task | None = None
        self._service: RenderFarmService | None = None
        self._engine = None
        self._health = HealthServicer()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def connect_ray(self) -> None:
        """Starts a local Ray instance or joins the configured cluster, unless this process already has."""
        import ray

        if not ray.is_initialized():
            ray.init(
                address=self.config.ray_address,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )

    async def start(self) -> None:
        from renderfarm.cluster.engine import Engine

        # Before anything starts: a broken keys file or unreadable certificate is the operator's to fix.
        users = Users(self.config.auth.keys_file, self._token)
        credentials = server_credentials(self.config)
        store = result_store(self.config)
        await asyncio.to_thread(store.check)
        if users.open and self.config.host not in LOOPBACK_HOSTS:
            log.warning("no keys file and no RENDERFARM_TOKEN: the API is open to whoever reaches %s", self.config.host)
        self._jobs = JobStore(self.config.state_dir)
        self.connect_ray()
        self._engine = Engine(
            self.config, self._jobs, store, lambda model: model_info(model, self.config.model_cache_dir), self._metrics
        )
        await self._engine.start()
        self._service = RenderFarmService(self.config, self._jobs, store, self._engine, users)
        for job in self._jobs.unfinished():
            # An owner no longer in the keys file keeps the default share.
            owner = users.get(job.owner)
            await self._engine.resume(job, owner.weight if owner else 1.0)
        receive_limit = ("grpc.max_receive_message_length", self.config.limits.max_request_bytes)
        self._server = grpc.aio.server(options=SERVER_OPTIONS + (receive_limit,), interceptors=(CallerGuard(users),))
        self._server.add_generic_rpc_handlers((service_handler(self._service),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        # So that grpcurl and other generic clients find the API without the .proto files.
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address = f"{self.config.host}:{self.config.port}"
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        await self._server.start()
        if self.config.health_port is not None:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{self.config.host}:{self.config.health_port}")
            await self._health_server.start()
        if self.config.metrics_port is not None:
            server = await metrics.serve(self._metrics, self.config.host, self.config.metrics_port)
            self._http_servers.append(server)
            self.metrics_port = server.port
        if self.config.web_port is not None:
            from renderfarm.cluster import web

            server = await web.serve(self._service, self.config.host, self.config.web_port)
            self._http_servers.append(server)
            self.web_port = server.port
        if self.config.retention_days is not None:
            self._retention = asyncio.create_task(self._service.keep_retention(self.config.retention_days))
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("renderfarm serving on %s%s", self.address, " (TLS)" if credentials else "")
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        if self.web_port is not None:
            log.info("the web page on http://%s:%d/", self.config.host, self.web_port)

    async def _stop_servers(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
        for server in self._http_servers:
            await server.stop()
        await self._server.stop(SHUTDOWN_GRACE_S)
        if self._health_server is not None:
            await self._health_server.stop(None)

    async def stop(self) -> None:
        """Graceful: health goes NOT_SERVING, running jobs drain, then the server and pools stop."""
        await self._health.enter_graceful_shutdown()
        await self._service.drain()
        await self._stop_servers()
        self._engine.executor.shutdown()
        self._jobs.close()

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serves until `stop` is set, then stops gracefully. Raises ClusterGoneError, after stopping what it
        can, if the Ray cluster dies first: nothing could run, so the supervisor should restart the farm."""
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopped, self._engine.cluster_gone], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if self._engine.cluster_gone.done():
            await self._health.enter_graceful_shutdown()
            self._jobs.stop_following()
            await self._stop_servers()
            self._jobs.close()
            self._engine.cluster_gone.result()
        await self.stop()

    def stats(self) -> FarmStats:
        """Replicas per stage with their peak memory and model loads, batches run and their sizes, encoder calls,
        and the result bytes the scheduler received.

        Blocks on the replicas: call it from any thread but the farm's event loop (an EmbeddedFarm's caller)."""
        return dataclasses.replace(self._engine.executor.stats(), result_bytes_received=self._engine.sink.bytes_received)
