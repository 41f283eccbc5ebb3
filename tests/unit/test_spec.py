import json

import pytest
from PIL import Image

from renderfarm.spec import ImageSpec, UpscaledImageSpec, encode_png, manifest_line, read_spec, spec_from_json

SPEC = ImageSpec(
    model="builtin:tiny-sd",
    prompt="a red fox, golden hour",
    negative_prompt="blurry",
    seed=3,
    width=64,
    height=48,
    steps=30,
    guidance_scale=7.5,
    scheduler="euler_a",
)


def test_png_carries_the_spec_and_a1111_parameters():
    png = encode_png(Image.new("RGB", (64, 48), (10, 20, 30)), SPEC)
    assert read_spec(png) == SPEC
    with Image.open(__import__("io").BytesIO(png)) as image:
        assert image.text["parameters"] == (
            "a red fox, golden hour\n"
            "Negative prompt: blurry\n"
            "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 64x48, Model: builtin:tiny-sd"
        )
        assert json.loads(image.text["renderfarm"]).keys() == {
            "model", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "scheduler"
        }


def test_file_name_is_deterministic_and_distinguishes_specs():
    same = ImageSpec(**vars(SPEC))
    other = ImageSpec(**{**vars(SPEC), "guidance_scale": 5.0})
    assert SPEC.file_name == same.file_name
    assert SPEC.file_name != other.file_name
    assert SPEC.file_name.startswith("a-red-fox-golden-hour-3-") and SPEC.file_name.endswith(".png")
    assert "/" not in ImageSpec(**{**vars(SPEC), "prompt": "../../etc/passwd"}).file_name


def test_manifest_line_round_trips():
    line = json.loads(manifest_line("x.png", SPEC))
    assert line["file"] == "x.png" and ImageSpec(**line["spec"]) == SPEC


def test_read_spec_refuses_a_plain_png(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no renderfarm spec"):
        read_spec(tmp_path / "plain.png")


UPSCALED = UpscaledImageSpec(
    model="builtin:tiny-sd-x4-upscaler", source_sha256="ab" * 32, prompt=SPEC.prompt, negative_prompt="blurry",
    noise_level=20, steps=2, guidance_scale=9.0, seed=3, width=256, height=192, tile=128,
)  # fmt: skip


def test_an_upscaled_input_image_keeps_its_json_and_a_sweep_images_names_its_source():
    assert "source" not in json.loads(UPSCALED.to_json()) and spec_from_json(UPSCALED.to_json()) == UPSCALED
    chained = UpscaledImageSpec(**{**vars(UPSCALED), "source": SPEC})
    assert json.loads(chained.to_json())["source"] == json.loads(SPEC.to_json())
    png = encode_png(Image.new("RGB", (256, 192)), chained)
    assert read_spec(png) == chained and chained.file_name != UPSCALED.file_name
    with Image.open(__import__("io").BytesIO(png)) as image:
        assert image.text["parameters"] == (
            "a red fox, golden hour\n"
            "Negative prompt: blurry\n"
            "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 64x48, Model: builtin:tiny-sd, "
            "Hires upscale: 4, Hires resize: 256x192, Hires steps: 2, Hires upscaler: builtin:tiny-sd-x4-upscaler, "
            "Hires CFG scale: 9, Noise level: 20"
        )
    assert json.loads(manifest_line("x.png", UPSCALED))["spec"].keys() == json.loads(UPSCALED.to_json()).keys()
