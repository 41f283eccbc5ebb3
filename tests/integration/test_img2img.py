"""img2img and inpainting jobs through real farms: pixels against diffusers' pipelines, each image once."""

import hashlib
import io
from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

import renderfarm as rf
from renderfarm.actors.models import resolve_model
from renderfarm.actors.schedulers import SCHEDULER_CLASSES
from renderfarm.cli import main as cli
from renderfarm.spec import EditedImageSpec, read_spec

INPAINTER = "builtin:tiny-sd-inpaint"


def picture(width: int, height: int, seed: int) -> bytes:
    """A smooth random picture: VAEs encode it like a photograph, not like noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((width, height), Image.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(width: int, height: int) -> bytes:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def diffusers_edit(model_cache_dir):
    """Renders an EditedImageSpec with diffusers' own img2img or inpaint pipeline, on one thread as replicas run."""
    pipes = {}

    def render(spec: EditedImageSpec, image: bytes, mask: bytes | None = None) -> np.ndarray:
        pipeline_class = StableDiffusionImg2ImgPipeline if mask is None else StableDiffusionInpaintPipeline
        if spec.model not in pipes:
            pipe = pipeline_class.from_pretrained(resolve_model(spec.model, model_cache_dir))
            pipe.set_progress_bar_config(disable=True)
            pipes[spec.model] = pipe, pipe.scheduler.config
        pipe, own_config = pipes[spec.model]
        pipe.scheduler = SCHEDULER_CLASSES[spec.scheduler].from_config(own_config)
        inputs = dict(image=Image.open(io.BytesIO(image)).convert("RGB"))
        if mask is not None:
            inputs.update(mask_image=Image.open(io.BytesIO(mask)), width=spec.width, height=spec.height)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = pipe(
                spec.prompt, negative_prompt=spec.negative_prompt or None, strength=spec.strength,
                num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(spec.seed), **inputs,
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        return np.asarray(result.images[0])

    return render


def test_img2img_at_batch_1_is_pixel_identical_to_diffusers(start_farm, diffusers_edit):
    source = picture(100, 76, seed=1)  # rounded down to 96x72, as the pipeline rounds it
    with rf.Client(start_farm(max_batch=1).address) as client:
        job = client.img2img(source, "a red fox", strength=[0.3, 0.75], scheduler=["ddim", "euler"], steps=6,
                             guidance_scale=[1.0, 6.0])  # fmt: skip
        results = list(job.results())
    assert len(results) == 8
    for result in results:
        spec = result.spec
        assert (spec.width, spec.height, spec.source_sha256) == (96, 72, hashlib.sha256(source).hexdigest())
        assert f"Denoising strength: {spec.strength:g}" in result.image.text["parameters"]
        assert np.array_equal(np.asarray(result.image), diffusers_edit(spec, source)), spec


def test_inpainting_at_batch_1_is_pixel_identical_to_diffusers(start_farm, diffusers_edit):
    image, mask = picture(96, 64, seed=2), mask_png(96, 64)
    with rf.Client(start_farm(max_batch=1).address) as client:
        results = list(client.inpaint(image, mask, "a lighthouse", strength=[0.6, 1.0], steps=5).results())
    assert len(results) == 2
    for result in results:
        assert result.spec.mask_sha256 == hashlib.sha256(mask).hexdigest() and result.spec.model == INPAINTER
        assert np.array_equal(np.asarray(result.image), diffusers_edit(result.spec, image, mask)), result.spec


def test_an_img2img_sweep_makes_each_of_its_16_images_once_and_each_reproduces_from_its_spec(farm, diffusers_edit):
    sources = {hashlib.sha256(data).hexdigest(): data for data in (picture(64, 64, seed=3), picture(64, 48, seed=4))}
    with rf.Client(farm.address) as client:
        job = client.img2img(list(sources.values()), ["a red fox", "a castle"], strength=[0.4, 0.8], seeds=[0, 1], steps=5)
        results = list(job.results())
        status = job.status()
    assert status.completed == status.total == 16
    assert len(results) == len({result.spec for result in results}) == 16  # each image, once
    assert Counter(result.spec.source_sha256 for result in results) == Counter({sha: 8 for sha in sources})
    for result in results:
        assert read_spec(result.png) == result.spec
        reproduced = diffusers_edit(result.spec, sources[result.spec.source_sha256])
        assert np.abs(np.asarray(result.image).astype(int) - reproduced.astype(int)).max() <= 1, result.spec


def test_the_cli_renders_img2img_and_inpaint_jobs(farm, tmp_path):
    (tmp_path / "in.png").write_bytes(picture(64, 64, seed=5))
    (tmp_path / "mask.png").write_bytes(mask_png(64, 64))
    common = ["--prompt", "a fox", "--steps", "4", "--address", farm.address]
    assert cli(["img2img", str(tmp_path / "in.png"), "--strength", "0.5,1", "--seeds", "0-1", *common,
                "--out", str(tmp_path / "img2img")]) == 0  # fmt: skip
    assert cli(["inpaint", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), *common,
                "--out", str(tmp_path / "inpaint")]) == 0  # fmt: skip
    edited = [read_spec(png) for png in (tmp_path / "img2img").glob("*.png")]
    assert sorted((spec.strength, spec.seed) for spec in edited) == [(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)]
    (inpainted,) = [read_spec(png) for png in (tmp_path / "inpaint").glob("*.png")]
    assert inpainted.model == INPAINTER and inpainted.strength == 1.0 and inpainted.mask_sha256
