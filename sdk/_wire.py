"""Conversions between protobuf messages and SDK types; user code never sees a protobuf."""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import time
import urllib.request
import uuid
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from io import BytesIO
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from renderfarm._constants import (
    AUTHORIZATION_KEY,
    BEARER_PREFIX,
    CHANNEL_OPTIONS,
    DEFAULT_PORT,
    DEFAULT_UPSCALER,
    FETCH_TIMEOUT_S,
    FIELD_METADATA_KEY,
    MAX_LIST_PAGE,
    MAX_RETRIES,
    RECONNECT_FIRST_DELAY_S,
    RECONNECT_MAX_DELAY_S,
    RECONNECT_WINDOW_S,
    RETRY_FIRST_BACKOFF_S,
    RETRY_MAX_BACKOFF_S,
)
from renderfarm.errors import (
    AuthenticationError,
    CapacityError,
    FarmTimeoutError,
    FarmUnavailableError,
    InvalidJobError,
    JobNotFoundError,
    PermissionDeniedError,
    RenderfarmError,
)
from renderfarm.spec import AnySpec, DecodedImageSpec, EditedImageSpec, ImageSpec, LoraSpec, UpscaledImageSpec
from renderfarm.v1 import farm_pb2 as pb


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the state is final: SUCCEEDED, FAILED or CANCELLED."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


_STATE_FROM_PB = {
    pb.JOB_STATE_QUEUED: JobState.QUEUED,
    pb.JOB_STATE_RUNNING: JobState.RUNNING,
    pb.JOB_STATE_SUCCEEDED: JobState.SUCCEEDED,
    pb.JOB_STATE_FAILED: JobState.FAILED,
    pb.JOB_STATE_CANCELLED: JobState.CANCELLED,
}


@dataclass(frozen=True)
class JobStatus:
    id: str
    state: JobState
    total: int
    completed: int
    error: str
    created_at: float
    priority: int = 0  # as submitted: higher runs first
    owner: str = ""  # the user who submitted it


