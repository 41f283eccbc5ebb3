"""What the farm refuses to run, read from a model's files before any weight is loaded."""

import json
import shutil

import pytest

from renderfarm.actors import models
from renderfarm.cluster.model_info import SUPPORTED_PIPELINES, model_info


@pytest.fixture
def tiny_sd_copy(model_cache_dir, tmp_path):
    source = models.resolve_model("builtin:tiny-sd", model_cache_dir)
    copy = tmp_path / "model"
    shutil.copytree(source, copy)
    return copy


def test_a_pipeline_the_farm_does_not_run_is_refused_naming_the_ones_it_does(tiny_sd_copy, model_cache_dir):
    index = tiny_sd_copy / "model_index.json"
    index.write_text(json.dumps(json.loads(index.read_text()) | {"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError) as raised:
        model_info(str(tiny_sd_copy), model_cache_dir)
    assert "FluxPipeline, which the farm does not run" in str(raised.value)
    assert all(name in str(raised.value) for name in SUPPORTED_PIPELINES)


def test_pickle_weights_are_refused_before_anything_loads_them(tiny_sd_copy, model_cache_dir):
    weights = tiny_sd_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match=r"unet/ holds its weights as pickles \(diffusion_pytorch_model.bin\)"):
        model_info(str(tiny_sd_copy), model_cache_dir)


def test_the_builtins_pipelines(model_cache_dir):
    assert model_info("builtin:tiny-sd", model_cache_dir).pipeline == "StableDiffusionPipeline"
    assert model_info("builtin:tiny-sd-x4-upscaler", model_cache_dir).is_upscaler
