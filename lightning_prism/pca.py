"""Principal components of a batch of feature maps.

PRISM treats the final feature map of a whole batch, ``(N, c, h, w)``, as one matrix with
``N·h·w`` pixel rows and ``c`` channel columns. These functions compute its principal axes
(channel loadings), the explained variance of every component, and the scores that become the
red, green and blue of a PRISM map. They are pure tensor-in/tensor-out functions that run on
the tensors' device in at least float32.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "PrincipalComponents",
    "align_components",
    "orient_components",
    "principal_components",
    "project",
    "subspace_similarity",
]


class PrincipalComponents(NamedTuple):
    """Principal axes of a batch of feature maps.

    Attributes:
        components: ``(c, k)`` orthonormal channel loadings of the top ``k`` components, oriented by
            :func:`orient_components`. A component without variance (the batch has too few
            distinct pixels) is a zero column.
        explained_variance: ``(K,)`` share of the total variance of every component,
            ``K = min(N·h·w, c)``, in decreasing order; sums to 1 (all zeros for a constant map).
        mean: ``(c,)`` column mean over all ``N·h·w`` pixels, used for centring.
    """

    components: Tensor
    explained_variance: Tensor
    mean: Tensor


def _pixel_rows(activations: Tensor) -> Tensor:
    """``(N, c, h, w)`` → ``(N·h·w, c)`` in at least float32."""
    if activations.ndim != 4:
        raise ValueError(f"expected a 4-D (N, c, h, w) feature map, got shape {tuple(activations.shape)}")
    dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32
    return activations.permute(0, 2, 3, 1).reshape(-1, activations.shape[1]).to(dtype)


def principal_components(activations: Tensor, num_components: int = 3) -> PrincipalComponents:
    """Principal axes of all pixels of a batch of feature maps.

    The ``N·h·w`` pixel rows are centred by their mean over the whole batch. The symmetric
    eigendecomposition of the smaller of the Gram matrix ``X Xᵀ`` and the covariance ``Xᵀ X``
    gives every component exactly, at ``O(min(N·h·w, c)³)`` cost (see ``benchmarks/``).

    Args:
        activations: ``(N, c, h, w)`` feature maps, any floating dtype; computed in float32
            (float64 stays float64).
        num_components: how many axes to return (``k``).

    Returns:
        :class:`PrincipalComponents` with ``components`` ``(c, k)``, ``explained_variance``
        ``(K,)`` and ``mean`` ``(c,)``.

    Raises:
        ValueError: if ``activations`` is not 4-D or ``num_components`` is not positive.

    Example::

        >>> pcs = principal_components(torch.rand(2, 16, 7, 7))
        >>> pcs.components.shape, pcs.explained_variance.shape
        (torch.Size([16, 3]), torch.Size([16]))
    """
    if num_components < 1:
        raise ValueError(f"num_components must be a positive integer, got {num_components}")
    rows = _pixel_rows(activations)
    mean = rows.mean(dim=0)
    centred = rows - mean
    num_rows, channels = centred.shape
    if num_rows < channels:
        eigenvalues, vectors = torch.linalg.eigh(centred @ centred.T)
    else:
        eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred)
    eigenvalues = eigenvalues.flip(0).clamp_min(0)
    vectors = vectors.flip(1)

    k = min(num_components, eigenvalues.numel())
    top = eigenvalues[:k]
    tolerance = torch.finfo(rows.dtype).eps * max(num_rows, channels) * eigenvalues[0]
    usable = (top > tolerance) & (top > 0)
    if num_rows < channels:
        # Left singular vectors u_i = vectors[:, i]; loadings v_i = Xᵀ u_i / s_i.
        singular = top.sqrt().where(usable, torch.ones_like(top))
        loadings = (centred.T @ vectors[:, :k]) / singular
    else:
        loadings = vectors[:, :k]
    loadings = loadings * usable.to(loadings.dtype)
    if k < num_components:
        loadings = torch.cat([loadings, loadings.new_zeros(channels, num_components - k)], dim=1)

    total = eigenvalues.sum()
    explained = eigenvalues / total if total > 0 else torch.zeros_like(eigenvalues)
    return PrincipalComponents(orient_components(loadings), explained, mean)


def orient_components(components: Tensor) -> Tensor:
    """Fix the arbitrary sign of every principal axis.

    Each column is flipped so that its largest-magnitude entry is positive (the first one on a
    tie), so the same input gives the same colours on any device and in any precision.

    Args:
        components: ``(c, k)`` channel loadings.

    Returns:
        ``(c, k)`` loadings with the sign convention applied; zero columns stay zero.
    """
    index = components.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(components.gather(0, index))
    return components * torch.where(signs == 0, torch.ones_like(signs), signs)


def project(activations: Tensor, components: Tensor, mean: Tensor) -> Tensor:
    """Principal-component scores of every pixel.

    Args:
        activations: ``(N, c, h, w)`` feature maps.
        components: ``(c, k)`` channel loadings.
        mean: ``(c,)`` centre subtracted from every pixel before projecting.

    Returns:
        ``(N, k, h, w)`` scores, in the dtype of ``components``.
    """
    n, c, h, w = activations.shape
    if components.shape[0] != c or mean.shape != (c,):
        raise ValueError(
            f"components {tuple(components.shape)} and mean {tuple(mean.shape)} do not match "
            f"a feature map with {c} channels"
        )
    rows = _pixel_rows(activations).to(components.dtype)
    scores = (rows - mean.to(components.dtype)) @ components
    return scores.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def align_components(components: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reorder and re-sign principal axes to match a reference basis.

    The permutation maximises the summed absolute cosine between matched axes (all ``k!``
    orders are tried; ``k`` is 3 for PRISM); each matched axis then takes the sign that makes its
    cosine with the reference non-negative. A feature that persists thus keeps its colour.

    Args:
        components: ``(c, k)`` loadings to align.
        reference: ``(c, k)`` loadings of the reference basis (for example the previous epoch).

    Returns:
        ``(aligned, order, signs)``: ``aligned = components[:, order] * signs`` ``(c, k)``,
        ``order`` ``(k,)`` long and ``signs`` ``(k,)``.

    Raises:
        ValueError: if the shapes differ.
    """
    if components.shape != reference.shape or components.ndim != 2:
        raise ValueError(
            f"cannot align components of shape {tuple(components.shape)} to a reference of shape "
            f"{tuple(reference.shape)}"
        )
    k = components.shape[1]
    cosine = reference.T.to(components.dtype) @ components  # (k_ref, k)
    magnitude = cosine.abs()
    best = max(
        itertools.permutations(range(k)),
        key=lambda order: float(sum(magnitude[i, j] for i, j in enumerate(order))),
    )
    order = torch.tensor(best, device=components.device, dtype=torch.long)
    signs = torch.sign(cosine[torch.arange(k, device=components.device), order])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return components[:, order] * signs, order, signs


def subspace_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine of the principal angles between two subspaces.

    Args:
        a: ``(c, k)`` basis of the first subspace (columns need not be orthonormal; zero columns
            are ignored).
        b: ``(c, m)`` basis of the second.

    Returns:
        Scalar in ``[0, 1]``: 1 for the same subspace, 0 for orthogonal ones. The mean runs over
        ``min(rank a, rank b)`` angles; 0 when either is empty.
    """
    bases = []
    for basis in (a, b):
        basis = basis.to(torch.float64)
        basis = basis[:, basis.norm(dim=0) > 0]
        if basis.shape[1] == 0:
            return a.new_zeros((), dtype=torch.float32)
        bases.append(torch.linalg.qr(basis).Q)
    cosines = torch.linalg.svdvals(bases[0].T @ bases[1]).clamp(0, 1)
    return cosines.mean().to(torch.float32)
