"""img2img and inpainting through img2img's plain functions, without Ray: pixel-identical to diffusers' pipelines."""

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

from renderfarm.actors import builtin, img2img, models, txt2img
from renderfarm.actors.img2img import SourceLatents
from renderfarm.actors.schedulers import SCHEDULER_CLASSES
from renderfarm.actors.txt2img import DenoiseBatch, DenoiseItem
from tests.unit.test_sdxl import build_other_sdxl

PROMPT = "a red fox in the snow"
NEGATIVE_PROMPT = "blurry"
STEPS = 4
# (width, height): a multiple of neither 8 nor 4, so that every model's source is rounded down.
SOURCE_SIZE = (133, 101)
# (guidance_scale, the farm's negative prompt, diffusers' negative_prompt): the farm's "" is diffusers' None.
CASES = {"guided": (5.0, NEGATIVE_PROMPT, NEGATIVE_PROMPT), "unguided": (1.0, "", None)}


@dataclass(frozen=True)
class Model:
    """One model loaded twice: as a diffusers pipeline, and as the farm's stages load it."""

    pipe: StableDiffusionImg2ImgPipeline | StableDiffusionInpaintPipeline | StableDiffusionXLImg2ImgPipeline
    scheduler_config: dict  # the pipeline's own, which the farm builds its schedulers from
    encoders: txt2img.TextEncoders
    denoiser: txt2img.DenoiseComponents
    vae: AutoencoderKL


