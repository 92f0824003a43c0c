"""Principal components of a batch of feature maps.

PRISM treats the final feature map of a whole batch, ``(N, c, h, w)``, as one matrix with
``N·h·w`` pixel rows and ``c`` channel columns. These functions compute its principal axes
(channel loadings), the explained variance of every component, and the scores that become the
red, green and blue of a PRISM map. They are pure tensor-in/tensor-out functions that run on
the tensors' device in at least float32.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "PrincipalComponents",
    "align_components",
    "explained_variance",
    "orient_components",
    "principal_components",
    "project",
    "subspace_similarity",
]


Method = Literal["auto", "exact", "iterative"]
METHODS: tuple[str, ...] = ("auto", "exact", "iterative")
#: Iterate only when rows and channels both reach this; below, the exact route (an eigendecomposition
#: of at most 256×256) is as fast or faster, also where the top of the spectrum is flat and iterating
#: takes long (benchmarks/README.md).
ITERATIVE_MIN_SIZE = 256
#: Extra directions iterated alongside the ``k`` wanted ones (block size ``k + OVERSAMPLING``).
OVERSAMPLING = 13
MAX_ITERATIONS = 64
#: Products with ``Xᵀ X`` before the first Rayleigh–Ritz step and convergence test (the final
#: maps of VGG16, ResNet-50 and EfficientNet-Lite0 need 3 to 6; each test skipped saves a dozen
#: small operations).
POWER_STEPS = 3
#: Convergence: every wanted Ritz pair's residual is below this fraction of its eigengap.
TOLERANCE = 1e-4
#: ``Σ X²`` of the centred map outside this range (and not 0) is computed again on ``X / max|X|``:
#: float32 squares of values below about 1e-19 underflow, above about 1e19 overflow.
SAFE_TOTAL = (1e-20, 1e20)


class PrincipalComponents(NamedTuple):
    """Principal axes of a batch of feature maps.

    Attributes:
        components: ``(c, k)`` orthonormal channel loadings of the top ``k`` components, oriented by
            :func:`orient_components`. A component without variance (the batch has too few
            distinct pixels) is a zero column.
        explained_variance: ``(k,)`` share of the total variance in each of these components, in
            decreasing order (all zeros for a constant map). The shares of *all* components come
            from :func:`explained_variance`.
        mean: ``(c,)`` column mean over all ``N·h·w`` pixels, used for centring.
        scores: ``(N, k, h, w)`` principal-component scores of every pixel on these axes (what
            :func:`project` gives, without a second pass over the feature map).
        total_variance: ``()`` sum of squared deviations from ``mean`` over all pixels, the
            denominator of every share (scores of any axis ``a`` explain ``‖X a‖² / total``).
    """

    components: Tensor
    explained_variance: Tensor
    mean: Tensor
    scores: Tensor
    total_variance: Tensor


def _channels(activations: Tensor) -> Tensor:
    """``(N, c, h, w)`` → ``(c, N·h·w)`` in at least float32, channel-major.

    Its transpose is the matrix of pixel rows. Copying runs of ``h·w`` values is 2–4× faster than
    gathering each pixel's channels, and matrix products take the transposed view at full speed
    (``Xᵀ P`` faster still). A float32 map that is channels-last or a batch of one gives a view of
    itself.
    """
    if activations.ndim != 4:
        raise ValueError(f"expected a 4-D (N, c, h, w) feature map, got shape {tuple(activations.shape)}")
    dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32
    return activations.transpose(0, 1).reshape(activations.shape[1], -1).to(dtype)


def _centred(activations: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel rows ``(N·h·w, c)`` minus their column mean, centred in place on a copy of the
    activations (the transposed view of :func:`_channels`), and the mean ``(c,)``."""
    channels = _channels(activations)
    if channels.untyped_storage().data_ptr() == activations.untyped_storage().data_ptr():
        channels = channels.clone()  # a view (channels-last map, batch of one): never centre the caller's map
    mean = channels.mean(dim=1)
    return channels.sub_(mean.unsqueeze(1)).T, mean


