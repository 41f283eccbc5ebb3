from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class Size(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Lora(_message.Message):
    __slots__ = ("path", "scale", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    scale: float
    sha256: str
    def __init__(self, path: _Optional[str] = ..., scale: _Optional[float] = ..., sha256: _Optional[str] = ...) -> None: ...

class LoraSet(_message.Message):
    __slots__ = ("loras",)
    LORAS_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[Lora]
    def __init__(self, loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ...) -> None: ...

class RenderSpec(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[SweepSpec]
    def __init__(self, images: _Optional[_Iterable[_Union[SweepSpec, _Mapping]]] = ...) -> None: ...

class SweepSpec(_message.Message):
    __slots__ = ("model", "prompts", "negative_prompt", "seeds", "guidance_scales", "steps", "sizes", "schedulers", "upscale", "upscale_model", "upscale_noise_level", "upscale_steps", "upscale_guidance_scale", "upscale_tile", "models", "lora_sets")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_MODEL_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_STEPS_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_TILE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LORA_SETS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    negative_prompt: str
    seeds: _containers.RepeatedScalarFieldContainer[int]
    guidance_scales: _containers.RepeatedScalarFieldContainer[float]
    steps: _containers.RepeatedScalarFieldContainer[int]
    sizes: _containers.RepeatedCompositeFieldContainer[Size]
    schedulers: _containers.RepeatedScalarFieldContainer[str]
    upscale: int
    upscale_model: str
    upscale_noise_level: int
    upscale_steps: int
    upscale_guidance_scale: float
    upscale_tile: int
    models: _containers.RepeatedScalarFieldContainer[str]
    lora_sets: _containers.RepeatedCompositeFieldContainer[LoraSet]
    def __init__(self, model: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., negative_prompt: _Optional[str] = ..., seeds: _Optional[_Iterable[int]] = ..., guidance_scales: _Optional[_Iterable[float]] = ..., steps: _Optional[_Iterable[int]] = ..., sizes: _Optional[_Iterable[_Union[Size, _Mapping]]] = ..., schedulers: _Optional[_Iterable[str]] = ..., upscale: _Optional[int] = ..., upscale_model: _Optional[str] = ..., upscale_noise_level: _Optional[int] = ..., upscale_steps: _Optional[int] = ..., upscale_guidance_scale: _Optional[float] = ..., upscale_tile: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., lora_sets: _Optional[_Iterable[_Union[LoraSet, _Mapping]]] = ...) -> None: ...

class ImageSpec(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "scheduler", "loras")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    loras: _containers.RepeatedCompositeFieldContainer[Lora]
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[str] = ..., loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ...) -> None: ...

class DecodeSpec(_message.Message):
    __slots__ = ("model", "latents_npy", "tile", "overlap")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_NPY_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    model: str
    latents_npy: bytes
    tile: int
    overlap: int
    def __init__(self, model: _Optional[str] = ..., latents_npy: _Optional[bytes] = ..., tile: _Optional[int] = ..., overlap: _Optional[int] = ...) -> None: ...

class DecodedImageSpec(_message.Message):
    __slots__ = ("model", "latents_sha256", "width", "height", "tile", "overlap")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    model: str
    latents_sha256: str
    width: int
    height: int
    tile: int
    overlap: int
    def __init__(self, model: _Optional[str] = ..., latents_sha256: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., tile: _Optional[int] = ..., overlap: _Optional[int] = ...) -> None: ...

class UpscaleSpec(_message.Message):
    __slots__ = ("model", "images", "prompt", "negative_prompt", "noise_level", "steps", "guidance_scale", "seed", "tile")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    prompt: str
    negative_prompt: str
    noise_level: int
    steps: int
    guidance_scale: float
    seed: int
    tile: int
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., noise_level: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., tile: _Optional[int] = ...) -> None: ...

class UpscaledImageSpec(_message.Message):
    __slots__ = ("model", "source_sha256", "prompt", "negative_prompt", "noise_level", "steps", "guidance_scale", "seed", "width", "height", "tile", "source")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    source_sha256: str
    prompt: str
    negative_prompt: str
    noise_level: int
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    tile: int
    source: ImageSpec
    def __init__(self, model: _Optional[str] = ..., source_sha256: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., noise_level: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., tile: _Optional[int] = ..., source: _Optional[_Union[ImageSpec, _Mapping]] = ...) -> None: ...

class Img2ImgSpec(_message.Message):
    __slots__ = ("model", "images", "prompts", "negative_prompt", "strengths", "seeds", "guidance_scales", "steps", "schedulers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STRENGTHS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    negative_prompt: str
    strengths: _containers.RepeatedScalarFieldContainer[float]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    guidance_scales: _containers.RepeatedScalarFieldContainer[float]
    steps: _containers.RepeatedScalarFieldContainer[int]
    schedulers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., prompts: _Optional[_Iterable[str]] = ..., negative_prompt: _Optional[str] = ..., strengths: _Optional[_Iterable[float]] = ..., seeds: _Optional[_Iterable[int]] = ..., guidance_scales: _Optional[_Iterable[float]] = ..., steps: _Optional[_Iterable[int]] = ..., schedulers: _Optional[_Iterable[str]] = ...) -> None: ...

class InpaintSpec(_message.Message):
    __slots__ = ("model", "image", "mask", "prompts", "negative_prompt", "strengths", "seeds", "guidance_scales", "steps", "schedulers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STRENGTHS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: bytes
    mask: bytes
    prompts: _containers.RepeatedScalarFieldContainer[str]
    negative_prompt: str
    strengths: _containers.RepeatedScalarFieldContainer[float]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    guidance_scales: _containers.RepeatedScalarFieldContainer[float]
    steps: _containers.RepeatedScalarFieldContainer[int]
    schedulers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., image: _Optional[bytes] = ..., mask: _Optional[bytes] = ..., prompts: _Optional[_Iterable[str]] = ..., negative_prompt: _Optional[str] = ..., strengths: _Optional[_Iterable[float]] = ..., seeds: _Optional[_Iterable[int]] = ..., guidance_scales: _Optional[_Iterable[float]] = ..., steps: _Optional[_Iterable[int]] = ..., schedulers: _Optional[_Iterable[str]] = ...) -> None: ...

class EditedImageSpec(_message.Message):
    __slots__ = ("model", "source_sha256", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "scheduler", "strength", "mask_sha256")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_SHA256_FIELD_NUMBER: _ClassVar[int]
    model: str
    source_sha256: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    strength: float
    mask_sha256: str
    def __init__(self, model: _Optional[str] = ..., source_sha256: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[str] = ..., strength: _Optional[float] = ..., mask_sha256: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "total", "completed", "error", "created_at", "sweep", "decode", "upscale", "img2img", "inpaint", "render", "priority", "owner", "preview_every")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_FIELD_NUMBER: _ClassVar[int]
    IMG2IMG_FIELD_NUMBER: _ClassVar[int]
    INPAINT_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    total: int
    completed: int
    error: str
    created_at: float
    sweep: SweepSpec
    decode: DecodeSpec
    upscale: UpscaleSpec
    img2img: Img2ImgSpec
    inpaint: InpaintSpec
    render: RenderSpec
    priority: int
    owner: str
    preview_every: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., total: _Optional[int] = ..., completed: _Optional[int] = ..., error: _Optional[str] = ..., created_at: _Optional[float] = ..., sweep: _Optional[_Union[SweepSpec, _Mapping]] = ..., decode: _Optional[_Union[DecodeSpec, _Mapping]] = ..., upscale: _Optional[_Union[UpscaleSpec, _Mapping]] = ..., img2img: _Optional[_Union[Img2ImgSpec, _Mapping]] = ..., inpaint: _Optional[_Union[InpaintSpec, _Mapping]] = ..., render: _Optional[_Union[RenderSpec, _Mapping]] = ..., priority: _Optional[int] = ..., owner: _Optional[str] = ..., preview_every: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("request_id", "sweep", "decode", "upscale", "img2img", "inpaint", "render", "priority", "preview_every")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_FIELD_NUMBER: _ClassVar[int]
    IMG2IMG_FIELD_NUMBER: _ClassVar[int]
    INPAINT_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sweep: SweepSpec
    decode: DecodeSpec
    upscale: UpscaleSpec
    img2img: Img2ImgSpec
    inpaint: InpaintSpec
    render: RenderSpec
    priority: int
    preview_every: int
    def __init__(self, request_id: _Optional[str] = ..., sweep: _Optional[_Union[SweepSpec, _Mapping]] = ..., decode: _Optional[_Union[DecodeSpec, _Mapping]] = ..., upscale: _Optional[_Union[UpscaleSpec, _Mapping]] = ..., img2img: _Optional[_Union[Img2ImgSpec, _Mapping]] = ..., inpaint: _Optional[_Union[InpaintSpec, _Mapping]] = ..., render: _Optional[_Union[RenderSpec, _Mapping]] = ..., priority: _Optional[int] = ..., preview_every: _Optional[int] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("owner", "page_size", "page_token", "states")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    owner: str
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[JobState]
    def __init__(self, owner: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamJobEventsRequest(_message.Message):
    __slots__ = ("job_id", "after_seq", "omit_images", "live")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    OMIT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    omit_images: bool
    live: bool
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., omit_images: _Optional[bool] = ..., live: _Optional[bool] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("spec", "decoded", "upscaled", "edited", "name", "png", "url", "sha256", "size")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DECODED_FIELD_NUMBER: _ClassVar[int]
    UPSCALED_FIELD_NUMBER: _ClassVar[int]
    EDITED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    spec: ImageSpec
    decoded: DecodedImageSpec
    upscaled: UpscaledImageSpec
    edited: EditedImageSpec
    name: str
    png: bytes
    url: str
    sha256: str
    size: int
    def __init__(self, spec: _Optional[_Union[ImageSpec, _Mapping]] = ..., decoded: _Optional[_Union[DecodedImageSpec, _Mapping]] = ..., upscaled: _Optional[_Union[UpscaledImageSpec, _Mapping]] = ..., edited: _Optional[_Union[EditedImageSpec, _Mapping]] = ..., name: _Optional[str] = ..., png: _Optional[bytes] = ..., url: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("completed", "total")
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    completed: int
    total: int
    def __init__(self, completed: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("step", "steps", "names")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    step: int
    steps: int
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., steps: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("name", "step", "steps", "png")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: int
    steps: int
    png: bytes
    def __init__(self, name: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., png: _Optional[bytes] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("seq", "job_id", "state", "progress", "result", "step_progress", "preview", "error")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    STEP_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    seq: int
    job_id: str
    state: JobState
    progress: Progress
    result: ImageResult
    step_progress: StepProgress
    preview: Preview
    error: str
    def __init__(self, seq: _Optional[int] = ..., job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[ImageResult, _Mapping]] = ..., step_progress: _Optional[_Union[StepProgress, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...
