from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fontTools.ttLib import TTFont
from PIL import Image, ImageFont

from lightning_prism.render import (
    FONT,
    MAX_TILE,
    MIN_TILE,
    EvolutionHistory,
    _caption_lines,
    caption_grid,
    denormalize,
    evolution_strip,
    heat_overlay,
    heatmap,
    load_font,
    missing_glyphs,
    overlay,
    tile_size,
    to_uint8,
)

# Captions a user's data gives: digits, ImageNet-style names, accents, Greek and Cyrillic labels,
# the arrow between true and predicted class, and the ellipsis and question mark the renderer adds.
CAPTIONS = [
    "0 → 9",
    "cat → dog",
    "golden_retriever → Labrador_retriever",
    "crème brûlée → café au lait",
    "Straße → Ωμέγα",
    "собака → кошка",
    "n02085620 (Chihuahua) → …?",
]


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


# ---------------------------------------------------------------------- glyphs
def test_every_caption_character_has_a_glyph_in_the_bundled_font():
    # Independent check: the font's own character map, read with fontTools.
    mapped = TTFont(FONT).getBestCmap()
    characters = sorted(set("".join(CAPTIONS)))
    assert [c for c in characters if ord(c) not in mapped] == []
    # What the renderer checks: no character is drawn as the font's missing-glyph box.
    for size in (12, 18, 32):
        assert missing_glyphs("".join(CAPTIONS), load_font(size)) == []


def test_missing_glyphs_agrees_with_the_character_map():
    mapped = TTFont(FONT).getBestCmap()
    probe = "→…✗ßΩЖ中日本語한국어" + "".join(chr(c) for c in range(0x2190, 0x21A0))
    expected = [c for c in dict.fromkeys(probe) if ord(c) not in mapped]
    assert expected == ["中", "日", "本", "語", "한", "국", "어"]  # the fixture has both kinds
    assert missing_glyphs(probe, load_font(16)) == expected


def test_pillows_default_font_lacks_the_arrow():
    # Why the package ships a font: the default one draws "→" as a missing-glyph box.
    try:
        default = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        pytest.skip("Pillow < 10.1")
    assert missing_glyphs("cat → dog", default) == ["→"]


def test_a_character_without_a_glyph_is_drawn_as_a_question_mark():
    tiles = torch.zeros(2, 3, 128, 128)
    drawn = caption_grid(tiles, ["猫 → 犬", "? → ?"])
    strip_height = drawn.shape[0] - 2 - 128 - 2
    first = drawn[2 + 128 : 2 + 128 + strip_height, 2 : 2 + 128]
    second = drawn[2 + 128 : 2 + 128 + strip_height, 2 + 130 : 2 + 130 + 128]
    np.testing.assert_array_equal(first, second)


# ---------------------------------------------------------------------- grids
@pytest.mark.parametrize(
    ("side", "expected"),
    [(8, 8 * 12), (28, 112), (32, 96), (64, 128), (95, 190), (96, 96), (224, 224), (256, 256), (512, 256)],
)
def test_tile_size(side, expected):
    assert tile_size(side, side) == (expected, expected)
    assert MIN_TILE <= expected <= max(MAX_TILE, 2 * MIN_TILE)


def test_tile_size_keeps_the_aspect_ratio():
    assert tile_size(32, 64) == (64, 128)
    assert tile_size(300, 600) == (128, 256)


def test_caption_grid_without_captions_is_a_padded_grid_of_enlarged_tiles():
    tiles = torch.rand(3, 3, 24, 24)
    plain = caption_grid(tiles, nrow=2)
    assert plain.shape == (2 + 2 * 98, 2 + 2 * 98, 3)  # 24 px → 96 px (×4), padding 2
    first = plain[2 : 2 + 96, 2 : 2 + 96]
    np.testing.assert_array_equal(first, to_uint8(tiles)[0].repeat(4, axis=0).repeat(4, axis=1))
    assert (plain[2 + 98 :, 2 + 98 :] == 255).all()  # the empty fourth cell is padding


def test_caption_grid_layout_and_mismatch_mark():
    tiles = torch.zeros(5, 3, 128, 128)
    captions = ["cat → cat", "cat → dog", "dog → dog", "dog → dog", "cat → cat"]
    grid = caption_grid(tiles, captions, [False, True, False, False, False])
    font = load_font(round(128 / 6))
    ascent, descent = font.getmetrics()
    strip = ascent + descent + 4  # one line: every caption fits
    assert grid.shape == (2 + 2 * (128 + strip + 2), 2 + 4 * 130, 3)  # four to a row by default
    bar_row = 2 + 128 + 1
    wrong_bar, right_bar = grid[bar_row, 2 + 130 + 120], grid[bar_row, 2 + 120]
    assert tuple(wrong_bar) == (220, 40, 40) and tuple(right_bar) == (40, 40, 40)
    assert tuple(grid[2 + 64, 2 + 130]) == (220, 40, 40)  # a red frame around the wrong one
    with pytest.raises(ValueError, match="got 1 captions for 5 tiles"):
        caption_grid(tiles, ["x"])


