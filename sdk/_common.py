"""What the blocking and the asyncio clients share: how they connect, and one spelling of every job's
parameters (each submit method builds its request here; a client only sends it)."""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from typing import Generic, TypeVar

from renderfarm import _wire
from renderfarm._constants import (
    CONNECT_TIMEOUT_S,
    DEFAULT_ADDRESS,
    DEFAULT_INPAINTER,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MODEL,
    DEFAULT_UPSCALER,
    UNARY_TIMEOUT_S,
)
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1.farm_pb2_grpc import RenderFarmStub

# What a submit method returns: a Job from Client, an awaitable of an AsyncJob from AsyncClient.
Submitted = TypeVar("Submitted")


class ClientBase(Generic[Submitted]):
    """Client and AsyncClient: the connection and the submit methods."""

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
        max_retries: int = DEFAULT_MAX_RETRIES,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ):
        """`address`: HOST (port 50051), HOST:PORT, ``grpc://HOST[:PORT]`` or ``grpcs://HOST[:PORT]`` (TLS; so
        is ``tls=True``); default $RENDERFARM_ADDRESS, then localhost:50051. `token`: the caller's API token;
        default $RENDERFARM_TOKEN.

        `timeout`: seconds each unary call (submit, status, cancel, list) may take, waiting for the farm to
        be reachable meanwhile (a farm that is starting or restarting); None waits forever. Event streams have
        no deadline; keepalive pings find a dead connection instead, and they resume from the last event.

        `connect_timeout`: how long the first call waits for a connection (a farm that is starting) before
        it raises FarmTimeoutError saying the farm cannot be reached; at most `timeout`.

        `max_retries` (0 to 4, default 4): how often a unary call answered UNAVAILABLE (the farm restarting
        under it) is sent again, after gRPC's jittered exponential backoff. Safe for submits: a resubmitted
        request_id returns the job the first attempt made.

        TLS: `root_certificates` is the CA that signed the farm's certificate (PEM bytes or a path;
        default $RENDERFARM_TLS_CA, else the system's roots; giving one implies TLS);
        `client_certificate` and `client_key` (default $RENDERFARM_TLS_CERT and $RENDERFARM_TLS_KEY)
        answer a farm that requires client certificates.
        """
        self.address = address or os.environ.get("RENDERFARM_ADDRESS") or DEFAULT_ADDRESS
        self._metadata = _wire.metadata(token or os.environ.get("RENDERFARM_TOKEN"))
        self._timeout = timeout
        self._connect_timeout = connect_timeout if timeout is None else min(connect_timeout, timeout)
        self._connected = False
        target, credentials = _wire.channel_target(
            self.address,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
        )
        self._channel = self._open_channel(target, credentials, _wire.channel_options(max_retries))
        self._stub = RenderFarmStub(self._channel)

    def _open_channel(self, target: str, credentials, options: tuple):
        raise NotImplementedError

    def _submit(self, request: pb.SubmitJobRequest) -> Submitted:
        raise NotImplementedError

    def sweep(
        self,
        prompts,
        *,
        seeds=0,
        guidance_scale=None,
        steps=None,
        width=None,
        height=None,
        size=None,
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
    ) -> Submitted:
        """Renders every combination of the given axes: `prompts`, `seeds`, `guidance_scale`, `steps`, the
        sizes, `scheduler`, the models and the LoRA sets, each a scalar or a list. `negative_prompt` is one
        string for every image. Sizes: every `width` with every `height`, or `size=(w, h)` or
        ``size=[(512, 768), (768, 512)]`` for exactly those pairs. A value of the wrong type (a seed of 1.5, a
        list where one string goes) raises InvalidJobError naming the argument.

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
            size=size,
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
        return self._submit(request)

    def decode(
        self,
        latents,
        *,
        model: str = DEFAULT_MODEL,
        tile: int | None = None,
        overlap: int | None = None,
        priority: int = 0,
        request_id: str | None = None,
    ) -> Submitted:
        """Decodes latents [1, C, h, w] (as the denoiser makes them) into one image, tiled over the VAE replicas.

        `tile` is the side of a tile's core in pixels (default 512); `overlap` the halo around it
        (default: the decoder's full reach, which makes the result equal the one-piece decode).
        `priority` (default 0): higher runs first, strict between levels, fair share within one; see sweep().
        """
        request = _wire.decode_request(
            latents, model=model, tile=tile, overlap=overlap, priority=priority, request_id=request_id
        )
        return self._submit(request)

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
    ) -> Submitted:
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
        return self._submit(request)

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
    ) -> Submitted:
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
        return self._submit(request)

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
    ) -> Submitted:
        """Repaints `image` where `mask` (the image's size) is white, as StableDiffusionInpaintPipeline does with
        an inpainting model (a 9-channel UNet), under every combination of the axes, as img2img(); strength
        defaults to 1. A result's spec names the image and the mask by SHA-256."""
        request = _wire.inpaint_request(
            image, mask, prompts, strength=strength, seeds=seeds, guidance_scale=guidance_scale, steps=steps,
            negative_prompt=negative_prompt, scheduler=scheduler, model=model, priority=priority,
            preview_every=preview_every,
            request_id=request_id,
        )  # fmt: skip
        return self._submit(request)

    def render(self, specs, *, priority: int = 0, preview_every: int = 0, request_id: str | None = None) -> Submitted:
        """Renders exactly these images: ImageSpecs (a sweep's results' ``spec``, or made by hand), one result
        each, in one job. A result's spec renders the same pixels again (as long as the farm's model and LoRA
        files are the same: a LoRA whose file changed since is refused, naming it). `priority` and
        `preview_every` as in sweep()."""
        return self._submit(
            _wire.render_request(specs, priority=priority, preview_every=preview_every, request_id=request_id)
        )


class JobBase:
    """Job and AsyncJob: what a submitted job is. ``kind`` is "sweep", "decode", "upscale", "img2img" or
    "inpaint"; ``settings`` holds what was asked, as the farm recorded it (images and latents left out)."""

    def __init__(self, client, message: pb.Job):
        self._client = client
        self.id = message.id
        self.total = message.total
        self.priority = message.priority
        self.kind = message.WhichOneof("kind") or ""
        self.settings = _wire.settings(message)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={reprlib.repr(value)}" for name, value in self.settings.items())
        return f"{type(self).__name__}(id={self.id!r}, kind={self.kind!r}, total={self.total}" + (
            f", {shown})" if shown else ")"
        )
