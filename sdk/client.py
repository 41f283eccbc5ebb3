"""The blocking client: submit jobs, stream their results, manage them."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
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


class Client:
    """A connection to a farm. ``address`` defaults to $RENDERFARM_ADDRESS, then localhost:50051;
    ``grpcs://HOST:PORT`` (or ``tls=True``) connects over TLS. ``token`` defaults to $RENDERFARM_TOKEN."""

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
        """`timeout`: seconds each unary call (submit, status, cancel, list) may take; None waits forever.
        Event streams have no deadline; keepalive pings find a dead connection instead.

        TLS: `root_certificates` is the CA that signed the farm's certificate (PEM bytes or a path;
        default $RENDERFARM_TLS_CA, else the system's roots; giving one implies TLS);
        `client_certificate` and `client_key` (default $RENDERFARM_TLS_CERT and $RENDERFARM_TLS_KEY)
        answer a farm that requires client certificates.
        """
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
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = RenderFarmStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _wire.translate(error, self._timeout) from None

    def sweep(
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
    ) -> Job:
        """Renders every combination of the given axes; each may be a scalar or a list.

        Unset axes take the farm's defaults: guidance 7.5, 50 steps, the model's
        native size and its own scheduler. `models` (or a list as `model`) makes models an axis:
        each model's images run together, so replicas load each model once.

        LoRA adapters (safetensors files on the farm's file system, relative paths from where the
        scheduler runs): ``loras=[path or (path, scale), ...]`` applies them together to every image;
        with one LoRA, ``lora_scales=[0, 0.5, 1]`` makes its scale an axis; ``lora_sets=[[...], [...]]``
        makes whole sets one (an empty set is the model alone). Each result's spec records every
        LoRA's SHA-256 and scale.

        With ``upscale=4`` each image goes on through
        the x4 upscaler inside the farm (its prompt, negative prompt and seed; the other
        settings as in upscale(), prefixed ``upscale_``), and the results are the 4x images.

        `priority` (an integer, default 0): higher runs first. Strict between levels: a job's images
        wait while a higher-priority job has images to run; within a level, images are shared fairly
        among its jobs. A non-integer or one outside the int32 range raises InvalidJobError.

        `preview_every=N`: a Preview of each image every N denoising steps, for Job.events() (never
        stored; previews never change pixels).
        """
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
        return Job(self, self._call(self._stub.SubmitJob, request).job)

    def decode(
        self,
        latents,
        *,
        model: str = DEFAULT_MODEL,
        tile: int | None = None,
        overlap: int | None = None,
        priority: int = 0,
        request_id: str | None = None,
    ) -> Job:
        """Decodes latents [1, C, h, w] (as the denoiser makes them) into one image, tiled over the VAE replicas.

        `tile` is the side of a tile's core in pixels (default 512); `overlap` the halo around it
        (default: the decoder's full reach, which makes the result equal the one-piece decode).
        `priority` (default 0): higher runs first, strict between levels, fair share within one; see sweep().
        """
        request = _wire.decode_request(
            latents, model=model, tile=tile, overlap=overlap, priority=priority, request_id=request_id
        )
        return Job(self, self._call(self._stub.SubmitJob, request).job)

    def upscale(
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
    ) -> Job:
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
        return Job(self, self._call(self._stub.SubmitJob, request).job)

    def img2img(
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
    ) -> Job:
        """Renders each image (PIL image, path or encoded bytes) again under every combination of the axes, as
        StableDiffusionImg2ImgPipeline does: noised to each `strength` (in (0, 1], default 0.8), then denoised.
        Every argument but `model` may be a list (an axis), `images` too; unset axes take the pipeline's
        defaults (guidance 7.5, 50 steps, the model's own scheduler). Each image keeps its size, rounded
        down to multiples of 8. A result's spec (EditedImageSpec) names its source by SHA-256."""
        request = _wire.img2img_request(
            images, prompts, strength=strength, seeds=seeds, guidance_scale=guidance_scale, steps=steps,
            negative_prompt=negative_prompt, scheduler=scheduler, model=model, priority=priority,
            preview_every=preview_every,
            request_id=request_id,
        )  # fmt: skip
        return Job(self, self._call(self._stub.SubmitJob, request).job)

    def inpaint(
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
    ) -> Job:
        """Repaints `image` where `mask` (the image's size) is white, as StableDiffusionInpaintPipeline does with
        an inpainting model (a 9-channel UNet), under every combination of the axes, as img2img(); strength
        defaults to 1. A result's spec names the image and the mask by SHA-256."""
        request = _wire.inpaint_request(
            image, mask, prompts, strength=strength, seeds=seeds, guidance_scale=guidance_scale, steps=steps,
            negative_prompt=negative_prompt, scheduler=scheduler, model=model, priority=priority,
            preview_every=preview_every,
            request_id=request_id,
        )  # fmt: skip
        return Job(self, self._call(self._stub.SubmitJob, request).job)

    def job(self, job_id: str) -> Job:
        return Job(self, self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id)).job)

    def delete(self, job_id: str) -> None:
        """Removes a finished job's results from the farm's result store and the job from its job store.
        A job still queued or running raises RenderfarmError (FAILED_PRECONDITION): cancel it first."""
        self._call(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id))

    def jobs(self, owner: str | None = None) -> list[JobStatus]:
        """The jobs the caller may see (a member: their own; an admin: everyone's), or only `owner`'s.
        A member naming another user raises PermissionDeniedError."""
        statuses, token = [], ""
        while True:  # page by page, so that no reply is large
            reply = self._call(self._stub.ListJobs, pb.ListJobsRequest(owner=owner or "", page_token=token))
            statuses += [_wire.job_status(j) for j in reply.jobs]
            if not (token := reply.next_page_token):
                return statuses


