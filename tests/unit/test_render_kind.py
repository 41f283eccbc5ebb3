"""The render kind: exactly the given images, each validated as a sweep of one image, errors named by image."""

import dataclasses
import hashlib
from pathlib import Path

import pytest

from renderfarm import _wire
from renderfarm.cluster import kinds
from renderfarm.errors import InvalidJobError
from renderfarm.spec import ImageSpec, LoraSpec
from renderfarm.v1 import farm_pb2 as pb
from tests.unit.test_validate import CONFIG, lora_file, model_info

FOX = ImageSpec("builtin:tiny-sd", "a red fox", "blurry", 3, 64, 48, 4, 7.5, "ddim")
HERON = ImageSpec("builtin:tiny-sdxl", "a heron", "", 9, 128, 128, 2, 1.0, "euler")


def _validate(specs) -> kinds.Work:
    return kinds.validate(_wire.render_request(specs, request_id=None), CONFIG, model_info)


def test_the_images_are_exactly_the_specs_given_each_once_in_order():
    render = _validate([FOX, HERON, FOX])
    assert list(render.specs()) == [FOX, HERON] and render.total == 2
    assert kinds.stage(_wire.render_request([FOX], request_id=None)) == "denoiser"


def test_a_loras_digest_must_still_be_its_files(tmp_path):
    style = lora_file(tmp_path / "style.safetensors")
    digest = hashlib.sha256(Path(style).read_bytes()).hexdigest()
    same = dataclasses.replace(FOX, loras=(LoraSpec(style, digest, 0.5),))
    assert [spec.loras for spec in _validate([same]).specs()] == [(LoraSpec(style, digest, 0.5),)]
    changed = dataclasses.replace(FOX, loras=(LoraSpec(style, "0" * 64, 0.5),))
    with pytest.raises(InvalidJobError, match="not the LoRA the image was rendered with") as raised:
        _validate([FOX, changed])
    assert raised.value.field == "render.images[1].lora_sets[0].loras[0].sha256"


@pytest.mark.parametrize(
    "image, field",
    [
        (pb.SweepSpec(model="builtin:tiny-sd", prompts=["a", "b"], seeds=[0], guidance_scales=[7], steps=[4]),
         "render.images[1].prompts"),
        (pb.SweepSpec(model="builtin:tiny-sd", prompts=["a"], seeds=[0], guidance_scales=[7], steps=[4],
                      sizes=[pb.Size(width=100, height=64)]), "render.images[1].sizes[0].width"),
        (pb.SweepSpec(model="no-such-model", prompts=["a"], seeds=[0], guidance_scales=[7], steps=[4]),
         "render.images[1].model"),
        (pb.SweepSpec(model="builtin:tiny-sd", prompts=["a"], seeds=[0], guidance_scales=[7], steps=[4], upscale=4),
         "render.images[1].upscale"),
    ],
)  # fmt: skip
def test_a_bad_image_is_named_by_its_place_in_the_render(image, field):
    request = _wire.render_request([FOX], request_id=None)
    request.render.images.append(image)
    with pytest.raises(InvalidJobError) as raised:
        kinds.validate(request, CONFIG, model_info)
    assert raised.value.field == field and str(raised.value).startswith(field + ": ")


def test_the_sdk_refuses_what_is_no_generated_images_spec():
    with pytest.raises(InvalidJobError) as raised:
        _wire.render_request([FOX, "a red fox"], request_id=None)
    assert raised.value.field == "specs[1]"
    with pytest.raises(InvalidJobError, match="render.images: must hold at least one image"):
        kinds.validate(pb.SubmitJobRequest(render=pb.RenderSpec()), CONFIG, model_info)
