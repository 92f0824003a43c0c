from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_prism.render import caption_grid, denormalize, evolution_strip, overlay, to_uint8


def test_denormalize_inverts_normalisation(seeded):
    images = torch.rand(2, 3, 5, 5)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(denormalize(normalised, mean, std), images)
    grey = denormalize(torch.randn(2, 1, 4, 4))
    assert (
        grey.shape == (2, 3, 4, 4)
        and grey.amin(dim=(1, 2, 3)).eq(0).all()
        and grey.amax(dim=(1, 2, 3)).eq(1).all()
    )


def test_overlay_blends_and_resizes():
    images, maps = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 4, 4)
    torch.testing.assert_close(overlay(images, maps, 0.25), torch.full((1, 3, 8, 8), 0.25))


def test_caption_grid_layout_and_mismatch_mark():
    tiles = torch.zeros(3, 3, 24, 24)
    plain = caption_grid(tiles, nrow=2)
    assert plain.shape == (2 + 2 * 26, 2 + 2 * 26, 3)
    captioned = caption_grid(tiles, ["cat → cat", "cat → dog", "dog → dog"], [False, True, False], nrow=3)
    strip = max(10, 24 // 12) + 6
    assert captioned.shape == (2 + 26 + strip, 2 + 3 * 26, 3)
    bar_row = 2 + 24 + 1
    wrong_bar, right_bar = captioned[bar_row, 2 + 26 + 12], captioned[bar_row, 2 + 12]
    assert tuple(wrong_bar) == (220, 40, 40) and tuple(right_bar) != (220, 40, 40)
    with pytest.raises(ValueError, match="got 1 captions for 3 tiles"):
        caption_grid(tiles, ["x"])


def test_evolution_strip_size():
    inputs = to_uint8(torch.rand(5, 3, 32, 32))
    rows = [to_uint8(torch.rand(5, 3, 32, 32)) for _ in range(4)]
    strip = evolution_strip(inputs, rows, [f"epoch {i}" for i in range(4)], tile=40)
    assert strip.size == (2 * 40 // 3 + 5 * 42 + 2, 5 * 42 + 2)
    first_tile = np.asarray(strip)[2 : 2 + 40, 2 * 40 // 3 + 2 :][:, :40]
    assert first_tile.std() > 0  # thumbnails are painted, not blank
    with pytest.raises(ValueError, match="row 'epoch 0' has 2 images, expected 5"):
        evolution_strip(inputs, [rows[0][:2]], ["epoch 0"])
