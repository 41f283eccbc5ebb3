"""The API token check: a server interceptor, so the servicer never sees an unauthenticated call."""

from __future__ import annotations

import hmac

import grpc

from renderfarm._wire import metadata

# The handler factory for each (request streaming, response streaming) kind of RPC.
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Fails calls to `service` that lack the SDK's `authorization: Bearer TOKEN` with UNAUTHENTICATED.

    Other services (the health service that Kubernetes probes) stay open.
    """

    def __init__(self, token: str, service: str):
        # The SDK builds the header; checking against its own spelling keeps the two in step.
        ((self._key, expected),) = metadata(token)
        self._expected = expected.encode()
        self._prefix = f"/{service}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(self._key, "")
        # Constant time, so the token cannot be guessed byte by byte from response times.
        if hmac.compare_digest(sent.encode(), self._expected):
            return handler
        factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
        return factory(
            _refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _refuse(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API token: set RENDERFARM_TOKEN")
