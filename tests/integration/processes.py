"""The `renderfarm` command in its own process, as a user runs it."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

# The console script a user runs, installed beside this interpreter.
RENDERFARM = [str(Path(sys.executable).parent / "renderfarm")]

# A farm's cold start: a local Ray, then a replica of each stage (the first builds tiny-sd).
START_TIMEOUT_S = 180


def start_serving(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Starts `renderfarm ARGS...` (up or serve) and waits for its "serving on" line; returns it and its address.

    RAY_ADDRESS is cleared so the farm starts its own local Ray, not the test session's.
    """
    process = subprocess.Popen(
        [*RENDERFARM, *args], stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": "", **(env or {})}
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(f"renderfarm {args[0]} exited with {process.returncode}")
        if match := re.search(r"renderfarm serving on (\S+)", line):
            return process, match.group(1)
    process.kill()
    raise RuntimeError(f"renderfarm {args[0]} did not start serving within {START_TIMEOUT_S} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
