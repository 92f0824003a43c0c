"""lightning_prism.discrimination against independent implementations: plain numpy loops, scikit-learn's
k-NN classifier, numpy's SVD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_prism.discrimination import (
    KNN_K,
    KNN_TEMPERATURE,
    RANKME_EPSILON,
    discrimination,
    effective_rank,
    embedding_axes,
    eta_squared,
    knn_accuracy,
)


# ---------------------------------------------------------------------- independent references
def reference_knn(features: np.ndarray, labels: np.ndarray, k: int, temperature: float) -> float:
    """Leave-one-out weighted k-NN, one sample at a time: the k most similar other samples (lower index
    first among equals), votes exp(s / T), the lowest class among equal votes."""
    x = features.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    similarity = x @ x.T
    correct = 0
    for i in range(len(x)):
        others = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-similarity[i, j], j))[:k]
        votes: dict[int, float] = {}
        for j in others:
            votes[int(labels[j])] = votes.get(int(labels[j]), 0.0) + math.exp(similarity[i, j] / temperature)
        best = max(sorted(votes), key=lambda c: votes[c])  # the first of equal maxima: the lowest class
        correct += best == labels[i]
    return correct / len(x)


def reference_eta_squared(points: np.ndarray, labels: np.ndarray) -> float:
    x = points.astype(np.float64)
    mean = x.mean(axis=0)
    total = ((x - mean) ** 2).sum()
    between = sum(
        (labels == c).sum() * ((x[labels == c].mean(axis=0) - mean) ** 2).sum() for c in set(labels)
    )
    return between / total


def reference_rankme(features: np.ndarray) -> float:
    sigma = np.linalg.svd(features.astype(np.float64), compute_uv=False)  # min(N, D) values
    p = sigma / sigma.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def clusters(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points around ``classes`` random centres, labels in loader order 0, 1, 2, …"""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, dim, generator=generator), labels


# ---------------------------------------------------------------------- k-NN
@pytest.mark.parametrize(
    ("k", "temperature", "spread"), [(1, 0.07, 1.0), (5, 0.07, 1.5), (20, 0.07, 1.0), (7, 0.5, 2.0)]
)
def test_knn_matches_a_plain_loop(k, temperature, spread):
    features, labels = clusters(120, 4, 16, spread, seed=k)
    got = knn_accuracy(features, labels, k=k, temperature=temperature)
    expected = reference_knn(features.numpy(), labels.numpy(), k, temperature)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(expected, abs=1e-7)
    assert 0.2 < expected < 1  # neither trivial nor hopeless


def test_knn_matches_scikit_learn_weighted_and_uniform():
    neighbors = pytest.importorskip("sklearn.neighbors")
    model_selection = pytest.importorskip("sklearn.model_selection")
    features, labels = clusters(90, 3, 8, 1.2, seed=3)
    x, y = features.numpy().astype(np.float64), labels.numpy()
    for k, temperature, weights in [
        (10, KNN_TEMPERATURE, lambda d: np.exp((1 - d) / KNN_TEMPERATURE)),  # cosine distance d = 1 − s
        (1, KNN_TEMPERATURE, "uniform"),
        (4, 1e9, "uniform"),  # a huge temperature: every neighbour weighs 1 (ties go to the lowest class)
        (6, 1e9, "uniform"),
    ]:
        classifier = neighbors.KNeighborsClassifier(k, weights=weights, metric="cosine", algorithm="brute")
        predicted = model_selection.cross_val_predict(classifier, x, y, cv=model_selection.LeaveOneOut())
        got = knn_accuracy(features, labels, k=k, temperature=temperature).item()
        assert got == pytest.approx((predicted == y).mean(), abs=1e-7), (k, temperature)


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 64, 119, 120, 500])
def test_knn_chunking_changes_nothing(chunk_size):
    features, labels = clusters(120, 5, 12, 1.5, seed=1)
    whole = knn_accuracy(features, labels, k=9, chunk_size=10_000)
    assert torch.equal(knn_accuracy(features, labels, k=9, chunk_size=chunk_size), whole)


