from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_prism import extrapolation
from lightning_prism.extrapolation import (
    gradual_extrapolation,
    rgb_and_informative,
    stage_map,
    to_rgb,
    unit_scale,
)


def reference_rgb(maps: np.ndarray) -> np.ndarray:
    z = (maps - maps.mean()) / maps.std(ddof=1)
    z = np.clip(z, -1, 1)
    return (z - z.min()) / (z.max() - z.min())


@pytest.mark.parametrize("chunk", [1, 60, 1 << 21])  # one image, two images, the whole batch at once
def test_stage_map_is_channel_mean_of_absolute_activation(chunk, monkeypatch, seeded):
    monkeypatch.setattr(extrapolation, "STAGE_MAP_CHUNK", chunk)
    a = torch.randn(5, 5, 4, 3)
    expected = torch.zeros(5, 1, 4, 3)
    for channel in range(5):
        expected += a[:, channel : channel + 1].abs() / 5
    torch.testing.assert_close(stage_map(a), expected)
    assert stage_map(a.to(torch.bfloat16)).dtype == torch.float32


def same_up_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal after dividing each by its largest magnitude (gradual extrapolation is only defined up to
    a positive factor), and the factor positive."""
    torch.testing.assert_close(
        actual / actual.abs().max(), (expected / expected.abs().max()).to(actual.dtype)
    )


def test_gradual_extrapolation_follows_the_stages_in_reverse(seeded):
    features = torch.randn(2, 3, 4, 4)
    stages = [torch.rand(2, 1, 16, 16), torch.rand(2, 1, 8, 8)]
    expected = F.interpolate(features, size=(8, 8), mode="bilinear", align_corners=False) * stages[1]
    expected = F.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False) * stages[0]
    expected = F.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False)
    same_up_to_scale(gradual_extrapolation(features, stages, (32, 32)), expected)
    # Without a target size the result stays at the first stage's resolution.
    assert gradual_extrapolation(features, stages).shape == (2, 3, 16, 16)
    # Without stages it is a plain bilinear resize.
    same_up_to_scale(
        gradual_extrapolation(features, [], (8, 8)),
        F.interpolate(features, size=(8, 8), mode="bilinear", align_corners=False),
    )


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_gradual_extrapolation_cannot_under_or_overflow(scale, seeded):
    # Four stages of 1e-12 (or 1e12) and features of that size: the raw product is 1e-60 (1e60),
    # outside float32; the extrapolation is the float64 one up to scale.
    features = torch.randn(2, 3, 2, 2, dtype=torch.float64) * scale
    stages = [torch.rand(2, 1, 2**k, 2**k, dtype=torch.float64) * scale + scale / 10 for k in (5, 4, 3, 2)]
    expected = features
    for stage in reversed(stages):
        expected = (
            F.interpolate(expected, size=stage.shape[-2:], mode="bilinear", align_corners=False) * stage
        )
    assert not torch.isfinite(expected.float()).all() or expected.float().abs().max() == 0  # float32 fails
    result = gradual_extrapolation(features.float(), [s.float() for s in stages], (32, 32))
    assert torch.isfinite(result).all() and result.abs().max() == pytest.approx(1.0, rel=1e-6)
    same_up_to_scale(result, expected)


def test_gradual_extrapolation_never_modifies_its_inputs(seeded):
    # The running map is multiplied in place, but never while it is still `features` (a stage of
    # the features' own size is not resized) and never a stage map.
    features = torch.randn(2, 3, 4, 4)
    stages = [torch.rand(2, 1, 8, 8), torch.rand(2, 1, 4, 4)]
    before = [t.clone() for t in (features, *stages)]
    result = gradual_extrapolation(features, stages, (8, 8))
    for tensor, copy in zip((features, *stages), before, strict=True):
        assert torch.equal(tensor, copy)
    expected = (
        F.interpolate(features * stages[1], size=(8, 8), mode="bilinear", align_corners=False) * stages[0]
    )
    same_up_to_scale(result, expected)


def test_unit_scale():
    tiny = torch.tensor([[1e-30, -4e-30]])
    torch.testing.assert_close(unit_scale(tiny), torch.tensor([[0.25, -1.0]]))
    zeros = torch.zeros(3)
    assert torch.equal(unit_scale(zeros), zeros) and unit_scale(zeros) is not zeros


def test_gradual_extrapolation_rejects_a_mismatched_stage():
    with pytest.raises(ValueError, match=r"stage map of shape \(3, 1, 8, 8\) does not fit"):
        gradual_extrapolation(torch.rand(2, 3, 4, 4), [torch.rand(3, 1, 8, 8)])


def test_to_rgb_matches_reference(seeded):
    maps = torch.randn(3, 3, 5, 6) * 4 + 1
    np.testing.assert_allclose(
        to_rgb(maps).numpy(), reference_rgb(maps.numpy().astype(np.float64)), atol=1e-5
    )


def test_to_rgb_inplace_gives_the_same_result_in_the_same_memory(seeded):
    maps = torch.randn(2, 3, 5, 6)
    expected = to_rgb(maps)
    rgb = to_rgb(maps, inplace=True)
    assert rgb.data_ptr() == maps.data_ptr()
    torch.testing.assert_close(rgb, expected)


def test_to_rgb_constant_map_is_grey_not_nan():
    rgb, informative = rgb_and_informative(torch.full((2, 3, 4, 4), 7.0))
    assert torch.equal(rgb, torch.full_like(rgb, 0.5)) and not informative
    assert rgb_and_informative(torch.randn(2, 3, 4, 4))[1]
    assert not rgb_and_informative(torch.randn(2, 3, 4, 4), torch.zeros(3, dtype=torch.bool))[1]
    assert torch.equal(to_rgb(torch.ones(1, 3, 1, 1)), torch.full((1, 3, 1, 1), 0.5))


def test_to_rgb_missing_components_are_zero(seeded):
    maps = torch.randn(2, 3, 4, 4)
    maps[:, 2] = 0
    rgb = to_rgb(maps, torch.tensor([True, True, False]))
    assert rgb[:, 2].abs().max() == 0
    np.testing.assert_allclose(
        rgb[:, :2].numpy(), reference_rgb(maps[:, :2].numpy().astype(np.float64)), atol=1e-5
    )
    assert to_rgb(maps, torch.zeros(3, dtype=torch.bool)).abs().max() == 0
