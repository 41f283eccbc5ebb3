"""Every stage in every pool dtype, on CPU and without Ray: bfloat16 renders near float32 and as diffusers' own
pipelines do in bfloat16, an fp16 VAE upcasts where its pipeline's does, and the speed options reach the models."""

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from renderfarm.actors import img2img, models, previews, stages, tiled_decode, txt2img
from renderfarm.actors.schedulers import SCHEDULER_CLASSES
from renderfarm.actors.speed import TEXT_ENCODER_ATTENTION, Speed
from renderfarm.actors.tiles import plan_tiles
from renderfarm.actors.txt2img import DenoiseBatch, DenoiseItem
from renderfarm.cluster.config import PoolConfig
from renderfarm.spec import UpscaledImageSpec

PROMPT = "a red fox in the snow"
NEGATIVE_PROMPT = "blurry"
STEPS = 4
# A bfloat16 image may stray this far from the float32 one, as a mean over its pixels (0-255): the tiny models'
# own bfloat16 rounding stays under it (SDXL's, the largest, ~7), while a dtype bug (a wrong scale, a value in
# the wrong range, an overflow) moves an image as far as another seed does (test_sdxl, test_models: > 12).
MEAN_TOLERANCE = 0.04 * 255


def model_dir(model_cache_dir, name: str) -> Path:
    return models.resolve_model(f"builtin:{name}", model_cache_dir)


def mean_difference(image: np.ndarray, reference: np.ndarray) -> float:
    assert image.shape == reference.shape
    return float(np.abs(image.astype(int) - reference.astype(int)).mean())


def render(directory: Path, dtype: torch.dtype, scheduler: str, guidance_scale: float, speed=Speed()) -> np.ndarray:
    """txt2img as the stages run it, every stage in `dtype`."""
    encoders = txt2img.load_text_encoders(directory, "cpu", dtype)
    denoiser = txt2img.load_denoiser(directory, "cpu", dtype, speed)
    vae = txt2img.load_vae(directory, "cpu", dtype, speed)
    width, height = models.default_image_size(directory)
    batch = DenoiseBatch(width, height, STEPS, scheduler, (DenoiseItem(0, guidance_scale),))
    negatives = [txt2img.encode_text(encoders, NEGATIVE_PROMPT)] if batch.guided else []
    latents = txt2img.denoise(denoiser, batch, [txt2img.encode_text(encoders, PROMPT)], negatives)
    assert latents.dtype == dtype and torch.isfinite(latents).all()
    return np.asarray(txt2img.decode(vae, latents)[0])


