"""The examples' code paths, on a few batches, so CI keeps them working."""

from __future__ import annotations

import shlex
from pathlib import Path

import finetune  # examples/ is on the path (conftest.py)
import numpy as np
import prism_photos
import pytest
import torch
import views_photos
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import readme_tensorboard_flags
from lightning_prism import prism


def quick(tmp_path, *extra: str) -> list[str]:
    """Command-line overrides of finetune.yaml for a run of a few batches into ``tmp_path``."""
    return [
        *("--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"),
        *("--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--data.size", "32"),
        *extra,
    ]


def test_finetune_example_runs_on_a_few_batches(tmp_path, capsys):
    summary = finetune.main(quick(tmp_path, "--trainer.max_epochs", "2"))
    assert 0 <= summary["val_acc"] <= 1
    assert 0 <= summary["separation_first"] <= 1 and 0 <= summary["separation_last"] <= 1
    strip = Image.open(next(tmp_path.rglob("prism_evolution.png")))
    width, height = strip.size  # inputs row, before training, 2 epochs; 20 probe images after the labels
    assert height == 4 * 98 + 2 and 20 * 98 + 2 < width < 20 * 98 + 2 + 120
    # The curves from the model before training on: step 0, then each epoch.
    for name in ("val/knn_accuracy", "val/class_separation", "val/effective_rank"):
        assert len(summary[name]) == 3 and all(np.isfinite(summary[name])), name
    # It prints the TensorBoard command the README gives (tests/test_tensorboard.py serves it).
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "tensorboard --logdir" in x]
    words = shlex.split(line.split("TensorBoard:", 1)[1])
    assert words[:2] == ["tensorboard", "--logdir"] and Path(words[2]).is_dir()
    assert words[3:] == readme_tensorboard_flags()
    acc = EventAccumulator(words[2])
    acc.Reload()
    assert "hp_metric" not in acc.Tags()["scalars"] and "prism/class_separation" in acc.Tags()["scalars"]


def test_finetune_example_takes_an_image_folder_and_a_torchvision_model(tmp_path):
    # The path for online users, offline: a small ImageFolder of real photo crops, a random-init
    # torchvision model (weights null instead of DEFAULT, which would download).
    import skimage.data

    for label in ("cat", "coffee"):
        photo = skimage.data.chelsea() if label == "cat" else skimage.data.coffee()
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(5):
            crop = photo[20 * i : 20 * i + 200, 30 * i : 30 * i + 200]
            Image.fromarray(crop).save(tmp_path / "data" / label / f"{i}.png")
    logs = tmp_path / "logs"
    data = ("--data.root", str(tmp_path / "data"), "--data.batch_size", "4")
    model = ("--model.backbone", "resnet18", "--model.train_from", "model.layer4")
    summary = finetune.main(quick(logs, *data, *model, "--trainer.max_epochs", "1"))
    assert 0 <= summary["val_acc"] <= 1
    assert next(logs.rglob("events.out.tfevents.*")) and next(logs.rglob("prism_evolution.png"))


def test_finetune_example_reads_its_yaml_by_default(capsys):
    # `python examples/finetune.py` with no arguments runs what finetune.yaml says.
    with pytest.raises(SystemExit):
        finetune.main(["--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["max_epochs"] == 4
    assert config["model"]["backbone"] == "efficientnet-lite0" and config["data"]["root"] is None
    (monitor,) = config["trainer"]["callbacks"]
    assert monitor["class_path"] == "lightning_prism.PRISMMonitor"
    assert monitor["init_args"]["num_images"] == 20


def test_the_examples_input_size_gives_lite0_a_final_map_with_structure(lite0, capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--print_config"])
    size = yaml.safe_load(capsys.readouterr().out)["data"]["size"]
    result = prism(lite0, torch.zeros(2, 3, size, size), extrapolate=False)
    assert tuple(result.features.shape[-2:]) >= (4, 4)
    # At the former 64 pixels it was 2×2: each map one flat colour per quadrant.
    assert tuple(prism(lite0, torch.zeros(2, 3, 64, 64), extrapolate=False).features.shape[-2:]) == (2, 2)


def test_train_from_freezes_what_comes_before_it():
    model = finetune.Classifier(train_from="model._blocks.11")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable[0].startswith("model._blocks.11.") and trainable[-1].startswith("model._fc.")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen[0].startswith("model._conv_stem") and frozen[-1].startswith("model._blocks.10.")
    # Batch norms keep their statistics (eval mode), from the start (Lightning does not call
    # train()) and through train(); the frozen convolutions too, the trained ones train.
    for _ in range(2):
        modes = {name: m.training for name, m in model.named_modules()}
        assert not modes["model._bn0"] and not modes["model._blocks.11._bn0"] and not modes["model._bn1"]
        assert not modes["model._conv_stem"] and modes["model._blocks.11._expand_conv"] and modes["model._fc"]
        model.train()
    with pytest.raises(ValueError, match=r"train_from 'model.layer4' is not a module of the model"):
        finetune.Classifier(train_from="model.layer4")


def test_photos_example_writes_the_png(tmp_path):
    path = prism_photos.main(str(tmp_path / "photos.png"))
    assert Image.open(path).size[0] == 2 + 3 * 226


def test_views_example_shows_each_photo_beside_its_views(tmp_path, capsys):
    path = views_photos.main(str(tmp_path / "views.png"))
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1] == 2 + 4 * 226  # input, PRISM, Grad-CAM, saliency
    # The pretrained model recognises the cat, the espresso and the rocket (as a missile).
    printed = capsys.readouterr().out
    assert "chelsea: Egyptian cat" in printed or "chelsea: tabby" in printed
    assert "coffee: espresso" in printed and "rocket: missile" in printed
