from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch

from lightning_prism import pca
from lightning_prism.pca import (
    _iterative,
    align_components,
    explained_variance,
    orient_components,
    principal_components,
    project,
    subspace_similarity,
)


def reference_pca(activations: torch.Tensor, k: int = 3):
    """Straightforward float64 PCA by full SVD of the centred (N·h·w, c) matrix."""
    n, c, h, w = activations.shape
    rows = activations.double().permute(0, 2, 3, 1).reshape(-1, c)
    centred = rows - rows.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    v = vh.T[:, :k].clone()
    for j in range(k):  # documented sign convention: largest-magnitude loading positive
        if v[v[:, j].abs().argmax(), j] < 0:
            v[:, j] = -v[:, j]
    scores = centred @ v
    return v, (s**2) / (s**2).sum(), scores.reshape(n, h, w, k).permute(0, 3, 1, 2)


@pytest.mark.parametrize("method", ["exact", "iterative"])
@pytest.mark.parametrize(("n", "c", "hw"), [(2, 16, 5), (4, 64, 3), (1, 8, 7), (3, 40, 2), (4, 160, 7)])
def test_principal_components_match_full_svd(n, c, hw, method, seeded):
    # Gram route (N·h·w < c) and covariance route (N·h·w ≥ c) are both covered, by both methods.
    x = torch.relu(torch.randn(n, c, hw, hw) + torch.linspace(-1, 1, c).view(1, c, 1, 1))
    v_ref, ev_ref, scores_ref = reference_pca(x)
    pcs = principal_components(x, method=method)
    assert pcs.components.shape == (c, 3)
    torch.testing.assert_close(pcs.explained_variance.double(), ev_ref[:3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pcs.components.double(), v_ref, rtol=1e-4, atol=1e-4)
    for scores in (pcs.scores, project(x, pcs.components, pcs.mean)):
        rel = torch.linalg.vector_norm(
            scores.double() - scores_ref, dim=(0, 2, 3)
        ) / torch.linalg.vector_norm(scores_ref, dim=(0, 2, 3))
        assert rel.max() < 1e-4
    spectrum = explained_variance(x)
    assert spectrum.shape == (min(n * hw * hw, c),)
    torch.testing.assert_close(spectrum.double(), ev_ref, rtol=1e-4, atol=1e-6)
    assert spectrum.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_auto_iterates_on_large_maps_and_matches_exact(seeded):
    x = torch.relu(torch.randn(8, 256, 7, 7) + torch.linspace(-1, 1, 256).view(1, 256, 1, 1))
    exact = principal_components(x, method="exact")
    with mock.patch("lightning_prism.pca._exact", side_effect=AssertionError("exact route taken")):
        auto = principal_components(x)
    torch.testing.assert_close(auto.components, exact.components, rtol=0, atol=1e-4)
    torch.testing.assert_close(auto.explained_variance, exact.explained_variance, rtol=1e-4, atol=0)


def test_iteration_gives_up_on_a_flat_spectrum_and_exact_route_takes_over(seeded):
    # The third axis is separated from a hundred others by a relative gap of 1e-7: subspace
    # iteration cannot pin it down within its budget, so the exact route must answer.
    singular = torch.cat([torch.tensor([10.0, 5.0]), 1 + 1e-7 * torch.arange(100, 0, -1)]).double()
    left = torch.linalg.qr(torch.randn(400, 102, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(150, 102, dtype=torch.float64)).Q
    rows = left * singular @ right.T
    x = rows.T.reshape(1, 150, 20, 20)
    assert _iterative(rows - rows.mean(0), 3) is None
    with mock.patch("lightning_prism.pca._exact", wraps=pca._exact) as exact:
        pcs = principal_components(x, method="iterative")
    assert exact.call_count == 1
    torch.testing.assert_close(pcs.components, principal_components(x, method="exact").components)


def test_explained_variance_is_accurate_on_a_large_batch(seeded):
    # 4M values with a large common offset: the total variance is summed from per-pixel norms, so
    # its float32 rounding does not reach the shares (one norm over all values was 2e-4 off here).
    x = torch.rand(32, 512, 16, 16) * torch.linspace(0.1, 2, 512).view(1, 512, 1, 1) + 100
    rows = x.double().permute(0, 2, 3, 1).reshape(-1, 512)
    centred = rows - rows.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred).flip(0)
    expected = eigenvalues[:3] / eigenvalues.sum()
    pcs = principal_components(x)
    torch.testing.assert_close(pcs.explained_variance.double(), expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_input_is_never_modified(seeded, batch, memory_format):
    # The pixel rows of a channels-last map or a batch of one are a view of the map: centring must
    # not happen in place there.
    x = torch.randn(batch, 8, 4, 4).to(memory_format=memory_format)
    before = x.clone()
    principal_components(x, method="exact")
    principal_components(x, method="iterative")
    explained_variance(x)
    assert torch.equal(x, before)


def test_not_finite_input_is_an_error():
    x = torch.rand(2, 8, 4, 4)
    x[1, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        principal_components(x)
    x[1, 3, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        principal_components(x)


def test_float64_input_stays_float64():
    pcs = principal_components(torch.rand(2, 5, 3, 3, dtype=torch.float64))
    assert pcs.components.dtype == torch.float64


def test_low_precision_input_computed_in_float32():
    x = torch.rand(2, 8, 4, 4)
    pcs = principal_components(x.to(torch.bfloat16))
    assert pcs.components.dtype == torch.float32
    reference = principal_components(x.to(torch.bfloat16).float())
    torch.testing.assert_close(pcs.components, reference.components)


def test_too_few_pixels_leave_zero_components():
    # Two pixels in total: one direction of variance, the other two components are zero columns.
    x = torch.tensor([[[[0.0, 1.0]], [[2.0, 0.0]], [[1.0, 1.0]]]])  # (1, 3, 1, 2)
    pcs = principal_components(x)
    norms = pcs.components.norm(dim=0)
    assert norms[0] == pytest.approx(1.0)
    assert norms[1:].abs().max() == 0
    assert pcs.explained_variance.tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_constant_map_has_no_components():
    pcs = principal_components(torch.ones(2, 4, 3, 3))
    assert pcs.components.abs().max() == 0
    assert pcs.explained_variance.abs().max() == 0
    assert explained_variance(torch.ones(2, 4, 3, 3)).abs().max() == 0


def test_orientation_is_the_documented_one():
    components = torch.tensor([[0.1, -0.9], [-0.8, 0.2], [0.3, 0.1]])
    oriented = orient_components(components)
    torch.testing.assert_close(oriented, torch.tensor([[-0.1, 0.9], [0.8, -0.2], [-0.3, -0.1]]))
    torch.testing.assert_close(orient_components(-components), oriented)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_alignment_restores_a_flipped_and_permuted_basis(order, seeded):
    reference = torch.linalg.qr(torch.randn(20, 3)).Q
    signs = torch.tensor([-1.0, 1.0, -1.0])
    scrambled = reference[:, list(order)] * signs
    # Small perturbation, as between two epochs of slow fine-tuning.
    scrambled = scrambled + 0.01 * torch.randn_like(scrambled)
    aligned, perm, s = align_components(scrambled, reference)
    torch.testing.assert_close(aligned, reference, atol=0.05, rtol=0)
    torch.testing.assert_close(scrambled[:, perm] * s, aligned)


def test_alignment_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"cannot align components of shape \(4, 3\)"):
        align_components(torch.rand(4, 3), torch.rand(5, 3))


def test_subspace_similarity(seeded):
    basis = torch.linalg.qr(torch.randn(10, 6)).Q
    a, b = basis[:, :3], basis[:, 3:]
    mixed = a @ torch.linalg.qr(torch.randn(3, 3)).Q  # same subspace, rotated and re-signed
    assert subspace_similarity(a, mixed).item() == pytest.approx(1.0, abs=1e-5)
    assert subspace_similarity(a, b).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.cat([a[:, :1], b[:, :2]], dim=1)  # shares one of three directions
    assert subspace_similarity(a, half).item() == pytest.approx(1 / 3, abs=1e-5)
    assert subspace_similarity(a, torch.zeros(10, 3)).item() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"expected a 4-D \(N, c, h, w\) feature map, got shape \(3, 4\)"):
        principal_components(torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"num_components must be a positive integer, got 0"):
        principal_components(torch.rand(1, 3, 2, 2), 0)
    with pytest.raises(
        ValueError, match=r"method must be one of \('auto', 'exact', 'iterative'\), got 'svd'"
    ):
        principal_components(torch.rand(1, 3, 2, 2), method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"do not match a feature map with 4 channels"):
        project(torch.rand(1, 4, 2, 2), torch.rand(5, 3), torch.rand(5))


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_axes_do_not_depend_on_the_map_scale(scale, seeded):
    # float32 squares of 1e-25 underflow and of 1e25 overflow; the axes are those of the map at
    # scale 1, and scores and variances scale with it.
    activations = torch.randn(2, 24, 5, 5)
    plain = principal_components(activations)
    scaled = principal_components(activations * scale)
    torch.testing.assert_close(scaled.components, plain.components, atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled.explained_variance, plain.explained_variance)
    torch.testing.assert_close(scaled.scores / scale, plain.scores, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(scaled.scores).all()