@dataclass(frozen=True)
class Result:
    """One finished image: the PNG as the farm stored it, and its spec.

    From a farm whose results live in an object store, the event carries a presigned `url` instead of
    the bytes: `png` (and `image`, `save`) fetch it on first use, with the standard library, and check
    it against the SHA-256 the farm recorded.
    """

    spec: AnySpec
    name: str
    # The PNG as the stream carried it; None where it carried a URL.
    data: bytes | None = field(default=None, repr=False)
    url: str | None = None
    sha256: str = ""

    @cached_property
    def png(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            with urllib.request.urlopen(self.url, timeout=FETCH_TIMEOUT_S) as response:
                png = response.read()
        except OSError as error:
            raise FarmUnavailableError(f"could not fetch {self.name} from the result store: {error}") from None
        if self.sha256 and hashlib.sha256(png).hexdigest() != self.sha256:
            raise RenderfarmError(f"{self.name} from the result store does not match the digest the farm recorded")
        return png

    @cached_property
    def image(self):
        from PIL import Image

        image = Image.open(BytesIO(self.png))
        image.load()
        return image

    def save(self, directory: str | Path) -> Path:
        """Writes the PNG (parameters embedded) as DIRECTORY/<name>; returns the path. A name that is not a
        plain file name (a wrong or hostile server's "../x.png", "/etc/x") raises RenderfarmError: nothing
        is ever written outside DIRECTORY."""
        if Path(self.name).name != self.name or self.name in ("", ".", ".."):
            raise RenderfarmError(f"the farm named a result {self.name!r}, which is not a file name; not saved")
        path = Path(directory) / self.name
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_bytes(self.png)
        temporary.replace(path)
        return path


def axis(value, name: str) -> list:
    """A sweep axis: a scalar is a one-element axis; None is the farm's default."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    values = list(value)
    if not values:
        raise InvalidJobError(f"{name}: must not be empty", field=name)
    return values


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def priority_value(value) -> int:
    """A job's priority: an integer in the int32 range (a bool is refused); higher runs first."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not INT32_MIN <= value <= INT32_MAX:
        raise InvalidJobError(
            f"priority: must be an integer in [{INT32_MIN}, {INT32_MAX}] (got {value!r})", field="priority"
        )
    return int(value)


def _integers(values: list, name: str) -> list[int]:
    """The values as ints; one that is not an integer (1.5, "3", True) raises, where int() would truncate it."""
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidJobError(f"{name}[{index}]: must be an integer (got {value!r})", field=f"{name}[{index}]")
    return [int(value) for value in values]


def _integer(value, name: str) -> int:
    """One integer argument; like _integers, the error names the argument itself."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidJobError(f"{name}: must be an integer (got {value!r})", field=name)
    return int(value)


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidJobError(f"{name}: must be a number (got {value!r})", field=name)
    return float(value)


def _reals(values: list, name: str) -> list[float]:
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidJobError(f"{name}[{index}]: must be a number (got {value!r})", field=f"{name}[{index}]")
    return [float(value) for value in values]


def _texts(values: list, name: str) -> list[str]:
    """Strings that UTF-8 can carry: a lone surrogate ("\\ud800") cannot go on the wire."""
    for index, value in enumerate(values):
        _text(value, f"{name}[{index}]")
    return values


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidJobError(f"{field}: must be a string (got {type(value).__name__})", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidJobError(
            f"{field}: is not valid Unicode ({error.reason} at character {error.start})", field=field
        ) from None
    return value


def sweep_request(
    *,
    prompts,
    seeds,
    guidance_scale,
    steps,
    width,
    height,
    negative_prompt: str,
    scheduler,
    model,
    size=None,
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
    request_id: str | None,
) -> pb.SubmitJobRequest:
    priority = priority_value(priority)
    prompts = _texts(axis(prompts, "prompts"), "prompts")
    names = _texts(axis(models, "models") or axis(model, "model"), "models" if models is not None else "model")
    sweep = pb.SweepSpec(
        # One model travels as `model`, so that a farm without the models axis takes it.
        model=names[0] if len(names) == 1 else "",
        models=names if len(names) > 1 else [],
        lora_sets=_lora_sets(loras, lora_scales, lora_sets),
        prompts=prompts,
        negative_prompt=_text(negative_prompt or "", "negative_prompt"),
        seeds=_integers(axis(seeds, "seeds"), "seeds"),
        guidance_scales=_reals(axis(guidance_scale, "guidance_scale"), "guidance_scale"),
        steps=_integers(axis(steps, "steps"), "steps"),
        sizes=_sizes(size, width, height),
        schedulers=_texts(axis(scheduler, "scheduler"), "scheduler"),
    )
    if upscale:
        sweep.upscale, sweep.upscale_model, sweep.upscale_tile = upscale, upscale_model, upscale_tile or 0
        _set_given(
            sweep,
            upscale_noise_level=upscale_noise_level,
            upscale_steps=upscale_steps,
            upscale_guidance_scale=upscale_guidance_scale,
        )
    return pb.SubmitJobRequest(request_id=request_id or uuid.uuid4().hex, sweep=sweep, priority=priority,
                               preview_every=_preview_every(preview_every))  # fmt: skip


def _sizes(size, width, height) -> list[pb.Size]:
    """The sizes axis: `size` as (width, height) pairs, one pair or a list of them; or every width with every
    height; or none (the model's native size)."""
    if size is None:
        widths, heights = axis(width, "width"), axis(height, "height")
        if bool(widths) != bool(heights):
            raise InvalidJobError("width and height: give both or neither", field="width")
        return [pb.Size(width=w, height=h) for w in _integers(widths, "width") for h in _integers(heights, "height")]
    if width is not None or height is not None:
        raise InvalidJobError("size: give size, or width and height, not both", field="size")
    pairs = [size] if _is_pair(size) else axis(size, "size")
    sizes = []
    for index, pair in enumerate(pairs):
        if not _is_pair(pair):
            raise InvalidJobError(f"size[{index}]: must be a (width, height) pair (got {pair!r})", field=f"size[{index}]")
        width, height = _integers(list(pair), f"size[{index}]")
        sizes.append(pb.Size(width=width, height=height))
    return sizes


def _is_pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and not any(isinstance(v, Iterable) for v in value)


def render_request(specs, *, priority=0, preview_every=0, request_id: str | None) -> pb.SubmitJobRequest:
    """Each ImageSpec as a sweep of one image; its LoRAs with their digests, which the farm checks."""
    priority = priority_value(priority)
    images = []
    for index, spec in enumerate(axis(specs, "specs")):
        field = f"specs[{index}]"
        if not isinstance(spec, ImageSpec):
            raise InvalidJobError(f"{field}: must be an ImageSpec, a generated image's (got {type(spec).__name__})",
                                  field=field)  # fmt: skip
        loras = [pb.Lora(path=lora.path, scale=lora.scale, sha256=lora.sha256) for lora in spec.loras or ()]
        images.append(pb.SweepSpec(
            model=_text(spec.model, f"{field}.model"), prompts=[_text(spec.prompt, f"{field}.prompt")],
            negative_prompt=_text(spec.negative_prompt, f"{field}.negative_prompt"),
            seeds=[_integer(spec.seed, f"{field}.seed")], guidance_scales=[_real(spec.guidance_scale, f"{field}.guidance_scale")],
            steps=[_integer(spec.steps, f"{field}.steps")], schedulers=[_text(spec.scheduler, f"{field}.scheduler")],
            sizes=[pb.Size(width=_integer(spec.width, f"{field}.width"), height=_integer(spec.height, f"{field}.height"))],
            lora_sets=[pb.LoraSet(loras=loras)] if loras else [],
        ))  # fmt: skip
    return pb.SubmitJobRequest(request_id=request_id or uuid.uuid4().hex, render=pb.RenderSpec(images=images),
                               priority=priority, preview_every=_preview_every(preview_every))  # fmt: skip


def _lora_sets(loras, lora_scales, lora_sets) -> list[pb.LoraSet]:
    """The LoRA axis: `lora_sets` as given; or one set, `loras`; or one LoRA at each of `lora_scales`."""
    if lora_sets is not None:
        if loras is not None or lora_scales is not None:
            raise InvalidJobError("lora_sets: give lora_sets, or loras (and lora_scales), not both", field="lora_sets")
        return [pb.LoraSet(loras=_loras(each, f"lora_sets[{i}]")) for i, each in enumerate(axis(lora_sets, "lora_sets"))]
    given = _loras(loras or [], "loras")
    if lora_scales is None:
        return [pb.LoraSet(loras=given)] if given else []
    if len(given) != 1:
        raise InvalidJobError(
            f"lora_scales: sweeps the scale of one LoRA, so loras must hold exactly one (it holds {len(given)})",
            field="lora_scales",
        )
    scales = _reals(axis(lora_scales, "lora_scales"), "lora_scales")
    return [pb.LoraSet(loras=[pb.Lora(path=given[0].path, scale=scale)]) for scale in scales]


def _loras(values, name: str) -> list[pb.Lora]:
    """Each LoRA as a path (scale 1) or a (path, scale) pair."""
    pairs = []
    for index, value in enumerate(values):
        path, scale = (value, 1.0) if isinstance(value, (str, os.PathLike)) else (None, None)
        if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], (str, os.PathLike)):
            path, scale = value
        if path is None or isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            field = f"{name}[{index}]"
            raise InvalidJobError(f"{field}: must be a path or a (path, scale) pair (got {value!r})", field=field)
        pairs.append((os.fspath(path), float(scale)))
    paths = _texts([path for path, _ in pairs], name)
    return [pb.Lora(path=path, scale=scale) for path, (_, scale) in zip(paths, pairs)]


