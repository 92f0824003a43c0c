"""How a module's output is read as an ``(N, C, h, w)`` feature map: :class:`FeatureLayout`.

Networks hand their feature maps on in three layouts:

* ``"nchw"``: a convolutional map ``(N, C, h, w)``;
* ``"nhwc"``: a channels-last map ``(N, h, w, C)`` (Swin in timm and torchvision, MaxViT's and
  ConvNeXt's inner blocks, MambaOut, Sequencer);
* ``"tokens"``: a token sequence ``(N, P + h·w, C)`` whose first ``P`` tokens are *prefix tokens*
  (class, distillation and register tokens) and whose other ``h·w`` tokens are the patches in raster
  order (ViT, DeiT, EVA, BEiT, their Hugging Face and torchvision versions, LeViT, PVT).

A :class:`FeatureLayout` says which one a tensor is, with its patch grid ``(h, w)`` and prefix, and
turns the tensor into an ``(N, C, h, w)`` view (:meth:`FeatureLayout.to_nchw`). The same layout
turns the gradient with respect to that tensor into the same view, since a gradient has its
tensor's shape.

:func:`infer_layout` finds the layout of a shape from the input image's size alone: a map's
``h×w``, and a token sequence's patch count, must be a *patch grid* of the image, that is
``h ∈ {⌊H/s⌋, ⌈H/s⌉}`` and ``w ∈ {⌊W/s⌋, ⌈W/s⌉}`` for one integer stride ``s``, and square if
the image is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

__all__ = [
    "LAYOUT_KINDS",
    "MAX_PREFIX_TOKENS",
    "FeatureLayout",
    "declared_prefix_tokens",
    "infer_layout",
    "patch_grid",
]

LayoutKind = Literal["nchw", "nhwc", "tokens"]
LAYOUT_KINDS: tuple[str, ...] = ("nchw", "nhwc", "tokens")
#: Prefix tokens tried, after the ones a model declares, when a token sequence is read without
#: a declaration (class, distillation and up to a few register tokens).
MAX_PREFIX_TOKENS = 8
#: Names of the parameters that hold prefix tokens, shaped ``(1, count, C)``: torchvision's
#: ``class_token``; Hugging Face's and timm's ``cls_token``, ``dist_token``/``distillation_token``,
#: ``reg_token``/``register_tokens``.
PREFIX_TOKEN_PARAMETERS = frozenset(
    {"class_token", "cls_token", "dist_token", "distillation_token", "reg_token", "register_tokens"}
)


@dataclass(frozen=True)
class FeatureLayout:
    """How a tensor is read as an ``(N, C, h, w)`` feature map.

    Attributes:
        kind: ``"nchw"``, ``"nhwc"`` (channels-last) or ``"tokens"`` (``(N, prefix + h·w, C)``).
        grid: ``(h, w)``, the feature map's spatial size (for tokens, the patch grid).
        prefix: tokens before the patch tokens (class, distillation, register tokens); 0 unless
            ``kind == "tokens"``.

    Raises:
        ValueError: for an unknown kind, a grid that is not two positive sizes, or a prefix on a
            map that is not a token sequence.

    Example::

        >>> layout = FeatureLayout("tokens", (2, 3), prefix=1)  # a class token and 2×3 patches
        >>> tokens = torch.arange(2 * 7 * 4.0).reshape(2, 7, 4)  # (N, 1 + 2·3, C)
        >>> layout.to_nchw(tokens).shape
        torch.Size([2, 4, 2, 3])
        >>> bool((layout.to_nchw(tokens)[0, :, 0, 1] == tokens[0, 2]).all())  # patch (0, 1)
        True
    """

    kind: LayoutKind
    grid: tuple[int, int]
    prefix: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"kind must be one of {LAYOUT_KINDS}, got {self.kind!r}")
        if len(self.grid) != 2 or any(not isinstance(s, int) or s < 1 for s in self.grid):
            raise ValueError(f"grid must be two positive sizes (h, w), got {self.grid!r}")
        if self.prefix < 0 or (self.prefix and self.kind != "tokens"):
            raise ValueError(f"prefix must be 0, or ≥ 0 for tokens; got {self.prefix} for {self.kind!r}")

    @property
    def spatial(self) -> bool:
        """Whether the map has more than one position (``h·w > 1``)."""
        return self.grid[0] * self.grid[1] > 1

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of this shape can be read with this layout."""
        h, w = self.grid
        if self.kind == "tokens":
            return len(shape) == 3 and shape[1] == self.prefix + h * w
        if len(shape) != 4:
            return False
        return tuple(shape[2:] if self.kind == "nchw" else shape[1:3]) == (h, w)

    def to_nchw(self, t: Tensor) -> Tensor:
        """``t`` as an ``(N, C, h, w)`` view (no copy): permuted for ``"nhwc"``; for ``"tokens"``
        without the prefix tokens, the patch tokens laid out on the grid in raster order.

        Args:
            t: a tensor of this layout, for example a module's output or the gradient with
                respect to it.

        Raises:
            ValueError: if ``t``'s shape does not fit the layout.
        """
        if not self.fits(t.shape):
            raise ValueError(f"a tensor of shape {tuple(t.shape)} does not fit {self}")
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        return t[:, self.prefix :].unflatten(1, self.grid).permute(0, 3, 1, 2)


