"""A corpus of bad requests sent through raw gRPC: each is refused with a clear error, nothing half-made.

Each gets its status code and a message naming the field (also in trailing
metadata); none creates a job; the farm keeps serving. Raw stubs, not the
SDK: the SDK refuses some of these before they are sent.
"""

import io
import math
import struct
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from renderfarm._constants import CHANNEL_OPTIONS, FIELD_METADATA_KEY
from renderfarm._wire import metadata
from renderfarm.cluster.config import AuthConfig, LimitsConfig
from renderfarm.cluster.keys import add_user
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1.farm_pb2_grpc import RenderFarmStub

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
UNKNOWN_JOB = "0123456789abcdef"
# Stands in a string field of a request, to be swapped for bytes that are not UTF-8.
MARKER = "MARKER"


def sweep(**fields) -> pb.SubmitJobRequest:
    fields = {
        "model": "builtin:tiny-sd",
        "prompts": ["a red fox"],
        "steps": [1],
        "sizes": [pb.Size(width=64, height=64)],
        **fields,
    }
    return pb.SubmitJobRequest(sweep=pb.SweepSpec(**fields))


def wire_field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One raw protobuf field: a key, then the payload (length-prefixed for wire type 2)."""
    from google.protobuf.internal.encoder import _VarintBytes

    key = _VarintBytes(number << 3 | wire_type)
    return key + (_VarintBytes(len(payload)) + payload if wire_type == 2 else payload)


def with_sweep_fields(*fields: bytes) -> bytes:
    """A valid sweep request with extra raw fields appended to its SweepSpec."""
    spec = sweep().sweep.SerializeToString() + b"".join(fields)
    return wire_field(2, 2, spec)


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode(**fields) -> pb.SubmitJobRequest:
    fields = {"model": "builtin:tiny-sd", "latents_npy": npy(np.zeros((1, 4, 8, 8), np.float32)), **fields}
    return pb.SubmitJobRequest(decode=pb.DecodeSpec(**fields))


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_pixels(data: bytes) -> bytes:
    """A PNG whose header reads fine (Image.verify() passes) and whose pixel data does not decode."""
    start = data.index(b"IDAT") + 8
    return data[:start] + bytes(byte ^ 0x5A for byte in data[start : start + 40]) + data[start + 40 :]


def sixteen_bit_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("I;16", (32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def img2img(**fields) -> pb.SubmitJobRequest:
    fields = {"model": "builtin:tiny-sd", "images": [png(32, 32)], "prompts": ["a fox"], "steps": [2], **fields}
    return pb.SubmitJobRequest(img2img=pb.Img2ImgSpec(**fields))


def inpaint(**fields) -> pb.SubmitJobRequest:
    fields = {"model": "builtin:tiny-sd-inpaint", "image": png(32, 32), "mask": png(32, 32), "prompts": ["a fox"],
              "steps": [2], **fields}  # fmt: skip
    return pb.SubmitJobRequest(inpaint=pb.InpaintSpec(**fields))


def upscale(**fields) -> pb.SubmitJobRequest:
    fields = {"model": "builtin:tiny-sd-x4-upscaler", "images": [png(32, 32)], "steps": 1, **fields}
    return pb.SubmitJobRequest(upscale=pb.UpscaleSpec(**fields))


def not_utf8(message) -> bytes:
    """The serialized message with MARKER's bytes patched to ones that are not UTF-8 (same length, so still framed)."""
    data = message.SerializeToString()
    assert data.count(MARKER.encode()) == 1
    return data.replace(MARKER.encode(), b"\xc3\x28\xff\xfe\x80\x80")


