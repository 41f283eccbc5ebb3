"""A denoiser batch that runs out of accelerator memory is split until it fits, and finishes: the fault is
the denoiser stage's test hook (actors/stages.py, RENDERFARM_FAULT_OOM_ABOVE), set in the environment of one
farm's denoiser replica only."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import ray

import renderfarm as rf
from renderfarm.actors.stages import FAULT_OOM_ABOVE, DenoiserStage
from renderfarm.cluster import executor
from renderfarm.cluster.embedded import EmbeddedFarm

# Images a batch may hold on the faulted denoiser: a batch of max_batch 8 halves twice to get there.
FITS = 2


@pytest.fixture
def short_of_memory_farm(ray_session, farm_config, tmp_path):
    # Ray gives an actor's process the runtime_env's variables: only this farm's denoiser has the fault.
    # The pool takes its class when the farm starts, so the swap lasts no longer than the start.
    faulted = ray.remote(runtime_env={"env_vars": {FAULT_OOM_ABOVE: str(FITS)}})(DenoiserStage)
    farm = EmbeddedFarm(replace(farm_config, state_dir=tmp_path / "state", max_batch=8))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(executor.ACTOR_CLASSES, "denoiser", faulted)
        farm.__enter__()
    yield farm
    farm.__exit__(None, None, None)


def test_a_batch_out_of_memory_is_split_until_it_fits_and_gives_the_same_pixels(short_of_memory_farm, reference):
    with rf.Client(short_of_memory_farm.address) as client:
        # Nine: a batch of 8, and one of the ninth image alone, padded to 8.
        job = client.sweep(prompts=["a red fox", "a lighthouse", "a tree"], seeds=range(3), steps=2, width=64,
                           height=64)  # fmt: skip
        results = list(job.results())
        assert job.wait().state == rf.JobState.SUCCEEDED
    counts = Counter(result.spec for result in results)
    assert len(counts) == 9 and set(counts.values()) == {1}  # every image, exactly once

    sizes = short_of_memory_farm.farm.stats().stages["denoiser"].batch_sizes
    # Batches are counted (by their images) as they start. The 8 and its halves of 4 ran out of memory,
    # and every image was denoised in a batch of FITS; the lone ninth ran out of memory padded to 8, then
    # to 4, and fit at FITS.
    assert sizes == {8: 1, 4: 2, FITS: 4, 1: 3}, sizes

    # Purity: each image as plain diffusers renders it alone, without a fault or a farm.
    for result in results:
        difference = np.abs(np.asarray(result.image).astype(int) - reference(result.spec).astype(int))
        assert difference.max() <= 1, result.spec
