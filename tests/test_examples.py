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


def test_photos_example_writes_the_png(tmp_path):
    path = prism_photos.main(str(tmp_path / "photos.png"))
    assert Image.open(path).size[0] == 2 + 3 * 226