def npy_claiming_64_gib() -> bytes:
    """A well-formed .npy header for a float32 [1, 4, 65536, 65536] array, then 256 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": (1, 4, 65536, 65536)}
    )
    return buffer.getvalue() + bytes(256)


# (id, method, request: a message or raw bytes, code, field)
CORPUS = [
    ("no-job-kind", "SubmitJob", pb.SubmitJobRequest(request_id="no-kind"), INVALID, "kind"),
    ("empty-prompt-list", "SubmitJob", sweep(prompts=[]), INVALID, "sweep.prompts"),
    ("empty-prompt", "SubmitJob", sweep(prompts=[""]), INVALID, "sweep.prompts[0]"),
    ("blank-second-prompt", "SubmitJob", sweep(prompts=["a fox", " \t "]), INVALID, "sweep.prompts[1]"),
    ("100kb-prompt", "SubmitJob", sweep(prompts=["x" * 100_000]), INVALID, "sweep.prompts[0]"),
    ("100kb-negative-prompt", "SubmitJob", sweep(negative_prompt="x" * 100_000), INVALID, "sweep.negative_prompt"),
    ("nul-in-prompt", "SubmitJob", sweep(prompts=["a\x00fox"]), INVALID, "sweep.prompts[0]"),
    ("bad-utf8-prompt", "SubmitJob", not_utf8(sweep(prompts=["a fox", MARKER])), INVALID, "sweep.prompts[1]"),
    ("bad-utf8-negative", "SubmitJob", not_utf8(sweep(negative_prompt=MARKER)), INVALID, "sweep.negative_prompt"),
    ("bad-utf8-model", "SubmitJob", not_utf8(sweep(model=MARKER)), INVALID, "sweep.model"),
    ("bad-utf8-scheduler", "SubmitJob", not_utf8(sweep(schedulers=[MARKER])), INVALID, "sweep.schedulers[0]"),
    (
        "bad-utf8-request-id",
        "SubmitJob",
        not_utf8(pb.SubmitJobRequest(request_id=MARKER, sweep=sweep().sweep)),
        INVALID,
        "request_id",
    ),
    ("bad-utf8-upscale-prompt", "SubmitJob", not_utf8(upscale(prompt=MARKER)), INVALID, "upscale.prompt"),
    ("bad-utf8-job-id", "GetJob", not_utf8(pb.GetJobRequest(job_id=MARKER)), INVALID, "job_id"),
    ("truncated-protobuf", "SubmitJob", sweep(prompts=["a red fox"]).SerializeToString()[:-4], INVALID, "request"),
    ("nan-guidance", "SubmitJob", sweep(guidance_scales=[math.nan]), INVALID, "sweep.guidance_scales[0]"),
    ("upscale-corrupt-pixels", "SubmitJob", upscale(images=[corrupt_pixels(png(32, 32))]), INVALID, "upscale.images[0]"),
    ("img2img-no-images", "SubmitJob", img2img(images=[]), INVALID, "img2img.images"),
    ("img2img-not-an-image", "SubmitJob", img2img(images=[png(32, 32), b"GIF89a nope"]), INVALID, "img2img.images[1]"),
    ("img2img-corrupt-pixels", "SubmitJob", img2img(images=[corrupt_pixels(png(32, 32))]), INVALID, "img2img.images[0]"),
    ("img2img-16-bit", "SubmitJob", img2img(images=[sixteen_bit_png()]), INVALID, "img2img.images[0]"),
    ("img2img-zero-strength", "SubmitJob", img2img(strengths=[0.5, 0.0]), INVALID, "img2img.strengths[1]"),
    ("img2img-strength-over-1", "SubmitJob", img2img(strengths=[1.5]), INVALID, "img2img.strengths[0]"),
    ("img2img-no-step", "SubmitJob", img2img(steps=[1], strengths=[0.5]), INVALID, "img2img.strengths[0]"),
    ("img2img-inpaint-model", "SubmitJob", img2img(model="builtin:tiny-sd-inpaint"), INVALID, "img2img.model"),
    ("img2img-blank-prompt", "SubmitJob", img2img(prompts=[" "]), INVALID, "img2img.prompts[0]"),
    ("inpaint-no-mask", "SubmitJob", inpaint(mask=b""), INVALID, "inpaint.mask"),
    ("inpaint-mask-size", "SubmitJob", inpaint(mask=png(32, 40)), INVALID, "inpaint.mask"),
    ("inpaint-txt2img-model", "SubmitJob", inpaint(model="builtin:tiny-sd"), INVALID, "inpaint.model"),
    ("model-segment-over-255-bytes", "SubmitJob", sweep(model="/tmp/" + "m" * 300), INVALID, "sweep.model"),
    ("model-ref-at-the-4096-limit", "SubmitJob", sweep(model="/tmp/" + "/".join(["m" * 255] * 16)[:4090]), INVALID, "sweep.model"),
    ("decode-float64-overflow", "SubmitJob", decode(latents_npy=npy(np.full((1, 4, 8, 8), 1e300))), INVALID, "decode.latents_npy"),
    ("seeds-as-doubles", "SubmitJob", with_sweep_fields(wire_field(4, 1, struct.pack("<d", 7.0))), INVALID, "sweep.seeds"),
    ("guidance-as-varint", "SubmitJob", with_sweep_fields(wire_field(5, 0, b"\x09")), INVALID, "sweep.guidance_scales"),
    ("unknown-field", "SubmitJob", with_sweep_fields(wire_field(999, 0, b"\x01")), INVALID, "sweep"),
    ("sweep-of-an-upscaler", "SubmitJob", sweep(model="builtin:tiny-sd-x4-upscaler"), INVALID, "sweep.model"),
    ("model-and-models", "SubmitJob", sweep(models=["builtin:tiny-sd"]), INVALID, "sweep.models"),
    ("unknown-second-model", "SubmitJob", sweep(model="", models=["builtin:tiny-sd", "builtin:nope"]), INVALID, "sweep.models[1]"),
    ("pickle-lora", "SubmitJob", sweep(lora_sets=[pb.LoraSet(loras=[pb.Lora(path="/tmp/style.bin", scale=1)])]), INVALID, "sweep.lora_sets[0].loras[0].path"),
    ("missing-lora", "SubmitJob", sweep(lora_sets=[pb.LoraSet(loras=[pb.Lora(path="/no/such.safetensors", scale=1)])]), INVALID, "sweep.lora_sets[0].loras[0].path"),
    ("nan-lora-scale", "SubmitJob", sweep(lora_sets=[pb.LoraSet(loras=[pb.Lora(path="x.safetensors", scale=math.nan)])]), INVALID, "sweep.lora_sets[0].loras[0].scale"),
    ("inf-guidance", "SubmitJob", sweep(guidance_scales=[7.5, math.inf]), INVALID, "sweep.guidance_scales[1]"),
    ("minus-inf-guidance", "SubmitJob", sweep(guidance_scales=[-math.inf]), INVALID, "sweep.guidance_scales[0]"),
    ("negative-guidance", "SubmitJob", sweep(guidance_scales=[-0.5]), INVALID, "sweep.guidance_scales[0]"),
    ("width-0", "SubmitJob", sweep(sizes=[pb.Size(width=0, height=64)]), INVALID, "sweep.sizes[0].width"),
    ("width-10^6", "SubmitJob", sweep(sizes=[pb.Size(width=10**6, height=64)]), INVALID, "sweep.sizes[0].width"),
    (
        "width-not-multiple-of-8",
        "SubmitJob",
        sweep(sizes=[pb.Size(width=100, height=64)]),
        INVALID,
        "sweep.sizes[0].width",
    ),
    ("negative-height", "SubmitJob", sweep(sizes=[pb.Size(width=64, height=-64)]), INVALID, "sweep.sizes[0].height"),
    ("negative-seed", "SubmitJob", sweep(seeds=[-1]), INVALID, "sweep.seeds[0]"),
    ("seed-2^53", "SubmitJob", sweep(seeds=[0, 2**53]), INVALID, "sweep.seeds[1]"),
    # 2**63 does not fit an int64: on the wire it is the varint that int64 reads as -2**63.
    ("seed-2^63", "SubmitJob", sweep(seeds=[-(2**63)]), INVALID, "sweep.seeds[0]"),
    ("steps-0", "SubmitJob", sweep(steps=[0]), INVALID, "sweep.steps[0]"),
    ("steps-10^6", "SubmitJob", sweep(steps=[10**6]), INVALID, "sweep.steps[0]"),
    (
        "10^9-image-sweep",
        "SubmitJob",
        sweep(
            prompts=[f"p{i}" for i in range(1000)],
            seeds=range(1000),
            guidance_scales=[1 + i / 1000 for i in range(1000)],
        ),
        INVALID,
        "sweep",
    ),  # fmt: skip
    ("unknown-model", "SubmitJob", sweep(model="builtin:no-such-model"), INVALID, "sweep.model"),
    ("missing-model-dir", "SubmitJob", sweep(model="/nonexistent/sd-1.5"), INVALID, "sweep.model"),
    ("empty-model", "SubmitJob", sweep(model=""), INVALID, "sweep.model"),
    ("unknown-scheduler", "SubmitJob", sweep(schedulers=["k_turbo"]), INVALID, "sweep.schedulers[0]"),
    ("builtin-dotdot", "SubmitJob", sweep(model="builtin:../tiny-sd"), INVALID, "sweep.model"),
    ("builtin-slash", "SubmitJob", sweep(model="builtin:tiny-sd/unet"), INVALID, "sweep.model"),
    ("relative-dotdot-model", "SubmitJob", sweep(model="../../etc/passwd"), INVALID, "sweep.model"),
    ("absolute-dotdot-model", "SubmitJob", sweep(model="/srv/models/../../etc"), INVALID, "sweep.model"),
    ("backslash-model", "SubmitJob", sweep(model="..\\..\\windows\\system32"), INVALID, "sweep.model"),
    ("nul-in-model", "SubmitJob", sweep(model="builtin:tiny-sd\x00.png"), INVALID, "sweep.model"),
    ("100kb-model", "SubmitJob", sweep(model="m" * 100_000), INVALID, "sweep.model"),
    (
        "dotdot-request-id",
        "SubmitJob",
        pb.SubmitJobRequest(request_id="../x", sweep=sweep().sweep),
        INVALID,
        "request_id",
    ),
    (
        "long-request-id",
        "SubmitJob",
        pb.SubmitJobRequest(request_id="r" * 65, sweep=sweep().sweep),
        INVALID,
        "request_id",
    ),
    ("decode-garbage", "SubmitJob", decode(latents_npy=b"\x93NUMPY garbage"), INVALID, "decode.latents_npy"),
    ("decode-empty", "SubmitJob", decode(latents_npy=b""), INVALID, "decode.latents_npy"),
    (
        "decode-wrong-rank",
        "SubmitJob",
        decode(latents_npy=npy(np.zeros((4, 8, 8), np.float32))),
        INVALID,
        "decode.latents_npy",
    ),
    (
        "decode-int-latents",
        "SubmitJob",
        decode(latents_npy=npy(np.zeros((1, 4, 8, 8), np.int32))),
        INVALID,
        "decode.latents_npy",
    ),
    (
        "decode-nan-latents",
        "SubmitJob",
        decode(latents_npy=npy(np.full((1, 4, 8, 8), np.nan, np.float32))),
        INVALID,
        "decode.latents_npy",
    ),
    (
        "decode-wrong-channels",
        "SubmitJob",
        decode(latents_npy=npy(np.zeros((1, 3, 8, 8), np.float32))),
        INVALID,
        "decode.latents_npy",
    ),
    (
        "decode-header-claims-64gb",
        "SubmitJob",
        decode(latents_npy=npy_claiming_64_gib()),
        INVALID,
        "decode.latents_npy",
    ),
    ("decode-dotdot-model", "SubmitJob", decode(model="builtin:../../x"), INVALID, "decode.model"),
    ("upscale-not-an-image", "SubmitJob", upscale(images=[b"GIF89a but not really"]), INVALID, "upscale.images[0]"),
    ("upscale-no-images", "SubmitJob", upscale(images=[]), INVALID, "upscale.images"),
    ("upscale-noise-level-351", "SubmitJob", upscale(noise_level=351), INVALID, "upscale.noise_level"),
    ("upscale-negative-noise", "SubmitJob", upscale(noise_level=-1), INVALID, "upscale.noise_level"),
    ("upscale-with-a-txt2img-model", "SubmitJob", upscale(model="builtin:tiny-sd"), INVALID, "upscale.model"),
    ("upscale-negative-seed", "SubmitJob", upscale(seed=-5), INVALID, "upscale.seed"),
    ("list-page-size-over-1000", "ListJobs", pb.ListJobsRequest(page_size=1001), INVALID, "page_size"),
    ("list-bad-page-token", "ListJobs", pb.ListJobsRequest(page_token="not a token"), INVALID, "page_token"),
    ("get-unknown-job", "GetJob", pb.GetJobRequest(job_id=UNKNOWN_JOB), NOT_FOUND, "job_id"),
    ("cancel-unknown-job", "CancelJob", pb.CancelJobRequest(job_id=UNKNOWN_JOB), NOT_FOUND, "job_id"),
    ("stream-unknown-job", "StreamJobEvents", pb.StreamJobEventsRequest(job_id=UNKNOWN_JOB), NOT_FOUND, "job_id"),
    ("get-empty-job-id", "GetJob", pb.GetJobRequest(job_id=""), INVALID, "job_id"),
    ("get-dotdot-job-id", "GetJob", pb.GetJobRequest(job_id="../../etc/passwd"), INVALID, "job_id"),
    ("cancel-slash-job-id", "CancelJob", pb.CancelJobRequest(job_id="a/b"), INVALID, "job_id"),
    ("stream-100kb-job-id", "StreamJobEvents", pb.StreamJobEventsRequest(job_id="j" * 100_000), INVALID, "job_id"),
]


@pytest.fixture(scope="module")
def channel(start_farm):
    with grpc.insecure_channel(start_farm().address, options=CHANNEL_OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return RenderFarmStub(channel)


def run_to_end(stub, request) -> pb.Job:
    job = stub.SubmitJob(request).job
    events = list(stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id, omit_images=True)))
    assert events[-1].state == pb.JOB_STATE_SUCCEEDED, events[-1]
    return job


@pytest.fixture(scope="module")
def finished_job(stub) -> pb.Job:
    return run_to_end(stub, sweep())


def send(channel, method: str, request, sent_metadata=()):
    """Calls METHOD with the request as given: raw bytes go out untouched (no serializer)."""
    path = f"/renderfarm.v1.RenderFarm/{method}"
    data = request if isinstance(request, bytes) else request.SerializeToString()
    if method == "StreamJobEvents":
        return list(channel.unary_stream(path)(data, metadata=sent_metadata, timeout=30))
    return channel.unary_unary(path)(data, metadata=sent_metadata, timeout=30)


def job_ids(stub) -> set[str]:
    return {job.id for job in stub.ListJobs(pb.ListJobsRequest()).jobs}


def assert_refused(error: grpc.RpcError, code: grpc.StatusCode, field: str) -> None:
    assert error.code() == code, error.details()
    assert error.details().startswith(f"{field}: "), error.details()
    assert (FIELD_METADATA_KEY, field) in error.trailing_metadata()


@pytest.mark.parametrize(
    "method, request_, code, field", [case[1:] for case in CORPUS], ids=[case[0] for case in CORPUS]
)
def test_a_bad_request_gets_its_code_naming_the_field_and_creates_nothing(
    channel, stub, finished_job, method, request_, code, field
):
    jobs_before = job_ids(stub)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        send(channel, method, request_)
    # Refusing never renders, nor expands a sweep's product.
    assert time.monotonic() - started < 10
    assert_refused(raised.value, code, field)
    assert job_ids(stub) == jobs_before
    assert stub.GetJob(pb.GetJobRequest(job_id=finished_job.id)).job.state == pb.JOB_STATE_SUCCEEDED


def test_a_used_request_id_returns_its_job_for_the_same_request_and_refuses_another(stub):
    first = stub.SubmitJob(pb.SubmitJobRequest(request_id="reused", sweep=sweep().sweep)).job
    assert stub.SubmitJob(pb.SubmitJobRequest(request_id="reused", sweep=sweep().sweep)).job.id == first.id
    jobs_before = job_ids(stub)
    for other in (sweep(seeds=[7]), decode()):
        other.request_id = "reused"
        with pytest.raises(grpc.RpcError) as raised:
            stub.SubmitJob(other)
        assert_refused(raised.value, grpc.StatusCode.ALREADY_EXISTS, "request_id")
        assert first.id in raised.value.details()
    assert job_ids(stub) == jobs_before


def test_a_20kb_bad_value_is_clipped_in_the_error_and_still_names_its_field(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.SubmitJob(sweep(schedulers=["x" * 20_000]))
    assert_refused(raised.value, INVALID, "sweep.schedulers[0]")
    assert len(raised.value.details()) < 4096


def test_job_lists_come_in_bounded_pages_without_the_jobs_lists(stub):
    for seed in range(3):
        run_to_end(stub, sweep(seeds=[seed], prompts=["a red fox"] * 1 + [f"prompt {i}" for i in range(50)]))
    everything = stub.ListJobs(pb.ListJobsRequest(page_size=1000))
    assert not everything.next_page_token and len(everything.jobs) >= 3
    paged, token = [], ""
    while True:
        reply = stub.ListJobs(pb.ListJobsRequest(page_size=2, page_token=token))
        assert len(reply.jobs) <= 2
        paged += [job.id for job in reply.jobs]
        if not (token := reply.next_page_token):
            break
    assert paged == [job.id for job in everything.jobs]
    assert all(not job.sweep.prompts and not job.sweep.seeds for job in everything.jobs)
    # GetJob still gives the whole summary.
    assert len(stub.GetJob(pb.GetJobRequest(job_id=everything.jobs[-1].id)).job.sweep.prompts) == 51


def test_the_corpus_is_at_least_30_distinct_requests():
    assert len({case[0] for case in CORPUS}) == len(CORPUS) >= 30


def test_cancelling_a_finished_job_is_a_failed_precondition(stub, finished_job):
    with pytest.raises(grpc.RpcError) as raised:
        stub.CancelJob(pb.CancelJobRequest(job_id=finished_job.id))
    assert_refused(raised.value, grpc.StatusCode.FAILED_PRECONDITION, "job_id")
    assert "already ended succeeded" in raised.value.details()


def test_after_the_whole_corpus_the_farm_renders(channel, stub):
    for _, method, request_, _, _ in CORPUS:
        with pytest.raises(grpc.RpcError):
            send(channel, method, request_)
    run_to_end(stub, sweep(seeds=[0, 1]))


SMALL_LIMITS = LimitsConfig(max_images_per_job=4, max_prompt_chars=50, max_pixels=96 * 96, max_concurrent_jobs=1)


@pytest.fixture(scope="module")
def small_stub(start_farm):
    with grpc.insecure_channel(start_farm(limits=SMALL_LIMITS).address, options=CHANNEL_OPTIONS) as channel:
        yield RenderFarmStub(channel)


OVER_LIMITS = [
    ("sweep-images", sweep(seeds=range(5)), "sweep"),
    ("upscale-images", upscale(images=[png(32, 32)] * 5), "upscale.images"),
    ("prompt-chars", sweep(prompts=["x" * 51]), "sweep.prompts[0]"),
    ("sweep-pixels", sweep(sizes=[pb.Size(width=128, height=128)]), "sweep.sizes[0]"),
    ("decode-pixels", decode(latents_npy=npy(np.zeros((1, 4, 16, 16), np.float32))), "decode.latents_npy"),
    ("upscale-pixels", upscale(images=[png(32, 32)]), "upscale.images[0]"),
]


@pytest.mark.parametrize("request_, field", [case[1:] for case in OVER_LIMITS], ids=[case[0] for case in OVER_LIMITS])
def test_a_job_over_a_per_job_limit_is_invalid_naming_the_field(small_stub, request_, field):
    jobs_before = job_ids(small_stub)
    with pytest.raises(grpc.RpcError) as raised:
        small_stub.SubmitJob(request_)
    assert_refused(raised.value, grpc.StatusCode.INVALID_ARGUMENT, field)
    assert "over the limit" in raised.value.details()
    assert job_ids(small_stub) == jobs_before


def test_a_job_over_max_concurrent_jobs_is_resource_exhausted_until_one_ends(small_stub):
    long_job = pb.SubmitJobRequest(request_id="long-job", sweep=sweep(seeds=range(4), steps=[100]).sweep)
    running = small_stub.SubmitJob(long_job).job
    jobs_before = job_ids(small_stub)
    with pytest.raises(grpc.RpcError) as raised:
        small_stub.SubmitJob(sweep())
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 job is queued or running, the farm's limit (max_concurrent_jobs = 1)" in raised.value.details()
    assert job_ids(small_stub) == jobs_before
    # Resubmitting the running job is not a new job, so the limit does not refuse it.
    assert small_stub.SubmitJob(long_job).job.id == running.id

    small_stub.CancelJob(pb.CancelJobRequest(job_id=running.id))
    events = small_stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=running.id, omit_images=True))
    assert list(events)[-1].state == pb.JOB_STATE_CANCELLED
    run_to_end(small_stub, sweep())


# A farm that requires tokens and reads requests of at most 2 MiB: over it, gRPC refuses a request unread.
GUARDED_LIMITS = LimitsConfig(max_source_bytes=1024 * 1024, max_request_bytes=2 * 1024 * 1024)
LONG_PROMPT = "a red fox " * 1000  # max_prompt_chars
# 3 MB requests, over that limit: a farm that read a request before checking its token would answer these
# RESOURCE_EXHAUSTED (as it did) instead of UNAUTHENTICATED.
OVERSIZED = [
    ("SubmitJob", sweep(prompts=[LONG_PROMPT] * 300)),
    ("StreamJobEvents", pb.StreamJobEventsRequest(job_id="j" * 3_000_000)),
    ("ServerReflectionInfo", reflection_pb2.ServerReflectionRequest(file_containing_symbol="s" * 3_000_000)),
]


@pytest.fixture(scope="module")
def guarded(start_farm, tmp_path_factory):
    """A channel to that farm, and a user's token."""
    keys_file = tmp_path_factory.mktemp("guarded") / "keys.toml"
    token = add_user(keys_file, "erin")
    farm = start_farm(auth=AuthConfig(keys_file=keys_file), limits=GUARDED_LIMITS)
    with grpc.insecure_channel(farm.address, options=CHANNEL_OPTIONS) as channel:
        yield channel, token


