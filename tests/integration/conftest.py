"""Integration fixtures: one real local Ray instance per session, real farms on loopback."""

import itertools
import json
import os
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from renderfarm.cluster.config import FarmConfig, PoolConfig
from renderfarm.cluster.embedded import EmbeddedFarm
from renderfarm.spec import ImageSpec


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 API on loopback, in this process. Its address and test credentials go into the environment
    before Ray starts, so the farm's workers (Ray's processes) reach it through boto3's standard chain."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    import ray

    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def farm_config(tmp_path_factory, model_cache_dir) -> FarmConfig:
    return FarmConfig(
        output_dir=tmp_path_factory.mktemp("output"),
        model_cache_dir=model_cache_dir,
        state_dir=tmp_path_factory.mktemp("state"),
        port=0,
        # Free ports: farms of a test session run side by side.
        metrics_port=0,
        web_port=0,
        max_batch=8,
    )


# Farms alive at once: each holds a few actor processes of ~0.5 GB, and CI has 24 GB.
LIVE_FARMS = 2


@pytest.fixture(scope="session")
def start_farm(ray_session, farm_config):
    """Starts (or reuses) a farm: start_farm(denoisers=3, max_batch=1). The least recently used is stopped."""
    farms: OrderedDict[tuple, EmbeddedFarm] = OrderedDict()
    started = itertools.count()

    def start(denoisers=1, decoders=1, upscalers=1, max_batch=8, **config) -> EmbeddedFarm:
        key = (denoisers, decoders, upscalers, max_batch, tuple(sorted(config.items())))
        if key not in farms:
            if len(farms) == LIVE_FARMS:
                farms.popitem(last=False)[1].__exit__(None, None, None)
            pools = {
                name: PoolConfig(replicas=replicas)
                for name, replicas in (("denoisers", denoisers), ("decoders", decoders), ("upscalers", upscalers))
            }
            # Each farm its own job store: a farm resumes the unfinished jobs it finds there.
            state_dir = farm_config.state_dir / f"farm-{next(started)}"
            settings = replace(farm_config, max_batch=max_batch, state_dir=state_dir, **pools, **config)
            farms[key] = EmbeddedFarm(settings).__enter__()
        farms.move_to_end(key)
        return farms[key]

    yield start
    for farm in farms.values():
        farm.__exit__(None, None, None)


@pytest.fixture
def farm(start_farm) -> EmbeddedFarm:
    """The default farm (one replica per stage, max batch 8)."""
    return start_farm()


@pytest.fixture(scope="session")
def reference(model_cache_dir):
    """Renders a spec with plain diffusers, as a user would: the parity baseline. The spec's model names the
    pipeline class (its model_index.json's); its LoRAs load with load_lora_weights and set_adapters."""
    import diffusers

    from renderfarm.actors.models import resolve_model
    from renderfarm.actors.schedulers import SCHEDULER_CLASSES

    pipes = {}

    def pipeline(model: str):
        if model not in pipes:
            directory = resolve_model(model, model_cache_dir)
            pipeline_class = getattr(diffusers, json.loads((directory / "model_index.json").read_text())["_class_name"])
            options = {"add_watermarker": False} if pipeline_class is diffusers.StableDiffusionXLPipeline else {}
            pipe = pipeline_class.from_pretrained(directory, **options)
            pipe.set_progress_bar_config(disable=True)
            pipes[model] = pipe, pipe.scheduler.config
        return pipes[model]

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
        pipe, own_scheduler_config = pipeline(spec.model)
        pipe.scheduler = SCHEDULER_CLASSES[spec.scheduler].from_config(own_scheduler_config)
        _set_loras(pipe, spec)
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


def _set_loras(pipe, spec: ImageSpec) -> None:
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    loras = [lora for lora in spec.loras or () if lora.scale != 0]
    if not loras:
        if loaded:
            pipe.disable_lora()
        return
    names = [f"lora-{lora.sha256[:16]}" for lora in loras]
    for lora, name in zip(loras, names):
        if name not in loaded:
            pipe.load_lora_weights(lora.path, adapter_name=name)
    pipe.enable_lora()
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])


def pixels(png) -> np.ndarray:
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))