def patch_grid(hw: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Whether ``hw`` is a patch grid of an image of ``image_size``: ``h ∈ {⌊H/s⌋, ⌈H/s⌉}`` and
    ``w ∈ {⌊W/s⌋, ⌈W/s⌉}`` for one integer stride ``s ≥ 1``; square if the image is (both sides go
    through the same layers).

    Example::

        >>> patch_grid((14, 10), (224, 160)), patch_grid((10, 14), (224, 160))
        (True, False)
    """
    (h, w), (height, width) = hw, image_size
    if h < 1 or w < 1 or h > height or w > width or (height == width and h != w):
        return False
    # ⌊H/s⌋ = h or ⌈H/s⌉ = h exactly for H/(h+1) < s < H/(h-1) (no upper bound for h = 1): the
    # smallest integer above both lower bounds must lie below both upper bounds.
    stride = max(height // (h + 1), width // (w + 1)) + 1
    return stride * (h - 1) < height and stride * (w - 1) < width


def _similar_aspect(hw: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Whether ``hw`` scales like ``image_size`` within a factor of two (maps of valid, unpadded
    convolutions such as Inception's 147×147 and 71×71 are no exact patch grid)."""
    scale_h, scale_w = hw[0] / image_size[0], hw[1] / image_size[1]
    return max(scale_h, scale_w) <= 2 * min(scale_h, scale_w)


def _token_grid(count: int, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid ``(h, w)`` of the image with ``h·w == count`` (closest aspect if several)."""
    height, width = image_size
    found = []
    for h in range(1, math.isqrt(count) + 1):
        if count % h == 0:
            found.extend(hw for hw in {(h, count // h), (count // h, h)} if patch_grid(hw, image_size))
    if not found:
        return None
    aspect = math.log(height / width)
    return min(found, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - aspect), hw))


def infer_layout(
    shape: Sequence[int],
    image_size: tuple[int, int],
    *,
    batch: int | None = None,
    prefix_tokens: Iterable[int] = (),
) -> FeatureLayout | None:
    """The layout of a tensor of ``shape``, or ``None`` if it is no feature map of the image.

    * 4-D ``(N, a, b, c)``: ``"nchw"`` if ``(b, c)`` is a patch grid (:func:`patch_grid`), else
      ``"nhwc"`` if ``(a, b)`` is one, else ``"nchw"`` if ``(b, c)`` scales like the image within a
      factor of two (maps of valid convolutions), else none.
    * 3-D ``(N, L, C)``: ``"tokens"`` with prefix ``P`` if ``L - P ≥ 2`` patches form a patch grid,
      trying first the prefixes in ``prefix_tokens`` (what the model declares, see
      :func:`declared_prefix_tokens`), then ``0, 1, …, MAX_PREFIX_TOKENS``. Which grid: the one
      with ``h·w = L - P`` for some stride (if two fit, the one closest to the image's aspect).

    Args:
        shape: the tensor's shape.
        image_size: ``(H, W)`` of the model's input images.
        batch: if given, the first dimension must be this batch size.
        prefix_tokens: prefix counts to try first for token sequences.

    Example::

        >>> infer_layout((8, 96, 56, 56), (224, 224))
        FeatureLayout(kind='nchw', grid=(56, 56), prefix=0)
        >>> infer_layout((8, 7, 7, 768), (224, 224))
        FeatureLayout(kind='nhwc', grid=(7, 7), prefix=0)
        >>> infer_layout((8, 1 + 14 * 10, 192), (224, 160), prefix_tokens=[1])
        FeatureLayout(kind='tokens', grid=(14, 10), prefix=1)
        >>> infer_layout((8 * 3, 197, 197), (224, 224), batch=8) is None  # attention, N × heads
        True
    """
    if batch is not None and (len(shape) == 0 or shape[0] != batch):
        return None
    if len(shape) == 4:
        _, a, b, c = shape
        if patch_grid((b, c), image_size):
            return FeatureLayout("nchw", (b, c))
        if patch_grid((a, b), image_size):
            return FeatureLayout("nhwc", (a, b))
        if b >= 1 and c >= 1 and _similar_aspect((b, c), image_size):
            return FeatureLayout("nchw", (b, c))
        return None
    if len(shape) == 3:
        length = shape[1]
        tried = set()
        for prefix in [*prefix_tokens, *range(MAX_PREFIX_TOKENS + 1)]:
            if prefix in tried or not 0 <= prefix <= length - 2:
                continue
            tried.add(prefix)
            grid = _token_grid(length - prefix, image_size)
            if grid is not None:
                return FeatureLayout("tokens", grid, prefix)
    return None


def declared_prefix_tokens(modules: Iterable[nn.Module]) -> tuple[int, ...]:
    """Prefix-token counts the modules declare, most specific first.

    timm's vision transformers say it (``num_prefix_tokens``: class, distillation and register
    tokens); elsewhere the prefix tokens are parameters shaped ``(1, count, C)`` named as in
    :data:`PREFIX_TOKEN_PARAMETERS` (torchvision's ``class_token``, Hugging Face's ``cls_token``,
    ``distillation_token`` and ``register_tokens``), counted per module.

    Example::

        >>> import torchvision
        >>> vit = torchvision.models.VisionTransformer(32, 16, 1, 2, 8, 16)
        >>> declared_prefix_tokens(vit.modules())
        (1,)
    """
    declared: list[int] = []
    counted: list[int] = []
    for module in modules:
        state = vars(module)
        value = state.get("num_prefix_tokens")
        if isinstance(value, int) and not isinstance(value, bool):
            declared.append(value)
            continue
        parameters = state["_parameters"]
        if parameters and not PREFIX_TOKEN_PARAMETERS.isdisjoint(parameters):
            count = sum(
                p.shape[1]
                for name, p in parameters.items()
                if name in PREFIX_TOKEN_PARAMETERS and p is not None and p.ndim == 3
            )
            if count:
                counted.append(count)
    return tuple(dict.fromkeys(declared + counted))
