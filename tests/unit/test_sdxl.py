"""SDXL through txt2img's plain functions, without Ray: pixel-identical to StableDiffusionXLPipeline."""

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

from renderfarm.actors import builtin, models, txt2img
from renderfarm.actors.schedulers import SCHEDULER_CLASSES
from renderfarm.actors.tiled_decode import tiled_decode
from renderfarm.actors.txt2img import DenoiseBatch, DenoiseItem

PROMPT = "a red fox in the snow"
NEGATIVE_PROMPT = "blurry"
STEPS = 3


@dataclass(frozen=True)
class Model:
    """One model loaded twice: as diffusers' pipeline, and as the farm's stages load it."""

    pipe: StableDiffusionXLPipeline | StableDiffusionPipeline
    scheduler_config: dict  # the pipeline's own, which the farm builds its schedulers from
    encoders: txt2img.TextEncoders
    denoiser: txt2img.DenoiseComponents
    vae: AutoencoderKL
    width: int
    height: int


def load(model_dir: Path, pipeline_class=StableDiffusionXLPipeline, **pipeline_kwargs) -> Model:
    pipe = pipeline_class.from_pretrained(model_dir, **pipeline_kwargs)
    pipe.set_progress_bar_config(disable=True)
    width, height = models.default_image_size(model_dir)
    return Model(
        pipe,
        pipe.scheduler.config,
        txt2img.load_text_encoders(model_dir, "cpu", torch.float32),
        txt2img.load_denoiser(model_dir, "cpu", torch.float32),
        txt2img.load_vae(model_dir, "cpu", torch.float32),
        width,
        height,
    )


def build_other_sdxl(dest: Path) -> None:
    """Three UNet and VAE levels, other widths and encoders of different widths, and a VAE with latents_mean/std."""
    builtin._build_sdxl(
        dest,
        unet=dict(
            sample_size=8,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=8,
        ),
        vae=dict(
            sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            norm_num_groups=4,
            latents_mean=(0.1, -0.2, 0.3, 0.0),
            latents_std=(0.9, 1.1, 1.2, 0.8),
        ),
        text_encoder=dict(hidden_size=16),
        text_encoder_2=dict(hidden_size=24, projection_dim=16),
    )


@pytest.fixture(scope="module")
def tiny_sdxl_dir(model_cache_dir) -> Path:
    return models.resolve_model("builtin:tiny-sdxl", model_cache_dir)


# No invisible watermark (which the pipeline adds where its package is installed): the farm adds none.
@pytest.fixture(scope="module")
def tiny_sdxl(tiny_sdxl_dir) -> Model:
    return load(tiny_sdxl_dir, add_watermarker=False)


@pytest.fixture(scope="module")
def other_sdxl(tmp_path_factory) -> Model:
    model_dir = tmp_path_factory.mktemp("other-sdxl")
    build_other_sdxl(model_dir)
    return load(model_dir, add_watermarker=False)


@pytest.fixture(params=["tiny_sdxl", "other_sdxl"])
def sdxl(request) -> Model:
    return request.getfixturevalue(request.param)


def pipeline_image(model: Model, scheduler: str, seed: int, guidance_scale: float, negative_prompt) -> np.ndarray:
    model.pipe.scheduler = SCHEDULER_CLASSES[scheduler].from_config(model.scheduler_config)
    image = model.pipe(
        PROMPT,
        negative_prompt=negative_prompt,
        width=model.width,
        height=model.height,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image)


def farm_images(model: Model, scheduler: str, items, prompt=PROMPT, negatives=(), steps=STEPS) -> list[np.ndarray]:
    """As the stages render a batch: each text encoded alone, one denoise call, one decode call."""
    batch = DenoiseBatch(model.width, model.height, steps, scheduler, tuple(DenoiseItem(*item) for item in items))
    prompts = [txt2img.encode_text(model.encoders, prompt)] * len(items)
    negatives = [txt2img.encode_text(model.encoders, text) for text in negatives] if batch.guided else []
    latents = txt2img.denoise(model.denoiser, batch, prompts, negatives)
    return [np.asarray(image) for image in txt2img.decode(model.vae, latents)]


