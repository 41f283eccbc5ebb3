"""The service's gRPC method handlers: every call authenticated from its metadata before its request is
read (CallerGuard), then its request bytes parsed so that malformed ones are INVALID_ARGUMENT; how every
error is sent (abort).

grpc answers UNKNOWN when a deserializer raises, and protobuf rejects a whole
message for one string field that is not UTF-8 without saying which. Here the
handler receives the raw bytes; the parser hands bytes protobuf refuses on as an
UnparsableRequest, naming the field found by walking the wire format, and the
handler answers INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import partial
from typing import NoReturn

import grpc
from google.protobuf import unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health
from grpc_status import rpc_status

from renderfarm._constants import FIELD_METADATA_KEY
from renderfarm.cluster.auth import Users
from renderfarm.cluster.constants import MAX_ERROR_MESSAGE_WIRE_BYTES
from renderfarm.cluster.keys import User
from renderfarm.cluster.validate import invalid
from renderfarm.errors import InvalidJobError
from renderfarm.v1 import farm_pb2 as pb

SERVICE_NAME = "renderfarm.v1.RenderFarm"

# Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
VARINT, I64, LEN, I32 = 0, 1, 2, 5


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    field: str | None,
    message: str,
    *,
    details: Iterable[Message] = (),
) -> NoReturn:
    """Ends the call with `code` and `message`, and the same as a google.rpc.Status (the grpc-status-details-bin
    trailer, which generic gRPC tools decode) whose details are a google.rpc.BadRequest naming `field`, the
    request field at fault, if there is one (None: the error is about no one field), then `details`. The
    message of an error about a field starts "FIELD: "; the violation's description is the rest. A message too
    long for gRPC's trailer limit is cut, marked " [...]".

    `field` goes in the renderfarm-field trailer too: SDKs from before the Status read it there."""
    message = _fitting(message, copies_in_status=1 if field is None else 2)
    status = status_pb2.Status(code=code.value[0], message=message)
    if field is not None:
        description = message.removeprefix(f"{field}: ")
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    for detail in details:
        status.details.add().Pack(detail)
    sent = rpc_status.to_status(status)
    field_trailer = ((FIELD_METADATA_KEY, field),) if field is not None else ()
    await context.abort(sent.code, sent.details, sent.trailing_metadata + field_trailer)


def _fitting(message: str, copies_in_status: int) -> str:
    """`message`, cut where its copies on the wire would pass MAX_ERROR_MESSAGE_WIRE_BYTES: grpc-message
    percent-encodes every byte but printable ASCII, and the Status travels base64."""
    spent = 0.0
    for index, char in enumerate(message):
        utf8 = char.encode()
        spent += sum(1 if 0x20 <= byte < 0x7F and byte != ord("%") else 3 for byte in utf8)
        spent += copies_in_status * len(utf8) * 4 / 3
        if spent > MAX_ERROR_MESSAGE_WIRE_BYTES:
            return message[:index] + " [...]"
    return message


async def abort_invalid(context: grpc.aio.ServicerContext, error: InvalidJobError) -> NoReturn:
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, error.field, str(error))


async def abort_unauthenticated(context: grpc.aio.ServicerContext) -> NoReturn:
    await abort(
        context,
        grpc.StatusCode.UNAUTHENTICATED,
        None,
        "missing or wrong API token: set RENDERFARM_TOKEN to a token this farm knows (or pass token=)",
    )


class UnparsableRequest:
    """Request bytes that protobuf refused, with the error to answer them with."""

    def __init__(self, error: InvalidJobError):
        self.error = error


def request_parser(message_class):
    def parse(data: bytes):
        try:
            message = message_class.FromString(data)
        except DecodeError as error:
            if field := bad_utf8_field(message_class.DESCRIPTOR, data):
                return UnparsableRequest(invalid(field, "is not valid UTF-8"))
            return UnparsableRequest(invalid("request", f"is not a {message_class.DESCRIPTOR.full_name} ({error})"))
        if error := stray_field(message):
            return UnparsableRequest(error)
        return message

    return parse


WIRE_TYPE_NAMES = {VARINT: "an integer", I64: "a 64-bit number", LEN: "a length-delimited value", I32: "a 32-bit number"}


def stray_field(message, prefix: str = "") -> InvalidJobError | None:
    """The first field protobuf kept aside as unknown: one of another wire type than the field's (seeds sent as
    doubles), which protobuf drops silently and the job would render with defaults instead, or a field number this
    farm does not know."""
    for unknown in unknown_fields.UnknownFieldSet(message):
        field = message.DESCRIPTOR.fields_by_number.get(unknown.field_number)
        sent = WIRE_TYPE_NAMES.get(unknown.wire_type, f"wire type {unknown.wire_type}")
        if field is not None:
            return invalid(prefix + field.name, f"was sent as {sent}, which a field of its type never is")
        return invalid(
            prefix.rstrip(".") or "request",
            f"holds field number {unknown.field_number} ({sent}), which {message.DESCRIPTOR.full_name} does not have",
        )
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        for index, element in enumerate(value) if field.is_repeated else [(None, value)]:
            path = f"{prefix}{field.name}" + ("" if index is None else f"[{index}]")
            if error := stray_field(element, path + "."):
                return error
    return None


def bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path of the first string field of `data` that is not UTF-8, e.g. "sweep.prompts[1]"; None if none is."""
    elements: Counter[int] = Counter()
    position = 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == VARINT:
                _, position = _varint(data, position)
            elif wire_type == I64:
                position += 8
            elif wire_type == I32:
                position += 4
            elif wire_type == LEN:
                length, position = _varint(data, position)
                value, position = data[position : position + length], position + length
                field = descriptor.fields_by_number.get(number)
                if field is None or field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
                    continue  # bytes, packed numbers, or a field this server does not know
                path = prefix + field.name
                if field.is_repeated:
                    path += f"[{elements[number]}]"
                    elements[number] += 1
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    if found := bad_utf8_field(field.message_type, value, path + "."):
                        return found
                elif not _is_utf8(value):
                    return path
            else:
                return None  # groups are not proto3: these bytes are not a message of ours
    except IndexError:
        return None  # truncated: the fault is not one field's
    return None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def service_handler(servicer) -> grpc.GenericRpcHandler:
    """The RenderFarm methods of `servicer`, read off the service descriptor so that none is left out: each
    parses the request (INVALID_ARGUMENT if it cannot be), then runs `servicer.NAME(request, context, caller)`.
    Their behaviours take the caller as a third argument, which CallerGuard gives them: served without the
    guard, a call fails instead of running for nobody."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["RenderFarm"].methods:
        behaviour, parse = getattr(servicer, method.name), request_parser(getattr(pb, method.input_type.name))
        if method.server_streaming:
            make_handler, behaviour = grpc.unary_stream_rpc_method_handler, _parsing_stream(behaviour, parse)
        else:
            make_handler, behaviour = grpc.unary_unary_rpc_method_handler, _parsing_unary(behaviour, parse)
        handlers[method.name] = make_handler(
            behaviour, response_serializer=getattr(pb, method.output_type.name).SerializeToString
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


async def _parsed(data: bytes, context, parse):
    """The parsed request, or the call ends INVALID_ARGUMENT."""
    request = parse(data)
    if isinstance(request, UnparsableRequest):
        await abort_invalid(context, request.error)
    return request


def _parsing_unary(behaviour, parse):
    async def unary(data, context, caller: User):
        return await behaviour(await _parsed(data, context, parse), context, caller)

    return unary


def _parsing_stream(behaviour, parse):
    async def stream(data, context, caller: User):
        async for response in behaviour(await _parsed(data, context, parse), context, caller):
            yield response

    return stream


class CallerGuard(grpc.aio.ServerInterceptor):
    """Who may call: every call but the health service's (probes carry no token) needs a token the farm
    knows, reflection's too (the service list and schema are the API's, and grpc_reflection checks no token).
    The token is checked from the call's metadata, before its request is read, so a stranger cannot make the
    farm take in a request; the RenderFarm methods are given the caller."""

    def __init__(self, users: Users):
        self._users = users

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(f"/{health.SERVICE_NAME}/"):
            return await continuation(handler_call_details)
        caller = self._users.authenticate(handler_call_details.invocation_metadata)
        if caller is None:
            return REFUSED
        handler = await continuation(handler_call_details)
        if handler is not None and method.startswith(f"/{SERVICE_NAME}/"):
            return _with_caller(handler, caller)
        return handler


def _with_caller(handler: grpc.RpcMethodHandler, caller: User) -> grpc.RpcMethodHandler:
    """A service_handler handler whose behaviour is given `caller`."""
    if handler.response_streaming:
        make_handler, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        make_handler, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    return make_handler(
        partial(behaviour, caller=caller),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _refused(requests, context) -> NoReturn:
    await abort_unauthenticated(context)


# A stream-request handler, whatever the method: grpc reads a unary request whole before its behaviour runs,
# a stream's messages only as the behaviour asks, and this one never does. The client sees the same status.
REFUSED = grpc.stream_stream_rpc_method_handler(_refused)
