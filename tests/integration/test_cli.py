"""The `renderfarm` command as a user runs it: real processes, a real `up` server."""

import os
import re
import signal
import subprocess

import pytest

from renderfarm.spec import read_spec
from tests.integration.processes import RENDERFARM, start_serving, stop


def run(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([*RENDERFARM, *args], capture_output=True, text=True, timeout=300, check=check)


@pytest.fixture(scope="module")
def served_farm(tmp_path_factory, model_cache_dir):
    """`renderfarm up` in its own process (it starts its own local Ray), on a free port."""
    output, state = tmp_path_factory.mktemp("up-output"), tmp_path_factory.mktemp("up-state")
    process, address = start_serving(
        "up", "--port", "0", "--output-dir", str(output), "--model-cache-dir", str(model_cache_dir), "--state-dir", str(state)
    )
    yield process, address, output
    stop(process)


def test_sweep_jobs_status_watch_against_a_running_farm(served_farm, tmp_path):
    _, address, output = served_farm
    out = tmp_path / "renders"
    swept = run("sweep", "--address", address, "--prompt", "a red fox", "--seeds", "0-2", "--steps", "2",
                "--width", "64", "--height", "48", "--out", str(out))  # fmt: skip
    job_id = re.search(r"job (\w+): 3 images", swept.stderr).group(1)
    assert "3/3" in swept.stderr and "images/s" in swept.stderr  # the progress bar
    assert sorted(read_spec(p).seed for p in out.glob("*.png")) == [0, 1, 2]
    assert (output / job_id / "manifest.jsonl").read_text().count("\n") == 3

    assert re.search(rf"{job_id}\s+succeeded\s+3/3", run("jobs", "--address", address).stdout)
    assert re.search(rf"{job_id}\s+succeeded\s+3/3", run("status", job_id, "--address", address).stdout)
    watched = tmp_path / "watched"
    run("watch", job_id, "--address", address, "--out", str(watched))
    assert sorted(p.name for p in watched.glob("*.png")) == sorted(p.name for p in out.glob("*.png"))

    refused = run("cancel", job_id, "--address", address, check=False)
    assert refused.returncode == 2 and "already ended succeeded" in refused.stderr


def test_bad_sweep_names_the_field_and_the_farm_keeps_serving(served_farm, tmp_path):
    _, address, _ = served_farm
    bad = run("sweep", "--address", address, "--prompt", "x", "--width", "100", "--height", "64",
              "--out", str(tmp_path), check=False)  # fmt: skip
    assert bad.returncode == 2 and "sweep.sizes[0].width" in bad.stderr
    missing = run("status", "no-such-job", "--address", address, check=False)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr
    assert run("jobs", "--address", address).returncode == 0


def test_up_stops_gracefully_on_sigterm(served_farm):
    process, _, _ = served_farm
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_models_path_prints_the_diffusers_directory(model_cache_dir):
    printed = run("models", "path", "builtin:tiny-sd", "--model-cache-dir", str(model_cache_dir)).stdout.strip()
    assert (model_cache_dir / "builtin").is_dir() and os.path.isfile(os.path.join(printed, "model_index.json"))