# (guidance_scale, the farm's negative prompt, diffusers' negative_prompt): the farm's "" is diffusers' None.
CASES = {
    "guided": (5.0, NEGATIVE_PROMPT, NEGATIVE_PROMPT),
    "guided-without-negative": (5.0, "", None),
    "unguided": (1.0, "", None),
}


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "euler_a"])
@pytest.mark.parametrize("case", CASES)
def test_stages_are_pixel_identical_to_the_pipeline(sdxl, case, scheduler):
    guidance_scale, negative, diffusers_negative = CASES[case]
    expected = pipeline_image(sdxl, scheduler, 3, guidance_scale, diffusers_negative)
    (image,) = farm_images(sdxl, scheduler, [(3, guidance_scale)], negatives=[negative])
    assert image.shape == expected.shape == (sdxl.height, sdxl.width, 3)
    assert np.array_equal(image, expected)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_a_batch_is_within_a_level_of_each_items_pipeline_image(sdxl, scheduler):
    items = [(0, 5.0, NEGATIVE_PROMPT), (1, 7.5, ""), (2, 5.0, NEGATIVE_PROMPT)]
    images = farm_images(sdxl, scheduler, [item[:2] for item in items], negatives=[item[2] for item in items])
    for image, (seed, guidance_scale, negative) in zip(images, items, strict=True):
        expected = pipeline_image(sdxl, scheduler, seed, guidance_scale, negative or None)
        assert np.abs(image.astype(int) - expected).max() <= 1


def test_embeddings_are_typed_picklable_and_zero_for_no_negative_prompt(sdxl):
    encoders = sdxl.encoders
    embedding = txt2img.encode_text(encoders, PROMPT)
    width = sum(encoder.config.hidden_size for encoder in encoders.encoders)
    assert embedding.hidden.shape == (1, 77, width)
    assert embedding.pooled.shape == (1, encoders.encoders[1].config.projection_dim)
    travelled = pickle.loads(pickle.dumps(embedding.cpu()))
    assert torch.equal(travelled.hidden, embedding.hidden) and torch.equal(travelled.pooled, embedding.pooled)
    empty = txt2img.encode_text(encoders, "")
    assert not empty.hidden.any() and not empty.pooled.any()
    assert empty.hidden.shape == embedding.hidden.shape and empty.pooled.shape == embedding.pooled.shape


def test_tiny_sdxl_images_vary_with_seed_and_prompt(tiny_sdxl):
    # As tests/unit/test_models.py asks of tiny-sd, on a 0-255 scale: diffusers' default guidance, 5 steps.
    def render(prompt: str, seed: int) -> np.ndarray:
        (image,) = farm_images(tiny_sdxl, "euler", [(seed, 7.5)], prompt=prompt, negatives=[""], steps=5)
        return image.astype(float)

    fox = render("a red fox", 0)
    assert fox.shape == (128, 128, 3)
    assert fox.std() > 0.05 * 255
    assert np.abs(fox - render("a red fox", 1)).mean() > 0.05 * 255
    assert np.abs(fox - render("a lighthouse", 0)).mean() > 0.04 * 255


def test_tiled_decode_equals_the_whole_decode(sdxl):
    latents = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(0))
    whole = np.asarray(txt2img.decode(sdxl.vae, latents)[0]).astype(int)
    tiled = np.asarray(tiled_decode(sdxl.vae, latents, core=8)).astype(int)
    assert tiled.shape == whole.shape
    # Only the order of floating-point sums differs: at most one level, in a handful of pixels.
    assert np.abs(tiled - whole).max() <= 1
    assert (tiled != whole).mean() < 0.001


def test_fp16_loading_keeps_a_force_upcast_vae_in_fp32_where_the_pipeline_does(tiny_sdxl_dir, model_cache_dir):
    assert txt2img.load_vae(tiny_sdxl_dir, "cpu", torch.float16).dtype == torch.float32
    # StableDiffusionPipeline decodes in the model's dtype, whatever force_upcast says.
    tiny_sd_dir = models.resolve_model("builtin:tiny-sd", model_cache_dir)
    assert txt2img.load_vae(tiny_sd_dir, "cpu", torch.float16).dtype == torch.float16


def test_sd_models_still_render_as_the_sd_pipeline(model_cache_dir):
    sd = load(models.resolve_model("builtin:tiny-sd", model_cache_dir), StableDiffusionPipeline)
    assert sd.encoders.pipeline == txt2img.SD_PIPELINE and len(sd.encoders.encoders) == 1
    assert txt2img.encode_text(sd.encoders, "").pooled is None
    for guidance_scale, negative, diffusers_negative in CASES.values():
        expected = pipeline_image(sd, "pndm", 3, guidance_scale, diffusers_negative)
        (image,) = farm_images(sd, "pndm", [(3, guidance_scale)], negatives=[negative])
        assert np.array_equal(image, expected)
