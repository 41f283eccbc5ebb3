"""The img2img and inpaint kinds' work: every combination once, a batch key's items together, sizes as rounded."""

import io
import itertools

import pytest
from PIL import Image

from renderfarm.cluster import kinds
from renderfarm.cluster.config import FarmConfig, LimitsConfig
from renderfarm.cluster.kinds.img2img import batch_key
from renderfarm.cluster.model_info import ModelInfo
from renderfarm.errors import InvalidJobError
from renderfarm.v1 import farm_pb2 as pb

CONFIG = FarmConfig(output_dir="out", model_cache_dir="models", state_dir="state", limits=LimitsConfig(max_pixels=512 * 512))


def model_info(model: str) -> ModelInfo:
    pipeline = {"builtin:tiny-sd": "StableDiffusionPipeline", "builtin:tiny-sd-inpaint": "StableDiffusionInpaintPipeline"}
    return ModelInfo(
        pipeline=pipeline[model], width=128, height=128, scheduler="pndm", vae_scale_factor=8, latent_channels=4,
        decode_segments=17, decode_halo=9, is_upscaler=False, max_noise_level=0, unet_alignment=4,
    )  # fmt: skip


def png(width: int, height: int, color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_combination_once_with_each_images_rounded_size_and_keys_together():
    images = [png(100, 76), png(64, 64), png(64, 64, (1, 2, 3))]
    request = pb.Img2ImgSpec(model="builtin:tiny-sd", images=images, prompts=["a", "b"], strengths=[0.3, 0.8],
                             seeds=[0, 1], guidance_scales=[1.0, 7.5], steps=[10])  # fmt: skip
    work = kinds.validate(pb.SubmitJobRequest(img2img=request), CONFIG, model_info)
    specs = [spec for spec, _ in work.specs()]
    assert work.total == len(specs) == len(set(specs)) == 3 * 2 * 2 * 2 * 2
    assert {(spec.width, spec.height) for spec in specs} == {(96, 72), (64, 64)}
    assert {spec.strength for spec in specs} == {0.3, 0.8} and {spec.scheduler for spec in specs} == {"pndm"}
    keys = [key for key, _ in itertools.groupby(specs, key=batch_key)]
    assert len(keys) == len(set(keys))  # a key's items come in one run, so a job fills its batches


def test_an_inpaint_job_names_its_mask_and_defaults_to_strength_1():
    request = pb.InpaintSpec(model="builtin:tiny-sd-inpaint", image=png(64, 64), mask=png(64, 64), prompts=["a"])
    (spec, source), = kinds.validate(pb.SubmitJobRequest(inpaint=request), CONFIG, model_info).specs()
    assert spec.strength == 1.0 and spec.mask_sha256 == source.mask_sha256 and source.mask == request.mask


@pytest.mark.parametrize("field, request_", [
    ("img2img", pb.Img2ImgSpec(model="builtin:tiny-sd", images=[png(8, 8)] * 10, prompts=["a"] * 10, seeds=range(1001))),
    ("img2img.images[0]", pb.Img2ImgSpec(model="builtin:tiny-sd", images=[png(1024, 1024)], prompts=["a"])),
    ("img2img.images[0]", pb.Img2ImgSpec(model="builtin:tiny-sd", images=[png(4, 64)], prompts=["a"])),
])  # fmt: skip
def test_limits_name_the_field(field, request_):
    with pytest.raises(InvalidJobError) as raised:
        kinds.validate(pb.SubmitJobRequest(img2img=request_), CONFIG, model_info)
    assert raised.value.field == field
