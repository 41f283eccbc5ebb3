import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from renderfarm.actors import builtin, models
from renderfarm.actors.models import ModelNotFoundError


@pytest.fixture(scope="module")
def tiny_sd_dir(model_cache_dir) -> Path:
    """tiny-sd in the run's shared model cache (tests/conftest.py), so it is built once."""
    return models.resolve_model("builtin:tiny-sd", model_cache_dir)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    # huggingface_hub reads these at import, so patch its constants as well as the environment.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def file_digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_builtin_is_built_in_the_cache_and_loads(tiny_sd_dir, model_cache_dir):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    assert tiny_sd_dir == model_cache_dir / "builtin" / f"tiny-sd-{builtin.BUILTIN_VERSION}"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id


def test_builtin_images_vary_with_seed_and_prompt(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)

    def render(prompt: str, seed: int) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt, num_inference_steps=5, generator=generator, output_type="np").images[0]

    fox = render("a red fox", 0)
    assert fox.shape == (128, 128, 3)
    assert np.isfinite(fox).all() and fox.std() > 0.05
    assert np.abs(fox - render("a red fox", 1)).mean() > 0.05
    assert np.abs(fox - render("a lighthouse", 0)).mean() > 0.04


def test_tokenizer_tells_prompts_apart(tiny_sd_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    fox, lighthouse = tokenizer("a red fox").input_ids, tokenizer("a lighthouse").input_ids
    assert fox != lighthouse
    assert fox[0] == lighthouse[0] == tokenizer.bos_token_id
    assert fox[-1] == lighthouse[-1] == tokenizer.eos_token_id == tokenizer.pad_token_id


def test_second_resolve_reuses_the_directory(tiny_sd_dir, model_cache_dir, monkeypatch):
    def must_not_build(dest: Path) -> None:
        raise AssertionError("rebuilt a builtin that was already in the cache")

    monkeypatch.setitem(builtin.BUILTIN_MODELS, "tiny-sd", must_not_build)
    assert models.resolve_model("builtin:tiny-sd", model_cache_dir) == tiny_sd_dir


@pytest.mark.parametrize("name", sorted(builtin.BUILTIN_MODELS))
def test_build_is_deterministic_and_leaves_global_rng_alone(name, model_cache_dir, tmp_path):
    cached = models.resolve_model(f"builtin:{name}", model_cache_dir)
    torch.manual_seed(1234)
    rng_state = torch.random.get_rng_state()
    builtin.BUILTIN_MODELS[name](tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert file_digests(tmp_path) == file_digests(cached)


def test_build_losing_a_race_uses_the_winners_directory(tmp_path, monkeypatch):
    target = tmp_path / "builtin" / f"racer-{builtin.BUILTIN_VERSION}"

    def build_while_another_process_finishes_first(dest: Path) -> None:
        (dest / "model_index.json").write_text("{}")
        target.mkdir()
        (target / "model_index.json").write_text('{"winner": true}')

    monkeypatch.setitem(builtin.BUILTIN_MODELS, "racer", build_while_another_process_finishes_first)
    assert models.resolve_model("builtin:racer", tmp_path) == target
    assert json.loads((target / "model_index.json").read_text()) == {"winner": True}
    assert [path.name for path in target.parent.iterdir()] == [f"racer-{builtin.BUILTIN_VERSION}"]


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing_build(dest: Path) -> None:
        (dest / "model_index.json").write_text("{}")
        raise RuntimeError("out of disk")

    monkeypatch.setitem(builtin.BUILTIN_MODELS, "broken", failing_build)
    with pytest.raises(RuntimeError, match="out of disk"):
        models.resolve_model("builtin:broken", tmp_path)
    assert list((tmp_path / "builtin").iterdir()) == []


def test_local_directory_refs(tiny_sd_dir, model_cache_dir, monkeypatch):
    assert models.resolve_model(str(tiny_sd_dir), model_cache_dir) == tiny_sd_dir.resolve()
    monkeypatch.chdir(tiny_sd_dir.parent)
    for ref in (f"./tiny-sd-{builtin.BUILTIN_VERSION}", f"tiny-sd-{builtin.BUILTIN_VERSION}"):
        assert models.resolve_model(ref, model_cache_dir) == tiny_sd_dir.resolve()


def test_cached_hugging_face_repo_resolves_to_its_snapshot(hf_cache, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / "models--renderfarm-test--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    assert models.resolve_model("renderfarm-test/tiny", tmp_path) == snapshot


@pytest.mark.parametrize(
    "ref",
    [
        "builtin:no-such-model",
        "./no/such/dir",
        "/no/such/dir",
        "renderfarm-test/not-cached",
        "not a model ref",
    ],
)
def test_unusable_refs_raise_naming_the_ref(ref, hf_cache, tmp_path):
    with pytest.raises(ModelNotFoundError, match=re.escape(repr(ref))):
        models.resolve_model(ref, tmp_path)
    assert not (tmp_path / "builtin").exists()


def test_directory_without_model_index_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        models.resolve_model(str(tmp_path), tmp_path)


def test_default_image_size_and_scheduler(tiny_sd_dir):
    assert models.default_image_size(tiny_sd_dir) == (128, 128)
    assert models.scheduler_class_name(tiny_sd_dir) == "PNDMScheduler"


def test_default_image_size_of_a_non_square_model(tmp_path):
    for component, config in [("unet", {"sample_size": [48, 64]}), ("vae", {"block_out_channels": [1, 2, 3, 4]})]:
        (tmp_path / component).mkdir()
        (tmp_path / component / "config.json").write_text(json.dumps(config))
    assert models.default_image_size(tmp_path) == (512, 384)


def test_importing_models_does_not_import_torch():
    code = (
        "import sys, renderfarm.actors.models; "
        "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
