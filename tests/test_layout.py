from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_prism.layout import (
    MAX_PREFIX_TOKENS,
    FeatureLayout,
    declared_prefix_tokens,
    infer_layout,
    patch_grid,
)


def reference_nchw(t: torch.Tensor, kind: str, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """(N, C, h, w) by explicit indexing: out[n, c, i, j] is the value at row i, column j."""
    n = t.shape[0]
    h, w = grid
    c = t.shape[1] if kind == "nchw" else t.shape[-1]
    out = torch.empty(n, c, h, w, dtype=t.dtype)
    for i in range(h):
        for j in range(w):
            if kind == "nchw":
                out[:, :, i, j] = t[:, :, i, j]
            elif kind == "nhwc":
                out[:, :, i, j] = t[:, i, j, :]
            else:
                out[:, :, i, j] = t[:, prefix + i * w + j, :]  # patches in raster order after the prefix
    return out


@pytest.mark.parametrize(
    ("kind", "shape", "grid", "prefix"),
    [
        ("nchw", (2, 5, 3, 4), (3, 4), 0),
        ("nhwc", (2, 3, 4, 5), (3, 4), 0),
        ("tokens", (2, 12, 5), (3, 4), 0),
        ("tokens", (2, 1 + 12, 5), (3, 4), 1),
        ("tokens", (2, 5 + 12, 5), (3, 4), 5),  # class token and four registers
    ],
)
def test_to_nchw_is_a_view_in_raster_order(kind, shape, grid, prefix, seeded):
    t = torch.randn(shape)
    layout = FeatureLayout(kind, grid, prefix)
    view = layout.to_nchw(t)
    assert torch.equal(view, reference_nchw(t, kind, grid, prefix))
    assert view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # no copy
    assert layout.fits(shape)


def test_the_same_layout_reads_a_gradient(seeded):
    # What a Grad-CAM needs: the output and the gradient with respect to it, read alike.
    tokens = torch.randn(2, 1 + 6, 4, requires_grad=True)
    layout = FeatureLayout("tokens", (2, 3), prefix=1)
    weights = torch.randn(2, 4, 2, 3)
    (layout.to_nchw(tokens) * weights).sum().backward()
    assert tokens.grad is not None
    assert torch.equal(layout.to_nchw(tokens.grad), weights)
    assert tokens.grad[:, 0].abs().max() == 0  # the class token does not reach the map


def test_layout_validation_and_mismatched_tensors():
    with pytest.raises(ValueError, match=r"kind must be one of \('nchw', 'nhwc', 'tokens'\), got 'nwhc'"):
        FeatureLayout("nwhc", (2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"grid must be two positive sizes"):
        FeatureLayout("nchw", (0, 2))
    with pytest.raises(ValueError, match=r"prefix must be 0, or ≥ 0 for tokens; got 1 for 'nhwc'"):
        FeatureLayout("nhwc", (2, 2), prefix=1)
    with pytest.raises(ValueError, match=r"a tensor of shape \(2, 10, 8\) does not fit"):
        FeatureLayout("tokens", (3, 3), prefix=0).to_nchw(torch.zeros(2, 10, 8))
    assert FeatureLayout("tokens", (1, 1)).spatial is False and FeatureLayout("nhwc", (1, 2)).spatial


@pytest.mark.parametrize(
    ("hw", "image", "expected"),
    [
        ((14, 10), (224, 160), True),  # stride 16
        ((10, 14), (224, 160), False),  # transposed
        ((56, 56), (224, 224), True),
        ((56, 96), (224, 224), False),  # a ConvNeXt (N, h, w, C) permute read as (N, C, h, w)
        ((4, 4), (127, 127), True),  # ⌈127/32⌉
        ((147, 147), (299, 299), False),  # a valid convolution's trimmed map is no exact grid
        ((1, 1), (64, 64), True),
        ((65, 65), (128, 128), False),  # 64 patches and a class token
        ((1, 2), (128, 128), False),  # a square image has square grids (PiT's two class tokens)
        ((2, 3), (40, 64), True),  # ⌈40/24⌉ = 2, ⌈64/24⌉ = 3
    ],
)
def test_patch_grid(hw, image, expected):
    assert patch_grid(hw, image) is expected


def test_infer_layout_reads_maps_channels_last_maps_and_tokens():
    image = (224, 224)
    assert infer_layout((8, 96, 56, 56), image) == FeatureLayout("nchw", (56, 56))
    assert infer_layout((8, 56, 56, 96), image) == FeatureLayout("nhwc", (56, 56))
    assert infer_layout((8, 7, 7, 768), image) == FeatureLayout("nhwc", (7, 7))
    assert infer_layout((8, 64, 147, 147), (299, 299)) == FeatureLayout("nchw", (147, 147))  # valid convs
    assert infer_layout((8, 3, 40, 200), image) is None  # scales like no image
    # Tokens: the declared prefix first, then the smallest that leaves a patch grid.
    assert infer_layout((8, 197, 192), image, prefix_tokens=[1]) == FeatureLayout("tokens", (14, 14), 1)
    assert infer_layout((8, 197, 192), image) == FeatureLayout("tokens", (14, 14), 1)
    assert infer_layout((8, 196, 192), image, prefix_tokens=[1]) == FeatureLayout("tokens", (14, 14), 0)
    assert infer_layout((8, 201, 192), image, prefix_tokens=[5]) == FeatureLayout("tokens", (14, 14), 5)
    assert infer_layout((8, 1 + 14 * 10, 64), (224, 160), prefix_tokens=[1]) == FeatureLayout(
        "tokens", (14, 10), 1
    )
    assert infer_layout((8, 49, 384), image) == FeatureLayout("tokens", (7, 7), 0)  # LeViT, PVT
    # What the model declares decides: a class token and 8 registers before 4×4 patches are 25 tokens,
    # which would also read as a 5×5 grid without a prefix.
    assert infer_layout((8, 25, 64), (64, 64), prefix_tokens=[9]) == FeatureLayout("tokens", (4, 4), 9)
    assert infer_layout((8, 25, 64), (64, 64)) == FeatureLayout("tokens", (5, 5), 0)
    assert all(infer_layout((8, 1100 + p, 64), image) is None for p in range(MAX_PREFIX_TOKENS))  # no grid
    # The batch: attention of 8 images × 3 heads is no feature map of this batch.
    assert infer_layout((24, 196, 64), image, batch=8) is None
    assert infer_layout((8, 196, 64), image, batch=8) is not None
    assert infer_layout((8, 10), image) is None


def test_declared_prefix_tokens():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, reg_tokens=4)
    assert declared_prefix_tokens(vit.modules()) == (5,)  # timm says it: class token and 4 registers
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1, img_size=32)
    assert declared_prefix_tokens(deit.modules()) == (2,)
    tv = torchvision.models.VisionTransformer(32, 16, 1, 2, 8, 16)
    assert declared_prefix_tokens(tv.modules()) == (1,)  # its class_token parameter
    assert declared_prefix_tokens(torchvision.models.resnet18().modules()) == ()

    class Embeddings(nn.Module):  # as Hugging Face's DINOv2 with registers
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.register_tokens = nn.Parameter(torch.zeros(1, 4, 8))

    assert declared_prefix_tokens(Embeddings().modules()) == (5,)
