"""Colours stay put across epochs of slow fine-tuning with the aligned basis."""

from __future__ import annotations

import copy

import torch

from lightning_prism import prism


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_aligned_basis_keeps_colours_while_refit_may_swap(lite0, photos):
    torch.manual_seed(0)
    model = copy.deepcopy(lite0)
    images = (photos - 0.5) / 0.5
    head = model._conv_head.weight
    previous = {"aligned": None, "refit": None}
    reference = None
    consecutive = {"aligned": [], "refit": []}
    for _ in range(4):  # "epochs" of slow drift of the last convolution
        with torch.no_grad():
            head.add_(0.15 * head.std() * torch.randn_like(head))
        aligned = prism(model, images, basis="aligned", reference=reference, extrapolate=False)
        refit = prism(model, images, basis="refit", extrapolate=False)
        reference = aligned.components
        for name, result in (("aligned", aligned), ("refit", refit)):
            if previous[name] is not None:
                consecutive[name].append(correlation(result.features, previous[name]))
            previous[name] = result.features
    assert min(consecutive["aligned"]) > 0.8, consecutive
    assert min(consecutive["aligned"]) >= min(consecutive["refit"]) - 1e-6, consecutive
