"""The `renderfarm` command as a user runs it: real processes, a real `up` server."""

import json
import os
import re
import signal
import subprocess

import numpy as np
import pytest
import trustme
from PIL import Image

from renderfarm.grid import LAYOUT_CHUNK
from renderfarm.spec import read_spec
from tests.integration.processes import RENDERFARM, start_serving, stop

# The token `run` sends (as RENDERFARM_TOKEN), and the CA the farm's certificate is from.
SESSION = {}
ENV = {"RENDERFARM_TOKEN": "token", "RENDERFARM_TLS_CA": "ca"}


def run(*args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, **{name: SESSION[key] for name, key in ENV.items() if key in SESSION}}
    return subprocess.run([*RENDERFARM, *args], capture_output=True, text=True, timeout=300, check=check, env=env)


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
    swept = run("sweep", "--address", address, "--prompt", "a red fox", "--seeds", "0-2", "--steps", "2",
                "--width", "64", "--height", "48", "--out", str(out))  # fmt: skip
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
    assert refused.returncode == 2 and "already ended succeeded" in refused.stderr


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
    assert bad.returncode == 2 and "sweep.sizes[0].width" in bad.stderr
    missing = run("status", "no-such-job", "--address", address, check=False)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr
    assert run("jobs", "--address", address).returncode == 0


def test_the_tls_port_refuses_plaintext_and_an_unknown_token(served_farm, tmp_path):
    _, address, _ = served_farm
    plaintext = run("jobs", "--address", f"grpc://{address}", check=False)
    assert plaintext.returncode == 2 and "UNAVAILABLE" in plaintext.stderr
    SESSION["token"], token = "rf_not-a-token", SESSION["token"]
    try:
        refused = run("jobs", "--address", address, check=False)
    finally:
        SESSION["token"] = token
    assert refused.returncode == 2 and "wrong API token" in refused.stderr


def test_up_stops_gracefully_on_sigterm(served_farm):
    process, _, _ = served_farm
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_models_path_prints_the_diffusers_directory(model_cache_dir):
    printed = run("models", "path", "builtin:tiny-sd", "--model-cache-dir", str(model_cache_dir)).stdout.strip()
    assert (model_cache_dir / "builtin").is_dir() and os.path.isfile(os.path.join(printed, "model_index.json"))
