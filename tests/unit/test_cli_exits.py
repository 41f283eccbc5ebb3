"""The CLI against a stand-in farm: which farm a command talks to, its documented exit codes and messages, and
--json (no Ray, no gRPC)."""

import dataclasses
import json

import numpy as np
import pytest

from renderfarm import cli
from renderfarm._wire import JobState, JobStatus, Result, StateChange
from renderfarm.errors import (
    AuthenticationError,
    CapacityError,
    FarmUnavailableError,
    InvalidJobError,
    JobNotFoundError,
    PermissionDeniedError,
    RenderfarmError,
)
from renderfarm.spec import ImageSpec

ADDRESS = "10.1.2.3:4567"
SPEC = ImageSpec("builtin:tiny-sd", "a fox", "", 0, 64, 64, 10, 7.5, "ddim")
STATUS = JobStatus("j1", JobState.RUNNING, 4, 1, "", 1700000000.5, priority=2, owner="ada")


class StandInFarm:
    """Stands in for renderfarm.Client and the Job it makes: records the addresses dialled; every call answers
    with STATUS, or raises `error`; the job's events are what `stream()` yields."""

    def __init__(self):
        self.addresses, self.error = [], None
        self.stream = lambda: iter(())
        self.id, self.total = STATUS.id, STATUS.total

    def client(self, address, **tls):
        self.addresses.append(address)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def _answer(self, value):
        if self.error is not None:
            raise self.error
        return value

    def jobs(self, owner=None):
        return self._answer([STATUS, dataclasses.replace(STATUS, id="j2", state=JobState.QUEUED)])

    def job(self, job_id):
        return self

    def status(self):
        return self._answer(STATUS)

    def cancel(self):
        return self._answer(dataclasses.replace(STATUS, state=JobState.CANCELLED))

    def events(self, images=True):
        return self.stream()

    def submit(self, *args, **kwargs):
        return self._answer(self)

    sweep = img2img = inpaint = upscale = decode = submit


@pytest.fixture
def farm(monkeypatch):
    farm = StandInFarm()
    monkeypatch.setattr(cli, "Client", farm.client)
    monkeypatch.delenv("RENDERFARM_ADDRESS", raising=False)
    return farm


def submitting(command: str, tmp_path) -> list[str]:
    """argv that submits a `command` job with results into tmp_path/out."""
    image = tmp_path / "in.png"
    image.write_bytes(b"an image")
    np.save(tmp_path / "latents.npy", np.zeros((1, 4, 8, 8), np.float32))
    inputs = {
        "sweep": ["--prompt", "a fox"],
        "img2img": [str(image), "--prompt", "a fox"],
        "inpaint": [str(image), "--mask", str(image), "--prompt", "a fox"],
        "upscale": [str(image)],
        "decode": [str(tmp_path / "latents.npy")],
    }
    return [command, *inputs[command], "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("command", cli.EMBEDDABLE)
def test_every_submitting_command_uses_renderfarm_address_and_names_it_when_unreachable(
    farm, monkeypatch, capsys, tmp_path, command
):
    monkeypatch.setenv("RENDERFARM_ADDRESS", ADDRESS)
    farm.error = FarmUnavailableError("failed to connect to all addresses; last error: UNKNOWN: ipv4:...")
    assert cli.main(submitting(command, tmp_path)) == cli.EXIT_UNREACHABLE == 3
    err = capsys.readouterr().err
    assert farm.addresses == [ADDRESS] and f"renderfarm: using the farm at {ADDRESS}\n" in err
    assert f"renderfarm: cannot reach the farm at {ADDRESS} (is it running? set --address or RENDERFARM_ADDRESS)" in err


def test_address_beats_renderfarm_address_and_other_commands_default_to_localhost(farm, monkeypatch, capsys):
    monkeypatch.setenv("RENDERFARM_ADDRESS", ADDRESS)
    assert cli.main(["status", "j1", "--address", "elsewhere:1"]) == 0
    monkeypatch.delenv("RENDERFARM_ADDRESS")
    assert cli.main(["jobs"]) == 0
    assert farm.addresses == ["elsewhere:1", "localhost:50051"]


def test_local_with_an_address_is_a_usage_error(farm, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["sweep", "--prompt", "a fox", "--out", "out", "--address", ADDRESS, "--local"])
    assert exited.value.code == cli.EXIT_USAGE == 2
    assert "argument --local: not allowed with argument --address" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (FarmUnavailableError("the farm did not answer within 30 s"), 3, f"cannot reach the farm at {ADDRESS}"),
        (AuthenticationError("wrong API token"), 3, f"the farm at {ADDRESS} refused the call: wrong API token"),
        (PermissionDeniedError("admins only"), 3, f"the farm at {ADDRESS} refused the call: admins only"),
        (InvalidJobError("sweep.width: must be a multiple of 8", field="sweep.width"), 4, "sweep.width"),
        (JobNotFoundError("no job 'j1'"), 4, "no job 'j1'"),
        (CapacityError("at most 2 jobs at once"), 5, "at most 2 jobs at once"),
        (RenderfarmError("FAILED_PRECONDITION: job_id: job j1 already ended succeeded"), 1, "already ended"),
    ],
)
def test_each_kind_of_error_has_its_documented_exit_code_and_one_message(farm, capsys, error, code, message):
    farm.error = error
    assert cli.main(["status", "j1", "--address", ADDRESS]) == code
    err = capsys.readouterr().err
    assert err.startswith("renderfarm: ") and message in err and "Traceback" not in err


def test_a_result_store_out_of_reach_is_not_called_the_farm(farm, capsys, tmp_path):
    farm.stream = lambda: iter([Result(SPEC, "a.png", url="http://127.0.0.1:1/a.png")])
    assert cli.main(["watch", "j1", "--address", ADDRESS, "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "could not fetch a.png from the result store" in err and "cannot reach the farm" not in err


def test_a_failed_job_exits_1(farm, capsys, tmp_path):
    farm.stream = lambda: iter([StateChange(JobState.FAILED, "the denoiser ran out of memory")])
    assert cli.main([*submitting("sweep", tmp_path), "--address", ADDRESS]) == cli.EXIT_JOB_FAILED == 1
    assert "renderfarm: job j1 failed: the denoiser ran out of memory" in capsys.readouterr().err


def test_an_interrupted_command_exits_130_naming_the_job_that_goes_on(farm, capsys, tmp_path):
    def interrupted():
        raise KeyboardInterrupt

    farm.stream = interrupted
    assert cli.main([*submitting("sweep", tmp_path), "--address", ADDRESS]) == cli.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert "`renderfarm cancel j1` stops it" in err and err.endswith("renderfarm: interrupted\n")


def test_json_prints_every_jobstatus_field(farm, capsys):
    every_field = {field.name for field in dataclasses.fields(JobStatus)}
    assert cli.main(["jobs", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # one object per line
    assert [job["id"] for job in listed] == ["j1", "j2"] and all(set(job) == every_field for job in listed)
    assert listed[0] == {
        "id": "j1", "state": "running", "total": 4, "completed": 1, "error": "",
        "created_at": 1700000000.5, "priority": 2, "owner": "ada",
    }  # fmt: skip
    for command, state in (("status", "running"), ("cancel", "cancelled"), ("watch", "running")):
        cli.main([command, "j1", "--json"])
        shown = json.loads(capsys.readouterr().out)
        assert set(shown) == every_field and shown["state"] == state
