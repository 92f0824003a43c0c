"""Pictures a person reads at a glance: grids with captions, overlays, the evolution strip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

__all__ = ["caption_grid", "denormalize", "evolution_strip", "overlay", "to_uint8", "with_invalid_tiles"]

PADDING = 2
MISMATCH = (220, 40, 40)
MATCH = (235, 235, 235)


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


def to_uint8(images: Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in ``[0, 1]`` → ``(N, H, W, 3)`` uint8 on the CPU."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def caption_grid(
    tiles: Tensor,
    captions: Sequence[str] | None = None,
    mismatched: Sequence[bool] | None = None,
    nrow: int = 8,
) -> np.ndarray:
    """Lay tiles out in a grid, with a caption strip under each tile.

    Args:
        tiles: ``(N, 3, H, W)`` in ``[0, 1]``.
        captions: one line per tile (for example ``"cat → dog"``); no caption strip if ``None``.
        mismatched: per tile, whether to mark it as a wrong prediction (red caption and frame).
        nrow: tiles per row.

    Returns:
        ``(H', W', 3)`` uint8 image.
    """
    n, _, h, w = tiles.shape
    if captions is None:
        grid = make_grid(tiles.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=PADDING, pad_value=1.0)
        return to_uint8(grid[None])[0]
    if len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} tiles")
    marks = list(mismatched) if mismatched is not None else [False] * n
    font_size = max(10, min(h, w) // 12)
    strip = font_size + 6
    columns = min(nrow, n)
    rows = (n + columns - 1) // columns
    size = (PADDING + columns * (w + PADDING), PADDING + rows * (h + strip + PADDING))
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    for i, tile in enumerate(to_uint8(tiles)):
        r, c = divmod(i, columns)
        x0, y0 = PADDING + c * (w + PADDING), PADDING + r * (h + PADDING + strip)
        canvas.paste(Image.fromarray(tile), (x0, y0))
        draw.rectangle(
            (x0, y0 + h, x0 + w - 1, y0 + h + strip - 1), fill=MISMATCH if marks[i] else (40, 40, 40)
        )
        if marks[i]:
            draw.rectangle((x0, y0, x0 + w - 1, y0 + h + strip - 1), outline=MISMATCH, width=max(2, w // 64))
        draw.text((x0 + 3, y0 + h + 2), captions[i], fill=MATCH, font=font)
    return np.asarray(canvas)


def evolution_strip(
    inputs: np.ndarray, rows: Sequence[np.ndarray], row_labels: Sequence[str], tile: int = 96
) -> Image.Image:
    """One picture of the whole run: probe inputs on top, then one row of maps per logged epoch.

    Args:
        inputs: ``(N, H, W, 3)`` uint8 probe images.
        rows: per logged epoch, ``(N, H, W, 3)`` uint8 maps (or overlays).
        row_labels: a label per row, for example ``"epoch 3"``.
        tile: side of each thumbnail in pixels.

    Returns:
        RGB image of ``(len(rows) + 1) · (tile + 2) + 2`` rows of pixels and
        ``label_width + N · (tile + 2) + 2`` columns, ``label_width = 2 · tile // 3``.
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"got {len(row_labels)} labels for {len(rows)} rows")
    n = inputs.shape[0]
    label_width = 2 * tile // 3
    step = tile + PADDING
    canvas = Image.new(
        "RGB", (label_width + n * step + PADDING, (len(rows) + 1) * step + PADDING), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, tile // 7))
    for r, (images, label) in enumerate([(inputs, "input"), *zip(rows, row_labels, strict=True)]):
        if images.shape[0] != n:
            raise ValueError(f"row {label!r} has {images.shape[0]} images, expected {n}")
        y = PADDING + r * step
        draw.text((4, y + tile // 2 - tile // 14), label, fill=(0, 0, 0), font=font)
        for c in range(n):
            thumb = Image.fromarray(images[c]).resize((tile, tile), Image.Resampling.BILINEAR)
            canvas.paste(thumb, (label_width + PADDING + c * step, y))
    return canvas
