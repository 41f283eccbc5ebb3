import pytest

from renderfarm import _wire
from renderfarm._constants import RECONNECT_MAX_DELAY_S, RECONNECT_WINDOW_S
from renderfarm.errors import FarmUnavailableError, InvalidJobError, RenderfarmError


def request(**overrides):
    arguments = dict(
        prompts="a red fox", seeds=0, guidance_scale=None, steps=None, width=None, height=None,
        negative_prompt="", scheduler=None, model="builtin:tiny-sd", request_id=None,
    )  # fmt: skip
    return _wire.sweep_request(**{**arguments, **overrides})


def test_scalars_are_one_element_axes_and_none_is_the_farms_default():
    sweep = request().sweep
    assert list(sweep.prompts) == ["a red fox"] and list(sweep.seeds) == [0]
    assert not sweep.guidance_scales and not sweep.steps and not sweep.sizes and not sweep.schedulers


def test_lists_and_ranges_are_axes_and_sizes_are_widths_by_heights():
    sweep = request(prompts=["a", "b"], seeds=range(3), guidance_scale=[5, 7.5], width=[512, 768], height=512).sweep
    assert list(sweep.seeds) == [0, 1, 2] and list(sweep.guidance_scales) == [5.0, 7.5]
    assert [(s.width, s.height) for s in sweep.sizes] == [(512, 512), (768, 512)]


def test_size_pairs_are_sent_as_given_not_crossed():
    paired = request(size=[(512, 768), (768, 512)]).sweep
    assert [(s.width, s.height) for s in paired.sizes] == [(512, 768), (768, 512)]
    assert [(s.width, s.height) for s in request(size=(64, 48)).sweep.sizes] == [(64, 48)]


def test_upscale_settings_are_sent_with_an_upscale_only():
    plain = request(upscale_steps=2).sweep
    assert plain.upscale == 0 and not plain.upscale_model and not plain.HasField("upscale_steps")
    chained = request(upscale=4, upscale_steps=2).sweep
    assert (chained.upscale, chained.upscale_model, chained.upscale_steps) == (4, "builtin:tiny-sd-x4-upscaler", 2)
    assert not chained.HasField("upscale_noise_level") and not chained.HasField("upscale_guidance_scale")


def test_several_models_are_an_axis_and_one_travels_as_model():
    assert (request().sweep.model, list(request().sweep.models)) == ("builtin:tiny-sd", [])
    for given in (dict(models=["a/b", "c/d"]), dict(model=["a/b", "c/d"])):
        sweep = request(**given).sweep
        assert (sweep.model, list(sweep.models)) == ("", ["a/b", "c/d"])


def lora_sets(sweep) -> list[list[tuple[str, float]]]:
    return [[(lora.path, lora.scale) for lora in each.loras] for each in sweep.lora_sets]


def test_loras_are_one_set_their_scales_or_their_sets_an_axis():
    assert lora_sets(request().sweep) == []
    assert lora_sets(request(loras=["a.safetensors", ("b.safetensors", 0.5)]).sweep) == [
        [("a.safetensors", 1.0), ("b.safetensors", 0.5)]
    ]
    assert lora_sets(request(loras=["a.safetensors"], lora_scales=[0, 0.5]).sweep) == [
        [("a.safetensors", 0.0)], [("a.safetensors", 0.5)]
    ]
    assert lora_sets(request(lora_sets=[[], [("a.safetensors", 2)]]).sweep) == [[], [("a.safetensors", 2.0)]]


@pytest.mark.parametrize(
    "arguments, field",
    [
        (dict(loras=[("a.safetensors", "high")]), "loras[0]"),
        (dict(loras=[3]), "loras[0]"),
        (dict(loras=["a", "b"], lora_scales=[1]), "lora_scales"),
        (dict(lora_scales=[1]), "lora_scales"),
        (dict(loras=["a"], lora_sets=[["b"]]), "lora_sets"),
        (dict(lora_sets=[[("a", None)]]), "lora_sets[0][0]"),
    ],
)
def test_bad_loras_name_the_argument(arguments, field):
    with pytest.raises(InvalidJobError) as raised:
        request(**arguments)
    assert raised.value.field == field