def decode_request(
    latents, *, model: str, tile: int | None, overlap: int | None, priority: int = 0, request_id: str | None
) -> pb.SubmitJobRequest:
    """`latents`: an array-like [1, C, h, w]; numpy is imported only here, when decoding is used."""
    priority = priority_value(priority)
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(latents), allow_pickle=False)
    decode = pb.DecodeSpec(
        model=model, latents_npy=buffer.getvalue(), tile=_integer(tile or 0, "tile"), overlap=_integer(overlap or 0, "overlap")
    )
    return pb.SubmitJobRequest(request_id=request_id or uuid.uuid4().hex, decode=decode, priority=priority)


def upscale_request(
    images, *, prompt, negative_prompt, noise_level, steps, guidance_scale, seed, model, tile, priority=0, request_id
) -> pb.SubmitJobRequest:
    """`images`: PIL images, paths or encoded bytes, one or a list."""
    priority = priority_value(priority)
    upscale = pb.UpscaleSpec(
        model=model,
        images=[_image_bytes(image) for image in axis(images, "images")],
        prompt=_text(prompt, "prompt"),
        negative_prompt=_text(negative_prompt, "negative_prompt"),
        seed=_integer(seed, "seed"),
        tile=_integer(tile or 0, "tile"),
    )
    _set_given(
        upscale,
        noise_level=None if noise_level is None else _integer(noise_level, "noise_level"),
        steps=None if steps is None else _integer(steps, "steps"),
        guidance_scale=None if guidance_scale is None else _real(guidance_scale, "guidance_scale"),
    )
    return pb.SubmitJobRequest(request_id=request_id or uuid.uuid4().hex, upscale=upscale, priority=priority)


