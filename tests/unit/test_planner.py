import itertools
import random

from renderfarm.cluster.planner import Sweep, batch_key, batches


def sweep(**overrides) -> Sweep:
    axes = dict(
        model="builtin:tiny-sd",
        prompts=("a red fox", "a lighthouse"),
        negative_prompt="",
        seeds=(0, 1, 2),
        guidance_scales=(1.0, 7.5),
        steps=(10, 20),
        sizes=((64, 64), (128, 64)),
        schedulers=("ddim", "euler"),
    )
    return Sweep(**{**axes, **overrides})


def test_every_combination_once():
    s = sweep()
    specs = list(s.specs())
    assert len(specs) == s.total == 2 * 3 * 2 * 2 * 2 * 2
    assert len(set(specs)) == s.total


def test_specs_are_lazy():
    huge = sweep(seeds=tuple(range(10**6)), prompts=tuple(f"p{i}" for i in range(1000)))
    assert huge.total == 16 * 10**9  # computed, not enumerated
    first = list(itertools.islice(huge.specs(), 5))
    assert [s.seed for s in first] == [0, 0, 1, 1, 2]


def test_batches_hold_only_compatible_items_up_to_max():
    specs = list(sweep().specs())
    for max_batch in (1, 3, 8):
        cut = list(batches(specs, max_batch))
        assert sum(len(b) for b in cut) == len(specs)
        assert all(1 <= len(b) <= max_batch for b in cut)
        assert all(len({batch_key(s) for s in b}) == 1 for b in cut)


def test_batches_fill_up_when_items_are_compatible():
    s = sweep(guidance_scales=(7.5,), steps=(10,), sizes=((64, 64),), schedulers=("ddim",))
    assert [len(b) for b in batches(s.specs(), 4)] == [4, 2]


def test_shuffled_input_still_batches_compatibly():
    specs = list(sweep().specs())
    random.Random(0).shuffle(specs)
    for batch in batches(specs, 8):
        assert len({batch_key(s) for s in batch}) == 1


def test_repeated_axis_values_make_each_image_once():
    sweep = Sweep(
        model="m", prompts=("a fox", "a fox", "a cat"), negative_prompt="", seeds=(1, 1, 2),
        guidance_scales=(7.5,), steps=(20,), sizes=((64, 64), (64, 64)), schedulers=("ddim",),
    )  # fmt: skip
    specs = list(sweep.specs())
    assert sweep.total == len(specs) == len(set(specs)) == 4
