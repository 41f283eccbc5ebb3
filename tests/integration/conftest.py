"""Integration fixtures: one real local Ray instance per session, real farms on loopback."""

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from renderfarm.cluster.config import FarmConfig, PoolConfig
from renderfarm.cluster.embedded import EmbeddedFarm
from renderfarm.spec import ImageSpec


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def farm_config(tmp_path_factory, model_cache_dir) -> FarmConfig:
    return FarmConfig(
        output_dir=tmp_path_factory.mktemp("output"), model_cache_dir=model_cache_dir, port=0, max_batch=8
    )


@pytest.fixture(scope="session")
def start_farm(ray_session, farm_config):
    """Starts farms that live to the end of the session: start_farm(denoisers=3, max_batch=1)."""
    farms = {}
    with contextlib.ExitStack() as stack:

        def start(denoisers=1, decoders=1, upscalers=1, max_batch=8, **config) -> EmbeddedFarm:
            key = (denoisers, decoders, upscalers, max_batch, tuple(sorted(config.items())))
            if key not in farms:
                pools = {
                    name: PoolConfig(replicas=replicas)
                    for name, replicas in (("denoisers", denoisers), ("decoders", decoders), ("upscalers", upscalers))
                }
                farms[key] = stack.enter_context(EmbeddedFarm(replace(farm_config, max_batch=max_batch, **pools, **config)))
            return farms[key]

        yield start


@pytest.fixture(scope="session")
def farm(start_farm) -> EmbeddedFarm:
    return start_farm()


@pytest.fixture(scope="session")
def reference(model_cache_dir):
    """Renders a spec with plain diffusers, as a user would: the parity baseline."""
    from diffusers import StableDiffusionPipeline

    from renderfarm.actors.models import resolve_model
    from renderfarm.actors.schedulers import SCHEDULER_CLASSES

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model("builtin:tiny-sd", model_cache_dir))
    pipe.set_progress_bar_config(disable=True)
    own_scheduler_config = pipe.scheduler.config

    def render(spec: ImageSpec) -> np.ndarray:
        # Ray runs each replica with one intra-op thread (OMP_NUM_THREADS=1), and CPU
        # reductions round differently with other thread counts: match it.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _render(spec)
        finally:
            torch.set_num_threads(threads)

    def _render(spec: ImageSpec) -> np.ndarray:
        pipe.scheduler = SCHEDULER_CLASSES[spec.scheduler].from_config(own_scheduler_config)
        image = pipe(
            spec.prompt,
            negative_prompt=spec.negative_prompt or None,
            width=spec.width,
            height=spec.height,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(spec.seed),
        ).images[0]
        return np.asarray(image)

    return render


def pixels(png) -> np.ndarray:
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))
