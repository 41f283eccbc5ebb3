import math
import uuid
from pathlib import Path

import pytest

from renderfarm.cluster import kinds
from renderfarm.cluster.config import FarmConfig, LimitsConfig
from renderfarm.cluster.kinds import sweep as sweep_kind
from renderfarm.cluster.kinds.upscale import UpscaleSettings
from renderfarm.cluster.model_info import ModelInfo
from renderfarm.cluster.validate import check_id
from renderfarm.errors import InvalidJobError
from renderfarm.spec import LoraSpec
from renderfarm.v1 import farm_pb2 as pb

LIMITS = LimitsConfig(max_images_per_job=1000, max_side=1024, max_prompt_chars=200, max_pixels=512 * 768)


def model_info(model: str) -> ModelInfo:
    if model == "builtin:tiny-sd-x4-upscaler":
        return ModelInfo(
            pipeline="StableDiffusionUpscalePipeline", width=128, height=128, scheduler="ddim", vae_scale_factor=4, latent_channels=4, decode_segments=7,
            decode_halo=5, is_upscaler=True, max_noise_level=350, unet_alignment=4,
        )  # fmt: skip
    if model == "builtin:tiny-sdxl":
        return ModelInfo(
            pipeline="StableDiffusionXLPipeline", width=256, height=256, scheduler="euler", vae_scale_factor=8,
            latent_channels=4, decode_segments=17, decode_halo=9, is_upscaler=False, max_noise_level=0, unet_alignment=4,
        )  # fmt: skip
    if model != "builtin:tiny-sd":
        raise ValueError(f"unknown model {model!r}")
    return ModelInfo(
        pipeline="StableDiffusionPipeline", width=128, height=128, scheduler="pndm", vae_scale_factor=8, latent_channels=4, decode_segments=17, decode_halo=9,
        is_upscaler=False, max_noise_level=0, unet_alignment=4,
    )


CONFIG = FarmConfig(output_dir=Path("out"), model_cache_dir=Path("models"), state_dir=Path("state"), limits=LIMITS)
# A sweep upscaled 4x.
CHAIN = dict(upscale=4, upscale_model="builtin:tiny-sd-x4-upscaler")


def request(**sweep) -> pb.SweepSpec:
    sweep.setdefault("model", "builtin:tiny-sd")
    sweep.setdefault("prompts", ["a red fox"])
    return pb.SweepSpec(**sweep)


def test_unset_axes_take_defaults():
    sweep = sweep_kind.validate(request(), CONFIG, model_info)
    (spec,) = sweep.specs()
    assert (spec.seed, spec.guidance_scale, spec.steps) == (0, 7.5, 50)
    assert (spec.width, spec.height, spec.scheduler, spec.loras) == (128, 128, "pndm", None)


def test_a_models_axis_takes_each_models_own_size_and_scheduler_and_runs_models_in_turn():
    sweep = sweep_kind.validate(
        request(model="", models=["builtin:tiny-sd", "builtin:tiny-sdxl"], seeds=[0, 1]), CONFIG, model_info
    )
    specs = list(sweep.specs())
    assert sweep.total == len(specs) == 4
    assert [(s.model, s.width, s.scheduler) for s in specs] == [
        ("builtin:tiny-sd", 128, "pndm"), ("builtin:tiny-sd", 128, "pndm"),
        ("builtin:tiny-sdxl", 256, "euler"), ("builtin:tiny-sdxl", 256, "euler"),
    ]  # fmt: skip


