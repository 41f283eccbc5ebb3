"""One scheduler for every job: cross-job batches, fair share, priorities, and pixels that do not depend on them."""

import time
from collections import Counter

import numpy as np

import renderfarm as rf

SMALL = dict(steps=2, width=64, height=64)


def denoiser_batches(farm) -> Counter:
    """Batches the farm's denoisers have run so far, by their number of real items."""
    return Counter(farm.farm.stats().stages["denoiser"].batch_sizes)


def test_sixteen_one_image_jobs_submitted_together_share_at_most_two_denoiser_batches(start_farm):
    farm = start_farm(max_batch=16)
    before = denoiser_batches(farm)
    with rf.Client(farm.address) as client:
        jobs = [client.sweep("a red fox", seeds=seed, **SMALL) for seed in range(16)]
        statuses = [job.wait() for job in jobs]
    assert all(status.state == rf.JobState.SUCCEEDED and status.completed == 1 for status in statuses)
    ran = denoiser_batches(farm) - before
    assert sum(ran.values()) <= 2 and sum(size * count for size, count in ran.items()) == 16, ran


def wait_for_progress(job, completed: int) -> int:
    deadline = time.monotonic() + 120
    while (done := job.status().completed) < completed:
        assert time.monotonic() < deadline, f"the job stalled at {done} images"
        time.sleep(0.05)
    return done


def test_a_small_job_finishes_while_a_big_one_does_under_a_tenth_more(farm):
    with rf.Client(farm.address) as client:
        big = client.sweep("a lighthouse", seeds=range(400), **SMALL)
        at_submit = wait_for_progress(big, 24)
        small = client.sweep("a red fox", seeds=range(2), **SMALL)
        assert small.wait().state == rf.JobState.SUCCEEDED
        big_meanwhile = big.status().completed - at_submit

        # With a higher priority it goes before every pending item of the big job: only the batches
        # already in flight when it arrived (two of max_batch 8 on the one denoiser) finish first.
        at_urgent = big.status().completed
        urgent = client.sweep("a red fox", seeds=range(2, 4), priority=1, **SMALL)
        assert urgent.wait().state == rf.JobState.SUCCEEDED
        big_before_urgent = big.status().completed - at_urgent
        assert urgent.status().priority == 1
        big.cancel()
        big.wait()
    assert big_meanwhile < 40, big_meanwhile  # a tenth of the big job
    assert big_before_urgent <= 2 * 8, big_before_urgent


def test_one_spec_alone_and_in_mixed_batches_at_other_positions_gives_identical_pixels(farm):
    spec = dict(prompts="a red fox", seeds=7, guidance_scale=7.5, negative_prompt="blurry", **SMALL)
    companions = [
        dict(prompts="a lighthouse", seeds=1, guidance_scale=5.0, negative_prompt="", **SMALL),
        dict(prompts="a red fox", seeds=2, guidance_scale=9.0, negative_prompt="blurry", **SMALL),
        dict(prompts="a cat", seeds=3, guidance_scale=7.5, negative_prompt="fog", **SMALL),
        dict(prompts="a dog", seeds=4, guidance_scale=3.0, negative_prompt="", **SMALL),
    ]
    images, before = [], denoiser_batches(farm)
    with rf.Client(farm.address) as client:
        for ahead in ([], companions[:1], companions):  # alone, at position 1, at position 4
            jobs = [client.sweep(**other) for other in ahead] + [client.sweep(**spec)]
            for job in jobs:
                job.wait()
            (result,) = jobs[-1].results()
            images.append(np.asarray(result.image))
    assert all(np.array_equal(image, images[0]) for image in images[1:])
    ran = denoiser_batches(farm) - before
    assert ran[len(companions) + 1] >= 1, ran  # the last five really shared one batch
