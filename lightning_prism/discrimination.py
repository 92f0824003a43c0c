"""How well a layer's features tell the classes apart, over a whole validation set.

Each sample is one point: its final feature map pooled over the positions, ``(N, D)`` for ``N``
samples of ``D`` channels. Three numbers describe the cloud of points:

* :func:`knn_accuracy`: leave-one-out weighted k-nearest-neighbour accuracy on L2-normalised
  features, as the k-NN monitors of self-supervised learning compute it (Wu et al. 2018, "Unsupervised
  Feature Learning via Non-Parametric Instance Discrimination"; Caron et al. 2021, DINO's
  ``eval_knn``);
* :func:`eta_squared`: the between-class share of the total sum of squares (η²);
* :func:`effective_rank`: RankMe (Garrido et al. 2023, "RankMe: Assessing the Downstream Performance
  of Pretrained Self-Supervised Representations by Their Rank"), which needs no labels.

:func:`discrimination` computes all three with the checks a training loop needs (rows with non-finite
values left out and named, labels optional, a reason for every metric it leaves out), and
:func:`embedding_axes` gives two principal axes of the points, aligned to the previous ones, for the
picture of them. Everything is tensor in, tensor out, on the features' device; sums of squares and
spectra are taken in float64 where the device has it (not on MPS).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .pca import align_components, principal_components

__all__ = [
    "CHUNK_SIZE",
    "KNN_K",
    "KNN_TEMPERATURE",
    "RANKME_EPSILON",
    "Discrimination",
    "EmbeddingAxes",
    "discrimination",
    "effective_rank",
    "embedding_axes",
    "eta_squared",
    "knn_accuracy",
]

#: Neighbours of the k-NN monitor. DINO's ``eval_knn`` (Caron et al. 2021) reports 20-NN as its best
#: among 10, 20, 100 and 200 on ImageNet; InstDisc (Wu et al. 2018) found its weighted k-NN accuracy
#: flat over k (within about a point from 10 to 200) and used 200 on 1.28 M images. With the default
#: cap of about 10,000 samples, 20 neighbours is the common choice, and weighted votes make the exact
#: k matter less than in a plain majority vote: far neighbours count exponentially less.
KNN_K = 20
#: Temperature ``T`` of the votes ``exp(similarity / T)``: InstDisc's and DINO's 0.07 (the temperature
#: of their non-parametric softmax). Cosine similarities lie in ``[-1, 1]``, so a neighbour at 0.9
#: outvotes one at 0.8 by ``exp(0.1 / 0.07) ≈ 4``.
KNN_TEMPERATURE = 0.07
#: Query rows per block of the k-NN similarity matrix, and rows per block of the float64 sums: the
#: k-NN's extra memory is a few ``CHUNK_SIZE × N`` arrays (40 MB of similarities for N = 10,000).
CHUNK_SIZE = 1024
#: RankMe's ε (Garrido et al. 2023, Eq. 1), added to every normalised singular value.
RANKME_EPSILON = 1e-7

NO_LABELS = "no labels"
NO_SAMPLES = "no samples"
METRICS = ("knn_accuracy", "class_separation", "effective_rank")


def _wide(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has none), for sums of squares and spectra."""
    return torch.float32 if device.type == "mps" else torch.float64