def call(channel, method: str, request, sent_metadata):
    """send(), and reflection's stream too."""
    if method == "ServerReflectionInfo":
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return list(stub.ServerReflectionInfo(iter([request]), metadata=sent_metadata, timeout=30))
    return send(channel, method, request, sent_metadata)


@pytest.mark.parametrize("method, request_", OVERSIZED, ids=[method for method, _ in OVERSIZED])
def test_a_caller_without_a_known_token_is_refused_before_the_request_is_read(guarded, method, request_):
    channel, token = guarded
    assert request_.ByteSize() > GUARDED_LIMITS.max_request_bytes
    for sent in ((), metadata("rf_not-a-token")):
        with pytest.raises(grpc.RpcError) as raised:
            call(channel, method, request_, sent)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, raised.value.details()
        assert raised.value.details().startswith("missing or wrong API token")
    # With a token the same request is too large to read: so the refusal above came before reading it.
    with pytest.raises(grpc.RpcError) as raised:
        call(channel, method, request_, metadata(token))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_request_over_max_request_bytes_is_resource_exhausted_and_one_under_it_is_accepted(guarded):
    channel, token = guarded
    stub, limit = RenderFarmStub(channel), GUARDED_LIMITS.max_request_bytes
    fitting = sweep(prompts=[LONG_PROMPT] * (limit // len(LONG_PROMPT)))
    over = sweep(prompts=list(fitting.sweep.prompts) + [LONG_PROMPT])
    assert limit - len(LONG_PROMPT) < fitting.ByteSize() <= limit < over.ByteSize()
    with pytest.raises(grpc.RpcError) as raised:
        stub.SubmitJob(over, metadata=metadata(token))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # gRPC's own message, naming both sizes.
    assert f"Received message larger than max ({over.ByteSize()} vs. {limit})" in raised.value.details()

    job = stub.SubmitJob(fitting, metadata=metadata(token)).job
    stub.CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=metadata(token))
    events = stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id, omit_images=True), metadata=metadata(token))
    assert list(events)[-1].state == pb.JOB_STATE_CANCELLED


def test_health_answers_without_a_token(guarded):
    channel, _ = guarded
    probe = health_pb2.HealthCheckRequest(service="renderfarm.v1.RenderFarm")
    assert health_pb2_grpc.HealthStub(channel).Check(probe).status == health_pb2.HealthCheckResponse.SERVING
