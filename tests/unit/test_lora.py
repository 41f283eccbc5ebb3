"""LoRA adapters on replicas: pixel-identical to diffusers' load_lora_weights + set_adapters, and files checked."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_kohya

from renderfarm.actors import lora, models
from tests.loras import make_lora

PROMPT = "a red fox in the snow"
STEPS = 3
SD = "StableDiffusionPipeline"
SDXL = "StableDiffusionXLPipeline"


def load_pipeline(pipeline_class, model_dir: Path):
    pipe = pipeline_class.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, seed: int = 0) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=STEPS, generator=generator, output_type="np").images


def to_kohya(path: Path, dest: Path) -> Path:
    """The same LoRA in kohya-ss's (A1111's) format, as most LoRAs in the wild come."""
    state_dict = safetensors.torch.load_file(path)
    kohya = {}
    for component, prefix in (("unet.", "lora_unet_"), ("text_encoder.", "lora_te_text_model_")):
        weights = {key.removeprefix(component): value for key, value in state_dict.items() if key.startswith(component)}
        kohya.update({prefix + key: value for key, value in convert_state_dict_to_kohya(weights).items()})
    safetensors.torch.save_file(kohya, dest)
    return dest


@pytest.fixture(scope="module")
def model_dir(model_cache_dir) -> Path:
    return models.resolve_model("builtin:tiny-sd", model_cache_dir)


@pytest.fixture(scope="module")
def files(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two LoRAs for the UNet and text encoder, one ("unet") for the UNet alone, and "a" in kohya's format."""
    root = tmp_path_factory.mktemp("loras")
    files = {
        "a": make_lora(StableDiffusionPipeline, model_dir, root / "a", seed=1),
        "b": make_lora(StableDiffusionPipeline, model_dir, root / "b", seed=2),
        "unet": make_lora(StableDiffusionPipeline, model_dir, root / "unet", seed=3, text_encoders=()),
    }
    files["kohya"] = to_kohya(files["a"], root / "kohya.safetensors")
    return files


@pytest.fixture(scope="module")
def digests(files) -> dict[str, str]:
    return {name: lora.lora_digest(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def base_image(model_dir) -> np.ndarray:
    return render(load_pipeline(StableDiffusionPipeline, model_dir))


@pytest.fixture(scope="module")
def reference(model_dir, files) -> StableDiffusionPipeline:
    """diffusers' own LoRA handling, each file loaded under its fixture name."""
    pipe = load_pipeline(StableDiffusionPipeline, model_dir)
    for name, path in files.items():
        pipe.load_lora_weights(path, adapter_name=name)
    return pipe


class Farm:
    """A separately loaded pipeline whose LoRAs only Adapters set: one per replica, as the farm splits them."""

    def __init__(self, pipeline_class, model_dir: Path, encoders=("text_encoder",)):
        self.pipe = load_pipeline(pipeline_class, model_dir)
        self.denoiser = lora.Adapters(pipeline_class.__name__, {"unet": self.pipe.unet})
        self.encoder = lora.Adapters(pipeline_class.__name__, {name: getattr(self.pipe, name) for name in encoders})

    def apply(self, loras) -> None:
        self.denoiser.apply(loras)
        self.encoder.apply(loras)

    def render(self, loras, seed: int = 0) -> np.ndarray:
        self.apply(loras)
        return render(self.pipe, seed)


@pytest.fixture(scope="module")
def farm(model_dir) -> Farm:
    return Farm(StableDiffusionPipeline, model_dir)


def loras(files, digests, scales: dict[str, float]) -> list[tuple[str, str, float]]:
    return [(str(files[name]), digests[name], scale) for name, scale in scales.items()]


def test_inspect_reads_the_digest_and_components(files, digests):
    assert digests["a"] == hashlib.sha256(files["a"].read_bytes()).hexdigest()
    assert lora.inspect_lora(files["a"]).components == {"unet", "text_encoder"}
    assert lora.inspect_lora(files["unet"]).components == {"unet"}
    assert lora.inspect_lora(files["kohya"]).components == {"unet", "text_encoder"}


def test_digest_is_cached_by_path_size_and_mtime(files):
    lora.lora_digest(files["a"])
    hits = lora._inspect.cache_info().hits
    lora.lora_digest(files["a"])
    assert lora._inspect.cache_info().hits == hits + 1


@pytest.mark.parametrize(
    "scales",
    [
        {"a": 0.5},
        {"a": 1.0},
        {"a": 0.7, "b": 0.4},
        # No text-encoder weights: the encoder replica runs its base model.
        {"unet": 1.0},
        {"kohya": 0.7},
    ],
    ids=["a@0.5", "a@1.0", "a+b", "unet-only", "kohya"],
)
def test_images_equal_diffusers(farm, reference, files, digests, base_image, scales):
    reference.set_adapters(list(scales), adapter_weights=list(scales.values()))
    expected = render(reference)
    assert not np.array_equal(expected, base_image)  # else the comparison below proves nothing
    assert np.array_equal(farm.render(loras(files, digests, scales)), expected)


def test_scale_zero_and_the_empty_set_run_the_base_model(farm, files, digests, base_image):
    assert not np.array_equal(farm.render(loras(files, digests, {"a": 1.0})), base_image)
    assert np.array_equal(farm.render(loras(files, digests, {"a": 0.0})), base_image)
    farm.render(loras(files, digests, {"a": 1.0}))
    assert np.array_equal(farm.render([]), base_image)


def test_switching_sets_gives_the_same_images(farm, files, digests):
    sets = [{"a": 1.0}, {"b": 0.8}, {"a": 0.6, "b": 0.5}, {}]
    first = [farm.render(loras(files, digests, scales)) for scales in sets]
    again = [farm.render(loras(files, digests, scales)) for scales in reversed(sets)]
    for image, repeat in zip(first, reversed(again)):
        assert np.array_equal(image, repeat)


def test_the_same_file_at_two_paths_is_one_adapter(farm, files, digests, tmp_path):
    copy = tmp_path / "copy.safetensors"
    shutil.copy(files["a"], copy)
    expected = farm.render(loras(files, digests, {"a": 1.0}))
    loaded = farm.denoiser.loaded
    assert np.array_equal(farm.render([(str(copy), digests["a"], 1.0)]), expected)
    assert farm.denoiser.loaded[-1] == digests["a"] and set(farm.denoiser.loaded) == set(loaded)


def test_least_recently_used_adapters_are_deleted(model_dir, files, digests, monkeypatch):
    monkeypatch.setattr(lora, "ADAPTERS_PER_MODEL", 2)
    farm = Farm(StableDiffusionPipeline, model_dir)
    with_b = farm.render(loras(files, digests, {"b": 1.0}))
    for name in ("a", "b", "a", "unet"):
        farm.render(loras(files, digests, {name: 1.0}))
    assert farm.denoiser.loaded == (digests["a"], digests["unet"])
    assert len(farm.pipe.unet.peft_config) == 2
    assert np.array_equal(farm.render(loras(files, digests, {"b": 1.0})), with_b)


def test_a_file_changed_after_submission_is_refused(model_dir, files, digests, tmp_path):
    path = tmp_path / "style.safetensors"
    shutil.copy(files["a"], path)
    submitted = lora.lora_digest(path)
    # The same size as "a": only the mtime tells the two versions apart.
    assert files["b"].stat().st_size == path.stat().st_size
    shutil.copy(files["b"], path)
    modified = path.stat()
    os.utime(path, ns=(modified.st_atime_ns, modified.st_mtime_ns + 1_000_000_000))
    assert lora.lora_digest(path) == digests["b"]
    adapters = lora.Adapters(SD, {"unet": load_pipeline(StableDiffusionPipeline, model_dir).unet})
    with pytest.raises(lora.LoraFileError, match="has changed since the job was submitted"):
        adapters.apply([(str(path), submitted, 1.0)])
    assert adapters.loaded == ()


def test_pickle_files_are_refused(files, tmp_path):
    path = tmp_path / "style.bin"
    torch.save(safetensors.torch.load_file(files["a"]), path)
    with pytest.raises(ValueError, match=f"{path}.*safetensors only: pickle files can run code when loaded"):
        lora.lora_digest(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda data: b"PK\x03\x04 a renamed zip or pickle", "header length"),
        (lambda data: data[:-16], "truncated"),
        (lambda data: (8).to_bytes(8, "little") + b"not json", "header is not JSON"),
    ],
    ids=["not-safetensors", "truncated", "bad-header"],
)
def test_files_that_are_not_safetensors_are_refused(files, tmp_path, content, message):
    path = tmp_path / "style.safetensors"
    path.write_bytes(content(files["a"].read_bytes()))
    with pytest.raises(ValueError, match=f"{path} is not a valid safetensors file.*{message}"):
        lora.lora_digest(path)


