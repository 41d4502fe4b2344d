"""Labelled contact sheets: a grid of equally sized images with column, row and title labels drawn in.

Used for the epoch x strength grids, the base-vs-LoRA training samples and the probe sheet. The
labels are part of the PNG (not only of the HTML page), so a sheet pasted into a chat or a bug
report still says what each cell is.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
EMPTY_CELL = (200, 200, 200)
_ROW_LABEL_CHARS = 24  # row labels wrap at about this many characters


def font_for(cell_size: int) -> ImageFont.ImageFont:
    """Pillow's built-in font (no font files needed), scaled with the cells."""
    return ImageFont.load_default(size=max(10, cell_size // 16))


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return right - left, bottom - top


def _wrap(text: str, width_chars: int) -> str:
    return "\n".join(textwrap.wrap(text, max(4, width_chars), break_long_words=True) or [""])


@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes on a sheet, in pixels."""

    rows: int
    cols: int
    cell_width: int
    cell_height: int
    row_label_width: int
    column_label_height: int
    title_height: int
    gap: int

    @property
    def size(self) -> tuple[int, int]:
        width = self.row_label_width + self.cols * (self.cell_width + self.gap) + self.gap
        height = self.title_height + self.column_label_height + self.rows * (self.cell_height + self.gap) + self.gap
        return width, height

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        x = self.row_label_width + self.gap + col * (self.cell_width + self.gap)
        y = self.title_height + self.column_label_height + self.gap + row * (self.cell_height + self.gap)
        return x, y


def _labels(labels: Sequence[str] | None, count: int) -> list[str]:
    labels = list(labels or [])
    return labels + [""] * (count - len(labels))


def make_sheet(
    cells: Sequence[Sequence[Image.Image | None]],
    column_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    gap: int = 4,
) -> tuple[Image.Image, SheetLayout]:
    """Lay ``cells[row][col]`` out on one image with the labels drawn on it.

    Cells may differ in size (e.g. a hires row): each is pasted at the top-left of a slot as large
    as the largest cell. A ``None`` cell is drawn grey.
    """
    rows, cols = len(cells), max((len(r) for r in cells), default=0)
    images = [c for r in cells for c in r if c is not None]
    cell_w = max((c.width for c in images), default=64)
    cell_h = max((c.height for c in images), default=64)
    font = font_for(min(cell_w, cell_h))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    char_w = max(1, _text_size(measure, "x" * 10, font)[0] // 10)
    col_texts = [_wrap(t, cell_w // char_w) for t in _labels(column_labels, cols)]
    row_texts = [_wrap(t, _ROW_LABEL_CHARS) for t in _labels(row_labels, rows)]
    title_text = _wrap(title, max(cols * cell_w // char_w, 40)) if title else ""
    pad = max(4, cell_h // 32)
    col_h = max((_text_size(measure, t, font)[1] for t in col_texts if t), default=-2 * pad) + 2 * pad
    row_w = max((_text_size(measure, t, font)[0] for t in row_texts if t), default=-2 * pad) + 2 * pad
    title_h = _text_size(measure, title_text, font)[1] + 2 * pad if title_text else 0
    layout = SheetLayout(rows, cols, cell_w, cell_h, row_w, col_h, title_h, gap)

    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title_text:
        draw.multiline_text((pad, pad), title_text, fill=TEXT, font=font, spacing=2)
    for col, text in enumerate(col_texts):
        x, _ = layout.cell_origin(0, col)
        draw.multiline_text((x, title_h + pad), text, fill=TEXT, font=font, spacing=2)
    for row, text in enumerate(row_texts):
        _, y = layout.cell_origin(row, 0)
        draw.multiline_text((pad, y + pad), text, fill=TEXT, font=font, spacing=2)
    for row, line in enumerate(cells):
        for col, cell in enumerate(line):
            x, y = layout.cell_origin(row, col)
            if cell is None:
                draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=EMPTY_CELL)
            else:
                sheet.paste(cell.convert("RGB"), (x, y))
    return sheet, layout