def _preview_every(value) -> int:
    every = _integer(value or 0, "preview_every")
    if every < 0:
        raise InvalidJobError(f"preview_every: must be 0 (no previews) or more (got {every})", field="preview_every")
    return every


def img2img_request(images, prompts, *, model, priority=0, preview_every=0, request_id, **axes) -> pb.SubmitJobRequest:
    """`images`: PIL images, paths or encoded bytes, one or a list (an axis)."""
    priority = priority_value(priority)
    spec = pb.Img2ImgSpec(model=model, images=[_image_bytes(image) for image in axis(images, "images")],
                          **_edit_axes(prompts, **axes))  # fmt: skip
    return pb.SubmitJobRequest(request_id=request_id or uuid.uuid4().hex, img2img=spec, priority=priority,
                               preview_every=_preview_every(preview_every))  # fmt: skip


def inpaint_request(image, mask, prompts, *, model, priority=0, preview_every=0, request_id, **axes) -> pb.SubmitJobRequest:
    """`image` and `mask` (white = repaint): each a PIL image, a path or encoded bytes."""
    priority = priority_value(priority)
    spec = pb.InpaintSpec(model=model, image=_image_bytes(image), mask=_image_bytes(mask), **_edit_axes(prompts, **axes))
    return pb.SubmitJobRequest(request_id=request_id or uuid.uuid4().hex, inpaint=spec, priority=priority,
                               preview_every=_preview_every(preview_every))  # fmt: skip


def _edit_axes(prompts, *, strength, seeds, guidance_scale, steps, negative_prompt, scheduler) -> dict:
    """The axes img2img and inpaint share, as their messages' fields."""
    return dict(
        prompts=_texts(axis(prompts, "prompts"), "prompts"),
        negative_prompt=_text(negative_prompt or "", "negative_prompt"),
        strengths=_reals(axis(strength, "strength"), "strength"),
        seeds=_integers(axis(seeds, "seeds"), "seeds"),
        guidance_scales=_reals(axis(guidance_scale, "guidance_scale"), "guidance_scale"),
        steps=_integers(axis(steps, "steps"), "steps"),
        schedulers=_texts(axis(scheduler, "scheduler"), "scheduler"),
    )


def _set_given(message, **values) -> None:
    """Sets the optional fields whose value is given; the others stay unset: the farm's defaults."""
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)


def _image_bytes(image) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class StateChange:
    """The job entered `state`; `error` says why, with FAILED."""

    state: JobState
    error: str = ""


@dataclass(frozen=True)
class Progress:
    """Images done of the job's total."""

    completed: int
    total: int


@dataclass(frozen=True)
class StepProgress:
    """Denoising steps done by one batch of the job's images while it runs (a live event, not stored)."""

    step: int
    steps: int
    names: tuple[str, ...]  # the batch's images of this job, by result file name


