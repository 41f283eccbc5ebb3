"""The SDK's surface against a real farm: rendering results' specs again, waiting with a timeout, listing jobs
by state in pages, and a Job that says what it is."""

import asyncio
import io

import pytest

import renderfarm as rf
from tests.integration.conftest import pixels

SMALL = dict(model="builtin:tiny-sd", steps=2, width=64, height=48, scheduler="ddim")


def test_a_results_spec_renders_the_same_pixels_again_in_a_render_job(farm):
    with rf.Client(farm.address) as client:
        swept = {r.name: r for r in client.sweep(["a red fox", "a heron"], seeds=[3], **SMALL).results()}
        specs = [result.spec for result in swept.values()]
        job = client.render([*specs, specs[0]])  # a repeated image is one result
        assert (job.kind, job.total) == ("render", 2) and "kind='render'" in repr(job)
        again = {r.name: r for r in job.results()}
    assert again.keys() == swept.keys()
    for name, result in again.items():
        assert result.spec == swept[name].spec
        assert (pixels(io.BytesIO(result.png)) == pixels(io.BytesIO(swept[name].png))).all()


def test_wait_and_results_give_up_after_their_timeout_and_the_job_goes_on(start_farm):
    farm = start_farm(max_batch=1)
    with rf.Client(farm.address) as client:
        job = client.sweep("a slow fox", seeds=range(6), **{**SMALL, "steps": 30})
        with pytest.raises(rf.FarmTimeoutError, match=rf"job {job.id} did not end within 0.5 s") as raised:
            job.wait(timeout=0.5)
        assert isinstance(raised.value, TimeoutError)
        with pytest.raises(TimeoutError):
            list(job.results(timeout=0.5))
        assert job.wait(timeout=120).state == rf.JobState.SUCCEEDED


def test_jobs_are_listed_by_state_in_pages(farm):
    with rf.Client(farm.address) as client:
        done = [client.sweep("a listed fox", seeds=seed, **SMALL) for seed in range(3)]
        for job in done:
            job.wait()
        cancelled = client.sweep("a cancelled fox", seeds=range(500), **SMALL)
        cancelled.cancel()
        cancelled.wait()
        succeeded = client.jobs(state=rf.JobState.SUCCEEDED)
        assert {job.id for job in done} <= {status.id for status in succeeded}
        assert all(status.state == rf.JobState.SUCCEEDED for status in succeeded)
        assert [status.id for status in client.jobs(state=["cancelled"])][-1] == cancelled.id
        # Two at a time, each page continuing where the last stopped, until none is left.
        pages, token = [], ""
        while True:
            page = client.jobs(state="succeeded", limit=2, page_token=token)
            assert len(page) <= 2
            pages += page
            if not (token := page.next_page_token):
                break
        assert [status.id for status in pages] == [status.id for status in succeeded]
        with pytest.raises(rf.InvalidJobError) as raised:
            client.jobs(state="finished")
        assert raised.value.field == "state[0]"


def test_a_job_shows_its_kind_and_settings(farm):
    with rf.Client(farm.address) as client:
        job = client.sweep(["a fox", "a heron"], seeds=range(2), size=[(64, 48), (48, 64)], **{
            key: value for key, value in SMALL.items() if key not in ("width", "height")})  # fmt: skip
        assert job.kind == "sweep" and job.total == 8
        assert job.settings["prompts"] == ["a fox", "a heron"] and job.settings["seeds"] == [0, 1]
        assert job.settings["sizes"] == [{"width": 64, "height": 48}, {"width": 48, "height": 64}]
        assert repr(job).startswith(f"Job(id={job.id!r}, kind='sweep', total=8, model='builtin:tiny-sd'")
        assert {(r.spec.width, r.spec.height) for r in job.results()} == {(64, 48), (48, 64)}


def test_the_async_client_renders_lists_and_times_out_alike(farm):
    async def use() -> None:
        async with rf.AsyncClient(farm.address) as client:
            swept = await client.sweep("an async fox", seeds=[5], **SMALL)
            [result] = [r async for r in swept.results()]
            job = await client.render([result.spec])
            assert job.kind == "render" and repr(job).startswith("AsyncJob(")
            [again] = [r async for r in job.results(timeout=120)]
            assert again.name == result.name and again.png == result.png
            page = await client.jobs(state="succeeded", limit=1)
            assert len(page) == 1 and page.next_page_token
            slow = await client.sweep("a slow async fox", seeds=range(4), **{**SMALL, "steps": 30})
            with pytest.raises(TimeoutError):
                await slow.wait(timeout=0.2)
            await slow.cancel()

    asyncio.run(use())
