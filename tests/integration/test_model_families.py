"""SDXL, LoRA adapters and models as a sweep axis, through real farms: pixels against diffusers, model loads."""

import json
import shutil

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import renderfarm as rf
from renderfarm.actors.models import resolve_model
from renderfarm.cli import main as cli
from renderfarm.cluster.model_info import SUPPORTED_PIPELINES
from renderfarm.spec import UpscaledImageSpec, read_spec
from tests.loras import make_lora

SDXL = "builtin:tiny-sdxl"
PROMPTS = ["a red fox", "a lighthouse at night"]


def image(result) -> np.ndarray:
    return np.asarray(result.image)


def off_by(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def loras(model_cache_dir, tmp_path_factory) -> dict:
    """A LoRA for tiny-sd (UNet and text encoder) and one for tiny-sdxl (UNet and both text encoders)."""
    root = tmp_path_factory.mktemp("loras")
    sd = make_lora(StableDiffusionPipeline, resolve_model("builtin:tiny-sd", model_cache_dir), root / "sd", seed=1)
    xl = make_lora(
        StableDiffusionXLPipeline, resolve_model(SDXL, model_cache_dir), root / "xl", seed=2,
        text_encoders=("text_encoder", "text_encoder_2"),
    )  # fmt: skip
    return {"sd": sd.rename(root / "ink.safetensors"), "xl": xl.rename(root / "ink-xl.safetensors")}


def test_sdxl_at_batch_1_is_pixel_identical_to_diffusers(start_farm, reference):
    with rf.Client(start_farm(max_batch=1).address) as client:
        # An empty negative prompt is diffusers' None: SDXL's zero embedding.
        plain = client.sweep(PROMPTS, seeds=[0, 1], guidance_scale=[1.0, 5.0], steps=3, model=SDXL)
        negative = client.sweep(PROMPTS[0], guidance_scale=5.0, steps=3, negative_prompt="blurry", scheduler="dpmpp_2m", model=SDXL)
        results = list(plain.results()) + list(negative.results())
    assert len(results) == 9
    for result in results:
        assert result.spec.model == SDXL and result.image.size == (128, 128)
        assert np.array_equal(image(result), reference(result.spec)), result.spec


def test_sdxl_batched_across_jobs_stays_within_one_level_of_diffusers(farm, reference):
    with rf.Client(farm.address) as client:
        jobs = [client.sweep(prompt, seeds=range(3), guidance_scale=[4.0, 6.0], steps=3, model=SDXL) for prompt in PROMPTS]
        results = [result for job in jobs for result in job.results()]
    assert len(results) == 12
    assert max(off_by(image(result), reference(result.spec)) for result in results) <= 1


def test_sdxl_chains_to_the_upscaler(farm):
    # (Its tiled decode is tests/unit/test_sdxl.py's: the tiled path is the VAE's, whichever model.)
    with rf.Client(farm.address) as client:
        (upscaled,) = client.sweep(PROMPTS[0], steps=2, width=64, height=64, model=SDXL, upscale=4, upscale_steps=2).results()
    spec = read_spec(upscaled.png)
    assert isinstance(spec, UpscaledImageSpec) and spec.source.model == SDXL and upscaled.image.size == (256, 256)


def test_lora_scales_match_diffusers_and_scale_0_is_the_model_alone(start_farm, reference, loras):
    with rf.Client(start_farm(max_batch=1).address) as client:
        base = list(client.sweep(PROMPTS[0], steps=3).results())
        scaled = sorted(
            client.sweep(PROMPTS[0], steps=3, loras=[str(loras["sd"])], lora_scales=[0, 0.5, 1]).results(),
            key=lambda result: result.spec.loras[0].scale,
        )
        (xl,) = client.sweep(PROMPTS[0], steps=3, model=SDXL, loras=[(str(loras["xl"]), 0.8)]).results()
    digest = rf.read_spec(scaled[0].png).loras[0].sha256
    assert [(lora.path, lora.sha256, lora.scale) for result in scaled for lora in result.spec.loras] == [
        (str(loras["sd"]), digest, scale) for scale in (0.0, 0.5, 1.0)
    ]
    assert "<lora:ink:0.5>" in scaled[1].image.text["parameters"]
    assert np.array_equal(image(scaled[0]), image(base[0]))
    assert off_by(image(scaled[2]), image(base[0])) > 10  # the LoRA changes the image
    for result in [*scaled, xl]:
        assert np.array_equal(image(result), reference(result.spec)), result.spec


def test_a_model_axis_loads_each_model_once_per_replica_and_matches_single_model_sweeps(start_farm):
    # Batches of 2: each model's 8 images are 4 batches, spread over both denoisers.
    farm = start_farm(denoisers=2, max_batch=2)
    models = ["builtin:tiny-sd", SDXL, "builtin:null-sd"]
    before = farm.farm.stats()
    with rf.Client(farm.address) as client:
        axis = {result.spec: image(result) for result in client.sweep(PROMPTS[0], seeds=range(8), steps=2, models=models).results()}
        after = farm.farm.stats()
        alone = {
            result.spec: image(result)
            for model in models
            for result in client.sweep(PROMPTS[0], seeds=range(8), steps=2, model=model).results()
        }
    assert len(axis) == 24 and {spec.model for spec in axis} == set(models)
    for stage in ("encoder", "denoiser", "decoder"):
        loads = [
            later.model_loads - earlier.model_loads
            for earlier, later in zip(before.stages[stage].replicas, after.stages[stage].replicas, strict=True)
        ]
        assert all(count <= len(models) for count in loads), (stage, loads)
    assert axis.keys() == alone.keys()
    assert all(np.array_equal(axis[spec], alone[spec]) for spec in axis)


def test_the_cli_takes_models_and_loras(farm, loras, tmp_path):
    def sweep(out: str, *options: str) -> list:
        assert cli(["sweep", "--prompt", "a fox", "--steps", "2", "--address", farm.address, "--out", str(tmp_path / out), *options]) == 0
        return sorted((read_spec(png) for png in (tmp_path / out).glob("*.png")), key=lambda spec: spec.to_json())

    models = sweep("models", "--model", "builtin:tiny-sd", "--model", "builtin:null-sd")
    assert sorted(spec.model for spec in models) == ["builtin:null-sd", "builtin:tiny-sd"]
    scaled = sweep("loras", "--lora", str(loras["sd"]), "--lora-scales", "0,1")
    assert [lora.scale for spec in scaled for lora in spec.loras] == [0.0, 1.0]
    (together,) = sweep("together", "--lora", f"{loras['sd']}:0.5")
    assert together.loras[0].scale == 0.5


def test_a_pipeline_the_farm_does_not_run_is_refused_at_submission(farm, model_cache_dir, tmp_path):
    model = tmp_path / "flux"
    shutil.copytree(resolve_model("builtin:tiny-sd", model_cache_dir), model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    with rf.Client(farm.address) as client, pytest.raises(rf.InvalidJobError) as raised:
        client.sweep("a fox", model=str(model))
    assert raised.value.field == "sweep.model"
    assert all(name in str(raised.value) for name in SUPPORTED_PIPELINES)