BAD = [
    ("sweep.prompts", dict(prompts=[])),
    ("sweep.prompts[1]", dict(prompts=["ok", "   "])),
    ("sweep.prompts[0]", dict(prompts=["x" * 201])),
    ("sweep.negative_prompt", dict(negative_prompt="x" * 201)),
    ("sweep.sizes[0].width", dict(sizes=[pb.Size(width=500, height=512)])),
    ("sweep.sizes[0].height", dict(sizes=[pb.Size(width=512, height=0)])),
    ("sweep.sizes[1].width", dict(sizes=[pb.Size(width=64, height=64), pb.Size(width=2048, height=64)])),
    ("sweep.steps[0]", dict(steps=[0])),
    ("sweep.steps[0]", dict(steps=[-3])),
    ("sweep.steps[0]", dict(steps=[1001])),
    ("sweep.guidance_scales[0]", dict(guidance_scales=[math.nan])),
    ("sweep.guidance_scales[1]", dict(guidance_scales=[7.5, math.inf])),
    ("sweep.guidance_scales[0]", dict(guidance_scales=[-1.0])),
    ("sweep.seeds[0]", dict(seeds=[-1])),
    ("sweep.schedulers[0]", dict(schedulers=["k_lms_turbo"])),
    ("sweep.model", dict(model="builtin:nope")),
    ("sweep.model", dict(model="")),
    ("sweep.model", dict(model="builtin:../tiny-sd")),
    ("sweep.model", dict(model="../../etc/passwd")),
    ("sweep.model", dict(model="/models/../../etc")),
    ("sweep.model", dict(model="models\\tiny-sd")),
    ("sweep.model", dict(model="builtin:tiny-sd\x00")),
    ("sweep.model", dict(model="m" * 5000)),
    ("sweep.sizes[0]", dict(sizes=[pb.Size(width=768, height=768)])),
    # An x4 upscaler cannot render from text: refused here, not after every retry.
    ("sweep.model", dict(model="builtin:tiny-sd-x4-upscaler")),
    ("sweep.models[1]", dict(model="", models=["builtin:tiny-sd", "builtin:tiny-sd-x4-upscaler"])),
    ("sweep.models[0]", dict(model="", models=["builtin:nope"])),
    ("sweep.models", dict(models=["builtin:tiny-sdxl"])),  # and model too
    ("sweep.lora_sets[0].loras[0].path", dict(lora_sets=[pb.LoraSet(loras=[pb.Lora(path="", scale=1)])])),
    ("sweep.lora_sets[0].loras[0].path", dict(lora_sets=[pb.LoraSet(loras=[pb.Lora(path="/no/such.safetensors")])])),
    ("sweep.lora_sets[1].loras[0].path", dict(lora_sets=[pb.LoraSet(), pb.LoraSet(loras=[pb.Lora(path="../x")])])),
    ("sweep.lora_sets[0]", dict(lora_sets=[pb.LoraSet(loras=[pb.Lora(path=f"/l{i}") for i in range(9)])])),
    ("sweep", dict(prompts=["a"] * 10, seeds=list(range(101)))),
    ("sweep.upscale", dict(upscale=2)),
    ("sweep.upscale", CHAIN | dict(sizes=[pb.Size(width=512, height=64)])),  # 2048 px wide, over max_side
    ("sweep.upscale_model", CHAIN | dict(upscale_model="builtin:tiny-sd")),
    ("sweep.upscale_model", CHAIN | dict(upscale_model="")),
    ("sweep.upscale_noise_level", CHAIN | dict(upscale_noise_level=351)),
    ("sweep.upscale_steps", CHAIN | dict(upscale_steps=0)),
    ("sweep.upscale_guidance_scale", CHAIN | dict(upscale_guidance_scale=math.nan)),
    ("sweep.upscale_tile", CHAIN | dict(upscale_tile=12)),
]


