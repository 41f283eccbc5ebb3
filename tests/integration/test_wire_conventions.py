"""The conventions generic gRPC tools rely on, on a farm that requires tokens: server reflection behind the
API's tokens, google.rpc.Status details on errors; and the SDK errors made of them."""

import asyncio

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

import renderfarm as rf
from renderfarm._wire import metadata
from renderfarm.cluster.config import AuthConfig
from renderfarm.cluster.keys import add_user
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1.farm_pb2_grpc import RenderFarmStub

SERVICE = pb.DESCRIPTOR.services_by_name["RenderFarm"]
WIDTH = "sweep.sizes[0].width"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("wire") / "keys.toml"
    return keys_file, add_user(keys_file, "erin")


@pytest.fixture
def farm(start_farm, keys):
    return start_farm(auth=AuthConfig(keys_file=keys[0]))


@pytest.fixture
def token(keys) -> str:
    return keys[1]


@pytest.fixture(autouse=True)
def no_token_from_the_environment(monkeypatch):
    monkeypatch.delenv("RENDERFARM_TOKEN", raising=False)


def bad_sweep() -> pb.SubmitJobRequest:
    sweep = pb.SweepSpec(model="builtin:tiny-sd", prompts=["a fox"], steps=[2], sizes=[pb.Size(width=100, height=64)])
    return pb.SubmitJobRequest(sweep=sweep)


def details(status, detail_type):
    """The details of `status` of that type."""
    found = []
    for detail in status.details:
        message = detail_type()
        if detail.Unpack(message):
            found.append(message)
    return found


def test_reflection_describes_the_service_to_a_caller_with_a_token(farm, token):
    # What grpcurl does: bearer-token call credentials, then the schema from the server itself.
    credentials = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(), grpc.access_token_call_credentials(token)
    )
    with grpc.secure_channel(farm.address, credentials) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {SERVICE.full_name, "grpc.health.v1.Health"} <= set(database.get_services())
        described = DescriptorPool(database).FindServiceByName(SERVICE.full_name)
        assert [method.name for method in described.methods] == [method.name for method in SERVICE.methods]


@pytest.mark.parametrize("sent", [(), metadata("rf_not-a-token")], ids=["no token", "wrong token"])
def test_reflection_refuses_a_caller_without_a_token_and_health_stays_open(farm, sent):
    with grpc.insecure_channel(farm.address) as channel:
        requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        with pytest.raises(grpc.RpcError) as raised:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(requests, metadata=sent))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_status.from_call(raised.value).code == grpc.StatusCode.UNAUTHENTICATED.value[0]
        # Probes carry no token.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name))
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_an_invalid_sweep_carries_a_status_whose_bad_request_names_the_field(farm, token):
    with grpc.insecure_channel(farm.address) as channel, pytest.raises(grpc.RpcError) as raised:
        RenderFarmStub(channel).SubmitJob(bad_sweep(), metadata=metadata(token))
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{WIDTH}: ") and "multiple of 8" in error.details()
    status = rpc_status.from_call(error)
    assert (status.code, status.message) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], error.details())
    ((violation,),) = [found.field_violations for found in details(status, error_details_pb2.BadRequest)]
    assert violation.field == WIDTH and f"{WIDTH}: {violation.description}" == error.details()


def test_an_unknown_job_carries_a_status_naming_the_resource(farm, token):
    with grpc.insecure_channel(farm.address) as channel, pytest.raises(grpc.RpcError) as raised:
        RenderFarmStub(channel).GetJob(pb.GetJobRequest(job_id="nope"), metadata=metadata(token))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    (resource,) = details(rpc_status.from_call(raised.value), error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == ("renderfarm.v1.Job", "nope")


def test_sdk_errors_carry_the_code_the_field_and_the_request_id(farm, token):
    with rf.Client(farm.address, token=token) as client:
        with pytest.raises(rf.InvalidJobError) as raised:
            client.sweep("a fox", steps=2, width=100, height=64, request_id="wire-conventions-1")
        assert str(raised.value).startswith(f"{WIDTH}: ")
        assert (raised.value.code, raised.value.field, raised.value.request_id) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            WIDTH,
            "wire-conventions-1",
        )
        # Without one, the error carries the SDK's own.
        with pytest.raises(rf.InvalidJobError) as raised:
            client.sweep("a fox", steps=2, width=100, height=64)
        assert raised.value.request_id
        with pytest.raises(rf.JobNotFoundError) as raised:
            client.job("nope")
        assert (raised.value.code, raised.value.request_id) == (grpc.StatusCode.NOT_FOUND, None)
    with rf.Client(farm.address) as client, pytest.raises(rf.AuthenticationError) as raised:
        client.jobs()
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_the_async_clients_errors_carry_the_same(farm, token):
    async def submit():
        async with rf.AsyncClient(farm.address, token=token) as client:
            await client.sweep("a fox", steps=2, width=100, height=64, request_id="wire-conventions-2")

    with pytest.raises(rf.InvalidJobError) as raised:
        asyncio.run(submit())
    assert (raised.value.code, raised.value.field, raised.value.request_id) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        WIDTH,
        "wire-conventions-2",
    )
