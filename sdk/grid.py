"""Contact sheets of a sweep's results: one spec field across, optionally one down, labelled with their values
(AUTOMATIC1111's X/Y plot). Every other field that varies makes separate sheets, one per combination.

Cells are the results' own pixels, pasted unscaled; a sheet's PNG records where each cell is (the
``renderfarm-grid`` text chunk), so a program can find an image in it again.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from renderfarm.spec import AnySpec

LAYOUT_CHUNK = "renderfarm-grid"
BACKGROUND = (255, 255, 255)
EMPTY_CELL = (230, 230, 230)  # a combination with no result (a job cancelled or still running)
INK = (20, 20, 20)
# A label longer than this many lines is cut with an ellipsis: a long prompt must not push the images away.
MAX_LABEL_LINES = 3


@dataclass(frozen=True)
class Sheet:
    """One contact sheet: `columns` are the values of `x` left to right, `rows` those of `y` top to bottom
    ([None] without y); `fixed` holds the other varying fields' values shared by this sheet's images."""

    image: Image.Image = field(repr=False)
    x: str
    y: str | None
    columns: list
    rows: list
    fixed: dict
    cell: tuple[int, int]  # width, height: the largest image's
    origin: tuple[int, int]  # the top-left corner of the first cell
    gap: int

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """The cell's (left, top, right, bottom) in the image."""
        width, height = self.cell
        left = self.origin[0] + column * (width + self.gap)
        top = self.origin[1] + row * (height + self.gap)
        return left, top, left + width, top + height

    def layout(self) -> dict:
        """Where the sheet's cells are, as plain data (what the PNG's renderfarm-grid chunk holds)."""
        return {"x": self.x, "y": self.y, "columns": self.columns, "rows": self.rows, "fixed": self.fixed,
                "cell": list(self.cell), "origin": list(self.origin), "gap": self.gap}  # fmt: skip

    def png(self) -> bytes:
        """The sheet as PNG bytes, its layout in the renderfarm-grid text chunk."""
        info = PngImagePlugin.PngInfo()
        info.add_text(LAYOUT_CHUNK, json.dumps(self.layout(), ensure_ascii=False))
        out = io.BytesIO()
        self.image.save(out, format="PNG", pnginfo=info)
        return out.getvalue()

    def save(self, path: str | Path) -> Path:
        """Writes the sheet's PNG (see png()) to `path`; returns the path."""
        path = Path(path)
        path.write_bytes(self.png())
        return path


def grids(results: Iterable[tuple[AnySpec, Image.Image]], x: str, y: str | None = None) -> list[Sheet]:
    """The contact sheets of (spec, image) pairs with spec field `x` across and `y` (if given) down.

    Values are sorted (numbers by value, text alphabetically), so a grid does not depend on the order in
    which results finished. Raises ValueError naming the axis when it is not a field of the specs."""
    pairs = [(spec.fields(), image) for spec, image in results]
    if not pairs:
        raise ValueError("there are no results to make a grid of")
    field_names = sorted({name for fields, _ in pairs for name in fields})
    values: dict[str, dict[str, object]] = {name: {} for name in field_names}  # field -> {its JSON: its value}
    cells: dict[tuple, Image.Image] = {}
    for fields, image in pairs:
        for name in field_names:
            values[name][_key(fields.get(name))] = fields.get(name)
        # One spec, one image: a repeated result is the same picture.
        cells.setdefault(tuple(_key(fields.get(name)) for name in field_names), image)
    for name, axis in (("x", x), ("y", y)):
        if axis is not None and axis not in values:
            raise ValueError(f"{name}: {axis!r} is not a field of these results' specs ({', '.join(field_names)})")
    if x == y:
        raise ValueError(f"y: must differ from x (both {x!r})")

    # Every field that varies apart from the two axes splits the results into sheets.
    split = [name for name in field_names if len(values[name]) > 1 and name not in (x, y)]
    column_keys = _sorted_keys(values[x])
    row_keys = _sorted_keys(values[y]) if y else [None]
    by_sheet: dict[tuple, dict[tuple[int, int], Image.Image]] = {}
    for key, image in cells.items():
        fields = dict(zip(field_names, key))
        sheet_key = tuple(fields[name] for name in split)
        row = row_keys.index(fields[y]) if y else 0
        by_sheet.setdefault(sheet_key, {})[row, column_keys.index(fields[x])] = image
    columns = [values[x][key] for key in column_keys]
    rows = [values[y][key] for key in row_keys] if y else [None]
    sheets = []
    for sheet_key in sorted(by_sheet, key=lambda key: [_order(values[name][part]) for name, part in zip(split, key)]):
        fixed = {name: values[name][part] for name, part in zip(split, sheet_key)}
        sheets.append(_draw(by_sheet[sheet_key], x, y, columns, rows, fixed))
    return sheets


