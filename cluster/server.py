"""The scheduler's gRPC service, and the Farm that wires config, Ray, pools, store and server."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from renderfarm._wire import JobState
from renderfarm.cluster.auth import BearerTokenInterceptor
from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.constants import SERVER_OPTIONS, SHUTDOWN_GRACE_S
from renderfarm.cluster.jobs import JobRecord, JobStore
from renderfarm.cluster.model_info import ModelInfo, model_info
from renderfarm.cluster.planner import Work
from renderfarm.cluster.results import LocalResultStore
from renderfarm.cluster.rpc import SERVICE_NAME, abort, abort_invalid, service_handler
from renderfarm.cluster.validate import check_id, validate
from renderfarm.errors import InvalidJobError
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1 import farm_pb2_grpc

log = logging.getLogger(__name__)


class RenderFarmService(farm_pb2_grpc.RenderFarmServicer):
    def __init__(self, config: FarmConfig, jobs: JobStore, store: LocalResultStore, dispatcher):
        self._config = config
        self._jobs = jobs
        self._store = store
        self._dispatcher = dispatcher
        self._running: set[asyncio.Task] = set()
        self._draining = False

    async def SubmitJob(self, request, context):
        if request.request_id and (existing := self._jobs.by_request_id(request.request_id)):
            return pb.SubmitJobResponse(job=existing.to_pb())
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the farm is shutting down; submit again once it is back")
        try:
            # Resolving a model may build or read files: keep it off the event loop.
            work = await asyncio.to_thread(validate, request, self._config, self._model_info)
        except InvalidJobError as error:
            await abort_invalid(context, error)
        # A retry of this request may have created the job while this one was validated.
        if request.request_id and (existing := self._jobs.by_request_id(request.request_id)):
            return pb.SubmitJobResponse(job=existing.to_pb())
        # No await between this count and the create below, so concurrent submissions cannot both pass.
        unfinished = len(self._jobs.unfinished())
        if unfinished >= self._config.limits.max_concurrent_jobs:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{unfinished} jobs are queued or running, the farm's limit "
                f"(max_concurrent_jobs = {self._config.limits.max_concurrent_jobs}); submit again when one ends",
            )
        job = self._jobs.create(request, work.total)
        self._start(job, work)
        return pb.SubmitJobResponse(job=job.to_pb())

    def _start(self, job: JobRecord, work: Work) -> None:
        task = asyncio.create_task(self._dispatcher.run(job, work))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def resume_unfinished(self) -> None:
        """Picks up the jobs a previous scheduler on this state dir left unfinished; their done items stay done."""
        for job in self._jobs.unfinished():
            if job.cancel_requested:
                job.finish(JobState.CANCELLED)
                continue
            try:
                work = await asyncio.to_thread(validate, job.request(), self._config, self._model_info)
            except InvalidJobError as error:
                job.finish(JobState.FAILED, f"cannot resume: {error}")
                continue
            # The manifest may lack the last result, or end in a torn line, if the process died writing it.
            await asyncio.to_thread(self._store.rewrite_manifest, job.id, list(job.results()))
            log.info("resuming job %s: %d of %d images done", job.id, job.completed, job.total)
            self._start(job, work)

    def _model_info(self, model: str) -> ModelInfo:
        return model_info(model, self._config.model_cache_dir)

    async def _job(self, job_id: str, context) -> JobRecord:
        try:
            check_id("job_id", job_id)
        except InvalidJobError as error:
            await abort_invalid(context, error)
        job = self._jobs.get(job_id)
        if job is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "job_id", f"job_id: no job {job_id!r}")
        return job

    async def GetJob(self, request, context):
        return pb.GetJobResponse(job=(await self._job(request.job_id, context)).to_pb())

    async def ListJobs(self, request, context):
        return pb.ListJobsResponse(jobs=[job.to_pb() for job in self._jobs.all()])

    async def CancelJob(self, request, context):
        job = await self._job(request.job_id, context)
        if job.state.finished:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "job_id",
                f"job_id: job {job.id} already ended {job.state.value}",
            )
        job.request_cancel()
        return pb.CancelJobResponse(job=job.to_pb())

    async def StreamJobEvents(self, request, context):
        job = await self._job(request.job_id, context)
        async for event in self._jobs.follow(job, request.after_seq):
            if event is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the scheduler is stopping; resume from the last seq")
            if event.WhichOneof("kind") == "result" and not request.omit_images:
                png = await asyncio.to_thread(self._store.read, job.id, event.result.name)
                with_image = pb.JobEvent()
                with_image.CopyFrom(event)
                with_image.result.png = png
                event = with_image
            yield event

    async def drain(self) -> None:
        """Refuses new jobs, stops dispatching and lets in-flight items finish and be stored.

        Unfinished jobs stay unfinished in the job store, for the next scheduler on
        the state dir to resume; their streams end UNAVAILABLE, which clients resume from.
        """
        self._draining = True
        self._dispatcher.stop_dispatching()
        await asyncio.gather(*self._running, return_exceptions=True)
        self._jobs.stop_following()


class Farm:
    """A running farm: Ray (started or joined), the stage pools and the gRPC server."""

    def __init__(self, config: FarmConfig, token: str | None = None):
        """`token`: when set, every RenderFarm call must carry it as a bearer token."""
        self.config = config
        self._token = token
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._service: RenderFarmService | None = None
        self._dispatcher = None
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
        from renderfarm.cluster.dispatcher import Dispatcher

        self.connect_ray()
        store = LocalResultStore(self.config.output_dir)
        self._dispatcher = Dispatcher(self.config, store)
        await self._dispatcher.ready()
        self._jobs = JobStore(self.config.state_dir)
        self._service = RenderFarmService(self.config, self._jobs, store, self._dispatcher)
        await self._service.resume_unfinished()
        interceptors = [BearerTokenInterceptor(self._token, SERVICE_NAME)] if self._token else []
        self._server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        self._server.add_generic_rpc_handlers((service_handler(self._service),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = self._server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("renderfarm serving on %s", self.address)

    async def stop(self) -> None:
        """Graceful: health goes NOT_SERVING, running jobs drain, then the server and pools stop."""
        await self._health.enter_graceful_shutdown()
        await self._service.drain()
        await self._server.stop(SHUTDOWN_GRACE_S)
        self._dispatcher.shutdown()
        self._jobs.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()
