"""How errors travel: rpc.abort's google.rpc.Status (and the older renderfarm-field trailer) on a real grpc.aio
server on loopback, and the SDK exceptions _wire.translate makes of them."""

import asyncio
import threading

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import renderfarm as rf
from renderfarm import _wire
from renderfarm._constants import FIELD_METADATA_KEY
from renderfarm.cluster import rpc
from renderfarm.cluster.validate import invalid
from renderfarm.v1 import farm_pb2 as pb

FIELD, DESCRIPTION = "sweep.sizes[0].width", "must be a multiple of 8 (got 100)"
MESSAGE = f"{FIELD}: {DESCRIPTION}"


async def invalid_sweep(request: bytes, context):
    await rpc.abort_invalid(context, invalid(FIELD, DESCRIPTION))


LONG_VALUES = {"ascii": "x" * 20_000, "latin": "é" * 20_000, "emoji": "🦊" * 20_000}


async def long_value(request: bytes, context):
    """Refuses a 20,000-character value of the script the request names, echoing it."""
    await rpc.abort_invalid(
        context, invalid("sweep.schedulers[0]", f"is not a scheduler (got {LONG_VALUES[request.decode()]!r})")
    )


async def with_code(request: bytes, context):
    """Ends with the status code the request names, about no one field."""
    await rpc.abort(context, grpc.StatusCode[request.decode()], None, "the farm says no")


async def from_an_older_farm(request: bytes, context):
    """What farms sent before the Status details: the field in the trailer only."""
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MESSAGE, ((FIELD_METADATA_KEY, FIELD),))


async def disagreeing(request: bytes, context):
    """A BadRequest and a trailer that name different fields."""
    status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=MESSAGE)
    violation = error_details_pb2.BadRequest.FieldViolation(field=FIELD, description=DESCRIPTION)
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    sent = rpc_status.to_status(status)
    await context.abort(sent.code, sent.details, sent.trailing_metadata + ((FIELD_METADATA_KEY, "sweep.model"),))


HANDLERS = {
    handler.__name__: handler for handler in (invalid_sweep, long_value, with_code, from_an_older_farm, disagreeing)
}


@pytest.fixture(scope="module")
def channel():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        methods = {name: grpc.unary_unary_rpc_method_handler(handler) for name, handler in HANDLERS.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Errors", methods),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


def failed_call(channel, method: str, request: bytes = b"") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(f"/test.Errors/{method}")(request, timeout=10)
    return raised.value


def bad_request(status: status_pb2.Status) -> error_details_pb2.BadRequest:
    (detail,) = status.details
    found = error_details_pb2.BadRequest()
    assert detail.Unpack(found)
    return found


def test_an_invalid_argument_carries_a_status_whose_bad_request_names_the_field(channel):
    error = failed_call(channel, "invalid_sweep")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == MESSAGE
    status = rpc_status.from_call(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and status.message == MESSAGE
    (violation,) = bad_request(status).field_violations
    assert (violation.field, violation.description) == (FIELD, DESCRIPTION)
    # SDKs from before the Status read the field here.
    assert (FIELD_METADATA_KEY, FIELD) in error.trailing_metadata()


def test_the_sdk_error_has_the_field_the_code_and_the_submissions_request_id(channel):
    error = _wire.translate(failed_call(channel, "invalid_sweep"), request=pb.SubmitJobRequest(request_id="retry-7"))
    assert isinstance(error, rf.InvalidJobError) and str(error) == MESSAGE
    assert (error.field, error.code, error.request_id) == (FIELD, grpc.StatusCode.INVALID_ARGUMENT, "retry-7")
    # Calls other than a submission have no request id.
    lookup = _wire.translate(failed_call(channel, "invalid_sweep"), request=pb.GetJobRequest(job_id="x"))
    assert lookup.request_id is None


def test_the_sdk_takes_the_field_from_the_bad_request_over_the_trailer(channel):
    assert _wire.translate(failed_call(channel, "disagreeing")).field == FIELD


def test_the_sdk_reads_the_field_from_an_older_farms_trailer(channel):
    error = failed_call(channel, "from_an_older_farm")
    assert rpc_status.from_call(error) is None
    assert _wire.translate(error).field == FIELD


@pytest.mark.parametrize("script", LONG_VALUES)
def test_a_long_bad_value_in_any_script_is_cut_to_fit_grpcs_trailer_limit_and_still_names_its_field(channel, script):
    # Past 8 KiB of trailers a client answers RESOURCE_EXHAUSTED instead, and loses the field.
    error = failed_call(channel, "long_value", script.encode())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("sweep.schedulers[0]: is not a scheduler") and error.details().endswith(" [...]")
    (violation,) = bad_request(rpc_status.from_call(error)).field_violations
    assert violation.field == "sweep.schedulers[0]"


ERROR_TYPES = [
    (grpc.StatusCode.INVALID_ARGUMENT, rf.InvalidJobError),
    (grpc.StatusCode.ALREADY_EXISTS, rf.InvalidJobError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, rf.CapacityError),
    (grpc.StatusCode.NOT_FOUND, rf.JobNotFoundError),
    (grpc.StatusCode.UNAUTHENTICATED, rf.AuthenticationError),
    (grpc.StatusCode.PERMISSION_DENIED, rf.PermissionDeniedError),
    (grpc.StatusCode.UNAVAILABLE, rf.FarmUnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, rf.FarmTimeoutError),
    (grpc.StatusCode.FAILED_PRECONDITION, rf.RenderfarmError),
]


@pytest.mark.parametrize("code, error_type", ERROR_TYPES, ids=[code.name for code, _ in ERROR_TYPES])
def test_every_code_has_its_error_type_and_a_status_without_details(channel, code, error_type):
    call = failed_call(channel, "with_code", code.name.encode())
    status = rpc_status.from_call(call)
    assert (status.code, status.message, len(status.details)) == (code.value[0], "the farm says no", 0)
    error = _wire.translate(call)
    assert type(error) is error_type and error.code == code
    assert str(error) == (
        "the farm says no" if error_type is not rf.RenderfarmError else f"{code.name}: the farm says no"
    )


def test_an_argument_the_sdk_refuses_before_sending_has_its_types_code():
    with rf.Client("127.0.0.1:1") as client, pytest.raises(rf.InvalidJobError) as raised:
        client.sweep("a fox", seeds=[1.5])
    assert (raised.value.field, raised.value.code, raised.value.request_id) == (
        "seeds[0]",
        grpc.StatusCode.INVALID_ARGUMENT,
        None,
    )
