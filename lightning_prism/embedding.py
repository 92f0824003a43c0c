"""The validation samples' pooled features as a picture, and as embeddings for the trackers' projectors.

* :func:`embedding_plot`: a dot per sample on two principal axes
  (:func:`~lightning_prism.discrimination.embedding_axes`), coloured by class, with a legend, the probe
  images ringed in black; drawn with PIL and the bundled DejaVu Sans Bold.
* :func:`log_embedding`: the features with their classes and predictions for an interactive
  projector (t-SNE, UMAP, PCA):

  - TensorBoard: ``SummaryWriter.add_embedding`` (the Projector tab), with ``class`` and
    ``prediction`` metadata and the thumbnails as its sprite;
  - W&B: a ``wandb.Table`` with columns ``class``, ``prediction``, ``embedding`` (one list-valued
    cell per sample, which W&B's 2D Projection panel reads as the vector) and ``image`` with
    thumbnails. W&B's projector works on at most 1,000 rows and 50 dimensions, so ``embedding`` holds
    the samples' coordinates on the top :data:`WANDB_DIMENSIONS` principal axes (the 50 dimensions
    that keep the most variance; the table is 40× smaller for 2048 channels);
  - MLflow: run artifacts ``<tag>/step_<step>/tensors.tsv`` (one sample per line, the full features,
    ``%.9g``, so float32 values read back exactly) and ``metadata.tsv`` (header ``class\\tprediction``):
    the two files that the standalone Embedding Projector (projector.tensorflow.org) loads.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .discrimination import embedding_axes
from .loggers import backend
from .pca import principal_components
from .render import _drawable, _shorten, load_font

__all__ = [
    "NEUTRAL",
    "PALETTE",
    "SPRITE_LIMIT",
    "THUMBNAIL_LIMIT",
    "WANDB_DIMENSIONS",
    "EmbeddingView",
    "embedding_plot",
    "embedding_range",
    "log_embedding",
    "plot_area",
    "projector_indices",
]

#: Class colours, readable on white: matplotlib's ``tab10``, then ten darker or more saturated hues.
#: Class ``c`` gets ``PALETTE[c % 20]`` (the legend says when colours repeat).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (57, 59, 121),
    (128, 0, 0),
    (0, 128, 128),
    (240, 50, 230),
    (230, 171, 2),
    (99, 121, 57),
    (145, 30, 180),
    (250, 128, 114),
    (47, 79, 79),
    (170, 110, 40),
)
#: The dots' colour without labels.
NEUTRAL = (31, 119, 180)
MARK = (0, 0, 0)
FRAME = (150, 150, 150)
ZERO_LINE = (225, 225, 225)
TEXT = (30, 30, 30)
#: The sprite TensorBoard's Projector shows is at most this many pixels a side.
SPRITE_LIMIT = 8192
#: Thumbnails larger than this (pixels a side) are reduced to it: the projectors show them as small
#: tiles, and 1,000 thumbnails of 64×64 make a 2048×2048 sprite.
THUMBNAIL_LIMIT = 64
#: Dimensions of the W&B table's ``embedding`` column (W&B's projector uses at most 50).
WANDB_DIMENSIONS = 50
#: Least width of the legend's column, in pixels (about 13 characters at the default size).
LEGEND_WIDTH = 170
#: Quantile of ``|coordinate|`` that the axis range covers (points beyond sit on the frame).
RANGE_QUANTILE = 0.995
#: The axis range is the next of these (times a power of ten) above 1.05 × that quantile, so it moves
#: only when the cloud outgrows a step (a quarter to a half), not with every epoch's small changes; two
#: significant digits keep the tick labels short (``"−0.15"``, ``"2.5"``, ``"1500"``).
NICE_STEPS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


# ---------------------------------------------------------------------- the picture
def embedding_range(coords: Tensor | np.ndarray) -> float:
    """The half-width ``R`` of the square ``[-R, R]²`` that :func:`embedding_plot` shows.

    Both axes share it (distances read the same across and along), and it is a round number: the
    next of :data:`NICE_STEPS` (times a power of ten) above 1.05 × the 99.5 % quantile of the
    absolute coordinates. Outliers beyond are drawn on the frame. A caller that wants the frame
    steady over a whole run can pass ``limit=max(previous, embedding_range(coords))``.

    Example::

        >>> embedding_range(np.array([[0.2, -3.1], [1.0, 0.5]])), embedding_range(np.zeros((2, 2)))
        (4.0, 1.0)
    """
    values = np.abs(_numpy(coords, "coords").reshape(-1))
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 1.0
    top = float(np.quantile(values, RANGE_QUANTILE)) * 1.05
    if top <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(top))
    step = next(s for s in NICE_STEPS if s * power >= top * (1 - 1e-12))
    return float(step * power)


def _numpy(values: Any, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        return values
    raise TypeError(f"{name} must be a tensor or a NumPy array, got {type(values).__name__}")


def _fonts(size: tuple[int, int], font: str | None) -> tuple[ImageFont.FreeTypeFont, ImageFont.FreeTypeFont]:
    height = size[1]
    return load_font(max(12, round(height / 22)), font), load_font(max(11, round(height / 26)), font)


def _line_height(face: ImageFont.FreeTypeFont) -> int:
    ascent, descent = face.getmetrics()
    return ascent + descent


def plot_area(size: tuple[int, int] = (720, 480), font: str | None = None) -> tuple[int, int, int, int]:
    """Where :func:`embedding_plot` puts the square plot: ``(left, top, right, bottom)`` pixels,
    inclusive. A coordinate ``(x, y)`` in ``[-R, R]²`` lands at column
    ``left + (x / R + 1) / 2 · (right − left)`` and row ``top + (1 − y / R) / 2 · (bottom − top)``.

    The layout depends only on the size and the font, so it is the same every epoch: a title band at
    the top, tick labels and axis names left of and below the square, the legend to its right.

    Example::

        >>> plot_area((720, 480))
        (102, 43, 478, 419)
    """
    width, height = size
    title_face, text_face = _fonts(size, font)
    pad = max(6, height // 60)
    text = _line_height(text_face)
    top = pad + _line_height(title_face) + pad
    left = pad + text + pad + math.ceil(text_face.getlength("−0.15")) + pad // 2
    bottom = pad + text + text + pad
    side = min(height - top - bottom, width - left - LEGEND_WIDTH - 2 * pad)
    if side < 40:
        raise ValueError(f"size {size} leaves no room for the plot; use at least 360×240")
    return left, top, left + side - 1, top + side - 1


def _tick(value: float) -> str:
    """A tick label: ``"1500"``, ``"0.15"``, or ``"1.5e4"`` outside ``[0.01, 10⁴)``; a real minus sign."""
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        text = f"{value:.4g}"
    else:
        mantissa, exponent = f"{value:.3g}".split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text.replace("-", "−")


def _rotated(text: str, face: ImageFont.FreeTypeFont, fill: tuple[int, int, int]) -> Image.Image:
    """``text`` turned 90° anticlockwise (reading upwards), on a transparent background."""
    left, top, right, bottom = face.getbbox(text)
    label = Image.new("RGBA", (right - left + 2, bottom - top + 2), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((-left + 1, -top + 1), text, font=face, fill=(*fill, 255))
    return label.rotate(90, expand=True)


def embedding_plot(
    coords: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    marked: Tensor | np.ndarray | None = None,
    title: str | None = None,
    *,
    explained: Sequence[float] | Tensor | None = None,
    limit: float | None = None,
    size: tuple[int, int] = (720, 480),
    font: str | None = None,
) -> np.ndarray:
    """A dot per sample on two principal axes, coloured by class, with a legend.

    Dots are drawn in an order fixed by the number of samples (a seeded permutation, the same every
    epoch), so no class always covers the others; the ``marked`` samples (the probe images) are drawn
    last, larger and ringed in black. Both axes show ``[-limit, limit]`` (:func:`embedding_range` by
    default); points beyond sit on the frame. Class ``c`` is coloured ``PALETTE[c % 20]``, the same
    in every epoch; the legend lists the classes drawn with their names, as many as fit, then how
    many more there are, and says when colours repeat (more than 20 classes).

    Args:
        coords: ``(N, 2)`` coordinates (rows with NaN or infinite values are not drawn).
        labels: ``(N,)`` non-negative integer classes, or ``None`` (all dots one colour).
        class_names: names by class index; a class without a name is shown as its number.
        marked: ``(N,)`` bool, the samples to ring (the probe images), or ``None``.
        title: a line above the plot (for example ``"epoch 3 · k-NN 0.956 · η² 0.81 · RankMe 54"``).
        explained: the share of the variance along each axis, shown as ``"PC1 (34 %)"``.
        limit: the half-width ``R`` of the axes; :func:`embedding_range` of ``coords`` if ``None``.
        size: ``(width, height)`` in pixels, at least 360×240.
        font: path of a TrueType/OpenType font; ``None`` for the bundled DejaVu Sans Bold.

    Returns:
        ``(height, width, 3)`` uint8 RGB image.

    Raises:
        TypeError: for inputs that are no tensors or arrays.
        ValueError: for shapes that do not match, negative labels, or a size or limit out of range.

    Example::

        >>> coords = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.2, 0.8]])
        >>> image = embedding_plot(coords, torch.tensor([0, 1, 0]), ["cat", "dog"], title="epoch 0")
        >>> image.shape, image.dtype
        ((480, 720, 3), dtype('uint8'))
    """
    points = _numpy(coords, "coords").astype(np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"expected (N, 2) coords, got shape {points.shape}")
    n = points.shape[0]
    classes = None
    if labels is not None:
        classes = _numpy(labels, "labels")
        if classes.shape != (n,):
            raise ValueError(f"expected ({n},) labels, got shape {classes.shape}")
        if classes.size and (not np.issubdtype(classes.dtype, np.integer) and classes.dtype != bool):
            raise ValueError(f"labels must be integer classes, got {classes.dtype}")
        classes = classes.astype(np.int64)
        if classes.size and classes.min() < 0:
            raise ValueError(f"labels must be non-negative, got {int(classes.min())}")
    ring = np.zeros(n, dtype=bool)
    if marked is not None:
        ring = _numpy(marked, "marked").astype(bool)
        if ring.shape != (n,):
            raise ValueError(f"expected ({n},) marked, got shape {ring.shape}")
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) for s in size)):
        raise ValueError(f"size must be (width, height) in pixels, got {size!r}")
    if size[0] < 360 or size[1] < 240:
        raise ValueError(f"size must be at least 360×240, got {size[0]}×{size[1]}")
    limit = embedding_range(points) if limit is None else float(limit)
    if not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"limit must be positive and finite, got {limit}")

    width, height = size
    title_face, text_face = _fonts(size, font)
    pad = max(6, height // 60)
    line = _line_height(text_face)
    left, top, right, bottom = plot_area(size, font)
    side = right - left
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    # The frame, the axes through 0, ticks at −R, 0 and R, the axis names.
    middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
    draw.line((middle_x, top, middle_x, bottom), fill=ZERO_LINE, width=1)
    draw.line((left, middle_y, right, middle_y), fill=ZERO_LINE, width=1)
    draw.rectangle((left, top, right, bottom), outline=FRAME, width=1)
    # Corner labels align with the frame's edges, so the two at the lower left do not meet.
    for value, x, anchor in ((-limit, left, "lt"), (0.0, middle_x, "mt"), (limit, right, "rt")):
        draw.text((x, bottom + 3), _tick(value), font=text_face, fill=TEXT, anchor=anchor)
    for value, y, anchor in ((limit, top, "rt"), (0.0, middle_y, "rm"), (-limit, bottom, "rb")):
        draw.text((left - 4, y), _tick(value), font=text_face, fill=TEXT, anchor=anchor)
    shares = None if explained is None else [float(v) for v in _numpy_like(explained)][:2]
    names = [f"PC{i + 1}" + (f" ({100 * shares[i]:.0f} %)" if shares else "") for i in range(2)]
    draw.text((middle_x, bottom + 3 + line), names[0], font=text_face, fill=TEXT, anchor="mt")
    vertical = _rotated(names[1], text_face, TEXT)
    canvas.paste(vertical, (pad, round(middle_y - vertical.height / 2)), vertical)
    if title:
        text = _shorten(_drawable(title, title_face), title_face, width - 2 * pad)
        draw.text((pad, pad), text, font=title_face, fill=TEXT)

    # The dots: a fixed order, the probe images last.
    finite = np.isfinite(points).all(axis=1)
    scaled = np.clip(points / limit, -1, 1)
    xs = left + (scaled[:, 0] + 1) / 2 * side
    ys = top + (1 - scaled[:, 1]) / 2 * side
    radius = max(1, round(side / 130)) if n <= 1000 else max(1, round(side / 200)) if n <= 5000 else 1
    colours = [NEUTRAL] * n if classes is None else [PALETTE[c % len(PALETTE)] for c in classes.tolist()]
    order = np.random.default_rng(0).permutation(n)
    order = np.concatenate([order[~ring[order]], order[ring[order]]])
    ring_radius = radius + max(3, radius + 1)
    for i in order.tolist():
        if not finite[i]:
            continue
        x, y, r = float(xs[i]), float(ys[i]), radius
        if ring[i]:
            r = ring_radius
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colours[i], outline=MARK, width=2)
        else:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colours[i])

    _legend(
        draw,
        None if classes is None else classes[finite],
        class_names,
        bool(ring[finite].any()),
        text_face,
        (right + 2 * pad, top, width - pad // 2, height - pad),
    )
    return np.asarray(canvas)


def _numpy_like(values: Sequence[float] | Tensor) -> list[float]:
    if isinstance(values, Tensor):
        return values.detach().cpu().tolist()
    return list(values)


def _legend(
    draw: ImageDraw.ImageDraw,
    classes: np.ndarray | None,
    class_names: Sequence[str] | None,
    any_marked: bool,
    face: ImageFont.FreeTypeFont,
    box: tuple[int, int, int, int],
) -> None:
    """The classes present with their colours, then the probe marker; as many entries as fit."""
    x0, y0, x1, y1 = box
    line = _line_height(face) + 2
    swatch = max(4, line // 3)
    text_x = x0 + 2 * swatch + 6
    entries: list[tuple[str, tuple[int, int, int] | None, bool]] = []  # text, colour, ringed
    notes: list[str] = []
    if classes is None:
        entries.append(("no labels", NEUTRAL, False))
    else:
        present = sorted(set(classes.tolist()))
        rows = max(1, (y1 - y0) // line - (1 if any_marked else 0))
        if len(present) > len(PALETTE):
            notes.append(f"colours repeat after {len(PALETTE)} classes")
        reserved = 2 * len(notes)  # a note may take two lines
        shown = present if len(present) + reserved <= rows else present[: max(1, rows - reserved - 2)]
        for c in shown:
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            entries.append((str(name), PALETTE[c % len(PALETTE)], False))
        if len(shown) < len(present):
            notes.insert(0, f"+ {len(present) - len(shown)} more classes")
    if any_marked:
        entries.append(("probe images", (255, 255, 255), True))
    y = y0
    for text, colour, ringed in entries:
        cx, cy = x0 + swatch + 1, y + line / 2
        r = swatch + (1 if ringed else 0)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=MARK if ringed else None, width=2)
        draw.text(
            (text_x, cy),
            _shorten(_drawable(text, face), face, x1 - text_x),
            font=face,
            fill=TEXT,
            anchor="lm",
        )
        y += line
    for note in notes:
        for text in _wrap(note, face, x1 - x0):
            draw.text((x0, y + line / 2), text, font=face, fill=(110, 110, 110), anchor="lm")
            y += line


def _wrap(text: str, face: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """``text`` in lines of at most ``width`` pixels, broken at spaces (a word too long is shortened)."""
    lines: list[str] = []
    for word in text.split():
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_shorten(word, face, width))
    return lines


# ---------------------------------------------------------------------- the trackers
def projector_indices(count: int, max_points: int) -> Tensor:
    """Which of ``count`` samples :func:`log_embedding` logs: all if ``count <= max_points``, else
    ``max_points`` spread evenly over them (the same ones every epoch for the same count; a validation
    set sorted by class keeps every class).

    Example::

        >>> projector_indices(10, 4).tolist()
        [0, 3, 6, 9]
    """
    if count <= max_points:
        return torch.arange(count)
    return torch.linspace(0, count - 1, max_points, dtype=torch.float64).round().long()


def _cell(value: str) -> str:
    """A metadata cell: no tabs or line breaks (they would split the TSV)."""
    return " ".join(str(value).split()) or "?"


def _names(values: Tensor | None, class_names: Sequence[str] | None, count: int) -> list[str] | None:
    if values is None:
        return None
    out = []
    for v in values.tolist():
        v = int(v)
        out.append(_cell(class_names[v]) if class_names is not None and 0 <= v < len(class_names) else str(v))
    if len(out) != count:
        raise ValueError(f"got {len(out)} labels or predictions for {count} samples")
    return out


def _thumbnail_side(count: int, height: int, width: int) -> int:
    """The side of ``count`` square thumbnails: at most :data:`THUMBNAIL_LIMIT`, and small enough for
    a square sprite of at most :data:`SPRITE_LIMIT` pixels a side (TensorBoard squares them).

    Example::

        >>> _thumbnail_side(1000, 32, 32), _thumbnail_side(1000, 224, 224), _thumbnail_side(50_000, 64, 64)
        (32, 64, 36)
    """
    return max(1, min(max(height, width), THUMBNAIL_LIMIT, SPRITE_LIMIT // math.ceil(math.sqrt(count))))


def _sprite_thumbnails(thumbnails: Tensor, count: int) -> Tensor:
    """``(N, 3, s, s)`` float32 in ``[0, 1]`` on the CPU, ``s`` from :func:`_thumbnail_side` for a sprite
    of ``count`` thumbnails."""
    t = thumbnails.detach().cpu()
    t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    side = _thumbnail_side(count, *t.shape[-2:])
    if tuple(t.shape[-2:]) != (side, side):
        t = torch.nn.functional.interpolate(t, size=(side, side), mode="bilinear", antialias=True)
    return t[:, :3].clamp(0, 1)


def _safe_path(tag: str) -> str:
    """A tag as a relative artifact path: ``/``-separated words of letters, digits, ``_``, ``-``, ``.``."""
    parts = ["".join(c if c.isalnum() or c in "_-." else "_" for c in p) for p in tag.split("/")]
    return "/".join(p.strip(".") or "_" for p in parts if p)


def log_embedding(
    logger: Any,
    tag: str,
    features: Tensor,
    step: int,
    *,
    labels: Tensor | None = None,
    predictions: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    thumbnails: Tensor | None = None,
    max_points: int = 1000,
) -> bool:
    """Log the samples' features for the tracker's interactive projector.

    At most ``max_points`` samples go out, spread evenly over all (:func:`projector_indices`). What
    each tracker gets is described in the module's docstring. For TensorBoard the embedding is named
    ``"<tag>:<step, 5 digits>"`` in the Projector; its files go to ``<log_dir>/<step>/<tag with / as
    %2F>/`` (``add_embedding``'s own layout, which keeps the tag's ``/`` out of the directory tree).
    Thumbnails are reduced to at most :data:`THUMBNAIL_LIMIT` pixels a side, and for TensorBoard's
    sprite (at most :data:`SPRITE_LIMIT` pixels a side) further if needed; non-square ones are
    stretched to squares, as the Projector shows them.

    Args:
        logger: a Lightning logger (recognised by :func:`~lightning_prism.loggers.backend`).
        tag: the embedding's name, ``/``-separated words (``"prism/embedding"``).
        features: ``(M, D)`` pooled features.
        step: the step of the epoch's other metrics.
        labels: ``(M,)`` integer classes, or ``None``.
        predictions: ``(M,)`` integer predicted classes, or ``None``.
        class_names: names by class index (otherwise the class number is shown).
        thumbnails: ``(M, C, h, w)`` or ``(max_points, C, h, w)`` (the samples that
            :func:`projector_indices` picks) images in ``[0, 1]`` (or uint8), ``C`` 1 or 3; or ``None``.
        max_points: most samples logged.

    Returns:
        ``True`` if the logger took the embedding; ``False`` for loggers without a projector or an
        artifact store (CSVLogger, …).

    Raises:
        TypeError: if ``features`` is not a floating-point tensor.
        ValueError: for shapes that do not match, or ``max_points`` below 1.
    """
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"expected (M, D) features, got shape {tuple(features.shape)}")
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be a positive integer, got {max_points!r}")
    kind = backend(logger)
    if kind not in ("tensorboard", "wandb", "mlflow"):
        return False
    count = features.shape[0]
    index = projector_indices(count, max_points)
    picked = index.to(features.device)
    matrix = features.detach()[picked].float()
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values is not None and (values.ndim != 1 or values.shape[0] != count):
            raise ValueError(f"expected ({count},) {name}, got shape {tuple(values.shape)}")
    classes = _names(None if labels is None else labels.detach().cpu()[index], class_names, len(index))
    predicted = _names(
        None if predictions is None else predictions.detach().cpu()[index], class_names, len(index)
    )
    images = None
    if thumbnails is not None:
        if (
            thumbnails.ndim != 4
            or thumbnails.shape[0] not in (count, len(index))
            or thumbnails.shape[1] not in (1, 3)
        ):
            raise ValueError(
                f"expected ({count} or {len(index)}, 1 or 3, h, w) thumbnails, got shape {tuple(thumbnails.shape)}"
            )
        images = (
            thumbnails.detach()[index.to(thumbnails.device)] if thumbnails.shape[0] == count else thumbnails
        )
    columns = [("class", classes), ("prediction", predicted)]
    columns = [(name, values) for name, values in columns if values is not None]

    if kind == "tensorboard":
        metadata: list[Any] | None = None
        header = None
        if len(columns) == 1:  # one column: no header row (the Projector would read it as a sample)
            metadata = list(columns[0][1])
        elif columns:
            header = [name for name, _ in columns]
            metadata = [list(row) for row in zip(*(values for _, values in columns), strict=True)]
        logger.experiment.add_embedding(
            matrix.cpu().numpy(),
            metadata=metadata,
            metadata_header=header,
            label_img=None if images is None else _sprite_thumbnails(images, len(index)),
            global_step=step,
            tag=tag,
        )
        return True
    if kind == "wandb":
        k = min(WANDB_DIMENSIONS, *matrix.shape)
        scores = principal_components(matrix.reshape(*matrix.shape, 1, 1), k).scores.reshape(len(index), k)
        names = [name for name, _ in columns] + ["embedding"]
        rows = [[values[i] for _, values in columns] + [scores[i].tolist()] for i in range(len(index))]
        if images is not None:
            import wandb

            names.append("image")
            tiles = _sprite_thumbnails(images, 1)
            for row, tile in zip(rows, tiles, strict=True):
                row.append(wandb.Image((tile.permute(1, 2, 0) * 255).round().byte().numpy()))
        logger.log_table(key=tag, columns=names, data=rows, step=step)
        return True
    # MLflow: the Embedding Projector's two TSV files as run artifacts.
    with tempfile.TemporaryDirectory() as directory:
        np.savetxt(os.path.join(directory, "tensors.tsv"), matrix.cpu().numpy(), fmt="%.9g", delimiter="\t")
        paths = [os.path.join(directory, "tensors.tsv")]
        if columns:
            with open(os.path.join(directory, "metadata.tsv"), "w", encoding="utf-8") as f:
                if len(columns) > 1:
                    f.write("\t".join(name for name, _ in columns) + "\n")
                for row in zip(*(values for _, values in columns), strict=True):
                    f.write("\t".join(row) + "\n")
            paths.append(os.path.join(directory, "metadata.tsv"))
        artifact_path = f"{_safe_path(tag)}/step_{step:05d}"
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, path, artifact_path=artifact_path)
    return True


class EmbeddingView:
    """The ``<prefix>/embedding`` picture of successive passes over the validation set, kept comparable:
    each pass's two principal axes are matched (order and sign) to the previous pass's, as PRISM's colour
    basis is, and the frame only grows, so a cluster keeps its place from picture to picture.

    Attributes:
        axes: ``(D, 2)`` the previous pass's axes (saved in checkpoints), or ``None``.
        limit: the frame's half-width so far.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.axes: Tensor | None = None
        self.limit = 0.0

    def picture(
        self,
        features: Tensor,
        labels: Tensor | None,
        marked: tuple[Tensor, Tensor | None] | None,
        title: str,
        class_names: Sequence[str] | None,
        font: str | None = None,
    ) -> np.ndarray | None:
        """The samples on the pass's aligned axes, and the probe's images ringed.

        Args:
            features: ``(M, D)`` finite pooled features of the samples.
            labels: ``(M,)`` class indices (a colour each), or ``None`` (multi-hot labels too).
            marked: the probe's ``(P, D)`` pooled features and ``(P,)`` labels, drawn ringed, or ``None``.
            title: the picture's title.
            class_names: the legend's names by class index.
            font: caption font path, or ``None``.

        Returns:
            ``(H, W, 3)`` uint8, or ``None`` with fewer than two samples.
        """
        if features.shape[0] < 2:
            return None
        reference = self.axes if self.axes is not None and self.axes.shape[0] == features.shape[1] else None
        found = embedding_axes(features, None if reference is None else reference.to(features.device))
        self.axes = found.axes.detach().float().cpu()
        coords, marks = found.coords, None
        classes = labels if labels is not None and labels.ndim == 1 else None
        if marked is not None and marked[0].shape[1] == features.shape[1]:
            pooled, probe_labels = marked
            probe_coords = (pooled.to(features.device) - features.mean(dim=0)) @ found.axes.to(pooled.dtype)
            coords = torch.cat([coords, probe_coords.to(coords.dtype)])
            marks = torch.cat(
                [torch.zeros(len(features), dtype=torch.bool), torch.ones(len(pooled), dtype=torch.bool)]
            )
            if classes is not None and probe_labels is not None and probe_labels.ndim == 1:
                classes = torch.cat([classes.long().cpu(), probe_labels.long().cpu()])
            else:
                classes = None
        self.limit = max(self.limit, embedding_range(coords))
        return embedding_plot(
            coords.cpu(), None if classes is None else classes.cpu(), class_names, marks, title,
            explained=found.explained.cpu(), limit=self.limit, font=font,
        )  # fmt: skip
