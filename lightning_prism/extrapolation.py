"""Gradual extrapolation of PRISM features and their conversion to RGB.

The principal-component scores live on the final feature map (7×7 for a 224×224 ImageNet CNN).
Gradual extrapolation walks back through the earlier, larger stage maps: at each stage it resizes
the scores to the stage's resolution and multiplies them by the stage's channel mean of absolute
activation, so the colours land on the image regions that the earlier layers respond to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gradual_extrapolation", "rgb_and_informative", "stage_map", "to_rgb", "unit_scale"]


#: Elements of an activation reduced at once by :func:`stage_map` (a few MB of temporaries).
STAGE_MAP_CHUNK = 1 << 21


def stage_map(activation: Tensor) -> Tensor:
    """Channel mean of absolute activation, ``mean_c |A|``, in float32.

    Computed a few images at a time, so the temporary ``|A|`` stays small (this is several times
    faster on the CPU than one pass over the batch, and adds no activation-sized buffer to the
    peak memory).

    Args:
        activation: ``(N, c, h, w)`` activation of a stage, any floating dtype.

    Returns:
        ``(N, 1, h, w)`` float32 (float64 stays float64).

    Example::

        >>> stage_map(torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]]))
        tensor([[[[2., 1.]]]])
    """
    activation = activation.detach()  # a statistic for display: no autograd graph kept of it
    dtype = torch.float64 if activation.dtype == torch.float64 else torch.float32
    n = activation.shape[0]
    rows = max(1, STAGE_MAP_CHUNK // max(1, activation[:1].numel()))
    if rows >= n:  # one chunk: two operations
        return activation.abs().mean(dim=1, keepdim=True, dtype=dtype)
    out = torch.empty((n, 1, *activation.shape[2:]), dtype=dtype, device=activation.device)
    for i in range(0, n, rows):
        torch.mean(activation[i : i + rows].abs(), dim=1, keepdim=True, dtype=dtype, out=out[i : i + rows])
    return out


def gradual_extrapolation(
    features: Tensor, stage_maps: Sequence[Tensor], size: tuple[int, int] | None = None
) -> Tensor:
    """Upsample PRISM features through the stage maps of the network.

    Starting from ``features``, for each stage map in *reverse* execution order the running map is
    resized bilinearly (``align_corners=False``) to the stage's ``h×w`` and multiplied by it; the
    result is finally resized to ``size`` if it differs. With non-negative stage maps this is the
    published gradual extrapolation; using ``mean_c |A|`` keeps maps sharp on networks whose stage
    outputs are linear (MobileNet, EfficientNet), where the signed mean would be noise.

    The result is only defined up to a positive factor (each stage's ``mean_c |A|`` is, and the RGB
    conversion is scale-free), and the raw product can leave float32's range: four stages of a
    freshly initialised torchvision EfficientNet-B0 at 128×128 have mean |A| of 1e-2 down to 1e-9,
    a product of 2e-20, on a final map of 2.5e-14. So the features are divided by their largest
    magnitude, every stage map by its maximum over the batch, and the running map by its largest
    magnitude after each product: the result is the published one times a positive constant, with
    largest magnitude 1 (before the last resize), whatever the activations' scale.

    Args:
        features: ``(N, k, h, w)`` principal-component scores on the final feature map.
        stage_maps: ``(N, 1, h_i, w_i)`` maps from :func:`stage_map`, in execution order (largest
            resolution first).
        size: ``(H, W)`` of the input images, or ``None`` to stop at the first stage.

    Returns:
        ``(N, k, H, W)`` extrapolated features, in the dtype of ``features``.

    Example::

        >>> f = torch.rand(2, 3, 7, 7)
        >>> gradual_extrapolation(f, [torch.rand(2, 1, 28, 28), torch.rand(2, 1, 14, 14)], (56, 56)).shape
        torch.Size([2, 3, 56, 56])
    """
    maps = unit_scale(features)
    for stage in reversed(stage_maps):
        if stage.shape[0] != maps.shape[0] or stage.ndim != 4 or stage.shape[1] != 1:
            raise ValueError(
                f"stage map of shape {tuple(stage.shape)} does not fit features of shape "
                f"{tuple(features.shape)}; expected (N, 1, h, w) with N={maps.shape[0]}"
            )
        resized = _resize(maps, stage.shape[-2:])
        stage = stage.to(maps.dtype)
        stage = stage / _largest(stage)
        maps = resized.mul_(stage)
        maps.div_(_largest(maps))
    if size is not None:
        maps = _resize(maps, size)
    return maps


def unit_scale(maps: Tensor) -> Tensor:
    """``maps`` divided by their largest magnitude (a new tensor; zeros stay zeros), so that what
    follows cannot under- or overflow.

    Example::

        >>> unit_scale(torch.tensor([1e-30, -4e-30]))
        tensor([ 0.2500, -1.0000])
    """
    return maps / _largest(maps)


def _largest(t: Tensor) -> Tensor:
    """``max |t|`` as a 0-d tensor on the device (no host sync), at least the smallest normal number
    (so that all zeros divide to zeros)."""
    return torch.linalg.vector_norm(t, ord=math.inf).clamp_min(torch.finfo(t.dtype).tiny)


def _resize(maps: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def to_rgb(maps: Tensor, usable: Tensor | None = None, *, inplace: bool = False) -> Tensor:
    """Normalise PRISM features into displayable RGB in ``[0, 1]``.

    One z-score over the whole batch tensor (unbiased standard deviation), clipped to
    ``[-1, 1]``, then one min-max over the whole batch, so colours are comparable across images.
    A constant map becomes 0.5 grey; channels of components without variance are 0.

    Args:
        maps: ``(N, 3, H, W)`` extrapolated (or raw) features.
        usable: ``(3,)`` boolean mask of channels that hold a real component; all by default.
        inplace: reuse the memory of a float32 ``maps`` for the result when every channel is
            usable (saves one image-sized buffer; ``maps`` is overwritten).

    Returns:
        ``(N, 3, H, W)`` float32 in ``[0, 1]``.
    """
    return rgb_and_informative(maps, usable, inplace=inplace)[0]


def rgb_and_informative(
    maps: Tensor, usable: Tensor | None = None, *, inplace: bool = False
) -> tuple[Tensor, bool]:
    """:func:`to_rgb`, and whether the result shows anything: ``False`` when it is uniform (no
    usable channel, or the usable channels' values all equal or not finite)."""
    if maps.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) maps, got shape {tuple(maps.shape)}")
    maps = maps.to(torch.float32)
    if usable is None:
        usable = torch.ones(maps.shape[1], dtype=torch.bool, device=maps.device)
    usable = usable.to(device=maps.device, dtype=torch.bool)
    every = bool(usable.all())
    values = maps if every else maps[:, usable]  # boolean indexing copies
    if values.numel() == 0:
        return torch.zeros_like(maps), False
    # Two passes for mean and unbiased std, as ``Tensor.std`` (which is several times slower here).
    centred = values.sub_(values.mean()) if inplace or not every else values - values.mean()
    count = centred.numel()
    std = float(torch.linalg.vector_norm(centred)) / math.sqrt(count - 1) if count > 1 else 0.0
    informative = False
    if math.isfinite(std) and std > 0:
        # z-score clipped to [-1, 1], then min-max: in the centred values' own units this is a clamp
        # to [max(min, -std), min(max, std)] and one affine map (Python-number bounds: the fast
        # scalar kernels).
        minimum, maximum = torch.stack(torch.aminmax(centred)).tolist()
        low, high = max(minimum, -std), min(maximum, std)
        if high > low:
            normalised = centred.clamp_(low, high).sub_(low).div_(high - low)
            informative = True
        else:
            normalised = torch.full_like(centred, 0.5)
    else:
        normalised = torch.full_like(centred, 0.5)
    if every:
        return normalised, informative
    rgb = torch.zeros_like(maps)
    rgb[:, usable] = normalised
    return rgb, informative