def test_knn_leaves_each_sample_out_by_index_so_duplicates_are_neighbours():
    base = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    twins = base.repeat_interleave(2, dim=0)  # rows 2i and 2i + 1 identical
    same = torch.arange(10).repeat_interleave(2)
    assert knn_accuracy(twins, same, k=1).item() == 1.0  # each sample's twin is its nearest neighbour
    other = torch.arange(20)  # twins labelled differently: the twin always votes wrong
    assert knn_accuracy(twins, other % 2 + 2 * (other // 2 % 2), k=1).item() == 0.0


def test_knn_breaks_ties_by_index_and_by_class_as_the_reference_does():
    generator = torch.Generator().manual_seed(2)
    distinct = torch.randn(5, 4, generator=generator)
    features = distinct[torch.randint(0, 5, (60,), generator=generator)]  # many exactly equal rows
    labels = torch.randint(0, 3, (60,), generator=generator)
    for k, temperature in [(1, 0.07), (3, 0.07), (8, 0.07), (4, 1e9)]:
        got = knn_accuracy(features, labels, k=k, temperature=temperature)
        assert got.item() == pytest.approx(
            reference_knn(features.numpy(), labels.numpy(), k, temperature), abs=1e-7
        )
        for chunk_size in (1, 13):
            assert torch.equal(
                knn_accuracy(features, labels, k=k, temperature=temperature, chunk_size=chunk_size), got
            )
    # Sample 0's two nearest (1 and 2) are equally similar: the lower index, 1, is its neighbour. Samples
    # 1 and 2 (duplicates) are each other's neighbour and differ in class; 3 and 4 agree.
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [-1.0, 0.0], [-1.0, 0.1]])
    assert knn_accuracy(x, torch.tensor([0, 0, 1, 1, 1]), k=1).item() == pytest.approx(3 / 5)  # 0 right
    assert knn_accuracy(x, torch.tensor([0, 1, 0, 1, 1]), k=1).item() == pytest.approx(2 / 5)  # 0 wrong


def test_knn_is_scale_free_and_keeps_to_the_device_and_dtype():
    features, labels = clusters(50, 2, 5, 1.0, seed=4)
    got = knn_accuracy(features, labels, k=5)
    assert torch.equal(knn_accuracy(features * 1e3, labels, k=5), got)
    wide = knn_accuracy(features.double(), labels, k=5)
    assert wide.dtype == torch.float32 and wide.item() == pytest.approx(got.item())
    assert knn_accuracy(features.half(), labels, k=5).device == features.device
    assert knn_accuracy(features, labels + 100, k=5).item() == got.item()  # any label values
    assert knn_accuracy(features, labels.int(), k=5).item() == got.item()


def test_knn_says_nothing_when_it_cannot():
    features = torch.randn(12, 3)
    assert knn_accuracy(features, torch.zeros(12, dtype=torch.long)) is None  # one class
    assert knn_accuracy(features, torch.arange(12) % 2, k=12) is None  # N <= k
    assert knn_accuracy(features, torch.arange(12) % 2, k=11) is not None


def test_knn_rejects_bad_input():
    features, labels = torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match=r"expected \(N, D\) features, got shape \(6, 3, 1\)"):
        knn_accuracy(features[..., None], labels)
    with pytest.raises(ValueError, match=r"expected \(N,\) labels for N = 6 samples, got shape \(5,\)"):
        knn_accuracy(features, labels[:5])
    with pytest.raises(TypeError, match=r"labels must be integer class labels, got torch\.float32"):
        knn_accuracy(features, labels.float())
    with pytest.raises(TypeError, match=r"features must be floating point, got torch\.int64"):
        knn_accuracy(labels[:, None].repeat(1, 2), labels)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        knn_accuracy(features, labels, k=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got True"):
        knn_accuracy(features, labels, chunk_size=True)
    with pytest.raises(ValueError, match="temperature must be positive and finite, got -1"):
        knn_accuracy(features, labels, temperature=-1)
    with pytest.raises(ValueError, match="features contain NaN or infinite values"):
        knn_accuracy(torch.cat([features[:5], torch.full((1, 3), math.nan)]), labels)


def test_the_defaults_are_dinos():
    assert (KNN_K, KNN_TEMPERATURE, RANKME_EPSILON) == (20, 0.07, 1e-7)


# ---------------------------------------------------------------------- η²
def test_eta_squared_matches_numpy_and_is_scale_and_rotation_free():
    features, labels = clusters(90, 3, 10, 1.5, seed=5)
    got = eta_squared(features, labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_eta_squared(features.numpy(), labels.numpy()), rel=1e-6)
    rotation = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0))).Q
    assert eta_squared(features @ rotation * 37.5 + 4.0, labels).item() == pytest.approx(got.item(), rel=1e-5)
    many = torch.randn(3000, 4, generator=torch.Generator().manual_seed(1))  # several blocks of rows
    many_labels = torch.arange(3000) % 7
    assert eta_squared(many, many_labels).item() == pytest.approx(
        reference_eta_squared(many.numpy(), many_labels.numpy()), rel=1e-6
    )


