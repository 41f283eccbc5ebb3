"""The CLI on a thin install (`pip install renderfarm`, no [cluster] extra): a command that needs a farm here
says which extra to install, in a line and a documented exit code, never a ModuleNotFoundError traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest

# What the cluster extra brings and a thin install lacks: importing any of them fails, as there.
CLUSTER_ONLY = ("ray", "torch", "diffusers", "transformers", "numpy")


def thin_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"for name in {CLUSTER_ONLY!r}: sys.modules[name] = None\n"
        "from renderfarm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    environment = {name: value for name, value in os.environ.items() if name != "RENDERFARM_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
    )


@pytest.fixture
def farm_toml(tmp_path):
    config = tmp_path / "farm.toml"
    config.write_text(f'output_dir = "{tmp_path}/o"\nmodel_cache_dir = "{tmp_path}/m"\nstate_dir = "{tmp_path}/s"\n')
    return config


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["sweep", "--prompt", "a fox", "--out", "{tmp}/out"], "running a farm here"),
        (["up", "--state-dir", "{tmp}/state", "--output-dir", "{tmp}/out"], "running a farm"),
        (["serve", "--config", "{tmp}/farm.toml"], "running a farm"),
        (["models", "path", "builtin:tiny-sd", "--model-cache-dir", "{tmp}/models"], "resolving a model reference"),
    ],
    ids=["sweep", "up", "serve", "models-path"],
)
def test_a_farm_command_names_the_extra_to_install(tmp_path, farm_toml, argv, what):
    ran = thin_cli(*(arg.format(tmp=tmp_path) for arg in argv))
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    assert f"renderfarm: {what} needs the cluster extra (no module " in ran.stderr
    assert ran.stderr.rstrip().endswith(
        "pip install 'renderfarm[cluster]' (or give --address of a running farm)"
        if argv[0] == "sweep"
        else "pip install 'renderfarm[cluster]'"
    )


def test_without_an_address_a_sweep_says_it_runs_a_farm_here(tmp_path):
    ran = thin_cli("sweep", "--prompt", "a fox", "--out", str(tmp_path))
    assert ran.stderr.startswith(
        "renderfarm: no farm address set (--address or RENDERFARM_ADDRESS): running a local farm for this command\n"
    )


def test_local_beats_renderfarm_address(tmp_path):
    ran = thin_cli("sweep", "--local", "--prompt", "a fox", "--out", str(tmp_path), env={"RENDERFARM_ADDRESS": "x:1"})
    assert ran.stderr.startswith("renderfarm: --local: running a local farm for this command\n")
    assert ran.returncode == 2 and "renderfarm: running a farm here needs the cluster extra" in ran.stderr


def test_decode_without_numpy_says_so(tmp_path):
    np.save(tmp_path / "latents.npy", np.zeros((1, 4, 8, 8), np.float32))
    ran = thin_cli("decode", str(tmp_path / "latents.npy"), "--out", str(tmp_path), "--address", "127.0.0.1:1")
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert (
        f"renderfarm: decode reads {tmp_path / 'latents.npy'} with numpy, which this install lacks: pip install numpy"
        in ran.stderr
    )
