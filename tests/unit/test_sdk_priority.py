"""Job priorities on the client side: the request builders, JobStatus, the clients and the CLI (no farm)."""

import asyncio
from concurrent import futures

import grpc
import pytest

import renderfarm as rf
from renderfarm import _wire
from renderfarm.cli import _print_status, build_parser
from renderfarm.errors import InvalidJobError
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1 import farm_pb2_grpc

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def sweep(**overrides):
    arguments = dict(
        prompts="a red fox", seeds=0, guidance_scale=None, steps=None, width=None, height=None,
        negative_prompt="", scheduler=None, model="builtin:tiny-sd", request_id=None,
    )  # fmt: skip
    return _wire.sweep_request(**{**arguments, **overrides})


def upscale(**overrides):
    arguments = dict(
        prompt="", negative_prompt="", noise_level=None, steps=None, guidance_scale=None, seed=0,
        model="builtin:tiny-sd-x4-upscaler", tile=None, request_id=None,
    )  # fmt: skip
    return _wire.upscale_request(b"an encoded image", **{**arguments, **overrides})


def decode(**overrides):
    arguments = dict(model="builtin:tiny-sd", tile=None, overlap=None, request_id=None)
    return _wire.decode_request([[[[0.0, 1.0], [2.0, 3.0]]]], **{**arguments, **overrides})


BUILDERS = pytest.mark.parametrize("build", [sweep, upscale, decode], ids=["sweep", "upscale", "decode"])


@BUILDERS
def test_the_default_priority_is_zero(build):
    assert build().priority == 0


@BUILDERS
@pytest.mark.parametrize("priority", [3, -2, 0, INT32_MIN, INT32_MAX])
def test_the_priority_goes_into_the_request(build, priority):
    request = build(priority=priority)
    assert request.priority == priority
    assert request.WhichOneof("kind") == build.__name__  # next to the job, not inside its spec


@BUILDERS
@pytest.mark.parametrize("priority", [1.5, True, False, 2**31, INT32_MIN - 1, "3", None])
def test_a_priority_that_is_not_an_int32_is_refused_before_sending(build, priority):
    with pytest.raises(InvalidJobError) as raised:
        build(priority=priority)
    assert raised.value.field == "priority"
    assert str(raised.value) == f"priority: must be an integer in [{INT32_MIN}, {INT32_MAX}] (got {priority!r})"


def test_the_message_names_the_range_and_the_value():
    message = r"^priority: must be an integer in \[-2147483648, 2147483647\] \(got 1\.5\)$"
    with pytest.raises(InvalidJobError, match=message):
        sweep(priority=1.5)


def test_job_status_carries_the_jobs_priority():
    job = pb.Job(id="j1", state=pb.JOB_STATE_QUEUED, total=4, priority=7)
    assert _wire.job_status(job).priority == 7
    assert _wire.job_status(pb.Job(id="j2", state=pb.JOB_STATE_RUNNING, priority=-3)).priority == -3
    assert _wire.job_status(pb.Job(id="j3", state=pb.JOB_STATE_QUEUED)).priority == 0


class Recording(farm_pb2_grpc.RenderFarmServicer):
    """A stand-in farm on loopback: records each submitted request, answers with a job."""

    def __init__(self):
        self.requests = []

    def SubmitJob(self, request, context):
        self.requests.append(request)
        return pb.SubmitJobResponse(job=pb.Job(id="j1", state=pb.JOB_STATE_QUEUED, total=1))


@pytest.fixture
def recording():
    servicer, server = Recording(), grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    farm_pb2_grpc.add_RenderFarmServicer_to_server(servicer, server)
    servicer.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield servicer
    server.stop(None)


def submit_all(client) -> list:
    return [
        client.sweep("a red fox", priority=3),
        client.upscale(b"an encoded image", priority=-2),
        client.decode([[[[0.0]]]], priority=5),
        client.sweep("a lighthouse"),
    ]


def test_client_passes_the_priority_through(recording):
    with rf.Client(recording.address) as client:
        submit_all(client)
        with pytest.raises(InvalidJobError):
            client.upscale(b"an encoded image", priority=2**31)
    assert [r.priority for r in recording.requests] == [3, -2, 5, 0]


def test_async_client_passes_the_priority_through(recording):
    async def run():
        async with rf.AsyncClient(recording.address) as client:
            for submission in submit_all(client):
                await submission
            with pytest.raises(InvalidJobError):
                await client.decode([[[[0.0]]]], priority=True)

    asyncio.run(run())
    assert [r.priority for r in recording.requests] == [3, -2, 5, 0]


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "--prompt", "a fox", "--out", "renders"],
        ["upscale", "in.png", "--out", "renders"],
        ["decode", "latents.npy", "--out", "renders"],
    ],
    ids=["sweep", "upscale", "decode"],
)
def test_the_cli_takes_a_priority(argv):
    parser = build_parser()
    assert parser.parse_args(argv).priority == 0
    assert parser.parse_args([*argv, "--priority", "2"]).priority == 2
    assert parser.parse_args([*argv, "--priority", "-1"]).priority == -1
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--priority", "1.5"])


def test_the_cli_prints_a_jobs_priority(capsys):
    _print_status(_wire.job_status(pb.Job(id="j1", state=pb.JOB_STATE_QUEUED, total=4, priority=2)))
    assert "priority 2" in capsys.readouterr().out