def test_eta_squared_says_nothing_when_it_cannot():
    points = torch.randn(4, 3)
    assert eta_squared(points, torch.tensor([1, 1, 1, 1])) is None  # one class
    assert eta_squared(points, torch.tensor([0, 1, 2, 3])) is None  # singletons only
    assert eta_squared(torch.zeros(4, 3), torch.tensor([0, 0, 1, 1])) is None  # no variance
    assert eta_squared(torch.full((4, 3), 0.1), torch.tensor([0, 0, 1, 1])) is None  # rounding is no variance
    with pytest.raises(ValueError, match=r"expected \(N, D\) points"):
        eta_squared(points[None], torch.tensor([0, 0, 1, 1]))


# ---------------------------------------------------------------------- RankMe
@pytest.mark.parametrize(
    "shape", [(200, 16), (10, 50), (3000, 8), (64, 64)], ids=["N>D", "N<D", "blocks", "square"]
)
def test_effective_rank_matches_numpy_svd(shape):
    generator = torch.Generator().manual_seed(shape[0])
    features = torch.randn(*shape, generator=generator) * torch.linspace(0.1, 3, shape[1])  # uneven spectrum
    got = effective_rank(features)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_rankme(features.numpy()), rel=1e-5)


def test_effective_rank_is_not_centred_follows_the_rank_and_ignores_scale():
    generator = torch.Generator().manual_seed(7)
    low = torch.randn(500, 3, generator=generator) @ torch.randn(3, 40, generator=generator)  # rank 3
    got = effective_rank(low).item()
    assert got == pytest.approx(reference_rankme(low.numpy()), rel=1e-5)
    assert 1 < got <= 3 + 1e-3
    assert effective_rank(low * 1e6).item() == pytest.approx(got, rel=1e-5)
    offset = low + 50.0  # the paper's Z is not centred: a common offset dominates the spectrum
    assert effective_rank(offset).item() == pytest.approx(reference_rankme(offset.numpy()), rel=1e-5)
    assert effective_rank(offset).item() < got
    assert effective_rank(torch.eye(6)).item() == pytest.approx(
        6 * math.exp(-6 * RANKME_EPSILON * math.log(1 / 6)), rel=1e-5
    )


def test_effective_rank_says_nothing_for_no_samples_or_zeros():
    assert effective_rank(torch.zeros(0, 5)) is None
    assert effective_rank(torch.zeros(4, 5)) is None
    with pytest.raises(ValueError, match="features contain NaN or infinite values"):
        effective_rank(torch.tensor([[1.0, math.inf]]))


# ---------------------------------------------------------------------- discrimination()
def test_discrimination_computes_the_three_as_the_functions_do():
    features, labels = clusters(100, 4, 12, 1.0, seed=8)
    result = discrimination(features, labels, k=10)
    assert set(result.metrics) == {"knn_accuracy", "class_separation", "effective_rank"}
    assert torch.equal(result.knn_accuracy, knn_accuracy(features, labels, k=10))
    assert torch.equal(result.class_separation, eta_squared(features, labels))
    assert torch.equal(result.effective_rank, effective_rank(features))
    assert (result.num_samples, result.left_out, dict(result.absent), result.note) == (100, (), {}, None)
    assert (result.k, result.temperature) == (10, KNN_TEMPERATURE)


def test_non_finite_rows_are_left_out_and_named():
    features, labels = clusters(40, 2, 6, 1.0, seed=9)
    broken = features.clone()
    broken[3, 0], broken[7, 5], broken[11] = math.nan, math.inf, -math.inf
    result = discrimination(broken, labels, k=5)
    clean = torch.ones(40, dtype=torch.bool)
    clean[[3, 7, 11]] = False
    assert result.left_out == (3, 7, 11) and result.num_samples == 37
    assert torch.equal(result.kept, clean)
    expected = discrimination(features[clean], labels[clean], k=5)
    for name in ("knn_accuracy", "class_separation", "effective_rank"):
        assert torch.equal(getattr(result, name), getattr(expected, name)), name
    assert result.note == "3 of 40 samples left out for NaN or infinite features (positions 3, 7, 11)"
    many = features.clone()
    many[:8] = math.nan
    assert discrimination(many, labels, k=5).note.endswith("(positions 0, 1, 2, 3, 4, …)")


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        (None, "no labels"),
        (torch.zeros(30, 4), r"multi-label targets (N, 4) give no single class per sample"),
        (torch.full((30,), 0.5), "torch.float32 labels that are not whole numbers are no class labels"),
        (torch.full((30,), 2), "a single class"),
    ],
    ids=["none", "multi-hot", "fractional", "single-class"],
)
def test_without_usable_labels_only_the_effective_rank_is_logged(labels, reason):
    features = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    result = discrimination(features, labels)
    assert list(result.metrics) == ["effective_rank"]
    assert dict(result.absent) == {"knn_accuracy": reason, "class_separation": reason}
    assert result.note == f"no knn_accuracy or class_separation: {reason}"


