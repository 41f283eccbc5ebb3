"""What a denoiser reports while a batch runs, and how the scheduler hands it to each job's watchers."""

import asyncio
import io

import PIL.Image
import torch

from renderfarm.actors import previews
from renderfarm.actors.previews import Reporter, StepReport, Watch
from renderfarm.actors.txt2img import SD_PIPELINE, SDXL_PIPELINE, Step
from renderfarm.cluster.constants import LIVE_EVENTS_PER_LISTENER, STEP_REPORT_INTERVAL_S
from renderfarm.cluster.live import LiveEvents
from renderfarm.cluster.scheduler import Item
from renderfarm.spec import ImageSpec


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _step(index: int, count: int = 6, items: int = 3) -> Step:
    latents = torch.zeros(items, 4, 2, 3)
    return Step(index, count, latents, latents)


def _reports(watch: Watch | None, seconds_a_step: float, count: int = 6) -> list[StepReport]:
    clock = Clock()
    reporter = Reporter(watch, SD_PIPELINE, clock)
    reports = []
    for index in range(1, count + 1):
        clock.now += seconds_a_step
        if (report := reporter.at(_step(index, count))) is not None:
            reports.append(report)
    return reports


def test_previews_are_made_every_n_steps_for_the_items_that_asked():
    reports = _reports(Watch(preview_every=(2, 0, 3), timed=False), seconds_a_step=10.0)
    assert [(r.step, sorted(r.previews)) for r in reports] == [(2, [0]), (3, [2]), (4, [0]), (6, [0, 2])]
    assert not any(r.timed for r in reports)


def test_timed_reports_come_at_most_once_an_interval():
    fast = _reports(Watch(preview_every=(0, 0, 0), timed=True), seconds_a_step=STEP_REPORT_INTERVAL_S / 2)
    assert [r.step for r in fast] == [2, 4, 6] and all(r.timed and not r.previews for r in fast)
    slow = _reports(Watch(preview_every=(0, 0, 0), timed=True), seconds_a_step=STEP_REPORT_INTERVAL_S)
    assert [r.step for r in slow] == [1, 2, 3, 4, 5, 6]


def test_an_unwatched_batch_reports_nothing():
    assert _reports(None, seconds_a_step=10.0) == []


def test_a_preview_is_the_latents_through_the_linear_map_one_pixel_per_latent_pixel():
    latents = torch.zeros(4, 2, 3)
    latents[0] = 1.0  # the first channel alone: its row of the map, (x + 1) / 2 in 0..255
    with PIL.Image.open(io.BytesIO(previews.preview_png(latents, previews.latent_rgb(SD_PIPELINE)))) as image:
        assert image.size == (3, 2) and image.mode == "RGB"
        expected = tuple(round((factor + 1) / 2 * 255) for factor in previews.SD_LATENT_RGB[0])
        assert set(image.getdata()) == {expected}
    assert previews.latent_rgb(SDXL_PIPELINE).equal(torch.tensor(previews.SDXL_LATENT_RGB))


def _items(*jobs: str) -> list[Item]:
    def spec(n: int, job: str) -> ImageSpec:
        return ImageSpec(model="m", prompt=job, negative_prompt="", seed=n, width=64, height=64, steps=6,
                         guidance_scale=7.5, scheduler="ddim")  # fmt: skip

    return [Item(job, spec(n, job), "m", "key") for n, job in enumerate(jobs)]


def _drain(queue: asyncio.Queue) -> list:
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


def test_each_watching_job_hears_its_own_steps_and_previews():
    async def run():
        live, items = LiveEvents(), _items("previewed", "plain", "plain", "unwatched")
        every = {"previewed": 2, "plain": 0, "unwatched": 0}.get
        with live.listen("previewed") as previewed, live.listen("plain") as plain:
            watch = live.watch(items, every)
            # Previews for the watched job that asked; timed reports for the one that did not.
            assert watch == Watch(preview_every=(2, 0, 0, 0), timed=True)
            live.report(items, StepReport(1, 6, timed=True), every)
            live.report(items, StepReport(2, 6, timed=False, previews={0: b"png"}), every)
            heard_previewed, heard_plain = _drain(previewed), _drain(plain)
        assert [(e.WhichOneof("kind"), e.seq) for e in heard_previewed] == [("step_progress", 0), ("preview", 0)]
        assert heard_previewed[0].step_progress.step == 2 and list(heard_previewed[0].step_progress.names) == [
            items[0].spec.file_name
        ]
        assert heard_previewed[1].preview.png == b"png" and heard_previewed[1].preview.name == items[0].spec.file_name
        assert [e.step_progress.step for e in heard_plain] == [1]
        assert list(heard_plain[0].step_progress.names) == [items[1].spec.file_name, items[2].spec.file_name]
        assert not live.watched("previewed") and live.watch(items, every) is None

    asyncio.run(run())


def test_a_listener_that_falls_behind_loses_its_oldest_events_not_memory():
    async def run():
        live, items = LiveEvents(), _items("job")
        with live.listen("job") as queue:
            for step in range(1, LIVE_EVENTS_PER_LISTENER + 11):
                live.report(items, StepReport(step, 10**6, timed=True), lambda job: 0)
            heard = _drain(queue)
        assert len(heard) == LIVE_EVENTS_PER_LISTENER
        assert heard[0].step_progress.step == 11 and heard[-1].step_progress.step == LIVE_EVENTS_PER_LISTENER + 10

    asyncio.run(run())