@dataclass(frozen=True)
class Preview:
    """An image as it denoises, at `step` of `steps` (a live event, not stored): its latents through a fixed
    linear latent-to-RGB map, one pixel per latent pixel (width/8 x height/8 for SD and SDXL)."""

    name: str  # the image's result file name
    step: int
    steps: int
    png: bytes = field(repr=False)

    @cached_property
    def image(self):
        from PIL import Image

        image = Image.open(BytesIO(self.png))
        image.load()
        return image


Event = StateChange | Progress | StepProgress | Preview | Result


def event(message: pb.JobEvent) -> Event:
    """The SDK type of one stream event."""
    kind = message.WhichOneof("kind")
    if kind == "state":
        return StateChange(_STATE_FROM_PB[message.state], message.error)
    if kind == "progress":
        return Progress(message.progress.completed, message.progress.total)
    if kind == "step_progress":
        step = message.step_progress
        return StepProgress(step.step, step.steps, tuple(step.names))
    if kind == "preview":
        preview = message.preview
        return Preview(preview.name, preview.step, preview.steps, preview.png)
    return result(message.result)


def job_status(job: pb.Job) -> JobStatus:
    return JobStatus(
        id=job.id,
        state=_STATE_FROM_PB[job.state],
        total=job.total,
        completed=job.completed,
        error=job.error,
        created_at=job.created_at,
        priority=job.priority,
        owner=job.owner,
    )


class JobList(list):
    """JobStatus entries, oldest first; ``next_page_token`` continues the listing (jobs(page_token=...))
    where a `limit` cut it, and is "" when no job is left."""

    next_page_token: str = ""


_STATE_TO_PB = {state: number for number, state in _STATE_FROM_PB.items()}


def list_pages(owner, state, limit, page_token) -> Generator[pb.ListJobsRequest, pb.ListJobsResponse, JobList]:
    """The ListJobs requests a listing makes, each sent back its reply; returns the JobList. One pager for both
    clients: they only make the calls."""
    states = [_STATE_TO_PB[_job_state(value, f"state[{index}]")] for index, value in enumerate(axis(state, "state"))]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidJobError(f"limit: must be a positive integer or None (got {limit!r})", field="limit")
    listed, token = JobList(), _text(page_token or "", "page_token")
    while True:
        page_size = 0 if limit is None else min(limit - len(listed), MAX_LIST_PAGE)
        reply = yield pb.ListJobsRequest(owner=owner or "", states=states, page_size=page_size, page_token=token)
        listed += [job_status(job) for job in reply.jobs]
        token = reply.next_page_token
        if not token or (limit is not None and len(listed) >= limit):
            listed.next_page_token = token
            return listed


def _job_state(value, field: str) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        names = ", ".join(state.value for state in JobState)
        raise InvalidJobError(f"{field}: must be a job state ({names}) (got {value!r})", field=field) from None


def settings(job: pb.Job) -> dict:
    """A job's request as plain data, its kind's fields that were set (the farm leaves bulk inputs out)."""
    kind = job.WhichOneof("kind")
    return _plain_message(getattr(job, kind)) if kind else {}


def _plain_message(message) -> dict:
    return {field.name: _plain_value(field, value) for field, value in message.ListFields()}


def _plain_value(field, value):
    if field.message_type is None:
        return list(value) if field.is_repeated else value
    return [_plain_message(each) for each in value] if field.is_repeated else _plain_message(value)


def image_spec(spec: pb.ImageSpec) -> ImageSpec:
    loras = tuple(LoraSpec(path=lora.path, sha256=lora.sha256, scale=lora.scale) for lora in spec.loras)
    return ImageSpec(**_fields(spec) | {"loras": loras or None})


