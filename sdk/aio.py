"""The asyncio client: the same surface as Client, awaitable."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from renderfarm import _wire, grid
from renderfarm._constants import (
    CHANNEL_OPTIONS,
    DEFAULT_ADDRESS,
    DEFAULT_INPAINTER,
    DEFAULT_MODEL,
    DEFAULT_UPSCALER,
    UNARY_TIMEOUT_S,
)
from renderfarm._wire import JobState, JobStatus, Result
from renderfarm.errors import JobFailedError
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1.farm_pb2_grpc import RenderFarmStub


class AsyncClient:
    """Like Client, for asyncio code. Use ``async with AsyncClient(...) as client``."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        timeout: float | None = UNARY_TIMEOUT_S,
        tls: bool | None = None,
        root_certificates: bytes | str | Path | None = None,
        client_certificate: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
    ):
        """See Client."""
        self.address = address or os.environ.get("RENDERFARM_ADDRESS") or DEFAULT_ADDRESS
        self._metadata = _wire.metadata(token or os.environ.get("RENDERFARM_TOKEN"))
        self._timeout = timeout
        target, credentials = _wire.channel_target(
            self.address,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
        )
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = RenderFarmStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _wire.translate(error, self._timeout) from None

    async def sweep(
        self,
        prompts,
        *,
        seeds=0,
        guidance_scale=None,
        steps=None,
        width=None,
        height=None,
        negative_prompt: str = "",
        scheduler=None,
        model=DEFAULT_MODEL,
        models=None,
        loras=None,
        lora_scales=None,
        lora_sets=None,
        upscale: int | None = None,
        upscale_model: str = DEFAULT_UPSCALER,
        upscale_noise_level: int | None = None,
        upscale_steps: int | None = None,
        upscale_guidance_scale: float | None = None,
        upscale_tile: int | None = None,
        priority: int = 0,
        preview_every: int = 0,
        request_id: str | None = None,
    ) -> AsyncJob:
        """See Client.sweep; `priority` (default 0): higher runs first, strict between levels, fair share within one."""
        request = _wire.sweep_request(
            prompts=prompts,
            seeds=seeds,
            guidance_scale=guidance_scale,
            steps=steps,
            width=width,
            height=height,
            negative_prompt=negative_prompt,
            scheduler=scheduler,
            model=model,
            models=models,
            loras=loras,
            lora_scales=lora_scales,
            lora_sets=lora_sets,
            upscale=upscale,
            upscale_model=upscale_model,
            upscale_noise_level=upscale_noise_level,
            upscale_steps=upscale_steps,
            upscale_guidance_scale=upscale_guidance_scale,
            upscale_tile=upscale_tile,
            priority=priority,
            preview_every=preview_every,
            request_id=request_id,
        )
        return AsyncJob(self, (await self._call(self._stub.SubmitJob, request)).job)

    async def decode(
        self,
        latents,
        *,
        model: str = DEFAULT_MODEL,
        tile: int | None = None,
        overlap: int | None = None,
        priority: int = 0,
        request_id: str | None = None,
    ) -> AsyncJob:
        """Decodes latents [1, C, h, w] (as the denoiser makes them) into one image, tiled over the VAE replicas.

        `tile` is the side of a tile's core in pixels (default 512); `overlap` the halo around it
        (default: the decoder's full reach, which makes the result equal the one-piece decode).
        `priority` (default 0): higher runs first, strict between levels, fair share within one; see sweep().
        """
        request = _wire.decode_request(
            latents, model=model, tile=tile, overlap=overlap, priority=priority, request_id=request_id
        )
        return AsyncJob(self, (await self._call(self._stub.SubmitJob, request)).job)

    async def upscale(
        self,
        images,
        *,
        prompt: str = "",
        negative_prompt: str = "",
        noise_level: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        model: str = DEFAULT_UPSCALER,
        tile: int | None = None,
        priority: int = 0,
        request_id: str | None = None,
    ) -> AsyncJob:
        """Upscales each image (PIL image, path or encoded bytes) 4x; one result per image.

        Unset parameters take StableDiffusionUpscalePipeline's defaults (noise level 20, 75 steps,
        guidance 9). `tile` is the UNet's tile side in input pixels. `priority` (default 0): higher
        runs first, strict between levels, fair share within one; see sweep().
        """
        request = _wire.upscale_request(
            images,
            prompt=prompt,
            negative_prompt=negative_prompt,
            noise_level=noise_level,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            model=model,
            tile=tile,
            priority=priority,
            request_id=request_id,
        )
        return AsyncJob(self, (await self._call(self._stub.SubmitJob, request)).job)

    async def img2img(
        self,
        images,
        prompts,
        *,
        strength=None,
        seeds=0,
        guidance_scale=None,
        steps=None,
        negative_prompt: str = "",
        scheduler=None,
        model: str = DEFAULT_MODEL,
        priority: int = 0,
        preview_every: int = 0,
        request_id: str | None = None,
    ) -> AsyncJob:
        """See Client.img2img."""
        request = _wire.img2img_request(
            images, prompts, strength=strength, seeds=seeds, guidance_scale=guidance_scale, steps=steps,
            negative_prompt=negative_prompt, scheduler=scheduler, model=model, priority=priority,
            preview_every=preview_every,
            request_id=request_id,
        )  # fmt: skip
        return AsyncJob(self, (await self._call(self._stub.SubmitJob, request)).job)

    async def inpaint(
        self,
        image,
        mask,
        prompts,
        *,
        strength=None,
        seeds=0,
        guidance_scale=None,
        steps=None,
        negative_prompt: str = "",
        scheduler=None,
        model: str = DEFAULT_INPAINTER,
        priority: int = 0,
        preview_every: int = 0,
        request_id: str | None = None,
    ) -> AsyncJob:
        """See Client.inpaint."""
        request = _wire.inpaint_request(
            image, mask, prompts, strength=strength, seeds=seeds, guidance_scale=guidance_scale, steps=steps,
            negative_prompt=negative_prompt, scheduler=scheduler, model=model, priority=priority,
            preview_every=preview_every,
            request_id=request_id,
        )  # fmt: skip
        return AsyncJob(self, (await self._call(self._stub.SubmitJob, request)).job)

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, (await self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))).job)

    async def delete(self, job_id: str) -> None:
        """See Client.delete."""
        await self._call(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id))

    async def jobs(self, owner: str | None = None) -> list[JobStatus]:
        """See Client.jobs."""
        statuses, token = [], ""
        while True:
            reply = await self._call(self._stub.ListJobs, pb.ListJobsRequest(owner=owner or "", page_token=token))
            statuses += [_wire.job_status(j) for j in reply.jobs]
            if not (token := reply.next_page_token):
                return statuses


