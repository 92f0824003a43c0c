"""The examples' code paths, on a few batches, so CI keeps them working."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import finetune
import prism_photos


def test_finetune_example_runs_on_a_few_batches(tmp_path):
    summary = finetune.main(
        [
            "--out",
            str(tmp_path),
            "--epochs",
            "2",
            "--limit-batches",
            "2",
            "--probe",
            "20",
            "--size",
            "32",
            "--quiet",
        ]
    )
    assert 0 <= summary["val_acc"] <= 1
    assert 0 <= summary["separation_first"] <= 1 and 0 <= summary["separation_last"] <= 1
    strip = Image.open(next(tmp_path.rglob("prism_evolution.png")))
    assert strip.size == (64 + 20 * 98 + 2, 3 * 98 + 2)  # inputs row + 2 logged epochs, 20 probe images


def test_finetune_example_takes_an_image_folder_and_a_torchvision_model(tmp_path):
    # The path for online users, offline: a small ImageFolder of real photo crops, a random-init
    # torchvision model (weights=None instead of DEFAULT, which would download).
    import skimage.data

    for label in ("cat", "coffee"):
        photo = skimage.data.chelsea() if label == "cat" else skimage.data.coffee()
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(5):
            crop = photo[20 * i : 20 * i + 200, 30 * i : 30 * i + 200]
            Image.fromarray(crop).save(tmp_path / "data" / label / f"{i}.png")
    data, out = str(tmp_path / "data"), str(tmp_path / "logs")
    options = ["--epochs", "1", "--size", "32", "--probe", "2", "--batch-size", "4", "--quiet"]
    summary = finetune.main(["--data", data, "--model", "resnet18", "--out", out, *options])
    assert 0 <= summary["val_acc"] <= 1
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events and next((tmp_path / "logs").rglob("prism_evolution.png"))


def test_photos_example_writes_the_png(tmp_path):
    path = prism_photos.main(str(tmp_path / "photos.png"))
    assert Image.open(path).size[0] == 2 + 3 * 226
