"""The `renderfarm` command as a user runs it: real processes, a real `up` server."""

import os
import re
import signal
import subprocess

import pytest
import trustme

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
        "up", "--port", "0", "--output-dir", str(output), "--model-cache-dir", str(model_cache_dir),
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
    assert "3/3" in swept.stderr and "images/s" in swept.stderr  # the progress bar
    assert sorted(read_spec(p).seed for p in out.glob("*.png")) == [0, 1, 2]
    assert (output / job_id / "manifest.jsonl").read_text().count("\n") == 3

    assert re.search(rf"{job_id}\s+succeeded\s+3/3\s+owner ops", run("jobs", "--address", address).stdout)
    assert job_id not in run("jobs", "--address", address, "--owner", "someone-else").stdout
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
