"""Deadlines and keepalive of the SDK's channels, against a real socket that never answers."""

import asyncio
import socket
import time

import grpc
import pytest

import renderfarm as rf
from renderfarm._constants import CHANNEL_OPTIONS, KEEPALIVE_TIME_S
from renderfarm.cluster.constants import SERVER_OPTIONS


@pytest.fixture
def silent_address():
    """A port that accepts TCP connections and never speaks HTTP/2: a hung farm."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_a_first_call_to_a_farm_that_never_answers_ends_at_the_clients_deadline(silent_address):
    started = time.monotonic()
    with rf.Client(silent_address, timeout=0.5) as client, pytest.raises(rf.FarmTimeoutError) as raised:
        client.jobs()
    assert 0.5 <= time.monotonic() - started < 5
    assert f"cannot reach the farm at {silent_address}: no connection within 0.5 s" in str(raised.value)
    # Code that handles timeouts or lost farms generically catches it too.
    assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, rf.FarmUnavailableError)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_async_client_has_the_same_deadline(silent_address):
    async def call():
        async with rf.AsyncClient(silent_address, timeout=0.5) as client:
            await client.job("0123456789abcdef")

    with pytest.raises(rf.FarmTimeoutError, match=r"no connection within 0\.5 s"):
        asyncio.run(call())


def test_the_server_accepts_pings_as_often_as_the_sdk_sends_them():
    # A server that gets pings more often than it allows answers GOAWAY (too_many_pings), dropping every stream.
    client, server = dict(CHANNEL_OPTIONS), dict(SERVER_OPTIONS)
    assert client["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_S * 1000
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert client["grpc.keepalive_permit_without_calls"] <= server["grpc.keepalive_permit_without_calls"]
