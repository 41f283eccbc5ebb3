"""`renderfarm serve --config farm.toml` as a user runs it, with an API token in its environment."""

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import renderfarm as rf
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1.farm_pb2_grpc import RenderFarmStub
from tests.integration.processes import start_serving, stop

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_cache_dir):
    """A scheduler from a farm.toml with no ray_address (so it starts its own local Ray), token required."""
    directory = tmp_path_factory.mktemp("serve")
    config = directory / "farm.toml"
    config.write_text(
        f'output_dir = "{directory / "output"}"\n'
        f'model_cache_dir = "{model_cache_dir}"\n'
        f'state_dir = "{directory / "state"}"\n'
        "port = 0\nmetrics_port = 0\nweb_port = 0\nmax_batch = 2\n"
    )
    process, address = start_serving("serve", "--config", str(config), env={"RENDERFARM_TOKEN": TOKEN})
    yield process, address, directory / "output"
    stop(process)


@pytest.fixture(autouse=True)
def no_token_from_the_environment(monkeypatch):
    """The SDK would send $RENDERFARM_TOKEN; each test says which token it sends."""
    monkeypatch.delenv("RENDERFARM_TOKEN", raising=False)


def test_health_answers_serving_without_a_token(served):
    _, address, _ = served
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "renderfarm.v1.RenderFarm"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
def test_calls_without_the_right_token_are_unauthenticated(served, token):
    _, address, _ = served
    with rf.Client(address, token=token) as client, pytest.raises(rf.AuthenticationError, match="wrong API token"):
        client.jobs()
    # A streaming call is refused too, before the servicer could say NOT_FOUND.
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        list(RenderFarmStub(channel).StreamJobEvents(pb.StreamJobEventsRequest(job_id="nope"), metadata=metadata))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_sweep_with_the_token_renders(served):
    _, address, output = served
    with rf.Client(address, token=TOKEN) as client:
        job = client.sweep("a red fox", seeds=[3], steps=1, width=64, height=64)
        (result,) = list(job.results())
        assert result.image.size == (64, 64) and result.spec.seed == 3
        # RENDERFARM_TOKEN is the token of an admin named admin.
        assert [(status.id, status.owner) for status in client.jobs()] == [(job.id, "admin")]
    assert (output / job.id / result.name).is_file()


def test_serve_stops_gracefully_on_sigterm(served):
    process, _, _ = served
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