def _working(features: Tensor) -> torch.dtype:
    """float32, or float64 for float64 features."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _check_points(points: Tensor, name: str = "features") -> None:
    if not isinstance(points, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(points).__name__}")
    if points.ndim != 2:
        raise ValueError(f"expected (N, D) {name}, got shape {tuple(points.shape)}")
    if not (points.is_floating_point()):
        raise TypeError(f"{name} must be floating point, got {points.dtype}")
    if points.numel() and not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} contain NaN or infinite values (discrimination() leaves such rows out)")


def _check_labels(labels: Tensor, n: int) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"expected (N,) labels for N = {n} samples, got shape {tuple(labels.shape)}")


# ---------------------------------------------------------------------- k-NN
def _check_knn_options(k: Any, temperature: Any, chunk_size: Any) -> None:
    for name, value in (("k", k), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")


def knn_accuracy(
    features: Tensor,
    labels: Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = CHUNK_SIZE,
) -> Tensor | None:
    """Leave-one-out weighted k-NN accuracy (InstDisc, Wu et al. 2018; DINO's ``eval_knn``).

    The features are L2-normalised; each sample's ``k`` nearest *other* samples by cosine similarity
    ``s`` vote for their classes with weight ``exp(s / T)``, and the class with the largest sum is the
    prediction. The sample itself is left out by its index, so an exact duplicate of it is a
    neighbour like any other sample. Ties are broken the same way on every device: among neighbours
    of equal similarity at the ``k``-th place the lower indices are taken, and among classes of equal
    votes the lower label. The weights are computed as ``exp((s - s_max) / T)`` (the same votes up to
    a factor per sample), which cannot overflow for a small ``T``.

    The similarities are computed ``chunk_size`` query rows at a time: the extra memory is a few
    ``chunk_size × N`` arrays (float32 similarities and boolean masks), never ``N × N``. Features
    are compared in float32 (float64 stays float64; on CUDA, matrix products follow
    ``torch.backends.cuda.matmul.allow_tf32``).

    Args:
        features: ``(N, D)`` floating point, finite.
        labels: ``(N,)`` integer class labels (any integer values).
        k: neighbours per vote.
        temperature: ``T`` of the weights; a very large ``T`` gives a plain majority vote.
        chunk_size: query rows per block.

    Returns:
        Scalar float32 in ``[0, 1]`` on the features' device, or ``None`` when it says nothing: fewer
        than two classes, or ``N <= k`` (too few samples for ``k`` neighbours each).

    Raises:
        TypeError: if ``features`` is not a floating-point tensor or ``labels`` not an integer tensor.
        ValueError: for shapes that do not match, non-finite features, ``k`` or ``chunk_size`` below 1,
            or a ``temperature`` that is not positive and finite.

    Example::

        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> knn_accuracy(x, torch.tensor([0, 0, 1, 1]), k=1)
        tensor(1.)
        >>> knn_accuracy(x, torch.tensor([0, 1, 0, 1]), k=1)  # every nearest neighbour disagrees
        tensor(0.)
    """
    _check_points(features)
    _check_labels(labels, features.shape[0])
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integer class labels, got {labels.dtype}")
    _check_knn_options(k, temperature, chunk_size)
    n = features.shape[0]
    classes, target = labels.to(features.device).unique(return_inverse=True)
    if classes.numel() < 2 or n <= k:
        return None
    points = torch.nn.functional.normalize(features.to(_working(features)), dim=1)
    num_classes = classes.numel()
    correct = torch.zeros((), dtype=torch.long, device=features.device)
    for start, stop in _chunks(n, chunk_size):
        similarity = points[start:stop] @ points.T  # (b, N)
        rows = torch.arange(stop - start, device=features.device)
        similarity[rows, rows + start] = -math.inf  # leave each sample out by its index
        values, index = similarity.topk(k, dim=1)  # descending
        # A tie at the k-th place: topk may take any of the tied samples; take the lower indices.
        tied = (similarity >= values[:, -1:]).sum(dim=1) > k
        if bool(tied.any()):
            ordered = similarity[tied].sort(dim=1, descending=True, stable=True)
            values[tied], index[tied] = ordered.values[:, :k], ordered.indices[:, :k]
        weights = ((values - values[:, :1]) / temperature).exp()  # (b, k), the nearest weighs 1
        neighbour = target[index]  # (b, k)
        votes = torch.zeros(stop - start, num_classes, dtype=weights.dtype, device=features.device)
        for j in range(k):  # one neighbour per row per step: the same sums in the same order everywhere
            votes.scatter_add_(1, neighbour[:, j : j + 1], weights[:, j : j + 1])
        correct += (votes.argmax(dim=1) == target[start:stop]).sum()  # argmax: the first on ties
    return (correct.to(torch.float64) / n).to(torch.float32)


# ---------------------------------------------------------------------- η²
def eta_squared(points: Tensor, labels: Tensor) -> Tensor | None:
    """Between-class share of the total sum of squares of a cloud of points (η²).

    With ``m`` the mean of all points and ``m_c`` the mean of the ``n_c`` points of class ``c``:
    ``η² = Σ_c n_c ‖m_c − m‖² / Σ_i ‖x_i − m‖²``, 1 when every class sits on one point of its own, 0
    when the class means coincide; invariant to rescaling and rotating the points. Sums are taken in
    float64 (where the device has it), ``CHUNK_SIZE`` rows at a time.

    Args:
        points: ``(N, D)`` floating point, finite.
        labels: ``(N,)`` class labels (integer values of any dtype).

    Returns:
        Scalar float32 in ``[0, 1]`` on the points' device, or ``None`` when it says nothing: fewer
        than two classes, no class with two samples (singletons are trivially separated), or no
        variance (the total sum of squares at rounding level of the points' squared norms).

    Raises:
        TypeError: if ``points`` or ``labels`` is not a tensor, or ``points`` is not floating point.
        ValueError: for shapes that do not match, or non-finite points.

    Example::

        >>> x = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
        >>> round(eta_squared(x, torch.tensor([0, 0, 1, 1])).item(), 4)
        0.9996
    """
    _check_points(points, "points")
    _check_labels(labels, points.shape[0])
    classes, inverse, counts = labels.to(points.device).unique(return_inverse=True, return_counts=True)
    if classes.numel() < 2 or int(counts.max()) < 2:
        return None
    dtype = _wide(points.device)
    n, d = points.shape
    mean = torch.zeros(d, dtype=dtype, device=points.device)
    squares = torch.zeros((), dtype=dtype, device=points.device)
    for start, stop in _chunks(n, CHUNK_SIZE):
        block = points[start:stop].to(dtype)
        mean += block.sum(dim=0)
        squares += block.pow(2).sum()
    mean /= n
    total = torch.zeros((), dtype=dtype, device=points.device)
    sums = torch.zeros(classes.numel(), d, dtype=dtype, device=points.device)  # per class, centred
    for start, stop in _chunks(n, CHUNK_SIZE):
        centred = points[start:stop].to(dtype) - mean
        total += centred.pow(2).sum()
        sums.index_add_(0, inverse[start:stop], centred)
    if float(total) <= torch.finfo(dtype).eps * float(squares):
        return None
    between = (sums.pow(2).sum(dim=1) / counts.to(dtype)).sum()
    return (between / total).clamp(0, 1).to(torch.float32)


# ---------------------------------------------------------------------- RankMe
def _singular_values(features: Tensor) -> Tensor:
    """All ``min(N, D)`` singular values of ``(N, D)`` features, from the eigenvalues of the smaller
    Gram matrix, accumulated ``CHUNK_SIZE`` rows at a time in float64 (where the device has it)."""
    dtype = _wide(features.device)
    n, d = features.shape
    if n > d:
        gram = torch.zeros(d, d, dtype=dtype, device=features.device)
        for start, stop in _chunks(n, CHUNK_SIZE):
            block = features[start:stop].to(dtype)
            gram.addmm_(block.T, block)
    else:
        wide = features.to(dtype)
        gram = wide @ wide.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def effective_rank(features: Tensor) -> Tensor | None:
    """RankMe, the effective rank of the embedding matrix (Garrido et al. 2023, Eq. 1).

    With ``σ_1 ≥ … ≥ σ_K`` the ``K = min(N, D)`` singular values of the ``(N, D)`` matrix ``Z`` of
    embeddings, ``p_k = σ_k / ‖σ‖₁ + ε`` and ``RankMe(Z) = exp(−Σ_k p_k log p_k)``, ``ε = 1e-7``
    (:data:`RANKME_EPSILON`). As in the paper, ``Z`` is *not* centred: the singular values are those
    of the embeddings themselves, so a common offset of all samples (the mean direction of non-negative
    pooled activations) is one of the directions counted. It needs no labels and is invariant to
    rescaling the features; 1 for embeddings on one line, up to ``K`` for a flat spectrum.

    The singular values come from the eigenvalues of the smaller Gram matrix (``Zᵀ Z``, ``D × D``, when
    ``N > D``), accumulated in float64 (where the device has it) over blocks of rows: the memory is
    ``O(min(N, D)²)`` besides the features, and the small singular values are accurate to about
    ``1e-8 σ_1``.

    Args:
        features: ``(N, D)`` floating point, finite.

    Returns:
        Scalar float32 in ``[1, min(N, D)]`` (up to ε) on the features' device, or ``None`` when it says
        nothing: no samples, or features that are all zero.

    Raises:
        TypeError: if ``features`` is not a floating-point tensor.
        ValueError: if ``features`` is not 2-D or not finite.

    Example::

        >>> round(effective_rank(torch.eye(4)).item(), 3)  # four equal singular values
        4.0
        >>> round(effective_rank(torch.ones(5, 3)).item(), 3)  # rank one
        1.0
    """
    _check_points(features)
    if features.numel() == 0:
        return None
    sigma = _singular_values(features)
    total = sigma.sum()
    if float(total) <= 0:
        return None
    p = sigma / total + RANKME_EPSILON
    return torch.exp(-(p * p.log()).sum()).to(torch.float32)


# ---------------------------------------------------------------------- all three
@dataclass(frozen=True)
class Discrimination:
    """The discrimination metrics of one set of samples, and why any is absent.

    Attributes:
        knn_accuracy: scalar float32 tensor (:func:`knn_accuracy`) or ``None``.
        class_separation: η² of the features (:func:`eta_squared`), or ``None``.
        effective_rank: RankMe (:func:`effective_rank`), or ``None``.
        num_samples: rows the metrics were computed from.
        left_out: positions (in the input) of the rows left out for NaN or infinite values.
        kept: ``(N,)`` bool, the rows used (on the features' device).
        absent: metric name → the reason it is absent, one short phrase (``"no labels"``, ``"a single
            class"``, ``"too few samples for k=20 (12)"``, …).
        k: the k-NN's ``k``.
        temperature: the k-NN's temperature.
    """

    knn_accuracy: Tensor | None
    class_separation: Tensor | None
    effective_rank: Tensor | None
    num_samples: int
    left_out: tuple[int, ...]
    kept: Tensor
    absent: Mapping[str, str] = field(default_factory=dict)
    k: int = KNN_K
    temperature: float = KNN_TEMPERATURE

    @property
    def metrics(self) -> dict[str, Tensor]:
        """The metrics present, by name (``knn_accuracy``, ``class_separation``, ``effective_rank``)."""
        values = {name: getattr(self, name) for name in METRICS}
        return {name: value for name, value in values.items() if value is not None}

    @property
    def note(self) -> str | None:
        """One line for one warning: which rows were left out and which metrics are absent, and why;
        ``None`` if nothing is to be said.

        Example::

            >>> result = discrimination(torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, 1.0]]))
            >>> result.note
            '1 of 3 samples left out for NaN or infinite features (position 1); no knn_accuracy or class_separation: no labels'
        """
        parts = []
        if self.left_out:
            shown = ", ".join(str(p) for p in self.left_out[:5]) + (", …" if len(self.left_out) > 5 else "")
            total = self.num_samples + len(self.left_out)
            where = "position" if len(self.left_out) == 1 else "positions"
            parts.append(
                f"{len(self.left_out)} of {total} samples left out for NaN or infinite features ({where} {shown})"
            )
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.absent.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            parts.append(f"no {' or '.join(names)}: {reason}")
        return "; ".join(parts) or None


def _class_labels(labels: Tensor, n: int) -> tuple[Tensor | None, str | None]:
    """``(N,)`` integer labels from ``(N,)`` or ``(N, 1)`` labels, or ``None`` and why not."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor or None, got {type(labels).__name__}")
    if labels.ndim == 0 or labels.shape[0] != n:
        raise ValueError(f"expected labels for N = {n} samples, got shape {tuple(labels.shape)}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        shape = "(N, " + ", ".join(str(s) for s in labels.shape[1:]) + ")"
        return None, f"multi-label targets {shape} give no single class per sample"
    if labels.dtype == torch.bool:
        return labels.long(), None
    if labels.is_floating_point():
        if not bool((torch.isfinite(labels) & (labels == labels.round())).all()):
            return None, f"{labels.dtype} labels that are not whole numbers are no class labels"
        return labels.long(), None
    if labels.is_complex():
        return None, f"{labels.dtype} labels are no class labels"
    return labels, None


def discrimination(
    features: Tensor,
    labels: Tensor | None = None,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = CHUNK_SIZE,
) -> Discrimination:
    """The k-NN accuracy, η² and effective rank of pooled features, leaving out what cannot count.

    Rows with NaN or infinite values are left out (their positions are in ``left_out``). Labels are
    optional: without them, or with labels that give no single class per sample (multi-hot ``(N, K)``
    targets of a multi-label classifier, fractional values), only the effective rank is computed.
    ``(N, 1)`` labels (binary targets) are read as ``(N,)``; whole-number floating-point and boolean
    labels as integers.

    Args:
        features: ``(N, D)`` pooled features, floating point.
        labels: ``(N,)`` or ``(N, 1)`` class labels, ``(N, K)`` multi-hot targets, or ``None``.
        k, temperature, chunk_size: as for :func:`knn_accuracy`.

    Returns:
        :class:`Discrimination`; its ``absent`` says why a metric is missing, and ``note`` puts that
        (and the rows left out) in one line for a warning.

    Raises:
        TypeError: if ``features`` is not a floating-point tensor or ``labels`` not a tensor or ``None``.
        ValueError: if ``features`` is not 2-D, ``labels`` do not have ``N`` rows, or ``k``,
            ``temperature`` or ``chunk_size`` is out of range.

    Example::

        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> result = discrimination(x, torch.tensor([0, 0, 1, 1]), k=1)
        >>> {name: round(value.item(), 3) for name, value in result.metrics.items()}
        {'knn_accuracy': 1.0, 'class_separation': 0.988, 'effective_rank': 1.998}
        >>> discrimination(x, torch.tensor([3, 3, 3, 3]), k=1).absent
        {'knn_accuracy': 'a single class', 'class_separation': 'a single class'}
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a tensor, got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"expected (N, D) features, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    _check_knn_options(k, temperature, chunk_size)
    n = features.shape[0]
    classes, reason = (None, NO_LABELS) if labels is None else _class_labels(labels, n)
    kept = torch.isfinite(features).all(dim=1)
    left_out = tuple(torch.nonzero(~kept).flatten().tolist()) if not bool(kept.all()) else ()
    if left_out:
        features = features[kept]
        classes = classes[kept.to(classes.device)] if classes is not None else None
    absent: dict[str, str] = {}
    knn = separation = rank = None
    if features.shape[0] == 0 or features.shape[1] == 0:
        absent = dict.fromkeys(METRICS, NO_SAMPLES)
    else:
        rank = effective_rank(features)
        if rank is None:
            absent["effective_rank"] = "the features are all zero"
        if classes is None:
            absent["knn_accuracy"] = absent["class_separation"] = str(reason)
        else:
            classes = classes.to(features.device)
            values, counts = classes.unique(return_counts=True)
            if values.numel() < 2:
                absent["knn_accuracy"] = absent["class_separation"] = "a single class"
            else:
                knn = knn_accuracy(features, classes, k, temperature, chunk_size)
                if knn is None:
                    absent["knn_accuracy"] = f"too few samples for k={k} ({features.shape[0]})"
                separation = eta_squared(features, classes)
                if separation is None:
                    absent["class_separation"] = (
                        "no class with two samples" if int(counts.max()) < 2 else "the features do not vary"
                    )
    return Discrimination(
        knn_accuracy=knn,
        class_separation=separation,
        effective_rank=rank,
        num_samples=features.shape[0],
        left_out=left_out,
        kept=kept,
        absent={name: absent[name] for name in METRICS if name in absent},
        k=k,
        temperature=temperature,
    )


# ---------------------------------------------------------------------- the picture's axes
class EmbeddingAxes(NamedTuple):
    """Two principal axes of pooled features and the samples' coordinates on them.

    Attributes:
        axes: ``(D, 2)`` orthonormal loadings (a zero column where the features have no second
            direction of variance), in the order and signs of the reference.
        coords: ``(N, 2)`` coordinates of the centred samples on ``axes``.
        explained: ``(2,)`` share of the total variance along each axis.
    """

    axes: Tensor
    coords: Tensor
    explained: Tensor


def embedding_axes(features: Tensor, reference: Tensor | None = None) -> EmbeddingAxes:
    """The top two principal axes of the centred pooled features, kept aligned from epoch to epoch.

    The axes are :func:`~lightning_prism.pca.principal_components` of the features read as ``N``
    one-pixel maps, so they follow the same sign convention as PRISM's colour basis; with a
    ``reference`` (the previous epoch's axes) they are reordered and re-signed to match it
    (:func:`~lightning_prism.pca.align_components`), so the picture does not flip or swap its axes
    when the features barely change.

    Args:
        features: ``(N, D)`` floating point, finite.
        reference: ``(D, 2)`` axes of an earlier call, or ``None``.

    Returns:
        :class:`EmbeddingAxes`: ``axes`` ``(D, 2)``, ``coords`` ``(N, 2)``, ``explained`` ``(2,)``, in
        float32 (float64 stays float64) on the features' device.

    Raises:
        TypeError: if ``features`` is not a floating-point tensor.
        ValueError: if ``features`` is not 2-D, empty or finite, or ``reference`` is not ``(D, 2)``.

    Example::

        >>> x = torch.tensor([[2.0, 0.1], [-2.0, -0.1], [0.0, 1.0], [0.0, -1.0]])
        >>> first = embedding_axes(x)
        >>> swapped = embedding_axes(x[:, [1, 0]], reference=first.axes[[1, 0]])  # channels reordered
        >>> torch.allclose(swapped.coords, first.coords)
        True
    """
    _check_points(features)
    n, d = features.shape
    if n == 0 or d == 0:
        raise ValueError(f"embedding_axes needs at least one sample and one channel, got shape {(n, d)}")
    if reference is not None and (not isinstance(reference, Tensor) or tuple(reference.shape) != (d, 2)):
        shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
        raise ValueError(f"reference must be ({d}, 2) axes of an earlier call, got {shape}")
    pcs = principal_components(features.reshape(n, d, 1, 1), 2)
    axes, coords, explained = pcs.components, pcs.scores.reshape(n, 2), pcs.explained_variance
    if reference is not None:
        axes, order, signs = align_components(axes, reference)
        coords, explained = coords[:, order] * signs.to(coords.dtype), explained[order]
    return EmbeddingAxes(axes, coords, explained)