def result(message: pb.ImageResult) -> Result:
    kind = message.WhichOneof("kind")
    if kind == "decoded":
        spec = DecodedImageSpec(**_fields(message.decoded))
    elif kind == "edited":
        spec = EditedImageSpec(**_fields(message.edited) | {"mask_sha256": message.edited.mask_sha256 or None})
    elif kind == "upscaled":
        fields = _fields(message.upscaled)
        source = fields.pop("source")
        spec = UpscaledImageSpec(**fields, source=image_spec(source) if message.upscaled.HasField("source") else None)
    else:
        spec = image_spec(message.spec)
    if message.url:
        return Result(spec=spec, name=message.name, url=message.url, sha256=message.sha256)
    return Result(spec=spec, name=message.name, data=message.png)


def _fields(message) -> dict:
    return {field.name: getattr(message, field.name) for field in message.DESCRIPTOR.fields}


def final_state(event: pb.JobEvent) -> JobState | None:
    if event.WhichOneof("kind") != "state":
        return None
    state = _STATE_FROM_PB[event.state]
    return state if state.finished else None


_ERROR_TYPES = {
    error_type.code: error_type
    for error_type in (
        InvalidJobError,
        CapacityError,
        JobNotFoundError,
        AuthenticationError,
        PermissionDeniedError,
        FarmUnavailableError,
        FarmTimeoutError,
    )
}
# A request_id already used for another request.
_ERROR_TYPES[grpc.StatusCode.ALREADY_EXISTS] = InvalidJobError


def translate(error: grpc.RpcError, timeout: float | None = None, request=None) -> RenderfarmError:
    """The typed SDK exception for a gRPC error, keeping the server's message, with the call's code and the
    request id of `request` (a submission's); `timeout`: the call's deadline."""
    code, message = error.code(), error.details() or str(error)
    call = dict(code=code, request_id=getattr(request, "request_id", "") or None)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
        message = (
            f"the farm did not answer within {timeout:g} s (DEADLINE_EXCEEDED); "
            "it is unreachable or overloaded, or the call needs a longer timeout= on the client"
        )
    error_type = _ERROR_TYPES.get(code)
    if error_type is None:
        return RenderfarmError(f"{code.name}: {message}", **call)
    if error_type is InvalidJobError:
        return InvalidJobError(message, field=violated_field(error), **call)
    return error_type(message, **call)


def violated_field(error: grpc.RpcError) -> str | None:
    """The request field an error is about: the first field violation of its google.rpc.BadRequest detail, or,
    from a farm older than the details, the renderfarm-field trailer."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a Status whose code or message is not the call's: a proxy's, not the farm's
        status = None
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request) and bad_request.field_violations:
            return bad_request.field_violations[0].field
    return dict(error.trailing_metadata() or ()).get(FIELD_METADATA_KEY)


def is_transient(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.UNAVAILABLE


# gRPC's own target names (dns:///host:port, unix:///path, ...) go to gRPC as they are.
GRPC_NAME_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock")


def channel_target(
    address: str, *, tls: bool | None, root_certificates, client_certificate, client_key
) -> tuple[str, grpc.ChannelCredentials | None]:
    """(HOST:PORT to dial, TLS credentials or None for plaintext) for a Client's arguments.

    `grpcs://HOST:PORT` is TLS, `grpc://HOST:PORT` plaintext; a bare HOST:PORT is TLS when `tls` is
    true or a CA is given (argument or $RENDERFARM_TLS_CA). PEM arguments are bytes or file paths;
    without a CA, TLS trusts the system's roots. A client certificate and key ($RENDERFARM_TLS_CERT,
    $RENDERFARM_TLS_KEY) answer a farm that requires them (mTLS).
    """
    scheme, separator, target = address.partition("://")
    if not separator or scheme in GRPC_NAME_SCHEMES:
        scheme, target = None, address
    elif scheme not in ("grpc", "grpcs"):
        raise ValueError(
            f"address {address!r}: the scheme must be grpcs:// (TLS) or grpc:// (plaintext), or none (HOST or "
            "HOST:PORT): the farm speaks gRPC, not HTTP"
        )
    if not (separator and scheme is None):  # gRPC's own names (dns:///, unix:) carry what they need
        target = with_port(target.rstrip("/"))
    root_certificates = root_certificates or os.environ.get("RENDERFARM_TLS_CA") or None
    client_certificate = client_certificate or os.environ.get("RENDERFARM_TLS_CERT") or None
    client_key = client_key or os.environ.get("RENDERFARM_TLS_KEY") or None
    if scheme is not None and tls is not None and tls != (scheme == "grpcs"):
        raise ValueError(f"address {address!r} says {scheme}://, which contradicts tls={tls}")
    if tls is None:
        tls = scheme == "grpcs" or (scheme is None and root_certificates is not None)
    if not tls:
        return target, None
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together: give both or neither")
    credentials = grpc.ssl_channel_credentials(_pem(root_certificates), _pem(client_key), _pem(client_certificate))
    return target, credentials


def unreachable(address: str, seconds: float) -> FarmTimeoutError:
    """A client's first call found no farm to connect to within `seconds`."""
    return FarmTimeoutError(
        f"cannot reach the farm at {address}: no connection within {seconds:g} s (is it running there, and does it "
        "speak TLS when the client does?)"
    )


