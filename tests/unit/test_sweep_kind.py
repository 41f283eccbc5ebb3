import itertools

from renderfarm.cluster.kinds.sweep import Sweep, SweepModel, batch_key, batch_shape

TINY_SD = SweepModel("builtin:tiny-sd", (128, 128), "pndm")


def sweep(**overrides) -> Sweep:
    axes = dict(
        models=(TINY_SD,),
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
    assert [(s.seed, s.guidance_scale) for s in first] == [(seed, 1.0) for seed in range(5)]


def test_items_of_one_batch_key_come_in_one_run():
    # Guided and unguided scales alternate on the axis; the items still come key by key, so a job's
    # next items fill a batch.
    specs = list(sweep(guidance_scales=(1.0, 7.5, 0.0, 5.0)).specs())
    keys = [key for key, _ in itertools.groupby(specs, key=batch_key)]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2 * 2


class DoneRecord:
    """A job-store record that has the results of some specs."""

    id = "job-1"

    def __init__(self, done):
        self.done = set(done)

    def is_done(self, spec):
        return spec in self.done

    def failures(self, spec):
        return 3 if spec.seed == 2 else 0


def test_a_jobs_items_leave_out_done_images_and_carry_failures_so_far():
    s = sweep()
    specs = list(s.specs())
    items = list(s.items(DoneRecord(specs[::2])))
    assert [item.spec for item in items] == specs[1::2]
    assert all(item.job == "job-1" and item.model == "builtin:tiny-sd" for item in items)
    assert {item.failures for item in items if item.spec.seed == 2} == {3}
    assert all(item.key[0] == batch_key(item.spec) for item in items)


def test_repeated_axis_values_make_each_image_once():
    sweep = Sweep(
        models=(TINY_SD, TINY_SD), prompts=("a fox", "a fox", "a cat"), negative_prompt="", seeds=(1, 1, 2),
        guidance_scales=(7.5,), steps=(20,), sizes=((64, 64), (64, 64)), schedulers=("ddim",),
    )  # fmt: skip
    specs = list(sweep.specs())
    assert sweep.total == len(specs) == len(set(specs)) == 4


def test_batch_shapes_are_a_function_of_the_key_and_bounded_in_pixels():
    def shape(width, height, max_batch=8):
        return batch_shape(next(sweep(sizes=((width, height),)).specs()), max_batch, 8 * 512 * 512)

    assert [shape(512, 512), shape(768, 768), shape(1024, 1024), shape(1536, 1536)] == [8, 3, 2, 1]
    assert shape(64, 64) == 8 and shape(64, 64, max_batch=1) == 1
    s = sweep(sizes=((64, 64), (1024, 1024)))
    s = Sweep(**{**vars(s), "max_batch": 8, "max_batch_pixels": 8 * 512 * 512})
    shapes = {(item.spec.width, item.shape) for item in s.items(DoneRecord(()))}
    assert shapes == {(64, 8), (1024, 2)}


def test_models_come_one_after_another_each_at_its_own_size_unless_the_sweep_sets_one():
    xl = SweepModel("builtin:tiny-sdxl", (256, 256), "euler")
    specs = list(sweep(models=(TINY_SD, xl), sizes=(), schedulers=()).specs())
    assert [(s.model, s.width, s.scheduler) for s in specs] == [(TINY_SD.name, 128, "pndm")] * 24 + [(xl.name, 256, "euler")] * 24
    assert {s.width for s in sweep(models=(TINY_SD, xl)).specs()} == {64, 128}