def test_files_without_lora_weights_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"unet.conv_in.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="has no LoRA weights"):
        lora.lora_digest(path)
    safetensors.torch.save_file({"vae.decoder.lora_A.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no weights for a Stable Diffusion UNet or text encoder"):
        lora.lora_digest(path)


def test_missing_and_wrongly_named_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="missing.safetensors cannot be read"):
        lora.lora_digest(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"style\.txt is not a \.safetensors file"):
        lora.lora_digest(tmp_path / "style.txt")


def test_malformed_sets_are_refused_before_loading(farm, files, digests):
    with pytest.raises(ValueError, match="not a SHA-256"):
        farm.denoiser.apply([(str(files["a"]), "abc", 1.0)])
    too_many = [(f"{i}.safetensors", f"{i:064x}", 1.0) for i in range(lora.ADAPTERS_PER_MODEL + 1)]
    with pytest.raises(ValueError, match=f"at most {lora.ADAPTERS_PER_MODEL}"):
        farm.denoiser.apply(too_many)
    with pytest.raises(ValueError, match="not a finite number"):
        farm.denoiser.apply([(str(files["a"]), digests["a"], float("nan"))])


def test_only_lora_components_of_sd_pipelines(farm):
    with pytest.raises(ValueError, match="not 'FluxPipeline'"):
        lora.Adapters("FluxPipeline", {"unet": farm.pipe.unet})
    with pytest.raises(ValueError, match=r"not \['vae'\]"):
        lora.Adapters(SD, {"vae": farm.pipe.vae})


@pytest.fixture(scope="module")
def sdxl_dir(model_cache_dir) -> Path:
    return models.resolve_model("builtin:tiny-sdxl", model_cache_dir)


def test_sdxl_images_equal_diffusers(sdxl_dir, tmp_path):
    path = make_lora(
        StableDiffusionXLPipeline, sdxl_dir, tmp_path, seed=4, text_encoders=("text_encoder", "text_encoder_2")
    )
    digest = lora.lora_digest(path)
    assert lora.inspect_lora(path).components == {"unet", "text_encoder", "text_encoder_2"}
    reference = load_pipeline(StableDiffusionXLPipeline, sdxl_dir)
    base_image = render(reference)
    reference.load_lora_weights(path, adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.8])
    expected = render(reference)
    assert not np.array_equal(expected, base_image)

    farm = Farm(StableDiffusionXLPipeline, sdxl_dir, encoders=("text_encoder", "text_encoder_2"))
    assert np.array_equal(farm.render([(str(path), digest, 0.8)]), expected)
    assert np.array_equal(farm.render([]), base_image)
