"""Pictures a person reads at a glance: grids with captions, overlays, the evolution strip.

Captions are drawn with DejaVu Sans Bold, shipped with the package (``fonts/``), which has glyphs
for Latin, Greek and Cyrillic scripts, arrows and common symbols; a character without a glyph in
the font used is drawn as ``?`` (:func:`missing_glyphs` says which ones). Tiles are brought to a
side between :data:`MIN_TILE` and :data:`MAX_TILE` pixels and laid out :data:`COLUMNS` to a row,
with captions a sixth of the tile high, so that a grid scaled down to the width of a TensorBoard
card (330 to 380 pixels) keeps a caption font of about 13 pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

__all__ = [
    "COLUMNS",
    "FONT",
    "MAX_TILE",
    "MIN_TILE",
    "EvolutionHistory",
    "caption_grid",
    "denormalize",
    "display_tiles",
    "evolution_strip",
    "heat_overlay",
    "heatmap",
    "load_font",
    "missing_glyphs",
    "overlay",
    "tile_size",
    "to_uint8",
    "views_grid",
    "with_invalid_tiles",
]

#: The anchors of the jet colour map (position in [0, 1], then red, green, blue), the colours that
#: Grad-CAM and saliency maps are usually shown in: dark blue for nothing, dark red for the most.
JET = (
    (0.0, 0.0, 0.0, 0.5),
    (0.125, 0.0, 0.0, 1.0),
    (0.375, 0.0, 1.0, 1.0),
    (0.625, 1.0, 1.0, 0.0),
    (0.875, 1.0, 0.0, 0.0),
    (1.0, 0.5, 0.0, 0.0),
)

#: The caption font shipped with the package (DejaVu Sans Bold; licence in ``fonts/LICENSE_DEJAVU``).
FONT = str(Path(__file__).with_name("fonts") / "DejaVuSans-Bold.ttf")
#: Tiles smaller than this (longer side, pixels) are enlarged by a whole factor (nearest neighbour).
MIN_TILE = 96
#: Tiles larger than this are reduced to it (antialiased), which keeps event files small.
MAX_TILE = 256
#: Tiles per row of a caption grid.
COLUMNS = 4
PADDING = 2
MISMATCH = (220, 40, 40)
MATCH = (235, 235, 235)
CAPTION_BACKGROUND = (40, 40, 40)
#: A code point that no font maps (a Unicode noncharacter): its mask is the font's missing-glyph box.
_UNMAPPED = "\U0010ffff"


def denormalize(
    images: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Tensor:
    """Undo input normalisation for display.

    Args:
        images: ``(N, C, H, W)`` model inputs.
        mean, std: per-channel normalisation that was applied (``x = (image - mean) / std``). Without
            them each image is min-max scaled on its own.

    Returns:
        ``(N, 3, H, W)`` float32 in ``[0, 1]`` on the same device (grey images are repeated to RGB;
        NaN and infinite values show as 0 before de-normalisation).
    """
    images = images.detach().to(torch.float32).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        images = images * s + m
    else:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - low) / (high - low).clamp_min(1e-12)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images[:, :3].clamp(0, 1)


def with_invalid_tiles(maps: Tensor, valid: Tensor) -> Tensor:
    """Put the maps of the valid images in place and an invalid tile (grey, crossed out in red)
    where an image had no map.

    Args:
        maps: ``(M, 3, H, W)`` maps of the valid images, in order.
        valid: ``(N,)`` bool, ``M`` of them true.

    Returns:
        ``(N, 3, H, W)``; ``maps`` itself when every image is valid.

    Example::

        >>> tiles = with_invalid_tiles(torch.zeros(1, 3, 4, 4), torch.tensor([False, True]))
        >>> tiles[0, :, 0, 0].tolist(), tiles[0, :, 0, 1].tolist(), tiles[1].sum().item()
        ([0.8627451062202454, 0.1568627506494522, 0.1568627506494522], [0.5, 0.5, 0.5], 0.0)
    """
    valid = valid.to(device=maps.device, dtype=torch.bool)
    if bool(valid.all()):
        return maps
    n, (_, h, w) = valid.shape[0], maps.shape[1:]
    tiles = torch.full((n, 3, h, w), 0.5, dtype=maps.dtype, device=maps.device)
    tiles[valid] = maps
    rows = torch.arange(h, device=maps.device).view(-1, 1) / max(h - 1, 1)
    cols = torch.arange(w, device=maps.device).view(1, -1) / max(w - 1, 1)
    width = 0.5 * max(1, min(h, w) // 32) / max(min(h, w) - 1, 1)  # half the stroke, in unit coordinates
    cross = ((rows - cols).abs() <= width) | ((rows + cols - 1).abs() <= width)
    red = torch.tensor(MISMATCH, dtype=maps.dtype, device=maps.device).view(3, 1) / 255
    invalid = tiles[~valid]
    invalid[:, :, cross] = red
    tiles[~valid] = invalid
    return tiles


def overlay(images: Tensor, maps: Tensor, alpha: float = 0.5) -> Tensor:
    """Blend PRISM maps over the images.

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]``.
        maps: ``(N, 3, h, w)`` in ``[0, 1]``; resized to ``H×W`` if needed.
        alpha: weight of the maps.

    Returns:
        ``(N, 3, H, W)`` in ``[0, 1]``.
    """
    if maps.shape[-2:] != images.shape[-2:]:
        maps = torch.nn.functional.interpolate(
            maps, size=images.shape[-2:], mode="bilinear", align_corners=False
        )
    return ((1 - alpha) * images + alpha * maps.to(images.dtype)).clamp(0, 1)


def heatmap(maps: Tensor) -> Tensor:
    """Colour single-channel maps with the jet colour map (:data:`JET`, linear between anchors).

    Args:
        maps: ``(N, 1, H, W)`` in ``[0, 1]`` (values outside are clipped; NaN counts as 0).

    Returns:
        ``(N, 3, H, W)`` float32 in ``[0, 1]``, on the maps' device.

    Example::

        >>> heatmap(torch.tensor([[[[0.0, 0.5, 1.0]]]]))[0, :, 0].T
        tensor([[0.0000, 0.0000, 0.5000],
                [0.5000, 1.0000, 0.5000],
                [0.5000, 0.0000, 0.0000]])
    """
    anchors = torch.tensor(JET, dtype=torch.float32, device=maps.device)
    x = maps.to(torch.float32).nan_to_num(0.0).clamp(0, 1)[:, 0]  # (N, H, W)
    upper = torch.searchsorted(anchors[:, 0].contiguous(), x.contiguous(), right=True).clamp(1, len(JET) - 1)
    lo, hi = anchors[upper - 1], anchors[upper]  # (N, H, W, 4)
    t = ((x - lo[..., 0]) / (hi[..., 0] - lo[..., 0])).unsqueeze(-1)
    return (lo[..., 1:] + t * (hi[..., 1:] - lo[..., 1:])).permute(0, 3, 1, 2).contiguous()


def heat_overlay(images: Tensor, maps: Tensor, alpha: float = 0.5, clip: float | None = None) -> Tensor:
    """Blend single-channel maps over the images as :func:`heatmap` colours, each pixel weighted by its
    value: where a map is 0 the image shows unchanged, where it is 1 the colour has weight ``alpha``.

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]``.
        maps: ``(N, 1, h, w)`` in ``[0, 1]``; resized bilinearly to ``H×W`` if needed.
        alpha: weight of the colour where a map is 1.
        clip: a quantile in ``(0, 1]``: each map is divided by its value at that quantile first and
            clipped at 1, for display (saliency is a few bright pixels: 0.99 makes them visible).

    Returns:
        ``(N, 3, H, W)`` in ``[0, 1]``.
    """
    maps = maps.to(torch.float32).nan_to_num(0.0).clamp(0, 1)
    if clip is not None:
        top = torch.quantile(maps.flatten(1), clip, dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        maps = (maps / top).clamp(0, 1)
    if maps.shape[-2:] != images.shape[-2:]:
        maps = torch.nn.functional.interpolate(
            maps, size=images.shape[-2:], mode="bilinear", align_corners=False
        )
    weight = alpha * maps.to(images.dtype)
    return ((1 - weight) * images + weight * heatmap(maps).to(images.dtype)).clamp(0, 1)


def to_uint8(images: Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in ``[0, 1]`` → ``(N, H, W, 3)`` uint8 on the CPU."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------- fonts and captions
@lru_cache(maxsize=32)
def load_font(size: int, path: str | None = None) -> ImageFont.FreeTypeFont:
    """The caption font at ``size`` pixels: the bundled DejaVu Sans Bold, or the font file at ``path``.

    Raises:
        OSError: if ``path`` is not a font file FreeType can read.
    """
    return ImageFont.truetype(path or FONT, size)


def _mask(font: ImageFont.FreeTypeFont, character: str) -> tuple[tuple[int, int, int, int], bytes]:
    """Where ``character`` is drawn and its pixels."""
    left, top, right, bottom = box = font.getbbox(character)
    image = Image.new("L", (max(1, right - left), max(1, bottom - top)))
    ImageDraw.Draw(image).text((-left, -top), character, font=font, fill=255)
    return box, image.tobytes()


@lru_cache(maxsize=4096)
def _has_glyph(font: ImageFont.FreeTypeFont, character: str) -> bool:
    return _mask(font, character) != _mask(font, _UNMAPPED)


def missing_glyphs(text: str, font: ImageFont.FreeTypeFont) -> list[str]:
    """The distinct characters of ``text`` that ``font`` has no glyph for, in order of appearance.

    A character is missing when FreeType draws it exactly as it draws a code point that no font
    maps (the font's missing-glyph box).

    Example::

        >>> missing_glyphs("cat → dog 猫", load_font(14))
        ['猫']
    """
    seen: list[str] = []
    for character in text:
        if character not in seen and not _has_glyph(font, character):
            seen.append(character)
    return seen


def _drawable(text: str, font: ImageFont.FreeTypeFont) -> str:
    missing = missing_glyphs(text, font)
    return "".join("?" if c in missing else c for c in text) if missing else text


def _shorten(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _caption_lines(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """One line if it fits; else two, split at ``" → "`` (``"true"`` / ``"→ predicted"``) or else after
    ``": "`` or at the last space that fits; each shortened with ``…``."""
    text = _drawable(text, font)
    if font.getlength(text) <= width:
        return [text]
    if " → " in text:
        true, predicted = text.split(" → ", 1)
        return [_shorten(true, font, width), _shorten("→ " + predicted, font, width)]
    if ": " in text:
        head, rest = text.split(": ", 1)
        return [_shorten(head + ":", font, width), _shorten(rest, font, width)]
    spaces = [i for i, c in enumerate(text) if c == " " and font.getlength(text[:i]) <= width]
    if spaces:
        return [text[: spaces[-1]], _shorten(text[spaces[-1] + 1 :], font, width)]
    return [_shorten(text, font, width)]


# ---------------------------------------------------------------------- grids
def tile_size(height: int, width: int) -> tuple[int, int]:
    """Display size of a ``height × width`` tile: enlarged by a whole factor up to :data:`MIN_TILE`,
    or reduced to :data:`MAX_TILE`, on the longer side; else unchanged."""
    side = max(height, width)
    if side < MIN_TILE:
        factor = math.ceil(MIN_TILE / side)
        return height * factor, width * factor
    if side > MAX_TILE:
        scale = MAX_TILE / side
        return max(1, round(height * scale)), max(1, round(width * scale))
    return height, width


def display_tiles(tiles: Tensor) -> Tensor:
    """``(N, 3, H, W)`` in ``[0, 1]`` → the same tiles at :func:`tile_size`, float32 on the CPU."""
    tiles = tiles.detach().float().cpu().clamp(0, 1)
    h, w = tiles.shape[-2:]
    size = tile_size(h, w)
    if size == (h, w):
        return tiles
    if size[0] > h:
        return torch.nn.functional.interpolate(tiles, size=size, mode="nearest")
    return torch.nn.functional.interpolate(tiles, size=size, mode="bilinear", antialias=True).clamp(0, 1)


def caption_grid(
    tiles: Tensor,
    captions: Sequence[str] | None = None,
    mismatched: Sequence[bool] | None = None,
    nrow: int = COLUMNS,
    font: str | None = None,
) -> np.ndarray:
    """Lay tiles out in a grid, with a caption strip under each tile.

    Tiles are first brought to :func:`tile_size`. The caption font is a sixth of the tile width
    (at least 12 pixels); a caption too wide for its tile goes on two lines, split at ``" → "``,
    and each line too wide is shortened with ``…``.

    Args:
        tiles: ``(N, 3, H, W)`` in ``[0, 1]``.
        captions: one line per tile (for example ``"cat → dog"``); no caption strip if ``None``.
        mismatched: per tile, whether to mark it as a wrong prediction (red caption and frame).
        nrow: tiles per row.
        font: path of a TrueType/OpenType font for the captions; ``None`` for the bundled one.

    Returns:
        ``(H', W', 3)`` uint8 image.
    """
    n = tiles.shape[0]
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} tiles")
    tiles = display_tiles(tiles)
    if captions is None:
        return to_uint8(make_grid(tiles, nrow=nrow, padding=PADDING, pad_value=1.0)[None])[0]
    _, _, h, w = tiles.shape
    marks = list(mismatched) if mismatched is not None else [False] * n
    face = load_font(max(12, round(w / 6)), font)
    lines = [_caption_lines(c, face, w - 6) for c in captions]
    ascent, descent = face.getmetrics()
    line_height = ascent + descent
    strip = max(len(t) for t in lines) * line_height + 4
    columns = min(nrow, n)
    rows = (n + columns - 1) // columns
    size = (PADDING + columns * (w + PADDING), PADDING + rows * (h + strip + PADDING))
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(to_uint8(tiles)):
        r, c = divmod(i, columns)
        x0, y0 = PADDING + c * (w + PADDING), PADDING + r * (h + PADDING + strip)
        canvas.paste(Image.fromarray(tile), (x0, y0))
        draw.rectangle(
            (x0, y0 + h, x0 + w - 1, y0 + h + strip - 1), fill=MISMATCH if marks[i] else CAPTION_BACKGROUND
        )
        if marks[i]:
            draw.rectangle((x0, y0, x0 + w - 1, y0 + h + strip - 1), outline=MISMATCH, width=max(2, w // 64))
        for k, line in enumerate(lines[i]):
            draw.text((x0 + 3, y0 + h + 2 + k * line_height), line, fill=MATCH, font=face)
    return np.asarray(canvas)


def views_grid(
    inputs: Tensor,
    views: Sequence[tuple[str, Tensor]],
    captions: Sequence[str] | None = None,
    mismatched: Sequence[bool] | None = None,
    font: str | None = None,
) -> np.ndarray:
    """The views side by side: one row per image, its input first, then each view, every tile captioned
    (the input with ``captions``, each view with its name).

    Args:
        inputs: ``(N, 3, H, W)`` images in ``[0, 1]``.
        views: ``(name, tiles)`` pairs, tiles ``(N, 3, H, W)`` in ``[0, 1]``.
        captions: one per image (``"cat → dog"``); the image index if ``None``.
        mismatched: per image, whether to mark its input tile as a wrong prediction.
        font: as for :func:`caption_grid`.

    Returns:
        ``(H', W', 3)`` uint8 image.
    """
    n, columns = inputs.shape[0], 1 + len(views)
    texts = list(captions) if captions is not None else [str(i) for i in range(n)]
    marks = list(mismatched) if mismatched is not None else [False] * n
    tiles = torch.stack([inputs, *(t.to(inputs.dtype) for _, t in views)], dim=1).flatten(0, 1)
    names = [name for name, _ in views]
    return caption_grid(
        tiles,
        [text for i in range(n) for text in (texts[i], *names)],
        [mark for i in range(n) for mark in (marks[i], *[False] * len(views))],
        nrow=columns,
        font=font,
    )


# ---------------------------------------------------------------------- the evolution strip
def evolution_strip(
    inputs: np.ndarray,
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str],
    tile: int = 96,
    font: str | None = None,
) -> Image.Image:
    """One picture of the whole run: probe inputs on top, then one row of maps per logged epoch.

    Args:
        inputs: ``(N, H, W, 3)`` uint8 probe images.
        rows: per logged epoch, ``(N, H, W, 3)`` uint8 maps (or overlays).
        row_labels: a label per row, for example ``"epoch 3"``.
        tile: side of each thumbnail in pixels.
        font: path of a TrueType/OpenType font for the labels; ``None`` for the bundled one.

    Returns:
        RGB image of ``(len(rows) + 1) · (tile + 2) + 2`` rows of pixels and
        ``label_width + N · (tile + 2) + 2`` columns, ``label_width`` the widest label plus 12 pixels.
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"got {len(row_labels)} labels for {len(rows)} rows")
    n = inputs.shape[0]
    face = load_font(max(12, tile // 6), font)
    labelled = [(inputs, "input"), *zip(rows, (_drawable(label, face) for label in row_labels), strict=True)]
    label_width = math.ceil(max(face.getlength(label) for _, label in labelled)) + 12
    step = tile + PADDING
    canvas = Image.new(
        "RGB", (label_width + n * step + PADDING, (len(rows) + 1) * step + PADDING), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for r, (images, label) in enumerate(labelled):
        if images.shape[0] != n:
            raise ValueError(f"row {label!r} has {images.shape[0]} images, expected {n}")
        y = PADDING + r * step
        draw.text((6, y + tile // 2), label, fill=(0, 0, 0), font=face, anchor="lm")
        for c in range(n):
            thumb = Image.fromarray(images[c]).resize((tile, tile), Image.Resampling.BILINEAR)
            canvas.paste(thumb, (label_width + PADDING + c * step, y))
    return canvas


def _encode(images: np.ndarray) -> bytes:
    """``(N, t, t, 3)`` uint8 → one JPEG of the tiles side by side (quality 90, full-resolution colour)."""
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(list(images), axis=1)).save(
        buffer, format="JPEG", quality=90, subsampling=0
    )
    return buffer.getvalue()


def _decode(data: bytes, count: int) -> np.ndarray:
    strip = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return np.stack(np.split(strip, count, axis=1))


class EvolutionHistory:
    """The rows of the evolution strip, bounded in number and spread evenly over the whole run.

    Rows are numbered in the order they are added (``0, 1, 2, …``). All rows are kept while there
    are at most ``max_rows``; beyond that only the rows whose number is a multiple of a stride (1, 2,
    4, …, doubled as often as needed) are kept, plus the latest. So the first and the last row are
    always shown, the rows between are evenly spaced, and there are never more than ``max_rows``.
    Rows are stored as ``tile``-pixel thumbnails in JPEG (quality 90, about 3 kB per image), which is
    also what :meth:`state_dict` returns, so a checkpoint carries at most ``max_rows + 1`` small
    JPEGs; the strip itself is drawn from them and saved as PNG.

    Args:
        max_rows: most rows of maps in the strip (at least 2: the first and the last).
        tile: side of each thumbnail in pixels.

    Example::

        >>> history = EvolutionHistory(max_rows=4, tile=8)
        >>> for epoch in range(10):
        ...     history.add(f"epoch {epoch}", np.zeros((2, 16, 16, 3), np.uint8))
        >>> history.labels
        ['epoch 0', 'epoch 4', 'epoch 8', 'epoch 9']
    """

    def __init__(self, max_rows: int = 10, tile: int = 96) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 2:
            raise ValueError(
                f"max_rows must be an integer >= 2 (the first and the last row), got {max_rows!r}"
            )
        self.max_rows = max_rows
        self.tile = tile
        self.reset()

    def reset(self) -> None:
        """Forget every row and the inputs."""
        self._inputs: bytes | None = None
        self._count = 0  # images per row
        self._added = 0  # rows ever added
        self._stride = 1
        self._rows: list[tuple[int, str, bytes]] = []  # (row number, label, JPEG)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def has_inputs(self) -> bool:
        """Whether the top row (the probe images) is there."""
        return self._inputs is not None

    @property
    def labels(self) -> list[str]:
        return [label for _, label, _ in self._rows]

    def _thumbnails(self, images: np.ndarray) -> np.ndarray:
        size = (self.tile, self.tile)
        return np.stack(
            [np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)) for image in images]
        )

    def add(self, label: str, images: np.ndarray, inputs: np.ndarray | None = None) -> None:
        """Add a row.

        Args:
            label: the row's label, for example ``"epoch 3"``.
            images: ``(N, H, W, 3)`` uint8, one per probe image.
            inputs: ``(N, H, W, 3)`` uint8 probe images, for the top row (kept from the first call
                that gives them). A row with a different number of images than the rows before
                starts the history afresh.
        """
        if self._rows and images.shape[0] != self._count:
            self.reset()
        self._count = images.shape[0]
        if inputs is not None and self._inputs is None:
            self._inputs = _encode(self._thumbnails(inputs))
        self._rows.append((self._added, label, _encode(self._thumbnails(images))))
        self._added += 1
        self._thin()

    def _thin(self) -> None:
        def keep(rows: list[tuple[int, str, bytes]]) -> list[tuple[int, str, bytes]]:
            return [row for row in rows[:-1] if row[0] % self._stride == 0] + rows[-1:]

        self._rows = keep(self._rows)
        while len(self._rows) > self.max_rows:
            self._stride *= 2
            self._rows = keep(self._rows)

    def render(self, font: str | None = None) -> Image.Image | None:
        """The strip (:func:`evolution_strip`), or ``None`` without rows or inputs."""
        if not self._rows or self._inputs is None:
            return None
        return evolution_strip(
            _decode(self._inputs, self._count),
            [_decode(data, self._count) for _, _, data in self._rows],
            self.labels,
            tile=self.tile,
            font=font,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "inputs": self._inputs,
            "images_per_row": self._count,
            "added": self._added,
            "stride": self._stride,
            "rows": [[number, label, data] for number, label, data in self._rows],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._inputs = state.get("inputs")
        self._count = int(state.get("images_per_row", 0))
        self._added = int(state.get("added", 0))
        self._stride = int(state.get("stride", 1))
        self._rows = [(int(number), str(label), bytes(data)) for number, label, data in state.get("rows", [])]
        self._thin()
