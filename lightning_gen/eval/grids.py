"""Labelled image tables: the grids of nearest neighbours, latent traversals, interpolations and NLL extremes.

A plain ``save_image`` grid cannot say what its columns are; these can. ``image_table`` lays images
out in rows and columns (upscaled by an integer factor with nearest-neighbour pixels, so small digits
stay legible and pixels stay exact), with an optional title, column-group headers (e.g. "sample" |
"nearest in pixels" | "nearest in features", a gap between groups), per-column labels, row labels
on the left and a caption under each image (a distance, bits/dim). ``Layout.box`` gives where each
image landed, so a test or a user can crop a cell back out of the PNG.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 12
LINE = FONT_SIZE + 4  # height of one line of text
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (90, 90, 90)


@dataclass
class Layout:
    """Where image (row, column) of a table lies: pixel boxes in the PNG."""

    scale: int  # integer upscaling of every image
    cell: int  # side of an upscaled image, pixels
    pad: int  # pixels between neighbouring images
    left: int  # x of the first column
    top: int  # y of the first row
    row_height: int  # cell + caption line (when there are captions) + pad
    group_gap: int  # extra pixels before the first column of each group after the first
    group_starts: list[int] = field(default_factory=list)

    def x(self, col: int) -> int:
        gaps = sum(1 for start in self.group_starts[1:] if col >= start)
        return self.left + col * (self.cell + self.pad) + gaps * self.group_gap

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the upscaled image at (row, col), right/bottom exclusive."""
        x, y = self.x(col), self.top + row * self.row_height
        return x, y, x + self.cell, y + self.cell

    def to_dict(self) -> dict:
        return asdict(self)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(FONT_SIZE)  # Pillow's bundled font: nothing to install or download


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    return int(draw.textlength(text, font=font))


def to_uint8_image(image: torch.Tensor, scale: int) -> Image.Image:
    """(C, H, W) float in [0, 1] -> an RGB PIL image upscaled ``scale`` times (pixels repeated)."""
    x = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")


def image_table(
    images: torch.Tensor,
    *,
    title: str | None = None,
    groups: list[tuple[str, int]] | None = None,
    column_labels: list[str] | None = None,
    row_labels: list[str] | None = None,
    captions: list[list[str]] | None = None,
    min_cell: int = 40,
    pad: int = 2,
) -> tuple[Image.Image, Layout]:
    """A labelled table of ``images`` (R, C, channels, H, W) in [0, 1]; returns the picture and its layout.

    ``groups``: (header, number of columns) in order, covering all C columns; ``captions[r][c]``: text
    under image (r, c)."""
    rows, cols = images.shape[:2]
    size = images.shape[-1]
    scale = max(1, -(-min_cell // size))  # ceil: every cell at least min_cell pixels
    cell = size * scale
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = pad + (max(_text_width(probe, t, font) for t in row_labels) + 3 * pad if row_labels else 0)
    headed = groups is not None
    top = pad + (bool(title) + headed + bool(column_labels)) * LINE
    row_height = cell + (LINE if captions else 0) + pad
    groups = groups or [("", cols)]
    if sum(n for _, n in groups) != cols:
        raise ValueError(f"column groups {groups} do not cover the {cols} columns")
    starts = [sum(n for _, n in groups[:i]) for i in range(len(groups))]
    layout = Layout(scale, cell, pad, left, top, row_height, 3 * LINE if len(groups) > 1 else 0, starts)
    texts = [(pad, title)] if title else []  # (x, text) of every line that may reach past the images
    if headed:
        texts += [(layout.x(start), header) for (header, _), start in zip(groups, starts)]
    width = max([layout.x(cols - 1) + cell] + [x + _text_width(probe, t, font) for x, t in texts]) + pad
    picture = Image.new("RGB", (width, top + rows * row_height), WHITE)
    draw = ImageDraw.Draw(picture)
    y = pad
    if title:
        draw.text((pad, y), title, fill=BLACK, font=font)
        y += LINE
    if headed:
        for (header, count), start in zip(groups, starts):
            x0, x1 = layout.x(start), layout.x(start + count - 1) + cell
            draw.text((x0, y), header, fill=BLACK, font=font)
            draw.line([(x0, y + LINE - 2), (x1, y + LINE - 2)], fill=GREY)
        y += LINE
    if column_labels:
        for col, label in enumerate(column_labels):
            draw.text((layout.x(col), y), label, fill=GREY, font=font)
    for row in range(rows):
        x0, y0, _, _ = layout.box(row, 0)
        if row_labels:
            draw.text((pad, y0 + (cell - FONT_SIZE) // 2), row_labels[row], fill=BLACK, font=font)
        for col in range(cols):
            bx, by, _, _ = layout.box(row, col)
            picture.paste(to_uint8_image(images[row, col], scale), (bx, by))
            if captions and captions[row][col]:
                draw.text((bx, by + cell + 1), captions[row][col], fill=GREY, font=font)
    return picture, layout


def cell_of(picture: Image.Image, layout: Layout | dict, row: int, col: int) -> torch.Tensor:
    """The image at (row, col) of a saved table as (3, H, W) uint8, at its original size."""
    layout = Layout(**layout) if isinstance(layout, dict) else layout
    crop = picture.convert("RGB").crop(layout.box(row, col))
    x = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)
    return x[:, :: layout.scale, :: layout.scale]