class Job:
    """A submitted job. ``results()`` streams its images as they finish."""

    def __init__(self, client: Client, message: pb.Job):
        self._client = client
        self.id = message.id
        self.total = message.total

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, total={self.total})"

    def status(self) -> JobStatus:
        return _wire.job_status(self._client._call(self._client._stub.GetJob, pb.GetJobRequest(job_id=self.id)).job)

    def cancel(self) -> JobStatus:
        request = pb.CancelJobRequest(job_id=self.id)
        return _wire.job_status(self._client._call(self._client._stub.CancelJob, request).job)

    def delete(self) -> None:
        """See Client.delete."""
        self._client.delete(self.id)

    def _events(self, omit_images: bool = False, live: bool = False) -> Iterator[pb.JobEvent]:
        """Every stored event once, in order, resuming after a dropped stream from the last seq seen; with
        `live`, the live events (step progress, previews) sent while the stream is open too."""
        client, last_seq = self._client, 0
        delays = _wire.reconnect_delays()
        while True:
            request = pb.StreamJobEventsRequest(job_id=self.id, after_seq=last_seq, omit_images=omit_images, live=live)
            stream = client._stub.StreamJobEvents(request, metadata=client._metadata)
            try:
                for event in stream:
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
            time.sleep(_wire.next_delay(delays, self.id))

    def events(self, images: bool = True) -> Iterator[_wire.Event]:
        """Everything that happens to the job, in order, until it ends: StateChange, Progress and Result
        (each once, as results() gives them; without `images`, results carry no PNG), and while the stream is
        open the live events too: StepProgress as batches denoise, and with preview_every a Preview of each
        image every that many steps. A failed job ends with StateChange(FAILED, error); nothing is raised."""
        for event in self._events(omit_images=not images, live=True):
            yield _wire.event(event)

    def results(self) -> Iterator[Result]:
        """Each result exactly once, in completion order; raises JobFailedError if the job fails."""
        for event in self._events():
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

    def wait(self) -> JobStatus:
        """Blocks until the job ends; raises JobFailedError if it failed."""
        for event in self._events(omit_images=True):
            if _wire.final_state(event) == JobState.FAILED:
                raise JobFailedError(self.id, event.error)
        return self.status()
