"""Servers the tests start in processes of their own."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def strict_s3_server():
    """An S3 API that checks credentials (moto authenticates every call when told to), in its own process;
    yields its endpoint URL. No keys exist in it, so every call is refused."""
    port = free_port()
    server = subprocess.Popen(
        [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()