def with_port(target: str) -> str:
    """HOST:PORT as given; a bare HOST (a name, an IPv4 address or a bracketed IPv6 one) gets the farm's port."""
    if target.startswith("["):
        return target if "]:" in target else f"{target}:{DEFAULT_PORT}"
    return target if ":" in target else f"{target}:{DEFAULT_PORT}"


def channel_options(max_retries: int) -> tuple:
    """The channel's options: CHANNEL_OPTIONS and a service config that retries unary calls answered UNAVAILABLE
    (a farm restarting, a connection reset) up to `max_retries` times, with gRPC's jittered exponential
    backoff. Safe for submits: a resubmitted request_id returns the job the first attempt made."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= MAX_RETRIES:
        raise ValueError(f"max_retries: must be an integer in [0, {MAX_RETRIES}] (got {max_retries!r})")
    if max_retries == 0:
        return CHANNEL_OPTIONS
    policy = {
        "maxAttempts": max_retries + 1,
        "initialBackoff": f"{RETRY_FIRST_BACKOFF_S}s",
        "maxBackoff": f"{RETRY_MAX_BACKOFF_S}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    service = pb.DESCRIPTOR.services_by_name["RenderFarm"]
    unary = [{"service": service.full_name, "method": method.name} for method in service.methods
             if not method.server_streaming]  # fmt: skip
    config = {"methodConfig": [{"name": unary, "retryPolicy": policy}]}
    return CHANNEL_OPTIONS + (("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config)))


def _pem(value) -> bytes | None:
    """PEM bytes as given, or read from a path (str or Path)."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def metadata(token: str | None) -> tuple:
    return ((AUTHORIZATION_KEY, BEARER_PREFIX + token),) if token else ()


def reconnect_delays() -> Iterator[float]:
    """Backoff delays for resuming a dropped stream: doubling, capped, within a window."""
    delay, spent = RECONNECT_FIRST_DELAY_S, 0.0
    while spent + delay <= RECONNECT_WINDOW_S:
        yield delay
        spent += delay
        delay = min(RECONNECT_MAX_DELAY_S, delay * 2)


class Deadline:
    """How long is left of a wait for a job to end (`timeout` seconds from now; None: no limit)."""

    def __init__(self, timeout: float | None, job_id: str):
        self._timeout, self._job_id = timeout, job_id
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """The time left, for a call's deadline; raises FarmTimeoutError once none is."""
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise self._expired()
        return left

    def check(self, error: grpc.RpcError) -> None:
        """Raises FarmTimeoutError where a stream ended because this deadline passed."""
        if self._end is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise self._expired() from None

    def cap(self, delay: float) -> float:
        left = self.remaining()
        return delay if left is None else min(delay, left)

    def _expired(self) -> FarmTimeoutError:
        return FarmTimeoutError(f"job {self._job_id} did not end within {self._timeout:g} s (timeout=); it goes on")


def next_delay(delays: Iterator[float], job_id: str) -> float:
    delay = next(delays, None)
    if delay is None:
        raise FarmUnavailableError(
            f"lost the event stream of job {job_id} and could not resume it within {RECONNECT_WINDOW_S:g} s"
        )
    return delay
