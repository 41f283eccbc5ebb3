"""Prompt sweeps end to end: SDK -> gRPC scheduler -> Ray stage actors -> streamed results."""

import asyncio
import json

import numpy as np
import pytest

import renderfarm as rf
from renderfarm.cli import main as cli
from renderfarm.spec import MANIFEST, read_spec

from .conftest import pixels

SCHEDULERS = ["ddim", "pndm", "lms", "euler", "euler_a", "dpmpp_2m"]


def test_batch_1_is_pixel_identical_to_diffusers_for_every_scheduler(start_farm, reference):
    farm = start_farm(max_batch=1)
    with rf.Client(farm.address) as client:
        job = client.sweep(
            ["a red fox", "a lighthouse"],
            seeds=[0, 7],
            steps=6,
            scheduler=SCHEDULERS,
            negative_prompt="blurry",
            width=64,
            height=96,
        )
        results = list(job.results())
    assert len(results) == job.total == 2 * 2 * len(SCHEDULERS)
    for result in results:
        assert np.array_equal(np.asarray(result.image), reference(result.spec)), result.spec


def test_unguided_items_match_diffusers(start_farm, reference):
    farm = start_farm(max_batch=1)
    with rf.Client(farm.address) as client:
        results = list(client.sweep("a red fox", guidance_scale=[1.0, 0.0], steps=4, width=64, height=64).results())
    assert {r.spec.guidance_scale for r in results} == {1.0, 0.0}
    for result in results:
        assert np.array_equal(np.asarray(result.image), reference(result.spec))


def test_cli_sweep_writes_64_pngs_that_diffusers_reproduces(farm_config, ray_session, reference, tmp_path):
    out = tmp_path / "renders"
    code = cli(
        ["sweep", "--prompt", "a red fox", "--prompt", "a lighthouse", "--seeds", "0-31", "--steps", "10",
         "--out", str(out), "--output-dir", str(tmp_path / "store"), "--model-cache-dir", str(farm_config.model_cache_dir)]
    )  # fmt: skip
    assert code == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 64
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(entry["file"] for entry in manifest) == [p.name for p in pngs]
    specs = {read_spec(p) for p in pngs}
    assert {(s.prompt, s.seed) for s in specs} == {(p, s) for p in ("a red fox", "a lighthouse") for s in range(32)}
    for png in pngs:
        # Batched on the farm (max batch 8): floating-point noise of batching only.
        difference = np.abs(pixels(png).astype(int) - reference(read_spec(png)).astype(int))
        assert difference.max() <= 1, png.name
    # The farm's own store holds the same job: one directory, 64 images, a 64-line manifest.
    (job_dir,) = (tmp_path / "store").iterdir()
    assert len(list(job_dir.glob("*.png"))) == 64
    assert len((job_dir / "manifest.jsonl").read_text().splitlines()) == 64


def _render(farm, seeds, prompts) -> dict:
    with rf.Client(farm.address) as client:
        job = client.sweep(prompts, seeds=seeds, guidance_scale=[3.0, 7.5], steps=5, width=64, height=64)
        return {r.spec: np.asarray(r.image).astype(int) for r in job.results()}


def test_replicas_batch_size_and_order_do_not_change_pixels(start_farm):
    prompts, seeds = ["a red fox", "a lighthouse", "a tree"], list(range(4))
    baseline = _render(start_farm(denoisers=1, max_batch=1), seeds, prompts)
    variants = [
        _render(start_farm(denoisers=3, max_batch=1), seeds, prompts),
        _render(start_farm(denoisers=1, max_batch=8), seeds, prompts),
        _render(start_farm(denoisers=3, max_batch=8), seeds[::-1], prompts[::-1]),
    ]
    assert len(baseline) == 24
    for variant in variants:
        assert variant.keys() == baseline.keys()
        assert max(np.abs(variant[spec] - baseline[spec]).max() for spec in baseline) <= 1


def test_each_unique_text_is_encoded_once_across_jobs(start_farm):
    farm = start_farm(max_batch=1)
    sweep = dict(prompts=["a red fox", "a lighthouse"], seeds=range(3), guidance_scale=[5.0, 7.5],
                 negative_prompt="blurry, encoded once", steps=2, width=64, height=64)  # fmt: skip
    before = farm.farm.stats()
    with rf.Client(farm.address) as client:
        first = client.sweep(**sweep)
        first.wait()
        between = farm.farm.stats()
        again = client.sweep(**{**sweep, "seeds": range(3, 5)})
        again.wait()
    after = farm.farm.stats()
    assert first.total == 12 and again.total == 8
    assert between.texts_encoded - before.texts_encoded == 3  # two prompts and the negative prompt
    assert after.texts_encoded == between.texts_encoded  # the second job's texts came from the cache
    assert after.text_cache_hits > between.text_cache_hits


def test_status_list_and_wait(farm):
    with rf.Client(farm.address) as client:
        job = client.sweep("a red fox", seeds=range(3), steps=2, width=64, height=64)
        status = job.wait()
        assert status.state == rf.JobState.SUCCEEDED and status.completed == status.total == 3
        assert job.id in {s.id for s in client.jobs()}
        assert client.job(job.id).status() == status
        with pytest.raises(rf.RenderfarmError, match="already ended succeeded"):
            job.cancel()


def test_cancel_keeps_partial_results(start_farm):
    farm = start_farm(max_batch=1)
    with rf.Client(farm.address) as client:
        job = client.sweep("a red fox", seeds=range(200), steps=2, width=64, height=64)
        results = job.results()
        next(results)
        job.cancel()
        kept = 1 + sum(1 for _ in results)
        status = job.status()
    assert status.state == rf.JobState.CANCELLED
    assert status.completed == kept < 200
    listed = (farm.farm.config.output_dir / job.id / MANIFEST).read_text().splitlines()
    assert len(listed) == kept == len(list((farm.farm.config.output_dir / job.id).glob("*.png")))


def test_async_client_streams_the_same_results(farm):
    async def run():
        async with rf.AsyncClient(farm.address) as client:
            job = await client.sweep(["a red fox"], seeds=[0, 1], steps=2, width=64, height=64)
            results = [r async for r in job.results()]
            return results, await job.status()

    results, status = asyncio.run(run())
    assert status.state == rf.JobState.SUCCEEDED
    assert sorted(r.spec.seed for r in results) == [0, 1]
