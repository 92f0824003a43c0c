"""lightning_prism.loggers: every backend, with its real local store, read back with its own client.

MLflow runs on a sqlite store, W&B in offline mode; both with telemetry and error reporting off, and
a guard that fails the test if Python opens a connection to anything but the loopback interface.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import finished_records, loaders, make_module_class
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_prism import PRISMMonitor
from lightning_prism.loggers import Picture, backend, log_pictures, save_file

TinyClassifier = make_module_class(pl)
NAMES = ["vertical", "horizontal"]
SCALARS = ("prism/explained_variance/pc1", "prism/similarity/previous", "prism/class_separation")


def fit(tmp_path, logger, epochs: int = 3) -> tuple[PRISMMonitor, TensorBoardLogger, pl.LightningModule]:
    """Fit with TensorBoard and ``logger``; return the monitor, the TensorBoard logger and the model."""
    torch.manual_seed(0)
    train, val = loaders()
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    monitor = PRISMMonitor(num_images=4, class_names=NAMES, knn_k=5)  # 16 validation samples
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[monitor],
        logger=[tb, logger],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = TinyClassifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    assert not [w for w in caught if "PRISMMonitor" in str(w.message)]
    return monitor, tb, module


def tensorboard_events(tb: TensorBoardLogger) -> EventAccumulator:
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def expected_captions(monitor: PRISMMonitor, module: pl.LightningModule) -> list[str]:
    """Captions of the last epoch, from the probe's labels and the final model's predictions."""
    dataset = loaders()[1].dataset
    indices = monitor.state_dict()["probe_indices"]
    images = torch.stack([dataset[i][0] for i in indices])
    labels = [int(dataset.targets[i]) for i in indices]
    with torch.no_grad():
        predictions = module.eval()(images).argmax(1).tolist()
    return [
        f"{NAMES[y]} → {NAMES[p]}" + (" ✗" if y != p else "")
        for y, p in zip(labels, predictions, strict=True)
    ]


# ---------------------------------------------------------------------- dispatch
def test_backend_recognises_the_loggers_of_both_lightning_packages(tmp_path):
    assert backend(TensorBoardLogger(str(tmp_path))) == "tensorboard"
    assert backend(CSVLogger(str(tmp_path))) == "none"
    lightning_loggers = pytest.importorskip("lightning.pytorch.loggers")
    assert backend(lightning_loggers.TensorBoardLogger(str(tmp_path))) == "tensorboard"
    assert backend(lightning_loggers.CSVLogger(str(tmp_path))) == "none"

    class MyTensorBoard(lightning_loggers.TensorBoardLogger):
        pass

    assert backend(MyTensorBoard(str(tmp_path))) == "tensorboard"


def test_a_logger_without_pictures_or_files_is_left_alone(tmp_path):
    logger = CSVLogger(str(tmp_path))
    assert log_pictures(logger, {"prism/maps": Picture(np.zeros((4, 4, 3), np.uint8))}, 0) is False
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []

    class Nowhere(pl.loggers.Logger):
        name, version = "nowhere", 0

        def log_hyperparams(self, *args, **kwargs) -> None: ...

        def log_metrics(self, *args, **kwargs) -> None: ...

    assert save_file(Nowhere(), "x.png", b"data") is None


# ---------------------------------------------------------------------- MLflow
MLFLOW_IMAGE = re.compile(
    r"images/(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]\d+[+%][0-9a-f-]+\.png"
)


def test_mlflow_gets_every_epochs_pictures_the_scalars_and_the_strip(tmp_path, offline):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger("prism", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    monitor, tb, _ = fit(tmp_path, logger)
    acc = tensorboard_events(tb)

    client = MlflowClient(tracking_uri=uri)  # a new client reads what the store holds
    run_id = logger.run_id
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert steps == [e.step for e in acc.Scalars("val_loss")] and len(steps) == 3
    for key in SCALARS:
        history = client.get_metric_history(run_id, key)
        assert [(m.step, pytest.approx(m.value)) for m in history] == [
            (e.step, e.value) for e in acc.Scalars(key)
        ]

    logged: dict[str, dict[int, str]] = {}
    for artifact in client.list_artifacts(run_id, "images"):
        match = MLFLOW_IMAGE.fullmatch(artifact.path)
        if match:
            key = match["key"].replace("~", "/").replace("#", "/")
            logged.setdefault(key, {})[int(match["step"])] = artifact.path
    assert sorted(logged) == ["prism/embedding", "prism/inputs", "prism/maps", "prism/overlay"]
    # Before training (step 0), then every epoch.
    assert sorted(logged["prism/maps"]) == sorted(logged["prism/overlay"]) == [0, *steps]
    assert sorted(logged["prism/inputs"]) == [0]
    for key in ("prism/maps", "prism/overlay"):  # the same captioned grid TensorBoard shows
        local = client.download_artifacts(run_id, logged[key][steps[-1]], str(tmp_path / "download"))
        np.testing.assert_array_equal(
            png(Path(local).read_bytes()), png(acc.Images(key)[-1].encoded_image_string)
        )

    assert "prism_evolution.png" in [a.path for a in client.list_artifacts(run_id)]
    strip = client.download_artifacts(run_id, "prism_evolution.png", str(tmp_path / "download"))
    assert Path(strip).read_bytes() == Path(tb.log_dir, "prism_evolution.png").read_bytes()
    assert monitor.evolution_paths[1].endswith("/artifacts/prism_evolution.png")


# ---------------------------------------------------------------------- W&B
def test_wandb_gets_captioned_pictures_every_epoch_and_the_strip(tmp_path, offline):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(project="prism", save_dir=str(tmp_path), offline=True)
    monitor, tb, module = fit(tmp_path, logger)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    acc = tensorboard_events(tb)

    rows, files = [], []
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            )
        elif record.WhichOneof("record_type") == "files":
            files += [f.path for f in record.files.files]

    def step_of(row: dict) -> int:
        return int(row["trainer/global_step"])

    steps = [step_of(r) for r in rows if "val_loss" in r]
    assert steps == [e.step for e in acc.Scalars("val_loss")] and len(steps) == 3
    for key in SCALARS:  # in the same row as the validation loss
        assert [step_of(r) for r in rows if key in r] == [e.step for e in acc.Scalars(key)]
    maps = [r for r in rows if "prism/maps/_type" in r]
    assert [step_of(r) for r in maps] == [0, *steps]  # before training, then every epoch
    assert [step_of(r) for r in rows if "prism/inputs/_type" in r] == [0]
    assert [step_of(r) for r in rows if "prism/overlay/_type" in r] == [0, *steps]

    # The last epoch: one image per probe image, captioned "true → predicted" (✗ when wrong).
    last = maps[-1]
    assert int(last["prism/maps/count"]) == 4
    assert json.loads(last["prism/maps/captions"]) == expected_captions(monitor, module)
    inputs_row = next(r for r in rows if "prism/inputs/_type" in r)
    assert json.loads(inputs_row["prism/inputs/captions"]) == [
        NAMES[int(loaders()[1].dataset.targets[i])] for i in monitor.state_dict()["probe_indices"]
    ]
    # Each W&B image is the tile TensorBoard's grid shows above its caption (inside the red frame
    # of a wrong prediction).
    grid = png(acc.Images("prism/maps")[-1].encoded_image_string)
    filenames = json.loads(last["prism/maps/filenames"])
    tiles = [png((run_dir / "files" / name).read_bytes()) for name in filenames]
    side = tiles[0].shape[0]
    assert side == 96  # 32-pixel maps enlarged three times
    for i, tile in enumerate(tiles):
        x0 = 2 + i * (side + 2)
        np.testing.assert_array_equal(tile[2:-2, 2:-2], grid[4:side, x0 + 2 : x0 + side - 2])

    assert "prism_evolution.png" in files
    stored = run_dir / "files" / "prism_evolution.png"
    assert stored.read_bytes() == Path(tb.log_dir, "prism_evolution.png").read_bytes()
    assert str(stored) in monitor.evolution_paths
