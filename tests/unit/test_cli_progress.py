"""The CLI's progress: images done counting running batches' steps, rate and ETA; a tqdm bar on a terminal,
plain lines in a log."""

import io

import pytest

from renderfarm import cli
from renderfarm._wire import Progress, Result, StepProgress
from renderfarm.spec import ImageSpec

SPEC = ImageSpec("builtin:tiny-sd", "a fox", "", 0, 64, 64, 10, 7.5, "ddim")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _events():
    yield Progress(0, 4)
    yield StepProgress(5, 10, ("a.png", "b.png"))  # two images half done
    yield StepProgress(10, 10, ("a.png", "b.png"))
    yield Result(SPEC, "a.png")
    yield Result(SPEC, "b.png")
    yield Progress(2, 4)
    yield StepProgress(2, 10, ("c.png", "d.png"))


def test_running_steps_count_towards_the_images_done_with_rate_and_eta(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(cli.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(cli, "PLAIN_LINE_EVERY_S", 1e9)
    log = io.StringIO()
    progress = cli.JobProgress(4, stream=log)  # started at t=0
    for event in _events():
        progress.on_event(event)
    # At t=8: 2 images done and 2 at step 2 of 10 (2.4 images' worth), 24 image-steps.
    assert progress.line() == "2/4 images, step 2/10, 0.30 images/s, 3.0 steps/s, ETA 00:05"
    assert log.getvalue() == ""  # no line is due yet


def test_a_log_gets_plain_lines_and_a_terminal_a_bar(monkeypatch):
    monkeypatch.setattr(cli, "PLAIN_LINE_EVERY_S", 0.0)
    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        progress = cli.JobProgress(4, stream=stream)
        for event in _events():
            progress.on_event(event)
        progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 8  # one per event (none is due sooner), and the last
    assert [line.split(",")[0] for line in lines] == ["0/4 images"] * 3 + ["1/4 images"] + ["2/4 images"] * 4
    assert ", step " in lines[3] and ", step " not in lines[4]  # no step once no image is running
    assert lines[-1].startswith("2/4 images, step 2/10")
    assert "\r" in terminal.getvalue() and "2/4 images, step 2/10" in terminal.getvalue()


@pytest.mark.parametrize("restart", [1, 3])
def test_a_retried_batch_counts_its_steps_again_from_the_start(monkeypatch, restart):
    clock = iter([0.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock, 1.0))  # 1 s after the start, from then on
    monkeypatch.setattr(cli, "PLAIN_LINE_EVERY_S", 1e9)
    progress = cli.JobProgress(1, stream=io.StringIO())
    for step in (4, restart):
        progress.on_event(StepProgress(step, 10, ("a.png",)))
    assert progress.line().startswith(
        f"0/1 images, step {restart}/10, {restart / 10:.2f} images/s, {4 + restart:.1f} steps/s"
    )