def test_each_submission_gets_a_fresh_request_id_unless_given():
    assert request().request_id != request().request_id
    assert request(request_id="mine").request_id == "mine"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(seeds=[]), "seeds"),
        (dict(width=512), "width"),
        # Each of these int() or float() would quietly turn into another value, or the wire refuse.
        (dict(seeds=[0, 1.5]), "seeds[1]"),
        (dict(seeds=True), "seeds[0]"),
        (dict(steps=1.7), "steps[0]"),
        (dict(width=64.5, height=64), "width[0]"),
        (dict(guidance_scale="7"), "guidance_scale[0]"),
        (dict(prompts=["a fox", "a \ud800 lone surrogate"]), "prompts[1]"),
        (dict(negative_prompt="\udfff"), "negative_prompt"),
        (dict(scheduler=["ddim", 3]), "scheduler[1]"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),  # one negative prompt a sweep: no axis
        (dict(size=[(512, 512), (64,)]), "size[1]"),
        (dict(size=[(512, 512.5)]), "size[0][1]"),
        (dict(size=(64, 64), width=64, height=64), "size"),
    ],
)
def test_malformed_axes_are_refused_before_sending(overrides, field):
    with pytest.raises(InvalidJobError) as raised:
        request(**overrides)
    assert raised.value.field == field and str(raised.value).startswith(field)


def test_integers_of_any_integral_type_are_kept_exactly():
    import numpy as np

    sweep = request(seeds=[np.int64(2**53 - 1), 7], steps=np.int32(30)).sweep
    assert list(sweep.seeds) == [2**53 - 1, 7] and list(sweep.steps) == [30]


@pytest.mark.parametrize("name", ["../escape.png", "/tmp/elsewhere.png", "sub/dir.png", "..", ""])
def test_a_result_is_never_saved_outside_its_directory(tmp_path, name):
    inside = tmp_path / "out"
    result = _wire.Result(spec=None, name=name, data=b"png")
    with pytest.raises(RenderfarmError, match="not a file name"):
        result.save(inside)
    assert not any(path.is_file() for path in tmp_path.rglob("*"))


def test_reconnect_backoff_doubles_is_capped_and_ends():
    delays = list(_wire.reconnect_delays())
    assert delays[1] == 2 * delays[0] and max(delays) == RECONNECT_MAX_DELAY_S
    assert sum(delays) <= RECONNECT_WINDOW_S
    with pytest.raises(FarmUnavailableError, match="could not resume"):
        _wire.next_delay(iter(()), "job-1")


@pytest.mark.parametrize(
    "arguments, field",
    [
        (dict(seed=1.5), "seed"),
        (dict(steps=2.5), "steps"),
        (dict(noise_level=True), "noise_level"),
        (dict(guidance_scale="high"), "guidance_scale"),
        (dict(tile=64.5), "tile"),
        (dict(prompt="a \ud800 fox"), "prompt"),
    ],
)
def test_upscale_arguments_that_would_be_truncated_or_cannot_travel_name_the_argument(arguments, field):
    defaults = dict(prompt="", negative_prompt="", noise_level=None, steps=None, guidance_scale=None, seed=0,
                    model="builtin:tiny-sd-x4-upscaler", tile=None, request_id=None)  # fmt: skip
    with pytest.raises(InvalidJobError) as raised:
        _wire.upscale_request(b"png", **{**defaults, **arguments})
    assert raised.value.field == field


def test_a_fractional_decode_tile_names_the_argument():
    with pytest.raises(InvalidJobError) as raised:
        _wire.decode_request([[[[0.0]]]], model="builtin:tiny-sd", tile=64.5, overlap=None, request_id=None)
    assert raised.value.field == "tile"