def test_labels_in_other_forms_are_read_as_classes():
    features, labels = clusters(40, 2, 4, 1.0, seed=10)
    expected = discrimination(features, labels, k=5).metrics
    for form in (labels[:, None], labels.float(), labels.bool(), labels[:, None].float()):
        assert discrimination(features, form, k=5).metrics == expected


def test_too_few_samples_singletons_and_constant_features():
    features = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    result = discrimination(features, torch.arange(12) % 3)
    assert list(result.metrics) == ["class_separation", "effective_rank"]
    assert dict(result.absent) == {"knn_accuracy": "too few samples for k=20 (12)"}
    singletons = discrimination(features, torch.arange(12), k=3)
    assert dict(singletons.absent) == {"class_separation": "no class with two samples"}
    constant = discrimination(torch.ones(12, 4), torch.arange(12) % 2, k=3)
    assert dict(constant.absent) == {"class_separation": "the features do not vary"}
    assert constant.effective_rank.item() == pytest.approx(1.0, abs=1e-4)
    zeros = discrimination(torch.zeros(12, 4), torch.arange(12) % 2, k=3)
    assert dict(zeros.absent) == {
        "class_separation": "the features do not vary",
        "effective_rank": "the features are all zero",
    }
    for empty in (torch.zeros(0, 4), torch.full((3, 4), math.nan)):
        nothing = discrimination(empty, torch.zeros(empty.shape[0], dtype=torch.long))
        assert nothing.metrics == {} and set(nothing.absent.values()) == {"no samples"}


def test_discrimination_takes_inference_tensors_outside_inference_mode():
    with torch.inference_mode():
        features, labels = clusters(40, 2, 4, 1.0, seed=11)
    result = discrimination(features, labels, k=5)
    assert set(result.metrics) == {"knn_accuracy", "class_separation", "effective_rank"}
    assert embedding_axes(features).coords.shape == (40, 2)


def test_discrimination_rejects_bad_input():
    with pytest.raises(TypeError, match="features must be a tensor, got list"):
        discrimination([[1.0]])
    with pytest.raises(ValueError, match=r"expected \(N, D\) features, got shape \(3,\)"):
        discrimination(torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected labels for N = 3 samples, got shape \(2,\)"):
        discrimination(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(TypeError, match="labels must be a tensor or None, got list"):
        discrimination(torch.zeros(3, 2), [0, 1, 2])
    with pytest.raises(ValueError, match="temperature must be positive and finite, got nan"):
        discrimination(torch.zeros(3, 2), temperature=math.nan)


# ---------------------------------------------------------------------- embedding axes
def test_embedding_axes_are_the_top_principal_axes():
    features, _ = clusters(80, 3, 6, 1.0, seed=12)
    result = embedding_axes(features)
    x = features.double().numpy()
    centred = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    top = vectors[:, ::-1][:, :2]
    assert np.abs(np.abs(top.T @ result.axes.double().numpy()) - np.eye(2)).max() < 1e-4
    np.testing.assert_allclose(result.coords.numpy(), centred @ result.axes.double().numpy(), atol=1e-4)
    np.testing.assert_allclose(result.explained.numpy(), values[::-1][:2] / values.sum(), rtol=1e-4)


def test_embedding_axes_keep_their_order_and_signs_from_epoch_to_epoch():
    generator = torch.Generator().manual_seed(13)
    features = torch.randn(300, 5, generator=generator) * torch.tensor([3.0, 2.0, 0.5, 0.3, 0.1])
    first = embedding_axes(features)
    assert (first.axes[:2].abs().diagonal() > 0.99).all()  # the first two channels
    # The next epoch: the two top variances trade places, and the features move a little.
    changed = features * torch.tensor([2.0 / 3, 3.0 / 2, 1, 1, 1]) + 0.01 * torch.randn(
        300, 5, generator=generator
    )
    unaligned = embedding_axes(changed)
    assert (unaligned.axes.T @ first.axes).diagonal().abs().max() < 0.1  # swapped without a reference
    aligned = embedding_axes(changed, reference=first.axes)
    assert ((aligned.axes.T @ first.axes).diagonal() > 0.99).all()
    assert torch.corrcoef(torch.stack([aligned.coords[:, 0], first.coords[:, 0]]))[0, 1] > 0.99
    assert aligned.explained[0] < aligned.explained[1]  # the shares follow their axes
    flipped = embedding_axes(features, reference=-first.axes)  # signs follow the reference
    assert torch.allclose(flipped.axes, -first.axes) and torch.allclose(flipped.coords, -first.coords)
    with pytest.raises(ValueError, match=r"reference must be \(5, 2\) axes of an earlier call, got \(5, 3\)"):
        embedding_axes(features, reference=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="needs at least one sample"):
        embedding_axes(torch.zeros(0, 5))