def test_caption_font_is_a_sixth_of_the_tile():
    # Caption height relative to the tile is what survives TensorBoard scaling the grid to its card.
    for side in (32, 64, 112, 224):
        grid = caption_grid(torch.zeros(1, 3, side, side), ["7 → 7"])
        h = tile_size(side, side)[0]
        ascent, descent = load_font(max(12, round(h / 6))).getmetrics()
        assert grid.shape[0] == 2 + h + ascent + descent + 4 + 2
        text = grid[2 + h : -2, 2 : 2 + h]
        rows_with_text = np.flatnonzero((text > 200).all(axis=2).any(axis=1))
        assert rows_with_text.size and (rows_with_text.max() - rows_with_text.min() + 1) >= 0.6 * h / 6


def test_long_captions_wrap_at_the_arrow_and_are_shortened():
    tiles = torch.zeros(2, 3, 96, 96)
    grid = caption_grid(tiles, ["golden_retriever → Labrador_retriever", "0 → 0"])
    font = load_font(round(96 / 6))
    ascent, descent = font.getmetrics()
    assert grid.shape[0] == 2 + 96 + 2 * (ascent + descent) + 4 + 2  # two lines for every tile
    # No text runs into the next tile: the padding column between the two tiles stays white.
    assert (grid[:, 2 + 96 : 2 + 98] == 255).all()