@pytest.mark.parametrize("field, sweep", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_sweeps_name_the_field(field, sweep):
    with pytest.raises(InvalidJobError) as raised:
        kinds.validate(pb.SubmitJobRequest(sweep=request(**sweep)), CONFIG, model_info)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


def test_a_model_reference_that_names_a_place_is_still_accepted():
    for model in ("builtin:tiny-sd", "org/name", "/srv/models/sd-1.5", "./models/sd", "~/models/sd..v2"):
        assert sweep_kind.validate(request(model=model), CONFIG, lambda _: model_info("builtin:tiny-sd")).models[0].name == model


def test_the_image_count_is_checked_before_any_value_is_read():
    # Every value here is bad, and 1000 ** 3 images: the count is what answers, from the axes' lengths alone.
    huge = request(prompts=[""] * 1000, seeds=[-1] * 1000, guidance_scales=[math.nan] * 1000)
    with pytest.raises(InvalidJobError, match="1000000000 images is over the limit") as raised:
        sweep_kind.validate(huge, CONFIG, model_info)
    assert raised.value.field == "sweep"


def test_ids_of_the_sdk_and_the_farm_are_safe():
    check_id("request_id", uuid.uuid4().hex)
    check_id("job_id", "same-request_2")


@pytest.mark.parametrize("value", ["", "a" * 65, "../x", "a/b", "x y", "é", "a\x00"])
def test_ids_are_short_and_safe(value):
    with pytest.raises(InvalidJobError) as raised:
        check_id("job_id", value)
    assert raised.value.field == "job_id"


def test_oversized_sweep_is_refused_before_the_model_is_resolved():
    def must_not_resolve(model):
        raise AssertionError("resolved a model for a refused sweep")

    with pytest.raises(InvalidJobError, match="over the limit"):
        sweep_kind.validate(request(seeds=list(range(2000))), CONFIG, must_not_resolve)


def test_a_chained_upscale_takes_the_upscale_jobs_defaults():
    assert kinds.validate(pb.SubmitJobRequest(sweep=request(**CHAIN)), CONFIG, model_info).upscale == UpscaleSettings(
        model="builtin:tiny-sd-x4-upscaler", noise_level=20, steps=75, guidance_scale=9.0, tile=128
    )
    for no_upscale in (0, 1):
        sweep = request(**CHAIN | dict(upscale=no_upscale))
        assert kinds.validate(pb.SubmitJobRequest(sweep=sweep), CONFIG, model_info).upscale is None


def test_a_resumed_job_is_replanned_not_readmitted_so_a_lowered_limit_does_not_fail_it():
    admitted = pb.SubmitJobRequest(sweep=request(seeds=list(range(2000))))
    with pytest.raises(InvalidJobError, match="2000 images is over the limit of 1000"):
        kinds.validate(admitted, CONFIG, model_info)
    assert kinds.replan(admitted, CONFIG, model_info).total == 2000
    # A field that is wrong whatever the limits still fails a resume.
    with pytest.raises(InvalidJobError, match="sweep.steps"):
        kinds.replan(pb.SubmitJobRequest(sweep=request(steps=[0])), CONFIG, model_info)


def test_a_negative_zero_guidance_is_zero_in_every_spec():
    negative, zero = (
        next(sweep_kind.validate(request(guidance_scales=[scale]), CONFIG, model_info).specs()) for scale in (-0.0, 0.0)
    )
    assert math.copysign(1, negative.guidance_scale) == 1
    assert (negative.file_name, negative.to_json()) == (zero.file_name, zero.to_json())


def lora_file(path: Path) -> str:
    """A minimal LoRA safetensors file (one tensor whose name says lora)."""
    import torch
    from safetensors.torch import save_file

    save_file({"unet.down.lora_A.weight": torch.ones(2, 2)}, path)
    return str(path)


def test_lora_sets_record_each_files_digest_and_scale(tmp_path):
    import hashlib

    style = lora_file(tmp_path / "style.safetensors")
    sets = [pb.LoraSet(), pb.LoraSet(loras=[pb.Lora(path=style, scale=-0.0)]), pb.LoraSet(loras=[pb.Lora(path=style, scale=0.5)])]
    specs = list(sweep_kind.validate(request(lora_sets=sets), CONFIG, model_info).specs())
    digest = hashlib.sha256(Path(style).read_bytes()).hexdigest()
    assert [spec.loras for spec in specs] == [
        None, (LoraSpec(style, digest, 0.0),), (LoraSpec(style, digest, 0.5),)
    ]
    assert math.copysign(1, specs[1].loras[0].scale) == 1
    # A LoRA at scale 0 is the model alone: it batches with the images without LoRA.
    assert sweep_kind.batch_key(specs[0]) == sweep_kind.batch_key(specs[1]) != sweep_kind.batch_key(specs[2])


@pytest.mark.parametrize("fault", ["pickle", "nan scale", "twice"])
def test_bad_loras_name_the_field(tmp_path, fault):
    import torch

    style = lora_file(tmp_path / "style.safetensors")
    pickle = tmp_path / "style.bin"
    torch.save({"unet.down.lora_A.weight": torch.ones(2, 2)}, pickle)
    loras, field, message = {
        "pickle": ([pb.Lora(path=str(pickle), scale=1)], "sweep.lora_sets[0].loras[0].path", "safetensors only"),
        "nan scale": ([pb.Lora(path=style, scale=math.nan)], "sweep.lora_sets[0].loras[0].scale", "finite"),
        "twice": ([pb.Lora(path=style, scale=1), pb.Lora(path=style, scale=2)], "sweep.lora_sets[0].loras[1].path", "already"),
    }[fault]
    with pytest.raises(InvalidJobError, match=message) as raised:
        sweep_kind.validate(request(lora_sets=[pb.LoraSet(loras=loras)]), CONFIG, model_info)
    assert raised.value.field == field
