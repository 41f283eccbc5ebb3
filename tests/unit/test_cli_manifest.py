"""OUT/manifest.jsonl holds each result once, however often results are saved into OUT."""

import json

from renderfarm import cli
from renderfarm._wire import Result
from renderfarm.spec import MANIFEST, ImageSpec, manifest_line


def result(seed: int) -> Result:
    return Result(ImageSpec("builtin:tiny-sd", "a fox", "", seed, 64, 64, 10, 7.5, "ddim"), f"{seed}.png", data=b"png")


class Finished:
    """A job whose events are its results, as a re-run or `watch --out` receives them."""

    id, total = "j1", 3

    def __init__(self, results):
        self.results = results

    def events(self, images=True):
        return iter(self.results)


def names(out) -> list[str]:
    return [json.loads(line)["file"] for line in (out / MANIFEST).read_text(encoding="utf-8").splitlines()]


def test_saving_the_same_results_again_adds_only_the_new_names(tmp_path):
    cli.follow(Finished([result(0), result(1)]), tmp_path)
    cli.follow(Finished([result(1), result(0), result(2)]), tmp_path)
    cli.follow(Finished([result(2)]), tmp_path)
    assert names(tmp_path) == ["0.png", "1.png", "2.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["0.png", "1.png", "2.png", MANIFEST]


def test_duplicates_and_a_line_cut_short_are_cleaned_up_on_the_next_save(tmp_path):
    line = manifest_line("0.png", result(0).spec)
    (tmp_path / MANIFEST).write_text(line + line + line[:20], encoding="utf-8")  # an older CLI's, then a kill
    cli.follow(Finished([result(1)]), tmp_path)
    assert names(tmp_path) == ["0.png", "1.png"]
    assert (tmp_path / MANIFEST).read_text(encoding="utf-8") == line + manifest_line("1.png", result(1).spec)
