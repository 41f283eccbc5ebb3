"""Contact sheets: one spec field across, one down, the rest into separate sheets; cells are the results'
own pixels, labelled with their axis values."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from renderfarm.grid import EMPTY_CELL, LAYOUT_CHUNK, grids
from renderfarm.spec import ImageSpec

SIZE = (64, 48)


def _spec(seed=0, guidance_scale=7.5, steps=10, prompt="a red fox", width=SIZE[0], height=SIZE[1]) -> ImageSpec:
    return ImageSpec("builtin:tiny-sd", prompt, "", seed, width, height, steps, guidance_scale, "ddim")


def _image(spec: ImageSpec) -> Image.Image:
    """A picture unique to its spec (noise seeded by it), so that a cell shows which result it holds."""
    seed = abs(hash(spec.to_json())) % 2**32
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (spec.height, spec.width, 3), np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _has_ink(sheet, box) -> bool:
    """Dark text pixels inside (left, top, right, bottom) of the sheet."""
    return bool((_pixels(sheet.image.crop(box)).max(axis=2) < 100).any())


def test_a_2x3_sweep_is_2_rows_of_3_cells_of_the_image_size_holding_each_result_under_its_labels():
    specs = [_spec(seed, guidance) for guidance in (7.5, 1.5) for seed in (2, 0, 1)]  # finished in any order
    [sheet] = grids([(spec, _image(spec)) for spec in specs], "seed", "guidance_scale")
    assert (sheet.columns, sheet.rows, sheet.cell, sheet.fixed) == ([0, 1, 2], [1.5, 7.5], SIZE, {})
    assert sheet.image.size == (
        sheet.origin[0] + 3 * (SIZE[0] + sheet.gap),
        sheet.origin[1] + 2 * (SIZE[1] + sheet.gap),
    )
    for row, guidance in enumerate(sheet.rows):
        for column, seed in enumerate(sheet.columns):
            cell = sheet.image.crop(sheet.box(row, column))
            assert np.array_equal(_pixels(cell), _pixels(_image(_spec(seed, guidance))))
    # A column label above each column, a row label left of each row.
    for column in range(3):
        left, top, right, _ = sheet.box(0, column)
        assert _has_ink(sheet, (left, 0, right, top))
    for row in range(2):
        _, top, _, bottom = sheet.box(row, 0)
        assert _has_ink(sheet, (0, top, sheet.origin[0] - sheet.gap, bottom))
    # The PNG says where every cell is.
    with Image.open(io.BytesIO(sheet.png())) as saved:
        layout = json.loads(saved.text[LAYOUT_CHUNK])
        assert np.array_equal(_pixels(saved), _pixels(sheet.image))
    assert layout == {"x": "seed", "y": "guidance_scale", "columns": [0, 1, 2], "rows": [1.5, 7.5], "fixed": {},
                      "cell": list(SIZE), "origin": list(sheet.origin), "gap": sheet.gap}  # fmt: skip


def test_other_varying_fields_become_one_sheet_each_in_value_order():
    specs = [_spec(seed, steps=steps, prompt=prompt) for prompt in ("b fox", "a fox") for steps in (20, 10)
             for seed in (0, 1)]  # fmt: skip
    sheets = grids([(spec, _image(spec)) for spec in specs], "seed")
    assert [sheet.fixed for sheet in sheets] == [
        {"prompt": "a fox", "steps": 10}, {"prompt": "a fox", "steps": 20},
        {"prompt": "b fox", "steps": 10}, {"prompt": "b fox", "steps": 20},
    ]  # fmt: skip
    for sheet in sheets:
        assert sheet.rows == [None] and sheet.columns == [0, 1]
        expected = _image(_spec(1, steps=sheet.fixed["steps"], prompt=sheet.fixed["prompt"]))
        assert np.array_equal(_pixels(sheet.image.crop(sheet.box(0, 1))), _pixels(expected))
        assert _has_ink(sheet, (0, 0, sheet.image.width, sheet.box(0, 0)[1]))  # the title and the labels


def test_a_missing_result_leaves_its_cell_empty_and_smaller_images_sit_centred():
    small, large = _spec(0, width=32), _spec(1)
    [sheet] = grids([(small, _image(small)), (large, _image(large))], "seed", "width")
    assert sheet.cell == SIZE and sheet.rows == [32, 64]
    left, top, right, bottom = sheet.box(0, 0)
    inner = (left + 16, top, left + 48, bottom)
    assert np.array_equal(_pixels(sheet.image.crop(inner)), _pixels(_image(small)))
    for empty in (sheet.box(0, 1), sheet.box(1, 0)):
        assert (_pixels(sheet.image.crop(empty)) == EMPTY_CELL).all()


def test_an_axis_that_is_no_field_is_refused_by_name():
    pairs = [(_spec(seed), _image(_spec(seed))) for seed in (0, 1)]
    with pytest.raises(ValueError, match=r"^x: 'sed' is not a field of these results' specs \(guidance_scale,"):
        grids(pairs, "sed")
    with pytest.raises(ValueError, match=r"^y: 'cfg' is not a field"):
        grids(pairs, "seed", "cfg")
    with pytest.raises(ValueError, match=r"^y: must differ from x"):
        grids(pairs, "seed", "seed")
    with pytest.raises(ValueError, match="no results"):
        grids([], "seed")
