"""Class separation of PRISM features: how much of their variance lies between classes."""

from __future__ import annotations

import torch
from torch import Tensor

from .discrimination import eta_squared

__all__ = ["class_separation"]


def class_separation(features: Tensor, labels: Tensor) -> Tensor | None:
    """Between-class share of the variance of per-image PRISM feature vectors (η²).

    Each image is summarised by the spatial mean of its principal-component scores (a point in the
    3-D PRISM colour space). With ``m`` the mean of all points and ``m_k`` the mean of class ``k``
    (``n_k`` images), the score is ``Σ_k n_k ‖m_k − m‖² / Σ_i ‖v_i − m‖²``
    (:func:`~lightning_prism.discrimination.eta_squared` of the points): 1 when every class sits on
    one point of its own, 0 when the class means coincide. It is invariant to rescaling the features.

    Args:
        features: ``(N, k, h, w)`` PRISM features (scores).
        labels: ``(N,)`` integer class labels.

    Returns:
        Scalar float32 in ``[0, 1]``, or ``None`` when it says nothing: fewer than two classes, no
        class with two images (singletons are trivially separated), or no variance at all.

    Example::

        >>> f = torch.tensor([0.0, 0.1, 5.0, 5.1]).view(4, 1, 1, 1)
        >>> round(class_separation(f, torch.tensor([0, 0, 1, 1])).item(), 4)
        0.9996
    """
    if features.ndim != 4 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"expected (N, k, h, w) features and (N,) labels, got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    dtype = torch.float32 if features.device.type == "mps" else torch.float64
    return eta_squared(features.to(dtype).mean(dim=(2, 3)), labels)
