from __future__ import annotations

import pytest
import torch
from lit_helpers import striped_images

from conftest import tiny_cnn
from lightning_prism import class_separation, prism


def reference_eta_squared(features: torch.Tensor, labels: torch.Tensor) -> float:
    points = features.double().mean(dim=(2, 3)).tolist()
    overall = [sum(p[d] for p in points) / len(points) for d in range(len(points[0]))]
    total = sum((p[d] - overall[d]) ** 2 for p in points for d in range(len(overall)))
    between = 0.0
    for c in set(labels.tolist()):
        members = [p for p, y in zip(points, labels.tolist(), strict=True) if y == c]
        centre = [sum(p[d] for p in members) / len(members) for d in range(len(overall))]
        between += len(members) * sum((centre[d] - overall[d]) ** 2 for d in range(len(overall)))
    return between / total


def test_matches_reference_and_is_scale_free(seeded):
    features, labels = torch.randn(9, 3, 4, 4), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    score = class_separation(features, labels).item()
    assert score == pytest.approx(reference_eta_squared(features, labels), rel=1e-5)
    assert class_separation(features * 37.5, labels).item() == pytest.approx(score, rel=1e-5)
    assert 0 <= score <= 1


def test_says_nothing_when_it_cannot():
    features = torch.randn(4, 3, 2, 2)
    assert class_separation(features, torch.tensor([1, 1, 1, 1])) is None  # one class
    assert class_separation(features, torch.tensor([0, 1, 2, 3])) is None  # singletons only
    assert class_separation(torch.zeros(4, 3, 2, 2), torch.tensor([0, 0, 1, 1])) is None  # no variance
    with pytest.raises(ValueError, match=r"expected \(N, k, h, w\) features and \(N,\) labels"):
        class_separation(features, torch.tensor([0, 1]))


def test_higher_after_training_to_separate_the_classes():
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=2)
    probe, probe_labels = striped_images(16, seed=5)
    before = class_separation(prism(model, probe).features, probe_labels).item()
    images, labels = striped_images(64, seed=6)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimiser.step()
    assert (model(probe).argmax(1) == probe_labels).float().mean() > 0.9  # it did learn
    after = class_separation(prism(model, probe).features, probe_labels).item()
    assert after > before + 0.2, (before, after)
