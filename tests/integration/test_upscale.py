"""4x upscaling jobs: parity with StableDiffusionUpscalePipeline, and tiles that do not show."""

import dataclasses
import resource

import numpy as np
import pytest
import torch
from PIL import Image

import renderfarm as rf
from renderfarm.actors.models import resolve_model
from renderfarm.actors.upscale_x4 import tile_windows
from renderfarm.cli import main as cli
from renderfarm.spec import ImageSpec, UpscaledImageSpec, read_spec

from .conftest import pixels


def low_res(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth test image: coarse noise resized up, like a real photo's low frequencies."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def upscale_reference(model_cache_dir):
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(resolve_model("builtin:tiny-sd-x4-upscaler", model_cache_dir))
    pipe.set_progress_bar_config(disable=True)

    def render(image: Image.Image, spec: UpscaledImageSpec) -> np.ndarray:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as a Ray replica runs
        try:
            result = pipe(
                prompt=spec.prompt, image=image, num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                noise_level=spec.noise_level, negative_prompt=spec.negative_prompt or None,
                generator=torch.Generator("cpu").manual_seed(spec.seed),
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        return np.asarray(result.images[0])

    return render


def test_one_tile_input_is_pixel_identical_to_diffusers(farm, upscale_reference):
    images = [low_res(40, 32, seed=0), low_res(32, 48, seed=1)]
    with rf.Client(farm.address) as client:
        job = client.upscale(images, prompt="a red fox", negative_prompt="blurry", steps=4, seed=3)
        results = {r.spec.source_sha256: r for r in job.results()}
    assert len(results) == 2
    for result in results.values():
        source = next(i for i in images if i.size == (result.spec.width // 4, result.spec.height // 4))
        assert result.image.size == (source.width * 4, source.height * 4)
        assert np.array_equal(np.asarray(result.image), upscale_reference(source, result.spec))


def test_tiled_upscale_is_close_to_one_piece_and_shows_no_seams(farm):
    image = low_res(160, 128, seed=2)
    with rf.Client(farm.address) as client:
        (one_piece,) = client.upscale(image, prompt="a lighthouse", steps=8, tile=256).results()
        (tiled,) = client.upscale(image, prompt="a lighthouse", steps=8, tile=64).results()
    a, b = np.asarray(one_piece.image).astype(float), np.asarray(tiled.image).astype(float)
    assert 10 * np.log10(255**2 / ((a - b) ** 2).mean()) >= 30
    # Seams: the horizontal gradient across the 64-px tile grid's blend zones vs everywhere.
    gradient = np.abs(np.diff(b, axis=1)).mean(axis=(0, 2))
    borders = [x * 4 for x in (48, 80, 112)]  # where windows of 64 with stride 32 overlap, in output pixels
    assert np.mean([gradient[x - 1 : x + 1].mean() for x in borders]) <= 1.1 * gradient.mean()


def part_counts(farm) -> list[int]:
    """Shares of spread images each upscaler replica of the farm has run (the pool starts with the first upscale)."""
    replicas = farm.farm.stats().stages["upscaler"].replicas
    return [replica.work_done for replica in replicas] or [0] * farm.farm.config.upscalers.replicas


def test_replica_count_does_not_change_a_pixel(start_farm):
    # Nine windows each: on three replicas, each image's windows are spread over all three, and
    # the three images' parts queue on every replica at once.
    assert len(tile_windows(32, 32, 16, align=4)) == 9
    images = [low_res(32, 32, seed=s) for s in range(3)]
    outputs = []
    for upscalers in (1, 3):
        farm = start_farm(upscalers=upscalers, decoders=2)
        with rf.Client(farm.address) as client:
            results = client.upscale(images, steps=3, tile=16).results()
            outputs.append({r.spec: np.asarray(r.image) for r in results})
    assert outputs[0].keys() == outputs[1].keys() and len(outputs[0]) == 3
    assert all(np.array_equal(outputs[0][spec], outputs[1][spec]) for spec in outputs[0])
    assert part_counts(farm) == [3, 3, 3]
    assert farm.farm.stats().exchange_sessions == 0  # every image's session closed


GIB = 2**30


@pytest.mark.slow
def test_a_960x540_input_upscales_to_3840x2160_spread_over_3_replicas_within_6_gb_a_process(start_farm):
    farm = start_farm(upscalers=3, decoders=2)
    parts_before = part_counts(farm)
    with rf.Client(farm.address) as client:
        # The default 128-px tiles: 112 windows, about 37 on each replica.
        (result,) = client.upscale(low_res(960, 540, seed=4), steps=1).results()
    assert result.image.size == (3840, 2160)
    assert [after - before for after, before in zip(part_counts(farm), parts_before)] == [1, 1, 1]
    peaks = farm.farm.stats().peak_rss_bytes
    print("peak RSS (GiB) of encoder, denoiser, 2 decoders, 3 upscalers, exchange:", [round(peak / GIB, 2) for peak in peaks])
    assert max(peaks) <= 6 * GIB, [f"{peak / GIB:.2f} GiB" for peak in peaks]
    # This process runs the scheduler (and, before this test, others).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 <= 6 * GIB


def test_cli_upscale_writes_a_4x_png(farm, tmp_path):
    low_res(48, 40).save(tmp_path / "in.png")
    assert cli(["upscale", str(tmp_path / "in.png"), "--out", str(tmp_path / "out"), "--steps", "2",
                "--address", farm.address]) == 0  # fmt: skip
    (png,) = (tmp_path / "out").glob("*.png")
    assert pixels(png).shape == (160, 192, 3)
    assert read_spec(png).noise_level == 20


def test_a_sweep_with_upscale_4_gives_what_upscaling_its_images_gives(farm):
    sweep = dict(prompts=["a red fox", "a lighthouse"], seeds=5, steps=2, width=64, height=64)
    with rf.Client(farm.address) as client:
        job = client.sweep(**sweep, upscale=4, upscale_steps=2)
        assert job.total == 2
        chained = {r.spec.source: r for r in job.results()}
        images = {r.spec: r for r in client.sweep(**sweep).results()}
        assert chained.keys() == images.keys() and len(chained) == 2
        for source, result in chained.items():
            assert isinstance(source, ImageSpec) and result.image.size == (256, 256)
            assert read_spec(result.png) == result.spec
            (separate,) = client.upscale(
                images[source].png, prompt=source.prompt, negative_prompt=source.negative_prompt, seed=source.seed,
                steps=2,
            ).results()  # fmt: skip
            # The same parameters and source hash; only the link to the sweep image differs.
            assert dataclasses.replace(result.spec, source=None) == separate.spec
            assert np.array_equal(np.asarray(result.image), np.asarray(separate.image))


def test_cli_sweep_upscale_4_writes_the_4x_pngs(farm, tmp_path):
    assert cli(["sweep", "--prompt", "a red fox", "--seeds", "0-1", "--steps", "2", "--width", "64", "--height", "48",
                "--upscale", "4", "--upscale-steps", "2", "--out", str(tmp_path), "--address", farm.address]) == 0  # fmt: skip
    pngs = sorted(tmp_path.glob("*.png"))
    assert [pixels(png).shape for png in pngs] == [(192, 256, 3)] * 2
    assert sorted(read_spec(png).source.seed for png in pngs) == [0, 1]
    assert (tmp_path / "manifest.jsonl").read_text().count('"source"') == 2


def test_bad_upscales_name_the_field(farm):
    with rf.Client(farm.address) as client:
        for kwargs, field in (
            (dict(images=[b"not an image"]), "upscale.images[0]"),
            (dict(images=[low_res(32, 32)], noise_level=351), "upscale.noise_level"),
            (dict(images=[low_res(32, 32)], model="builtin:tiny-sd"), "upscale.model"),
            (dict(images=[low_res(32, 32)], tile=12), "upscale.tile"),
        ):
            with pytest.raises(rf.InvalidJobError) as raised:
                client.upscale(**kwargs)
            assert raised.value.field == field
        for kwargs, field in ((dict(upscale=2), "sweep.upscale"), (dict(upscale=4, upscale_tile=12), "sweep.upscale_tile")):
            with pytest.raises(rf.InvalidJobError) as raised:
                client.sweep("a red fox", **kwargs)
            assert raised.value.field == field
