"""The examples' code paths, on a few batches, so CI keeps them working."""

from __future__ import annotations

import finetune  # examples/ is on the path (conftest.py)
import prism_photos
import pytest
import yaml
from PIL import Image


def quick(tmp_path, *extra: str) -> list[str]:
    """Command-line overrides of finetune.yaml for a run of a few batches into ``tmp_path``."""
    return [
        *("--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"),
        *("--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--data.size", "32"),
        *extra,
    ]


def test_finetune_example_runs_on_a_few_batches(tmp_path):
    summary = finetune.main(quick(tmp_path, "--trainer.max_epochs", "2"))
    assert 0 <= summary["val_acc"] <= 1
    assert 0 <= summary["separation_first"] <= 1 and 0 <= summary["separation_last"] <= 1
    strip = Image.open(next(tmp_path.rglob("prism_evolution.png")))
    assert strip.size == (64 + 20 * 98 + 2, 3 * 98 + 2)  # inputs row + 2 logged epochs, 20 probe images


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
    summary = finetune.main(quick(logs, *data, "--model.backbone", "resnet18", "--trainer.max_epochs", "1"))
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


def test_photos_example_writes_the_png(tmp_path):
    path = prism_photos.main(str(tmp_path / "photos.png"))
    assert Image.open(path).size[0] == 2 + 3 * 226