def _to_maps(row_scores: Tensor, shape: torch.Size) -> Tensor:
    """``(N·h·w, k)`` scores → ``(N, k, h, w)`` (contiguous NCHW, which ``interpolate`` resizes
    several times faster than the channels-last permute)."""
    n, _, h, w = shape
    return row_scores.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _smaller_gram(centred: Tensor) -> Tensor:
    """``X Xᵀ`` or ``Xᵀ X``, whichever is smaller; both have the nonzero eigenvalues of ``Xᵀ X``."""
    num_rows, channels = centred.shape
    return centred @ centred.T if num_rows < channels else centred.T @ centred


def _spectrum(centred: Tensor) -> Tensor:
    """Every eigenvalue of ``Xᵀ X`` (the squared singular values of ``X``), decreasing."""
    return torch.linalg.eigvalsh(_smaller_gram(centred)).flip(0).clamp_min(0)


def _exact(centred: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k`` eigenpairs of ``Xᵀ X`` from the eigendecomposition of the smaller Gram matrix,
    and the rows' scores ``X v`` on them."""
    num_rows, channels = centred.shape
    eigenvalues, vectors = torch.linalg.eigh(_smaller_gram(centred))
    eigenvalues = eigenvalues.flip(0)[:k].clamp_min(0)
    vectors = vectors.flip(1)[:, :k]
    if num_rows >= channels:
        return eigenvalues, vectors, centred @ vectors
    # Left singular vectors u_i = vectors[:, i]: loadings v_i = Xᵀ u_i / s_i, scores X v_i = u_i s_i.
    singular = eigenvalues.sqrt().where(eigenvalues > 0, torch.ones_like(eigenvalues))
    return eigenvalues, (centred.T @ vectors) / singular, vectors * singular


def _total(centred: Tensor) -> tuple[Tensor, float]:
    """``Σ X²`` (on the device, and as a Python float) from the channels' norms (contiguous rows of
    the channel-major copy), no squared copy: one float32 norm over all N·h·w·c values is 2e-4 off
    for ResNet-50 at batch 32, these 1e-7."""
    norms = torch.linalg.vector_norm(centred.T, dim=1)
    total = torch.dot(norms, norms)
    return total, float(total)


def _matmul_eps(t: Tensor) -> float:
    """Relative rounding of a matrix product, including CUDA's TF32/bfloat16 float32 matmul modes
    (``torch.set_float32_matmul_precision``), which the iteration cannot converge beyond."""
    if t.dtype == torch.float32 and t.is_cuda:
        precision = torch.get_float32_matmul_precision()
        if precision == "high":
            return 2.0**-10  # TF32 mantissa
        if precision == "medium":
            return 2.0**-7  # bfloat16 mantissa
    return float(torch.finfo(t.dtype).eps)


def _iterative(centred: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Top ``k`` eigenpairs of ``Xᵀ X`` by block subspace iteration with Rayleigh–Ritz.

    Each iteration multiplies a ``(c, k + OVERSAMPLING)`` orthonormal block by ``Xᵀ X`` (two thin
    matrix products with ``X``, never forming ``Xᵀ X``; iterating on a precomputed Gram matrix
    measured no faster from 392 rows up, with the earlier pixel-major copy of ``X``). From the
    ``POWER_STEPS``-th product on, it takes the Ritz pairs of the block and stops once every wanted
    pair's residual ``‖Xᵀ X v − λ v‖`` is below ``TOLERANCE`` times its gap to the neighbouring Ritz
    values (which bounds the angle to the true axis) or at float rounding level.

    The start block spans random combinations of the pixel rows (``Xᵀ Ω``, fixed seed, so the
    result is deterministic): the principal axes lie in the row space, so this start is half an
    iteration ahead of a random one (one iteration fewer on the final maps of VGG16, ResNet-50 and
    EfficientNet-Lite0).

    Returns:
        The top ``k`` eigenvalues, axes ``(c, k)`` and the rows' scores on them ``(N·h·w, k)`` (from
        the last product with ``X``, no extra pass); ``None`` if the iteration does not converge
        within ``MAX_ITERATIONS`` (nearly equal eigenvalues), and the caller takes the exact route.
    """
    num_rows, channels = centred.shape
    block = min(k + OVERSAMPLING, channels, num_rows)
    generator = torch.Generator(device=centred.device).manual_seed(0)
    mixing = torch.randn(num_rows, block, generator=generator, device=centred.device, dtype=centred.dtype)
    basis = torch.linalg.qr(centred.T @ mixing).Q
    rounding = 8 * _matmul_eps(centred)
    for iteration in range(MAX_ITERATIONS):
        projected = centred @ basis
        image = centred.T @ projected  # (Xᵀ X) basis
        if iteration + 1 >= POWER_STEPS:
            values, rotation = torch.linalg.eigh(basis.T @ image)  # Rayleigh–Ritz, ascending
            top = rotation[:, -k:].flip(1)
            vectors, top_values = basis @ top, values[-k:].flip(0)  # top k Ritz pairs, descending
            residual = (image @ top).sub_(vectors * top_values).norm(dim=0)
            numbers = torch.cat([values.flip(0), residual]).tolist()  # one transfer
            if _converged(numbers[:block], numbers[block:], rounding):
                return top_values.clamp_min(0), vectors, projected @ top
        basis = torch.linalg.qr(image).Q  # the same subspace as the Ritz vectors
    return None


def _converged(ritz: list[float], residual: list[float], rounding: float) -> bool:
    """Every wanted Ritz pair's residual below ``TOLERANCE`` times its gap to the neighbouring
    Ritz values, or at the rounding level of the matrix products."""
    floor = rounding * ritz[0]
    for i, r in enumerate(residual):
        gap = min(
            ritz[i - 1] - ritz[i] if i > 0 else float("inf"),
            ritz[i] - ritz[i + 1] if i + 1 < len(ritz) else float("inf"),
        )
        if r > max(TOLERANCE * gap, floor):
            return False
    return True


def principal_components(
    activations: Tensor, num_components: int = 3, *, method: Method = "auto"
) -> PrincipalComponents:
    """Principal axes of all pixels of a batch of feature maps.

    The ``N·h·w`` pixel rows are centred by their mean over the whole batch. Two routes give the
    same axes (to about ``1e-4`` relative error in the scores, float32 rounding aside):

    * ``"exact"``: the symmetric eigendecomposition of the smaller of the Gram matrix ``X Xᵀ``
      and the covariance ``Xᵀ X``, at ``O(min(N·h·w, c)³)`` cost;
    * ``"iterative"``: block subspace iteration with Rayleigh–Ritz on the top few axes only, a
      handful of thin matrix products (``O(N·h·w·c)`` each); at batch 32 on the CPU about 4×
      faster for 512 channels and 10–13× for 1280–2048 channels. It falls back to ``"exact"``
      if it does not converge.

    ``"auto"`` iterates when both dimensions are at least ``ITERATIVE_MIN_SIZE``.

    Args:
        activations: ``(N, c, h, w)`` feature maps, any floating dtype; computed in float32
            (float64 stays float64).
        num_components: how many axes to return (``k``).
        method: ``"auto"``, ``"exact"`` or ``"iterative"``.

    Returns:
        :class:`PrincipalComponents` with ``components`` ``(c, k)``, ``explained_variance``
        ``(k,)``, ``mean`` ``(c,)``, ``scores`` ``(N, k, h, w)`` and ``total_variance``.

    Raises:
        ValueError: if ``activations`` is not 4-D or not finite, ``num_components`` is not positive
            or ``method`` is unknown.

    Example::

        >>> pcs = principal_components(torch.rand(2, 16, 7, 7))
        >>> pcs.components.shape, pcs.explained_variance.shape
        (torch.Size([16, 3]), torch.Size([3]))
    """
    if num_components < 1:
        raise ValueError(f"num_components must be a positive integer, got {num_components}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    centred, mean = _centred(activations)
    num_rows, channels = centred.shape
    k = min(num_components, num_rows, channels)
    total, total_value = _total(centred)
    if not math.isfinite(total_value) and not torch.isfinite(activations).all():  # one check per batch
        raise ValueError("the feature map contains NaN or infinite values")
    scale = 1.0
    if not SAFE_TOTAL[0] <= total_value <= SAFE_TOTAL[1]:
        # Squares of the map's values may leave the floating range (a freshly initialised deep
        # network, unnormalised activations; also Σ X² = 0 by underflow): the axes of X / max|X| are
        # the same; scores and variances are scaled back at the end. A constant map stays as it is.
        largest = float(torch.linalg.vector_norm(centred, ord=math.inf))
        if 0 < largest < math.inf:
            scale = largest
            centred = centred.div_(scale)  # our own copy of the map
            total, total_value = _total(centred)
    found = None
    iterate = method == "iterative" or min(num_rows, channels) >= ITERATIVE_MIN_SIZE
    if method != "exact" and iterate and total_value > 0 and k < min(num_rows, channels):
        found = _iterative(centred, k)
    eigenvalues, loadings, scores = found if found is not None else _exact(centred, k)

    # Zero the axes without variance (rounding level) and orient the others.
    values = eigenvalues.tolist()
    tolerance = torch.finfo(centred.dtype).eps * max(num_rows, channels) * values[0]
    usable = [float(value > tolerance and value > 0) for value in values]
    weights = torch.tensor(usable, dtype=loadings.dtype, device=loadings.device) * _orientation(loadings)
    loadings, scores = loadings * weights, scores * weights
    explained = eigenvalues / total if total_value > 0 else torch.zeros_like(eigenvalues)
    if scale != 1.0:
        scores, eigenvalues, total = scores * scale, eigenvalues * scale**2, total * scale**2
    if k < num_components:
        loadings = torch.cat([loadings, loadings.new_zeros(channels, num_components - k)], dim=1)
        scores = torch.cat([scores, scores.new_zeros(num_rows, num_components - k)], dim=1)
        explained = torch.cat([explained, explained.new_zeros(num_components - k)])
    return PrincipalComponents(loadings, explained, mean, _to_maps(scores, activations.shape), total)


def explained_variance(activations: Tensor) -> Tensor:
    """Share of the total variance in every principal component of a batch of feature maps.

    The eigenvalues of the smaller of ``X Xᵀ`` and ``Xᵀ X`` (exact, ``O(min(N·h·w, c)³)``) over
    their sum; the first ``k`` equal :func:`principal_components`'s ``explained_variance``.

    Args:
        activations: ``(N, c, h, w)`` feature maps, any floating dtype.

    Returns:
        ``(K,)`` shares in decreasing order, ``K = min(N·h·w, c)``, summing to 1 (all zeros for a
        constant map); float32 (float64 stays float64).

    Example::

        >>> explained_variance(torch.rand(2, 16, 7, 7)).shape
        torch.Size([16])
    """
    centred, _ = _centred(activations)
    spectrum = _spectrum(centred)
    total = spectrum.sum()
    return spectrum / total if total > 0 else torch.zeros_like(spectrum)


def orient_components(components: Tensor) -> Tensor:
    """Fix the arbitrary sign of every principal axis.

    Each column is flipped so that its largest-magnitude entry is positive (the first one on a
    tie), so the same input gives the same colours on any device and in any precision.

    Args:
        components: ``(c, k)`` channel loadings.

    Returns:
        ``(c, k)`` loadings with the sign convention applied; zero columns stay zero.
    """
    return components * _orientation(components)


def _orientation(components: Tensor) -> Tensor:
    """``(k,)`` signs that make each column's largest-magnitude entry positive (1 for a zero column)."""
    index = components.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(components.gather(0, index)).squeeze(0)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def project(activations: Tensor, components: Tensor, mean: Tensor) -> Tensor:
    """Principal-component scores of every pixel.

    Args:
        activations: ``(N, c, h, w)`` feature maps.
        components: ``(c, k)`` channel loadings.
        mean: ``(c,)`` centre subtracted from every pixel before projecting.

    Returns:
        ``(N, k, h, w)`` scores, in the dtype of ``components``.
    """
    c = activations.shape[1]
    if components.shape[0] != c or mean.shape != (c,):
        raise ValueError(
            f"components {tuple(components.shape)} and mean {tuple(mean.shape)} do not match "
            f"a feature map with {c} channels"
        )
    centred = _channels(activations).to(components.dtype) - mean.to(components.dtype).unsqueeze(1)
    # (k, c) @ (c, N·h·w): the k = 3 on the wide side is 3–7× faster than (N·h·w, c) @ (c, k).
    return _to_maps((components.T @ centred).T, activations.shape)


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