# SD unguided with PNDM, which keeps the UNet's outputs across steps; SDXL guided with Euler.
@pytest.mark.parametrize(
    ("name", "pipeline_class", "scheduler", "guidance_scale"),
    [("tiny-sd", StableDiffusionPipeline, "pndm", 1.0), ("tiny-sdxl", StableDiffusionXLPipeline, "euler", 5.0)],
)
def test_bfloat16_renders_near_float32_and_as_the_pipeline_does_in_bfloat16(
    model_cache_dir, name, pipeline_class, scheduler, guidance_scale
):
    directory = model_dir(model_cache_dir, name)
    image = render(directory, torch.bfloat16, scheduler, guidance_scale)
    assert mean_difference(image, render(directory, torch.float32, scheduler, guidance_scale)) < MEAN_TOLERANCE

    pipe = pipeline_class.from_pretrained(directory, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SCHEDULER_CLASSES[scheduler].from_config(pipe.scheduler.config)
    expected = pipe(
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT if guidance_scale > 1 else None,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    # The loop's latents and scheduler math are the pipeline's, in its dtype; only the post-processing differs,
    # in float32 here (the pipeline's runs in bfloat16), by at most a level.
    assert np.abs(image.astype(int) - np.asarray(expected)).max() <= 1


def source_image() -> PIL.Image.Image:
    """Gradients and ripples, 133x101: every model rounds the size down."""
    y, x = np.mgrid[0:101, 0:133] / np.array([101, 133]).reshape(2, 1, 1)
    channels = [x, y, 0.5 + 0.5 * np.sin(12 * (x + y))]
    return PIL.Image.fromarray((255 * np.stack(channels, axis=-1)).round().astype(np.uint8))


def edit(directory: Path, dtype: torch.dtype, inpaint: bool) -> np.ndarray:
    """img2img (or inpainting) as the stages run it: the source encoded by a VAE, then denoised and decoded."""
    encoders = txt2img.load_text_encoders(directory, "cpu", dtype)
    denoiser = txt2img.load_denoiser(directory, "cpu", dtype)
    vae = txt2img.load_vae(directory, "cpu", dtype)
    width, height = img2img.source_size(source_image(), denoiser.vae_scale_factor)
    mask = np.zeros((101, 133), dtype=np.uint8)
    mask[20:80, 30:110] = 255
    source = img2img.encode_source(vae, source_image(), width, height, PIL.Image.fromarray(mask) if inpaint else None)
    batch = DenoiseBatch(width, height, STEPS, "euler", (DenoiseItem(0, 5.0),))
    prompts, negatives = [txt2img.encode_text(encoders, PROMPT)], [txt2img.encode_text(encoders, NEGATIVE_PROMPT)]
    latents = img2img.denoise(denoiser, batch, 0.6, [source], prompts, negatives)
    assert torch.isfinite(latents).all()
    return np.asarray(txt2img.decode(vae, latents)[0])


@pytest.mark.parametrize(("name", "inpaint"), [("tiny-sd", False), ("tiny-sd-inpaint", True), ("tiny-sdxl", False)])
def test_img2img_and_inpainting_in_bfloat16_are_near_float32(model_cache_dir, name, inpaint):
    directory = model_dir(model_cache_dir, name)
    difference = mean_difference(edit(directory, torch.bfloat16, inpaint), edit(directory, torch.float32, inpaint))
    assert difference < MEAN_TOLERANCE


def test_the_upscaler_in_bfloat16_takes_float32_embeddings_and_is_near_float32(model_cache_dir):
    """Pools have dtypes of their own: here the encoders run float32, the upscaler and the VAE bfloat16."""
    model = "builtin:tiny-sd-x4-upscaler"
    directory = model_dir(model_cache_dir, "tiny-sd-x4-upscaler")
    encoders = txt2img.load_text_encoders(directory, "cpu", torch.float32)
    embeds = [txt2img.encode_text(encoders, text) for text in (PROMPT, "")]
    rows, columns = np.mgrid[0:40, 0:32]
    low_res = PIL.Image.fromarray(np.stack([rows * 6, columns * 8, 128 + 0 * rows], axis=-1).astype(np.uint8))
    buffer = io.BytesIO()
    low_res.save(buffer, format="PNG")
    # tile=24: the UNet runs in four windows, whose GroupNorms meet, in bfloat16 too.
    spec = UpscaledImageSpec(model, "0" * 64, PROMPT, "", noise_level=20, steps=3, guidance_scale=7.5, seed=0,
                             width=128, height=160, tile=24)  # fmt: skip

    def upscaled(dtype: str) -> np.ndarray:
        latents = stages.UpscalerStage(str(model_cache_dir), PoolConfig(dtype=dtype)).upscale(
            model, buffer.getvalue(), spec, *embeds
        )
        assert latents.dtype == getattr(torch, dtype) and torch.isfinite(latents).all()
        vae = txt2img.load_vae(directory, "cpu", getattr(torch, dtype))
        return np.asarray(txt2img.decode(vae, latents)[0])

    image = upscaled("bfloat16")
    assert image.shape == (160, 128, 3)
    assert mean_difference(image, upscaled("float32")) < MEAN_TOLERANCE


def test_a_bfloat16_tiled_decode_takes_the_denoisers_tensor_and_equals_the_whole_decode(model_cache_dir):
    directory = model_dir(model_cache_dir, "tiny-sdxl")
    vae = txt2img.load_vae(directory, "cpu", torch.bfloat16)
    latents = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = np.asarray(txt2img.decode(vae, latents)[0]).astype(int)
    tiled = np.asarray(tiled_decode.tiled_decode(vae, latents, core=8)).astype(int)
    # As in float32 (test_tiled_decode): only the order of sums differs, by a level in a few pixels.
    assert np.abs(tiled - whole).max() <= 1 and (tiled != whole).mean() < 0.01

    # A decoder replica takes a bfloat16 denoiser's tensor (which numpy cannot hold) as it takes a decode job's
    # float32 array of the same values.
    decoder = stages.DecoderStage(str(model_cache_dir), PoolConfig(dtype="bfloat16"))
    tiles = plan_tiles(24, 20, core=8, halo=4)
    *from_tensor, _ = decoder.tiled_prepare("builtin:tiny-sdxl", latents, 0, tiles)
    *from_array, _ = decoder.tiled_prepare("builtin:tiny-sdxl", latents.float().numpy(), 0, tiles)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(from_tensor, from_array, strict=True))


@pytest.mark.parametrize(
    ("name", "dtype", "runs_in"),
    [
        ("tiny-sd-x4-upscaler", torch.float16, torch.float32),
        ("tiny-sdxl", torch.float16, torch.float32),
        # The pipelines upcast an fp16 VAE only: bfloat16 has float32's range.
        ("tiny-sdxl", torch.bfloat16, torch.bfloat16),
        # StableDiffusionPipeline decodes in the model's dtype, whatever force_upcast says.
        ("tiny-sd", torch.float16, torch.float16),
    ],
)
def test_a_vae_runs_in_float32_where_its_pipeline_upcasts_it(model_cache_dir, name, dtype, runs_in):
    assert txt2img.load_vae(model_dir(model_cache_dir, name), "cpu", dtype).dtype == runs_in


def test_an_upcast_fp16_vae_decodes_what_overflows_fp16(model_cache_dir):
    directory = model_dir(model_cache_dir, "tiny-sd-x4-upscaler")
    latents = 1e4 * torch.randn(1, 4, 10, 8, generator=torch.Generator().manual_seed(0))
    in_fp16 = AutoencoderKL.from_pretrained(directory, subfolder="vae", dtype=torch.float16)
    upcast = txt2img.load_vae(directory, "cpu", torch.float16)
    with torch.inference_mode():
        assert not torch.isfinite(in_fp16.decode(txt2img.unscale_latents(in_fp16, latents.half())).sample).all()
        assert torch.isfinite(upcast.decode(txt2img.unscale_latents(upcast, latents)).sample).all()
    # The fp16 weights, run in float32: what the pipeline's upcast VAE decodes.
    expected = txt2img.decode(in_fp16.float(), latents)[0]
    assert np.array_equal(np.asarray(txt2img.decode(upcast, latents)[0]), np.asarray(expected))


def test_previews_of_bfloat16_latents_are_those_of_their_float32_values():
    latents = torch.randn(4, 16, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    factors = previews.latent_rgb(txt2img.SD_PIPELINE)
    png = previews.preview_png(latents, factors)
    assert png == previews.preview_png(latents.float(), factors)
    assert PIL.Image.open(io.BytesIO(png)).size == (12, 16)


def test_every_attention_runs_sdpa(model_cache_dir):
    directory = model_dir(model_cache_dir, "tiny-sdxl")
    encoders = txt2img.load_text_encoders(directory, "cpu", torch.float32)
    assert {encoder.config._attn_implementation for encoder in encoders.encoders} == {TEXT_ENCODER_ATTENTION}
    unet = txt2img.load_denoiser(directory, "cpu", torch.float32).unet
    vae = txt2img.load_vae(directory, "cpu", torch.float32)
    for model in (unet, vae):
        assert {type(processor) for processor in model.attn_processors.values()} == {AttnProcessor2_0}

    # A model whose attention fell back to the eager processor is set back to SDPA.
    unet.set_attn_processor(AttnProcessor())
    Speed().apply(unet, compiled=unet)
    assert {type(processor) for processor in unet.attn_processors.values()} == {AttnProcessor2_0}


def test_channels_last_changes_pixels_by_a_level_at_most(model_cache_dir):
    directory = model_dir(model_cache_dir, "tiny-sd")
    speed = Speed(channels_last=True)
    unet = txt2img.load_denoiser(directory, "cpu", torch.float32, speed).unet
    vae = txt2img.load_vae(directory, "cpu", torch.float32, speed)
    for model in (unet, vae.decoder):
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    reference = render(directory, torch.float32, "euler", 5.0)
    assert np.abs(render(directory, torch.float32, "euler", 5.0, speed).astype(int) - reference).max() <= 1


def test_a_pools_dtype_and_speed_options_reach_its_replicas_models(model_cache_dir, monkeypatch):
    # Compiling even the tiny UNet takes minutes on a CPU: record what would be compiled, and how, and run it eagerly.
    compiled = {}

    def record(function, **options):
        compiled[function.__self__] = options
        return function

    monkeypatch.setattr(torch, "compile", record)
    pool = PoolConfig(dtype="bfloat16", channels_last=True, compile="max-autotune")
    cache = str(model_cache_dir)
    unet = stages.DenoiserStage(cache, pool)._components("builtin:tiny-sd").unet
    vae, _ = stages.DecoderStage(cache, pool)._components("builtin:tiny-sd")
    assert compiled == {unet: {"mode": "max-autotune"}, vae.decoder: {"mode": "max-autotune"}}
    assert unet.dtype == vae.dtype == torch.bfloat16
    for model in (unet, vae.decoder):
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    encoders = stages.TextEncoderStage(cache, PoolConfig(dtype="float16"))._components("builtin:tiny-sd")
    assert encoders.encoders[0].dtype == torch.float16

    # Without a dtype: float16 on CUDA, float32 on a CPU; without options, the models uncompiled.
    default = stages.DenoiserStage(cache, PoolConfig())._components("builtin:tiny-sd").unet
    assert default.dtype == (torch.float16 if torch.cuda.is_available() else torch.float32)
    assert default not in compiled and default.conv_in.weight.is_contiguous()