def label(name: str, value) -> str:
    """How an axis value reads on a sheet: "seed: 3", "guidance_scale: 7.5", "loras: style 0.8"."""
    if value is None:
        text = "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list):  # LoRA adapters
        text = ", ".join(f"{Path(lora['path']).stem} {lora['scale']:g}" for lora in value) or "none"
    else:
        text = str(value)
    return f"{name}: {text}"


def _draw(images: dict[tuple[int, int], Image.Image], x: str, y: str | None, columns: list, rows: list,
          fixed: dict) -> Sheet:  # fmt: skip
    width = max(image.width for image in images.values())
    height = max(image.height for image in images.values())
    font_size = max(12, round(min(width, height) / 20))
    font = ImageFont.load_default(size=font_size)
    line_height = math.ceil(font_size * 1.25)
    gap = max(4, font_size // 2)
    column_labels = [_wrap(label(x, value), font, width) for value in columns]
    row_label_width = max(width, 8 * font_size) if y else 0
    row_labels = [_wrap(label(y, value), font, row_label_width) for value in rows] if y else []
    title = ", ".join(label(name, value) for name, value in fixed.items())
    title_lines = _wrap(title, font, len(columns) * (width + gap) + row_label_width) if title else []

    header = (len(title_lines) + max(len(lines) for lines in column_labels)) * line_height + gap
    origin = (gap + (row_label_width + gap if y else 0), gap + header)
    canvas = Image.new("RGB", (origin[0] + len(columns) * (width + gap), origin[1] + len(rows) * (height + gap)),
                       BACKGROUND)  # fmt: skip
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(title_lines):
        draw.text((gap, gap + number * line_height), line, font=font, fill=INK)
    sheet = Sheet(canvas, x, y, columns, rows, fixed, (width, height), origin, gap)
    label_top = gap + len(title_lines) * line_height
    for column, lines in enumerate(column_labels):
        left = sheet.box(0, column)[0]
        for number, line in enumerate(lines):
            draw.text((left, label_top + number * line_height), line, font=font, fill=INK)
    for row, lines in enumerate(row_labels):
        top = sheet.box(row, 0)[1]
        for number, line in enumerate(lines):
            draw.text((gap, top + number * line_height), line, font=font, fill=INK)
    for row in range(len(rows)):
        for column in range(len(columns)):
            left, top, right, bottom = sheet.box(row, column)
            image = images.get((row, column))
            if image is None:
                draw.rectangle((left, top, right - 1, bottom - 1), fill=EMPTY_CELL)
            else:  # centred where the sheet's images differ in size (a width or height axis)
                canvas.paste(
                    image.convert("RGB"), (left + (width - image.width) // 2, top + (height - image.height) // 2)
                )
    return sheet


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """The text in lines no wider than `width` pixels (at most MAX_LABEL_LINES; words longer than a line are
    cut), breaking at spaces."""
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    lines = [_fit(line, font, width) for line in lines]
    if len(lines) > MAX_LABEL_LINES:
        lines = lines[: MAX_LABEL_LINES - 1] + [_fit(lines[MAX_LABEL_LINES - 1], font, width, ellipsis=True)]
    return lines


def _fit(line: str, font: ImageFont.FreeTypeFont, width: int, ellipsis: bool = False) -> str:
    """The line, cut with an ellipsis to fit `width` (always ending in one with `ellipsis`: more follows)."""
    if not ellipsis and font.getlength(line) <= width:
        return line
    while line and font.getlength(line + "…") > width:
        line = line[:-1]
    return line + "…"


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def _order(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    if isinstance(value, str):
        return (1, 0, value)
    return (2, 0, _key(value))


def _sorted_keys(values: dict[str, object]) -> list[str]:
    """An axis's value keys (JSON) in the order of their values."""
    return sorted(values, key=lambda key: _order(values[key]))