class AsyncJob:
    """A submitted job, for asyncio code; see Job."""

    def __init__(self, client: AsyncClient, message: pb.Job):
        self._client = client
        self.id = message.id
        self.total = message.total

    def __repr__(self) -> str:
        return f"AsyncJob(id={self.id!r}, total={self.total})"

    async def status(self) -> JobStatus:
        response = await self._client._call(self._client._stub.GetJob, pb.GetJobRequest(job_id=self.id))
        return _wire.job_status(response.job)

    async def cancel(self) -> JobStatus:
        response = await self._client._call(self._client._stub.CancelJob, pb.CancelJobRequest(job_id=self.id))
        return _wire.job_status(response.job)

    async def delete(self) -> None:
        """See Client.delete."""
        await self._client.delete(self.id)

    async def _events(self, omit_images: bool = False, live: bool = False) -> AsyncIterator[pb.JobEvent]:
        client, last_seq = self._client, 0
        delays = _wire.reconnect_delays()
        while True:
            request = pb.StreamJobEventsRequest(job_id=self.id, after_seq=last_seq, omit_images=omit_images, live=live)
            stream = client._stub.StreamJobEvents(request, metadata=client._metadata)
            try:
                async for event in stream:
                    # Live events (seq 0) are not stored, so a resumed stream cannot start after them.
                    last_seq, delays = event.seq or last_seq, _wire.reconnect_delays()
                    yield event
                    if _wire.final_state(event):
                        return
            except grpc.RpcError as error:
                if not _wire.is_transient(error):
                    raise _wire.translate(error) from None
            finally:
                stream.cancel()
            await asyncio.sleep(_wire.next_delay(delays, self.id))

    async def events(self, images: bool = True) -> AsyncIterator[_wire.Event]:
        """See Job.events."""
        async for event in self._events(omit_images=not images, live=True):
            yield _wire.event(event)

    async def results(self) -> AsyncIterator[Result]:
        async for event in self._events():
            if event.WhichOneof("kind") == "result":
                yield _wire.result(event.result)
            elif _wire.final_state(event) == JobState.FAILED:
                raise JobFailedError(self.id, event.error)

    async def grid(self, x: str, y: str | None = None) -> list[grid.Sheet]:
        """See Job.grid."""
        results = [result async for result in self.results()]
        # Off the event loop: images are decoded (and fetched, from an object store) here.
        return await asyncio.to_thread(lambda: grid.grids([(result.spec, result.image) for result in results], x, y))

    async def wait(self) -> JobStatus:
        async for event in self._events(omit_images=True):
            if _wire.final_state(event) == JobState.FAILED:
                raise JobFailedError(self.id, event.error)
        return await self.status()