def load(model_dir: Path, pipeline_class, **pipeline_kwargs) -> Model:
    pipe = pipeline_class.from_pretrained(model_dir, **pipeline_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return Model(
        pipe,
        pipe.scheduler.config,
        txt2img.load_text_encoders(model_dir, "cpu", torch.float32),
        txt2img.load_denoiser(model_dir, "cpu", torch.float32),
        txt2img.load_vae(model_dir, "cpu", torch.float32),
    )


def source_image(shift: float = 0.0) -> PIL.Image.Image:
    """Gradients and ripples, so that every pixel differs from its neighbours."""
    width, height = SOURCE_SIZE
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    channels = [x, y, 0.5 + 0.5 * np.sin(12 * (x + y) + 6 * shift)]
    return PIL.Image.fromarray((255 * np.stack(channels, axis=-1)).round().astype(np.uint8))


def mask_image(shift: int = 0) -> PIL.Image.Image:
    """White repaints: a rectangle whose left edge ramps from black to white, so the mask is binarised."""
    width, height = SOURCE_SIZE
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[20 + shift : 80, 30 : 110 - shift] = 255
    mask[20 + shift : 80, 30:50] = np.linspace(0, 255, 20).astype(np.uint8)
    return PIL.Image.fromarray(mask)


@pytest.fixture(scope="module")
def tiny_sd(model_cache_dir) -> Model:
    return load(models.resolve_model("builtin:tiny-sd", model_cache_dir), StableDiffusionImg2ImgPipeline)


@pytest.fixture(scope="module")
def other_sd(tmp_path_factory) -> Model:
    """A three-level UNet and VAE (latents a quarter of the image's size), of other widths."""
    model_dir = tmp_path_factory.mktemp("other-sd")
    builtin._build_sd(
        model_dir,
        unet=dict(
            sample_size=8,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=4,
        ),
        vae=dict(
            sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            norm_num_groups=4,
        ),
    )
    return load(model_dir, StableDiffusionImg2ImgPipeline)


@pytest.fixture(scope="module")
def tiny_inpaint(model_cache_dir) -> Model:
    return load(models.resolve_model("builtin:tiny-sd-inpaint", model_cache_dir), StableDiffusionInpaintPipeline)


@pytest.fixture(params=["tiny_sd", "other_sd"])
def sd(request) -> Model:
    return request.getfixturevalue(request.param)


# No invisible watermark (which the pipeline adds where its package is installed): the farm adds none.
@pytest.fixture(scope="module")
def tiny_sdxl(model_cache_dir) -> Model:
    model_dir = models.resolve_model("builtin:tiny-sdxl", model_cache_dir)
    return load(model_dir, StableDiffusionXLImg2ImgPipeline, add_watermarker=False)


@pytest.fixture(scope="module")
def other_sdxl(tmp_path_factory) -> Model:
    """Three UNet and VAE levels, and a VAE with latents_mean and latents_std."""
    model_dir = tmp_path_factory.mktemp("other-sdxl")
    build_other_sdxl(model_dir)
    return load(model_dir, StableDiffusionXLImg2ImgPipeline, add_watermarker=False)


@pytest.fixture(params=["tiny_sdxl", "other_sdxl"])
def sdxl(request) -> Model:
    return request.getfixturevalue(request.param)


def size(model: Model) -> tuple[int, int]:
    return img2img.source_size(source_image(), model.denoiser.vae_scale_factor)


def pipeline_image(
    model: Model, scheduler: str, strength: float, seed: int, guidance_scale: float, negative_prompt, image, mask=None
) -> np.ndarray:
    model.pipe.scheduler = SCHEDULER_CLASSES[scheduler].from_config(model.scheduler_config)
    # The img2img pipelines take the source's size; the inpainting one defaults to the model's, so it is told.
    width, height = size(model)
    sizes = {} if mask is None else dict(mask_image=mask, width=width, height=height)
    result = model.pipe(
        PROMPT,
        image=image,
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        generator=torch.Generator("cpu").manual_seed(seed),
        **sizes,
    )
    return np.asarray(result.images[0])


def encode(model: Model, image, mask=None) -> SourceLatents:
    return img2img.encode_source(model.vae, image, *size(model), mask)


def farm_images(model: Model, scheduler: str, strength: float, items, sources, negatives) -> list[np.ndarray]:
    """As the stages render a batch: each text and each source encoded alone, one denoise call, one decode call."""
    batch = DenoiseBatch(*size(model), STEPS, scheduler, tuple(DenoiseItem(*item) for item in items))
    prompts = [txt2img.encode_text(model.encoders, PROMPT)] * len(items)
    negatives = [txt2img.encode_text(model.encoders, text) for text in negatives] if batch.guided else []
    latents = img2img.denoise(model.denoiser, batch, strength, sources, prompts, negatives)
    return [np.asarray(image) for image in txt2img.decode(model.vae, latents)]


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("case", CASES)
def test_img2img_is_pixel_identical_to_the_pipeline(sd, case, strength, scheduler):
    guidance_scale, negative, diffusers_negative = CASES[case]
    image = source_image()
    expected = pipeline_image(sd, scheduler, strength, 3, guidance_scale, diffusers_negative, image)
    (result,) = farm_images(sd, scheduler, strength, [(3, guidance_scale)], [encode(sd, image)], [negative])
    width, height = size(sd)
    assert result.shape == expected.shape == (height, width, 3)
    assert np.array_equal(result, expected)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
@pytest.mark.parametrize("case", CASES)
def test_sdxl_img2img_is_pixel_identical_to_the_pipeline(sdxl, case, scheduler):
    guidance_scale, negative, diffusers_negative = CASES[case]
    image = source_image()
    expected = pipeline_image(sdxl, scheduler, 0.5, 3, guidance_scale, diffusers_negative, image)
    (result,) = farm_images(sdxl, scheduler, 0.5, [(3, guidance_scale)], [encode(sdxl, image)], [negative])
    assert result.shape == expected.shape
    assert np.array_equal(result, expected)


# 1.0 starts from noise alone, a branch of its own.
@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("case", CASES)
def test_inpainting_is_pixel_identical_to_the_pipeline(tiny_inpaint, case, strength, scheduler):
    guidance_scale, negative, diffusers_negative = CASES[case]
    image, mask = source_image(), mask_image()
    expected = pipeline_image(tiny_inpaint, scheduler, strength, 3, guidance_scale, diffusers_negative, image, mask)
    source = encode(tiny_inpaint, image, mask)
    (result,) = farm_images(tiny_inpaint, scheduler, strength, [(3, guidance_scale)], [source], [negative])
    assert result.shape == expected.shape == (96, 128, 3)
    assert np.array_equal(result, expected)


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_a_batch_is_within_a_level_of_each_items_pipeline_image(tiny_sd, tiny_inpaint, inpaint):
    model = tiny_inpaint if inpaint else tiny_sd
    # Each item its own seed, guidance, negative prompt and source.
    items = [(0, 5.0, NEGATIVE_PROMPT), (1, 7.5, ""), (2, 5.0, NEGATIVE_PROMPT)]
    images = [source_image(shift) for shift in range(len(items))]
    masks = [mask_image(10 * shift) if inpaint else None for shift in range(len(items))]
    sources = [encode(model, image, mask) for image, mask in zip(images, masks, strict=True)]
    results = farm_images(model, "euler_a", 0.75, [item[:2] for item in items], sources, [item[2] for item in items])
    for result, (seed, guidance_scale, negative), image, mask in zip(results, items, images, masks, strict=True):
        expected = pipeline_image(model, "euler_a", 0.75, seed, guidance_scale, negative or None, image, mask)
        assert np.abs(result.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_a_source_is_encoded_once_for_every_seed(tiny_sd, tiny_inpaint, inpaint):
    model = tiny_inpaint if inpaint else tiny_sd
    image, mask = source_image(), mask_image() if inpaint else None
    source = encode(model, image, mask)
    travelled = pickle.loads(pickle.dumps(source))
    results = {}
    for seed in (0, 1):
        expected = pipeline_image(model, "euler_a", 0.75, seed, 5.0, NEGATIVE_PROMPT, image, mask)
        (results[seed],) = farm_images(model, "euler_a", 0.75, [(seed, 5.0)], [travelled], [NEGATIVE_PROMPT])
        assert np.array_equal(results[seed], expected)
    assert not np.array_equal(results[0], results[1])


def test_source_latents_are_the_distributions_parameters_at_latent_size(tiny_inpaint):
    source = encode(tiny_inpaint, source_image(), mask_image())
    # 128x96 pixels, a VAE scale factor of 8; means and log-variances of 4 channels each.
    assert source.image_moments.shape == source.masked_moments.shape == (1, 8, 12, 16)
    assert source.mask.shape == (1, 1, 12, 16) and source.mask.dtype == torch.float32
    assert set(source.mask.unique().tolist()) == {0.0, 1.0}
    assert img2img.source_size(source_image(), 8) == (128, 96)


def test_refuses_what_it_cannot_render(tiny_sd, tiny_inpaint):
    image, mask = source_image(), mask_image()
    width, height = size(tiny_sd)
    one_item = DenoiseBatch(width, height, STEPS, "pndm", (DenoiseItem(0, 1.0),))
    prompt = [txt2img.encode_text(tiny_sd.encoders, PROMPT)]
    with pytest.raises(ValueError, match="inpainting model"):
        img2img.denoise(tiny_sd.denoiser, one_item, 0.5, [encode(tiny_sd, image, mask)], prompt, [])
    with pytest.raises(ValueError, match="takes a mask"):
        img2img.denoise(tiny_inpaint.denoiser, one_item, 0.5, [encode(tiny_inpaint, image)], prompt, [])
    with pytest.raises(ValueError, match="none of 4 steps"):
        img2img.denoise(tiny_sd.denoiser, one_item, 0.2, [encode(tiny_sd, image)], prompt, [])
    smaller = img2img.encode_source(tiny_sd.vae, image, width - 8, height)
    with pytest.raises(ValueError, match="encode it at the batch's width and height"):
        img2img.denoise(tiny_sd.denoiser, one_item, 0.5, [smaller], prompt, [])
    with pytest.raises(ValueError, match="multiples of 8"):
        img2img.encode_source(tiny_sd.vae, image, *SOURCE_SIZE)
