"""The `renderfarm` command as a user runs it: real processes, a real `up` server."""

import dataclasses
import json
import os
import re
import signal
import subprocess

import numpy as np
import pytest
import trustme
from PIL import Image

from renderfarm._wire import JobStatus
from renderfarm.grid import LAYOUT_CHUNK
from renderfarm.spec import read_spec
from tests.integration.processes import RENDERFARM, start_serving, stop

# The token `run` sends (as RENDERFARM_TOKEN), and the CA the farm's certificate is from.
SESSION = {}
ENV = {"RENDERFARM_TOKEN": "token", "RENDERFARM_TLS_CA": "ca"}


def environment(**extra: str) -> dict:
    """The environment a user of the farm has: their token and the farm's CA, and no farm address unless given."""
    env = {name: value for name, value in os.environ.items() if name != "RENDERFARM_ADDRESS"}
    return {**env, **{name: SESSION[key] for name, key in ENV.items() if key in SESSION}, **extra}


def run(*args, check=True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RENDERFARM, *args], capture_output=True, text=True, timeout=300, check=check, env=environment(**(env or {}))
    )


@pytest.fixture(scope="module")
def served_farm(tmp_path_factory, model_cache_dir):
    """`renderfarm up` in its own process (it starts its own local Ray), on a free port, over TLS, with the
    users of a keys file that `renderfarm keys add` made: the CLI an operator and a user run, end to end."""
    directory = tmp_path_factory.mktemp("up")
    output, state, keys = directory / "output", directory / "state", directory / "keys.toml"
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1")
    certificate.cert_chain_pems[0].write_to_path(directory / "farm.crt")
    certificate.private_key_pem.write_to_path(directory / "farm.key")
    ca.cert_pem.write_to_path(directory / "ca.crt")
    SESSION["ca"] = str(directory / "ca.crt")
    SESSION["token"] = subprocess.run(
        [*RENDERFARM, "keys", "add", "ops", "--role", "admin", "--keys-file", str(keys)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    process, address = start_serving(
        "up", "--port", "0", "--metrics-port", "0", "--web-port", "0", "--output-dir", str(output), "--model-cache-dir", str(model_cache_dir),
        "--state-dir", str(state), "--keys-file", str(keys), "--tls-cert", str(directory / "farm.crt"),
        "--tls-key", str(directory / "farm.key"),
    )  # fmt: skip
    yield process, address, output
    stop(process)


def test_sweep_jobs_status_watch_against_a_running_farm(served_farm, tmp_path):
    _, address, output = served_farm
    out = tmp_path / "renders"
    # The farm from RENDERFARM_ADDRESS, as every command that talks to a farm takes it.
    swept = run("sweep", "--prompt", "a red fox", "--seeds", "0-2", "--steps", "2", "--width", "64", "--height", "48",
                "--out", str(out), env={"RENDERFARM_ADDRESS": address})  # fmt: skip
    assert swept.stderr.startswith(f"renderfarm: using the farm at {address}\n")
    job_id = re.search(r"job (\w+): 3 images", swept.stderr).group(1)
    # Progress: not a terminal, so plain lines, the last with every image done.
    assert "3/3 images" in swept.stderr and "images/s" in swept.stderr and "\r" not in swept.stderr
    assert sorted(read_spec(p).seed for p in out.glob("*.png")) == [0, 1, 2]
    assert (output / job_id / "manifest.jsonl").read_text().count("\n") == 3

    assert re.search(rf"{job_id}\s+succeeded\s+3/3\s+owner ops", run("jobs", "--address", address).stdout)
    assert job_id not in run("jobs", "--address", address, "--owner", "someone-else").stdout
    assert re.search(rf"{job_id}\s+succeeded\s+3/3", run("status", job_id, "--address", address).stdout)
    watched = tmp_path / "watched"
    run("watch", job_id, "--address", address, "--out", str(watched))
    assert sorted(p.name for p in watched.glob("*.png")) == sorted(p.name for p in out.glob("*.png"))
    followed = run("watch", job_id, "--address", address)  # progress alone, nothing saved
    assert "3/3 images" in followed.stderr and re.search(rf"{job_id}\s+succeeded", followed.stdout)

    refused = run("cancel", job_id, "--address", address, check=False)
    assert refused.returncode == 1 and "already ended succeeded" in refused.stderr


def test_a_rerun_into_the_same_out_lists_each_result_once(served_farm, tmp_path):
    _, address, _ = served_farm
    out = tmp_path / "renders"
    sweep = ("sweep", "--address", address, "--prompt", "a fox, twice", "--seeds", "0-2", "--steps", "2",
             "--width", "64", "--height", "48", "--out", str(out))  # fmt: skip
    run(*sweep)
    job_id = re.search(r"job (\w+): 3 images", run(*sweep).stderr).group(1)
    run("watch", job_id, "--address", address, "--out", str(out))
    names = [json.loads(line)["file"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(names) == sorted(p.name for p in out.glob("*.png")) and len(names) == 3


def test_jobs_and_status_print_every_field_as_json(served_farm, tmp_path):
    _, address, _ = served_farm
    swept = run("sweep", "--address", address, "--prompt", "a fox in JSON", "--steps", "2", "--width", "64",
                "--height", "48", "--priority", "3", "--out", str(tmp_path))  # fmt: skip
    job_id = re.search(r"job (\w+): 1 images", swept.stderr).group(1)
    every_field = {field.name for field in dataclasses.fields(JobStatus)}
    status = json.loads(run("status", job_id, "--address", address, "--json").stdout)
    assert set(status) == every_field
    assert (status["id"], status["state"], status["total"], status["completed"], status["error"]) == (job_id, "succeeded", 1, 1, "")
    assert (status["priority"], status["owner"]) == (3, "ops") and status["created_at"] > 0
    listed = [json.loads(line) for line in run("jobs", "--address", address, "--json").stdout.splitlines()]
    assert all(set(job) == every_field for job in listed) and status in listed


def test_an_interrupted_sweep_exits_130_and_its_job_goes_on_until_cancelled(served_farm, tmp_path):
    _, address, _ = served_farm
    sweep = subprocess.Popen(
        [*RENDERFARM, "sweep", "--address", address, "--prompt", "a long fox", "--seeds", "0-199", "--steps", "50",
         "--width", "64", "--height", "48", "--out", str(tmp_path)],
        stderr=subprocess.PIPE, text=True, env=environment(),
    )  # fmt: skip
    while not (submitted := re.search(r"job (\w+): 200 images", sweep.stderr.readline())):
        assert sweep.poll() is None, "the sweep ended before it submitted"
    job_id = submitted.group(1)
    sweep.send_signal(signal.SIGINT)
    rest = sweep.stderr.read()
    assert sweep.wait(timeout=60) == 130 and "Traceback" not in rest
    assert f"`renderfarm cancel {job_id}` stops it" in rest and rest.endswith("renderfarm: interrupted\n")
    assert json.loads(run("status", job_id, "--address", address, "--json").stdout)["state"] in ("queued", "running")

    run("cancel", job_id, "--address", address)  # a running batch finishes first: watch sees the job end
    watched = run("watch", job_id, "--address", address, check=False)
    assert watched.returncode == 1 and re.search(rf"{job_id}\s+cancelled", watched.stdout)


def test_grid_of_a_2x3_sweep_is_2_rows_of_3_labelled_cells_and_previews_are_saved(served_farm, tmp_path):
    _, address, _ = served_farm
    out, grid = tmp_path / "renders", tmp_path / "grid.png"
    swept = run("sweep", "--address", address, "--prompt", "a fox in a grid", "--seeds", "0-2", "--guidance", "1.5,7.5",
                "--steps", "4", "--scheduler", "ddim", "--width", "64", "--height", "48", "--preview-every", "2",
                "--out", str(out))  # fmt: skip
    job_id = re.search(r"job (\w+): 6 images", swept.stderr).group(1)
    assert re.search(r"6/6 images, [\d.]+ images/s, [\d.]+ steps/s", swept.stderr)  # the denoisers' steps counted
    # Previews at steps 2 and 4 of each image, one pixel per latent pixel.
    previews = sorted((out / "previews").glob("*.png"))
    assert len(previews) == 12 and {Image.open(p).size for p in previews} == {(8, 6)}

    made = run("grid", job_id, "--address", address, "--x", "seed", "--y", "guidance_scale", "--out", str(grid))
    assert f"{grid}: 2 x 3" in made.stderr
    results = {(spec.guidance_scale, spec.seed): path for path in out.glob("*.png") if (spec := read_spec(path))}
    with Image.open(grid) as sheet:
        layout, pixels = json.loads(sheet.text[LAYOUT_CHUNK]), np.asarray(sheet.convert("RGB"))
    assert (layout["rows"], layout["columns"], layout["cell"]) == ([1.5, 7.5], [0, 1, 2], [64, 48])
    (left, top), gap = layout["origin"], layout["gap"]
    assert pixels.shape == (top + 2 * (48 + gap), left + 3 * (64 + gap), 3)
    for row, guidance in enumerate(layout["rows"]):
        for column, seed in enumerate(layout["columns"]):
            x, y = left + column * (64 + gap), top + row * (48 + gap)
            assert np.array_equal(pixels[y : y + 48, x : x + 64], np.asarray(Image.open(results[guidance, seed])))
            assert (pixels[:top, x : x + 64].max(axis=2) < 100).any()  # the seed's label above its column
        assert (pixels[y : y + 48, : left - gap].max(axis=2) < 100).any()  # the guidance's label beside its row
    # The same sheet from the folder of results, with no farm.
    run("grid", str(out), "--x", "seed", "--y", "guidance_scale", "--out", str(tmp_path / "from-folder.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "from-folder.png").convert("RGB")), pixels)

    bad = run("grid", job_id, "--address", address, "--x", "sed", "--out", str(grid), check=False)
    assert bad.returncode == 2 and "x: 'sed' is not a field of these results' specs" in bad.stderr


def test_bad_sweep_names_the_field_and_the_farm_keeps_serving(served_farm, tmp_path):
    _, address, _ = served_farm
    bad = run("sweep", "--address", address, "--prompt", "x", "--width", "100", "--height", "64",
              "--out", str(tmp_path), check=False)  # fmt: skip
    assert bad.returncode == 4 and "sweep.sizes[0].width" in bad.stderr
    missing = run("status", "no-such-job", "--address", address, check=False)
    assert missing.returncode == 4 and "no job 'no-such-job'" in missing.stderr
    assert run("jobs", "--address", address).returncode == 0


def test_the_tls_port_refuses_plaintext_and_an_unknown_token(served_farm, tmp_path):
    _, address, _ = served_farm
    plaintext = run("jobs", "--address", f"grpc://{address}", check=False)
    assert plaintext.returncode == 3
    assert plaintext.stderr.startswith(f"renderfarm: cannot reach the farm at grpc://{address} (is it running?")
    SESSION["token"], token = "rf_not-a-token", SESSION["token"]
    try:
        refused = run("jobs", "--address", address, check=False)
    finally:
        SESSION["token"] = token
    assert refused.returncode == 3
    assert f"renderfarm: the farm at {address} refused the call:" in refused.stderr and "wrong API token" in refused.stderr


def test_up_stops_gracefully_on_sigterm(served_farm):
    process, _, _ = served_farm
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_a_sweep_to_an_unreachable_renderfarm_address_names_it_and_starts_no_farm(tmp_path):
    unreachable = run("sweep", "--prompt", "a fox", "--out", str(tmp_path), check=False,
                      env={"RENDERFARM_ADDRESS": "127.0.0.1:1"})  # fmt: skip
    assert unreachable.returncode == 3 and "Traceback" not in unreachable.stderr
    assert unreachable.stderr.startswith(
        "renderfarm: using the farm at 127.0.0.1:1\n"
        "renderfarm: cannot reach the farm at 127.0.0.1:1 (is it running? set --address or RENDERFARM_ADDRESS)\n"
    )


def test_models_path_prints_the_diffusers_directory(model_cache_dir):
    printed = run("models", "path", "builtin:tiny-sd", "--model-cache-dir", str(model_cache_dir)).stdout.strip()
    assert (model_cache_dir / "builtin").is_dir() and os.path.isfile(os.path.join(printed, "model_index.json"))
