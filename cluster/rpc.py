"""The service's gRPC method handlers: every call authenticated, then its request bytes parsed so that
malformed ones are INVALID_ARGUMENT.

grpc answers UNKNOWN when a deserializer raises, and protobuf rejects a whole
message for one string field that is not UTF-8 without saying which. Here the
handler receives the raw bytes; the parser hands bytes protobuf refuses on as an
UnparsableRequest, naming the field found by walking the wire format, and the
handler answers INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections import Counter

import grpc
from google.protobuf import unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from renderfarm._constants import FIELD_METADATA_KEY
from renderfarm.cluster.auth import Users
from renderfarm.cluster.validate import invalid
from renderfarm.errors import InvalidJobError
from renderfarm.v1 import farm_pb2 as pb

SERVICE_NAME = "renderfarm.v1.RenderFarm"

# Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
VARINT, I64, LEN, I32 = 0, 1, 2, 5


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, field: str, message: str) -> None:
    """Ends the call; the message names the field, and so does trailing metadata, for clients that branch on it."""
    context.set_trailing_metadata(((FIELD_METADATA_KEY, field),))
    await context.abort(code, message)


async def abort_invalid(context: grpc.aio.ServicerContext, error: InvalidJobError) -> None:
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, error.field or "", str(error))


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


def service_handler(servicer, users: Users) -> grpc.GenericRpcHandler:
    """The RenderFarm methods of `servicer`, read off the service descriptor so that none is left
    unguarded: each authenticates its caller first (UNAUTHENTICATED without a known token), then
    parses the request (INVALID_ARGUMENT if it cannot be), then runs `servicer.NAME(request,
    context, caller)`. Request bytes are parsed only for a caller who is known."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["RenderFarm"].methods:
        behaviour, parse = getattr(servicer, method.name), request_parser(getattr(pb, method.input_type.name))
        if method.server_streaming:
            make_handler, behaviour = grpc.unary_stream_rpc_method_handler, _checked_stream(behaviour, parse, users)
        else:
            make_handler, behaviour = grpc.unary_unary_rpc_method_handler, _checked_unary(behaviour, parse, users)
        handlers[method.name] = make_handler(
            behaviour, response_serializer=getattr(pb, method.output_type.name).SerializeToString
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


async def _admitted(data: bytes, context, parse, users: Users):
    """(the parsed request, the caller), or the call ends UNAUTHENTICATED or INVALID_ARGUMENT."""
    caller = users.authenticate(context.invocation_metadata())
    if caller is None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong API token: set RENDERFARM_TOKEN to a token this farm knows (or pass token=)",
        )
    request = parse(data)
    if isinstance(request, UnparsableRequest):
        await abort_invalid(context, request.error)
    return request, caller


def _checked_unary(behaviour, parse, users: Users):
    async def unary(data, context):
        request, caller = await _admitted(data, context, parse, users)
        return await behaviour(request, context, caller)

    return unary


def _checked_stream(behaviour, parse, users: Users):
    async def stream(data, context):
        request, caller = await _admitted(data, context, parse, users)
        async for response in behaviour(request, context, caller):
            yield response

    return stream
