"""The x4 upscaler's plain functions, without Ray: pixel-identical to StableDiffusionUpscalePipeline."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

from renderfarm.actors import builtin, models, txt2img, upscale_x4
from renderfarm.actors.exchange import WindowExchange

PROMPT = "a red fox in the snow"
NEGATIVE_PROMPT = "blurry"
STEPS = 3
NOISE_LEVEL = 20


@pytest.fixture(scope="module")
def upscaler_dir(model_cache_dir) -> Path:
    return models.resolve_model("builtin:tiny-sd-x4-upscaler", model_cache_dir)


@pytest.fixture(scope="module")
def pipe(upscaler_dir) -> StableDiffusionUpscalePipeline:
    pipe = StableDiffusionUpscalePipeline.from_pretrained(upscaler_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_encoders(upscaler_dir) -> txt2img.TextEncoders:
    return txt2img.load_text_encoders(upscaler_dir, "cpu", torch.float32)


@pytest.fixture(scope="module")
def low_res_image() -> PIL.Image.Image:
    """32 wide and 40 high: a transposed width and height would show."""
    rows, columns = np.mgrid[0:40, 0:32]
    speckle = np.random.default_rng(0).integers(0, 64, (40, 32))
    pixels = np.stack([rows * 6, columns * 8, 128 + speckle], axis=-1)
    return PIL.Image.fromarray(pixels.astype(np.uint8))


def upscale_stage_by_stage(pipe, text_encoders, image: PIL.Image.Image, seed: int, guidance_scale: float) -> np.ndarray:
    prompt_embeds = txt2img.encode_text(text_encoders, PROMPT)
    negative_embeds = txt2img.encode_text(text_encoders, NEGATIVE_PROMPT)
    latents = upscale_x4.upscale_latents(
        pipe.unet,
        pipe.scheduler,
        pipe.low_res_scheduler,
        upscale_x4.preprocess(image, pipe.vae_scale_factor),
        prompt_embeds,
        negative_embeds,
        steps=STEPS,
        guidance_scale=guidance_scale,
        noise_level=NOISE_LEVEL,
        seed=seed,
    )
    return np.asarray(txt2img.decode(pipe.vae, latents)[0])


def test_builtin_resolves_and_loads_as_the_upscale_pipeline(upscaler_dir, model_cache_dir, pipe):
    assert upscaler_dir == model_cache_dir / "builtin" / f"tiny-sd-x4-upscaler-{builtin.BUILTIN_VERSION}"
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert isinstance(pipe.low_res_scheduler, DDPMScheduler)
    assert pipe.config.max_noise_level == 350
    assert pipe.vae.config.scaling_factor == 0.08333
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels + 3
    assert pipe.unet.config.num_class_embeds == 1000


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_stages_are_pixel_identical_to_the_pipeline(pipe, text_encoders, low_res_image, seed, guidance_scale):
    expected = pipe(
        prompt=PROMPT,
        image=low_res_image,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        noise_level=NOISE_LEVEL,
        negative_prompt=NEGATIVE_PROMPT,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    expected = np.asarray(expected)

    upscaled = upscale_stage_by_stage(pipe, text_encoders, low_res_image, seed, guidance_scale)
    assert upscaled.shape == expected.shape == (4 * 40, 4 * 32, 3)
    assert np.array_equal(upscaled, expected)


def test_upscaled_images_vary_with_seed_and_input(pipe, text_encoders, low_res_image):
    upscaled = upscale_stage_by_stage(pipe, text_encoders, low_res_image, seed=0, guidance_scale=1.0).astype(float)
    assert upscaled.std() > 10
    other_seed = upscale_stage_by_stage(pipe, text_encoders, low_res_image, seed=1, guidance_scale=1.0)
    assert np.abs(upscaled - other_seed).mean() > 10
    flipped = upscale_stage_by_stage(pipe, text_encoders, low_res_image.transpose(PIL.Image.FLIP_TOP_BOTTOM), 0, 1.0)
    assert np.abs(upscaled - flipped).mean() > 10


def spread_latents(pipe, text_encoders, image: PIL.Image.Image, parties: int, tile: int) -> list[torch.Tensor]:
    """Each party's latents, the parties run on threads meeting at a real WindowExchange."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    windows = WindowExchange(join_timeout_s=60, round_timeout_s=60)

    def gather(values: dict) -> dict:
        return asyncio.run_coroutine_threadsafe(windows.gather("image", parties, values), loop).result()

    def party(rank: int) -> torch.Tensor:
        return upscale_x4.upscale_latents(
            pipe.unet,
            DDIMScheduler.from_config(pipe.scheduler.config),
            DDPMScheduler.from_config(pipe.low_res_scheduler.config),
            upscale_x4.preprocess(image, pipe.vae_scale_factor),
            txt2img.encode_text(text_encoders, PROMPT),
            txt2img.encode_text(text_encoders, NEGATIVE_PROMPT),
            steps=2,
            guidance_scale=7.5,
            noise_level=NOISE_LEVEL,
            seed=0,
            tile=tile,
            share=upscale_x4.Share(rank, parties, gather),
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray replica runs
    try:
        with ThreadPoolExecutor(parties) as pool:
            return list(pool.map(party, range(parties)))
    finally:
        torch.set_num_threads(threads)
        loop.call_soon_threadsafe(loop.stop)


def test_windows_spread_over_parties_give_the_same_latents_as_one_party(pipe, text_encoders, low_res_image):
    upscale_x4.synchronise_group_norms(pipe.unet)
    assert len(upscale_x4.tile_windows(40, 32, 16, align=4)) == 12
    (alone,) = spread_latents(pipe, text_encoders, low_res_image, parties=1, tile=16)
    spread = spread_latents(pipe, text_encoders, low_res_image, parties=3, tile=16)
    assert all(torch.equal(latents, alone) for latents in spread)
    # The tiles matter: one window over the whole image gives other latents.
    (one_window,) = spread_latents(pipe, text_encoders, low_res_image, parties=1, tile=64)
    assert not torch.equal(one_window, alone)