# ---------------------------------------------------------------------- evolution strip
def test_evolution_strip_size():
    inputs = to_uint8(torch.rand(5, 3, 32, 32))
    rows = [to_uint8(torch.rand(5, 3, 32, 32)) for _ in range(4)]
    strip = evolution_strip(inputs, rows, [f"epoch {i}" for i in range(4)], tile=40)
    width, height = strip.size
    assert height == 5 * 42 + 2
    label_width = width - 5 * 42 - 2
    font = load_font(max(12, 40 // 6))
    assert font.getlength("epoch 3") < label_width <= font.getlength("epoch 3") + 13
    first_tile = np.asarray(strip)[2 : 2 + 40, label_width + 2 :][:, :40]
    assert first_tile.std() > 0  # thumbnails are painted, not blank
    with pytest.raises(ValueError, match="row 'epoch 0' has 2 images, expected 5"):
        evolution_strip(inputs, [rows[0][:2]], ["epoch 0"])


def smooth_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """``(n, side, side, 3)`` uint8 images of smooth colour fields, as PRISM maps and overlays are."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return to_uint8(torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear"))


def solid(value: int, n: int = 3, side: int = 16) -> np.ndarray:
    return np.full((n, side, side, 3), value, np.uint8)


@pytest.mark.parametrize("max_rows", [2, 3, 5, 10])
@pytest.mark.parametrize("epochs", [1, 2, 7, 10, 11, 100])
def test_evolution_history_keeps_first_last_and_at_most_max_rows(max_rows, epochs):
    history = EvolutionHistory(max_rows=max_rows, tile=8)
    for epoch in range(epochs):
        history.add(f"epoch {epoch}", solid(5 * epoch % 256), solid(255))
    kept = [int(label.split()[1]) for label in history.labels]
    assert kept[0] == 0 and kept[-1] == epochs - 1
    assert len(kept) == min(epochs, max_rows) or (
        epochs > max_rows and max_rows // 2 <= len(kept) <= max_rows
    )
    assert kept == sorted(set(kept))
    gaps = np.diff(kept[:-1]) if len(kept) > 2 else np.array([1])
    assert len(set(gaps.tolist())) == 1  # evenly spaced but for the last row
    # The rendered rows are the kept epochs' images, in order (to JPEG rounding).
    strip = np.asarray(history.render())
    assert strip.shape[0] == (len(kept) + 1) * 10 + 2
    column = strip[2 + 10 + 4 :: 10, -6, 0][: len(kept)]  # middle of each row, last thumbnail
    assert np.abs(column.astype(int) - 5 * np.array(kept) % 256).max() <= 2


def test_evolution_history_round_trips_through_a_checkpoint(tmp_path):
    history = EvolutionHistory(max_rows=4, tile=16)
    images = [smooth_images(3, 40, seed) for seed in range(6)]
    for epoch, image in enumerate(images):
        history.add(f"epoch {epoch}", image, images[0])
    torch.save({"evolution": history.state_dict()}, tmp_path / "ckpt.pt")
    restored = EvolutionHistory(max_rows=4, tile=16)
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["evolution"])
    assert restored.labels == history.labels == ["epoch 0", "epoch 2", "epoch 4", "epoch 5"]
    np.testing.assert_array_equal(np.asarray(restored.render()), np.asarray(history.render()))
    # Adding on goes on with the same spacing, as if there had been no interruption.
    uninterrupted = EvolutionHistory(max_rows=4, tile=16)
    for epoch, image in enumerate(images * 2):
        uninterrupted.add(f"epoch {epoch}", image, images[0])
        if epoch >= 6:
            restored.add(f"epoch {epoch}", image, images[0])
    assert restored.labels == uninterrupted.labels
    # A checkpoint carries the kept rows as JPEG thumbnails (here 4 rows and the inputs, 3 16-pixel
    # tiles each: 11.5 kB raw), not the 40-pixel images (72 kB raw) nor every epoch.
    assert (tmp_path / "ckpt.pt").stat().st_size < 5 * 3 * 16 * 16 * 3


def test_evolution_history_starts_afresh_when_the_probe_size_changes():
    history = EvolutionHistory(max_rows=4, tile=8)
    history.add("epoch 0", solid(0, n=3), solid(1, n=3))
    history.add("epoch 1", solid(0, n=5), solid(1, n=5))
    assert history.labels == ["epoch 1"]
    assert np.asarray(history.render()).shape[1] > 5 * 10


def test_evolution_history_rejects_fewer_than_two_rows():
    with pytest.raises(
        ValueError, match=r"max_rows must be an integer >= 2 \(the first and the last row\), got 1"
    ):
        EvolutionHistory(max_rows=1)


def test_evolution_history_stores_the_thumbnails_as_jpeg():
    history = EvolutionHistory(max_rows=3)
    images = smooth_images(2, 128)
    history.add("epoch 0", images, images)
    stored = Image.open(io.BytesIO(history.state_dict()["rows"][0][2]))
    assert stored.format == "JPEG" and stored.size == (2 * 96, 96)
    thumbnails = [np.asarray(Image.fromarray(i).resize((96, 96), Image.Resampling.BILINEAR)) for i in images]
    difference = np.asarray(stored).astype(int) - np.concatenate(thumbnails, axis=1)
    assert np.abs(difference).mean() < 2


def test_heatmap_is_jet_between_its_anchors():
    values = torch.tensor([0.0, 0.125, 0.25, 0.5, 0.875, 1.0, 2.0, float("nan")]).view(1, 1, 1, -1)
    rgb = heatmap(values)[0, :, 0].T
    expected = torch.tensor(
        [[0, 0, 0.5], [0, 0, 1], [0, 0.5, 1], [0.5, 1, 0.5], [1, 0, 0], [0.5, 0, 0], [0.5, 0, 0], [0, 0, 0.5]]
    )
    torch.testing.assert_close(rgb, expected)


def test_heat_overlay_weights_the_colour_by_the_maps_value():
    images = torch.rand(2, 3, 4, 4)
    maps = torch.zeros(2, 1, 2, 2)
    maps[1] = 1.0
    blended = heat_overlay(images, maps, alpha=0.6)
    torch.testing.assert_close(blended[0], images[0])  # nothing seen: the image as it is
    torch.testing.assert_close(blended[1], 0.4 * images[1] + 0.6 * heatmap(torch.ones(1, 1, 4, 4))[0])
    # clip: the map over its 99th percentile, clipped at 1 (one bright pixel of 100 no longer sets the scale)
    sparse = torch.full((1, 1, 10, 10), 0.01)
    sparse[0, 0, 0, 0] = 1.0
    clipped = heat_overlay(torch.zeros(1, 3, 10, 10), sparse, alpha=1.0, clip=0.5)
    torch.testing.assert_close(clipped[0, :, 5, 5], heatmap(torch.ones(1, 1, 1, 1))[0, :, 0, 0])


def test_long_captions_wrap_after_a_colon_or_at_a_space():
    face = load_font(16)
    assert _caption_lines("chelsea: Egyptian cat", face, face.getlength("chelsea: Egypt")) == [
        "chelsea:",
        "Egyptian cat",
    ]
    assert _caption_lines("a tabby cat", face, face.getlength("a tabby ")) == ["a tabby", "cat"]
