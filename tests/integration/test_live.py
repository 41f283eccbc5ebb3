"""Step progress and previews while a job runs, and Prometheus metrics, on a real farm."""

import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import renderfarm as rf
from renderfarm import JobState

TINY = dict(model="builtin:tiny-sd", width=64, height=64)


def _metrics(farm) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{farm.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _images_total(metrics: dict) -> float:
    return sum(value for (name, labels), value in metrics.items()
               if name == "renderfarm_images_total" and dict(labels) == {"kind": "sweep", "model": TINY["model"]})  # fmt: skip


def test_metrics_count_a_sweeps_images_jobs_and_batches(farm):
    before = _metrics(farm)
    with rf.Client(farm.address) as client:
        job = client.sweep(["a metered fox", "a metered owl"], seeds=range(6), steps=2, **TINY)
        assert job.wait().state == JobState.SUCCEEDED
    after = _metrics(farm)
    assert _images_total(after) - _images_total(before) == 12
    succeeded = ("renderfarm_jobs", (("state", "succeeded"),))
    assert after[succeeded] - before.get(succeeded, 0) == 1
    assert after[("renderfarm_queue_images", ())] == 0
    assert after[("renderfarm_replicas", (("stage", "denoiser"),))] == 1
    # 12 images at max batch 8: at least two denoiser batches, each timed and sized.
    for histogram in ("renderfarm_batch_duration_seconds_count", "renderfarm_batch_size_count"):
        key = (histogram, (("stage", "denoiser"),))
        assert after[key] - before.get(key, 0) >= 2
    sized = ("renderfarm_batch_size_sum", (("stage", "denoiser"),))
    assert after[sized] - before.get(sized, 0) == 12  # real images, not padding
    assert ("renderfarm_item_retries_total", ()) in after
    assert after[("renderfarm_model_loads_total", (("stage", "denoiser"),))] >= 1


def test_previews_every_two_steps_of_six_come_with_three_step_events_a_batch(farm):
    prompts, seeds = ["a previewed fox", "a previewed owl"], [0, 1, 2]
    with rf.Client(farm.address) as client:
        # Another job holds the denoiser, so this one's batch starts after its stream is open (live events
        # are for whoever watches; nothing replays them).
        blocker = client.sweep(
            ["a blocking heron"], seeds=range(16), steps=8, model=TINY["model"], width=128, height=128
        )
        # DDIM's loop takes exactly the steps asked for (PNDM, tiny-sd's own, takes one more, as its pipeline does).
        settings = dict(seeds=seeds, steps=6, scheduler="ddim", **TINY)
        job = client.sweep(prompts, preview_every=2, **settings)
        events = list(job.events())
        plain = {
            r.spec.seed * 10 + prompts.index(r.spec.prompt): r for r in client.sweep(prompts, **settings).results()
        }
        blocker.wait()

    steps = [event for event in events if isinstance(event, rf.StepProgress)]
    results = [event for event in events if isinstance(event, rf.Result)]
    previews = [event for event in events if isinstance(event, rf.Preview)]
    assert events[-1] == rf.StateChange(JobState.SUCCEEDED) and len(results) == 6
    # Six images share one batch (max batch 8): steps 2, 4 and 6 are reported, each naming every image.
    assert [(event.step, event.steps) for event in steps] == [(2, 6), (4, 6), (6, 6)]
    assert all(sorted(event.names) == sorted(r.name for r in results) for event in steps)
    assert sorted((p.name, p.step) for p in previews) == sorted((r.name, step) for r in results for step in (2, 4, 6))
    # One RGB pixel per latent pixel.
    assert {(p.image.size, p.image.mode) for p in previews} == {((8, 8), "RGB")}
    for result in results:
        # Previews only read the loop: the images are those of the same sweep without them.
        key = result.spec.seed * 10 + prompts.index(result.spec.prompt)
        np.testing.assert_array_equal(np.asarray(result.image), np.asarray(plain[key].image))
    # Live events come before the results of their batch, and are not stored: a replay has none.
    assert events.index(steps[-1]) < events.index(results[0])
    with rf.Client(farm.address) as client:
        replayed = list(client.job(job.id).events())
    assert not [event for event in replayed if isinstance(event, (rf.StepProgress, rf.Preview))]
    assert [r.name for r in replayed if isinstance(r, rf.Result)] == [r.name for r in results]
