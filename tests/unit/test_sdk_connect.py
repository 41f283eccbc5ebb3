"""How the SDK reaches a farm: its address forms, waiting for a farm that is not up yet, and retrying calls
a restarting farm answers UNAVAILABLE. Against a stand-in RenderFarm service on loopback (real gRPC)."""

import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

import renderfarm as rf
from renderfarm._wire import channel_target
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1 import farm_pb2_grpc


class Restarting(farm_pb2_grpc.RenderFarmServicer):
    """Answers UNAVAILABLE to the first `failures` calls of each method, as a farm going down would."""

    def __init__(self, failures: int):
        self.failures, self.request_ids, self.calls = failures, [], 0

    def _answer(self, context, reply):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the scheduler is restarting")
        return reply

    def GetJob(self, request, context):
        return self._answer(context, pb.GetJobResponse(job=pb.Job(id=request.job_id, total=1)))

    def SubmitJob(self, request, context):
        self.request_ids.append(request.request_id)
        return self._answer(context, pb.SubmitJobResponse(job=pb.Job(id="job-1", total=1, sweep=request.sweep)))


class Slow(farm_pb2_grpc.RenderFarmServicer):
    """Connected, and slower to answer than the client waits: an overloaded farm."""

    def GetJob(self, request, context):
        time.sleep(2)
        return pb.GetJobResponse(job=pb.Job(id=request.job_id))


def _serve(servicer, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    farm_pb2_grpc.add_RenderFarmServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


@pytest.mark.parametrize(
    "address, dialled, tls",
    [
        ("farm", "farm:50051", False),
        ("farm:7000", "farm:7000", False),
        ("grpc://farm", "farm:50051", False),
        ("grpc://farm:7000/", "farm:7000", False),
        ("grpcs://farm", "farm:50051", True),
        ("10.0.0.7", "10.0.0.7:50051", False),
        ("[::1]", "[::1]:50051", False),
        ("[::1]:7000", "[::1]:7000", False),
        ("dns:///farm:7000", "dns:///farm:7000", False),  # gRPC's own names go as they are
        ("unix:///run/farm.sock", "unix:///run/farm.sock", False),
    ],
)
def test_an_address_without_a_port_dials_the_farms_port(address, dialled, tls):
    target, credentials = channel_target(address, tls=None, root_certificates=None, client_certificate=None,
                                         client_key=None)  # fmt: skip
    assert (target, credentials is not None) == (dialled, tls)


def test_a_call_answered_unavailable_is_retried_with_the_same_request_id():
    restarting = Restarting(failures=2)
    server, port = _serve(restarting)
    try:
        with rf.Client(f"127.0.0.1:{port}", timeout=30) as client:
            job = client.sweep("a red fox", request_id="resubmit-me")
        assert job.id == "job-1" and restarting.request_ids == ["resubmit-me"] * 3
    finally:
        server.stop(None)


def test_without_retries_the_first_unavailable_is_raised():
    restarting = Restarting(failures=1)
    server, port = _serve(restarting)
    try:
        with rf.Client(f"127.0.0.1:{port}", max_retries=0) as client, pytest.raises(rf.FarmUnavailableError):
            client.job("0123456789abcdef")
        assert restarting.calls == 1
    finally:
        server.stop(None)


@pytest.mark.parametrize("max_retries", [-1, 5, 1.5, True])
def test_max_retries_is_checked(max_retries):
    with pytest.raises(ValueError, match=r"max_retries: must be an integer in \[0, 4\]"):
        rf.Client("127.0.0.1:1", max_retries=max_retries)


def test_a_farm_that_comes_up_after_the_call_is_waited_for():
    with socket.socket() as probe:  # a free port, closed: nothing listens there yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    later: list[grpc.Server] = []
    starter = threading.Timer(1.0, lambda: later.append(_serve(Restarting(failures=0), port)[0]))
    starter.start()
    try:
        started = time.monotonic()
        with rf.Client(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.job("0123456789abcdef").id == "0123456789abcdef"
        assert time.monotonic() - started >= 1.0
    finally:
        starter.join()
        for server in later:
            server.stop(None)


def test_a_call_a_connected_farm_answers_too_late_ends_at_the_clients_deadline():
    server, port = _serve(Slow())
    try:
        with rf.Client(f"127.0.0.1:{port}", timeout=0.5) as client:
            with pytest.raises(rf.FarmTimeoutError, match=r"did not answer within 0\.5 s \(DEADLINE_EXCEEDED\)"):
                client.job("0123456789abcdef")
    finally:
        server.stop(None)


def test_a_first_call_waits_only_connect_timeout_for_a_farm_that_is_not_there():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with rf.Client(f"127.0.0.1:{port}", connect_timeout=0.5) as client, pytest.raises(rf.FarmTimeoutError) as raised:
        client.jobs()
    assert time.monotonic() - started < 5 and f"cannot reach the farm at 127.0.0.1:{port}" in str(raised.value)
