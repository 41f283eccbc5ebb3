"""The wire protocol through raw gRPC: error codes, resumable streams, health, large images."""

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from renderfarm._constants import CHANNEL_OPTIONS, FIELD_METADATA_KEY
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1.farm_pb2_grpc import RenderFarmStub


@pytest.fixture
def stub(farm):
    with grpc.insecure_channel(farm.address, options=CHANNEL_OPTIONS) as channel:
        yield RenderFarmStub(channel)


def sweep_request(**sweep) -> pb.SubmitJobRequest:
    sweep.setdefault("model", "builtin:tiny-sd")
    sweep.setdefault("prompts", ["a red fox"])
    sweep.setdefault("steps", [2])
    sweep.setdefault("sizes", [pb.Size(width=64, height=64)])
    return pb.SubmitJobRequest(sweep=pb.SweepSpec(**sweep))


BAD_SWEEPS = [
    ("sweep.prompts", dict(prompts=[])),
    ("sweep.sizes[0].width", dict(sizes=[pb.Size(width=100, height=64)])),
    ("sweep.sizes[0].height", dict(sizes=[pb.Size(width=64, height=68)])),
    ("sweep.sizes[0].width", dict(sizes=[pb.Size(width=8192, height=64)])),
    ("sweep.steps[0]", dict(steps=[0])),
    ("sweep.guidance_scales[0]", dict(guidance_scales=[math.nan])),
    ("sweep.schedulers[0]", dict(schedulers=["turbo"])),
    ("sweep.model", dict(model="builtin:no-such-model")),
    ("sweep.model", dict(model="/nonexistent/model/dir")),
    ("sweep", dict(seeds=list(range(100_001)))),
]


@pytest.mark.parametrize("field, sweep", BAD_SWEEPS, ids=[f for f, _ in BAD_SWEEPS])
def test_bad_requests_are_invalid_argument_naming_the_field_and_create_nothing(stub, field, sweep):
    jobs_before = len(stub.ListJobs(pb.ListJobsRequest()).jobs)
    with pytest.raises(grpc.RpcError) as raised:
        stub.SubmitJob(sweep_request(**sweep))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}: ")
    assert (FIELD_METADATA_KEY, field) in raised.value.trailing_metadata()
    assert len(stub.ListJobs(pb.ListJobsRequest()).jobs) == jobs_before
    # ... and the farm keeps serving.
    job = stub.SubmitJob(sweep_request()).job
    events = list(stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id)))
    assert events[-1].state == pb.JOB_STATE_SUCCEEDED


def test_unknown_job_is_not_found(stub):
    for call, request in (
        (stub.GetJob, pb.GetJobRequest(job_id="nope")),
        (stub.CancelJob, pb.CancelJobRequest(job_id="nope")),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id="nope")))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_resumes_after_a_sequence_number(stub):
    job = stub.SubmitJob(sweep_request(seeds=[0, 1, 2])).job
    everything = list(stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id)))
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    assert [e.state for e in everything if e.WhichOneof("kind") == "state"] == [
        pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED
    ]  # fmt: skip
    results = [e for e in everything if e.WhichOneof("kind") == "result"]
    assert len(results) == 3 and all(e.result.png.startswith(b"\x89PNG") for e in results)
    resumed = list(stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id, after_seq=results[0].seq)))
    assert resumed == everything[results[0].seq :]


def test_omit_images_streams_specs_without_bytes(stub):
    job = stub.SubmitJob(sweep_request(seeds=[0, 1])).job
    events = stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id, omit_images=True))
    results = [e.result for e in events if e.WhichOneof("kind") == "result"]
    assert len(results) == 2 and all(r.name and not r.png for r in results)


def test_request_id_makes_submission_idempotent(stub):
    request = sweep_request()
    request.request_id = "same-request"
    first, second = stub.SubmitJob(request).job, stub.SubmitJob(request).job
    assert first.id == second.id


def test_health_service_reports_serving(farm):
    with grpc.insecure_channel(farm.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "renderfarm.v1.RenderFarm"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_an_image_over_grpcs_default_4mb_cap_crosses_the_wire(stub):
    job = stub.SubmitJob(sweep_request(steps=[1], sizes=[pb.Size(width=1536, height=1536)])).job
    events = list(stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id)))
    (result,) = [e.result for e in events if e.WhichOneof("kind") == "result"]
    assert len(result.png) > 4 * 1024 * 1024
