"""Every kind of image classifier gets the right captions and gradient views, read where its user reads
them: a single-logit binary classifier trained as Lightning's own transfer-learning example is (a
frozen backbone, a head ending in one logit, ``binary_cross_entropy_with_logits``), run through
LightningCLI with the monitor added on the command line; a multi-label classifier (independent
sigmoids, multi-hot labels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import (
    Stripes,
    decode,
    events,
    finished_records,
    served_image,
    tensorboard_server,
    wait_for_images,
)
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import readme_tensorboard_flags
from lightning_prism import PRISMMonitor, grad_cam, prism, saliency
from lightning_prism.render import caption_grid

CATS_DOGS = ["cats", "dogs"]


# ------------------------------------------------------------------ a single-logit binary classifier
class CatsDogs(Stripes):
    """Two classes as ``ImageFolder`` names them (``classes``), integer labels."""

    classes = CATS_DOGS


class CatsDogsData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(CatsDogs(16, seed=1), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(CatsDogs(12, seed=2), batch_size=self.batch_size)


class TransferLearning(pl.LightningModule):
    """The shape of Lightning's ``computer_vision_fine_tuning.py``: a frozen feature extractor, a head
    of linear layers ending in one logit, binary cross-entropy with logits. ``bias`` starts the last
    layer so that every image is predicted a dog, as in the run the issue reports.

    Args:
        bias: the starting bias of the logit.
        lr: Adam's learning rate.
    """

    def __init__(self, bias: float = 6.0, lr: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.feature_extractor.requires_grad_(False)
        self.fc = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
        with torch.no_grad():
            self.fc[-1].bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feature_extractor(x).squeeze(-1).squeeze(-1))

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x), y.view(-1, 1).type_as(x))

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def test_a_single_logit_classifier_from_lightning_cli_gets_its_own_predictions_in_the_captions(
    tmp_path, offline
):
    wandb = pytest.importorskip("wandb")
    torch.manual_seed(0)
    cli = LightningCLI(
        TransferLearning,
        CatsDogsData,
        args=[
            "fit",
            "--trainer.max_epochs=2",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=pytorch_lightning.loggers.WandbLogger",
            "--trainer.logger.offline=true",
            f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.callbacks+=lightning_prism.PRISMMonitor",
            "--trainer.callbacks.num_images=6",
            "--trainer.callbacks.views=[prism, grad_cam]",
        ],
        save_config_callback=None,
    )
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, PRISMMonitor)]
    run_dir = Path(cli.trainer.logger.experiment.dir).parent
    wandb.finish()

    # Independently: the probe's labels, and the final model's predictions (class 1 where the logit > 0).
    dataset = CatsDogs(12, seed=2)
    indices = monitor.state_dict()["probe_indices"]
    labels = [int(dataset.targets[i]) for i in indices]
    with torch.no_grad():
        logits = cli.model.eval()(torch.stack([dataset[i][0] for i in indices]))[:, 0]
    predicted = (logits > 0).long().tolist()
    assert predicted == [1] * 6 and sorted(set(labels)) == [0, 1]  # a dog everywhere, as reported
    expected = [
        f"{CATS_DOGS[y]} → {CATS_DOGS[p]}" + (" ✗" if y != p else "")
        for y, p in zip(labels, predicted, strict=True)
    ]

    # What W&B shows under each image, read from the offline run's own transaction log.
    rows = [
        {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
        for record in finished_records(run_dir)
        if record.WhichOneof("record_type") == "history"
    ]
    for tag in ("prism/maps", "prism/grad_cam"):
        last = [r for r in rows if f"{tag}/_type" in r][-1]
        assert json.loads(last[f"{tag}/captions"]) == expected, tag
    assert "cats → dogs ✗" in expected and "dogs → dogs" in expected


class Keeping(PRISMMonitor):
    """Keeps what the views computed in the last epoch."""

    def _views(self, *args):
        out = super()._views(*args)
        self.kept = (args[1], out)
        return out


@pytest.mark.parametrize("target", ["prediction", "label"])
def test_the_gradient_views_of_a_single_logit_classifier_explain_the_class_it_names(tmp_path, target):
    """Grad-CAM of a "cats" (class 0) image shows the evidence for cats: the negated logit."""
    torch.manual_seed(0)
    monitor = Keeping(num_images=6, views=["prism", "grad_cam", "saliency"], target=target, strict=True)
    module, data = TransferLearning(bias=0.0, lr=0.0), CatsDogsData()
    with torch.no_grad():  # half the validation images on each side of 0
        module.fc[-1].bias -= module(data.val_dataloader().dataset.images)[:, 0].median()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[monitor], logger=TensorBoardLogger(str(tmp_path)), accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    images, out = monitor.kept
    labels = monitor._probe.labels
    with torch.no_grad():
        logits = module.eval()(images)[:, 0]
    classes = (logits > 0).long() if target == "prediction" else labels
    assert 0 < int(classes.sum()) < len(classes)  # both classes explained
    # Against the plain functions told the class, and class 0 against a model that outputs the negation.
    torch.testing.assert_close(out.maps["grad_cam"], grad_cam(module, images, classes).maps)
    torch.testing.assert_close(out.maps["saliency"], saliency(module, images, classes).maps)
    negated = nn.Sequential(module, nn.Linear(1, 1))
    with torch.no_grad():
        negated[1].weight.fill_(-1.0)
        negated[1].bias.zero_()
    zeros = classes == 0
    torch.testing.assert_close(
        out.maps["grad_cam"][zeros],
        grad_cam(negated, images[zeros], targets=1, layer="0.feature_extractor.4").maps,
    )


# ------------------------------------------------------------------ a multi-label classifier
ATTRIBUTES = ["striped", "bright", "noisy"]


class Attributes(Dataset):
    """Images with multi-hot float labels over three attributes, as dict samples."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g)
        self.labels = (torch.rand(n, 3, generator=g) > 0.5).float()
        self.labels[0] = 0  # one image with no attribute at all
        self.classes = ATTRIBUTES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "labels": self.labels[i]}


class MultiLabel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.binary_cross_entropy_with_logits(self(batch["image"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.log(
            "val_loss", nn.functional.binary_cross_entropy_with_logits(self(batch["image"]), batch["labels"])
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def label_set(row) -> str:
    chosen = [ATTRIBUTES[i] for i, on in enumerate(row) if on]
    return ", ".join(chosen) if chosen else "∅"


def test_a_multi_label_classifier_shows_label_sets_and_predicted_sets(tmp_path, offline):
    wandb = pytest.importorskip("wandb")
    torch.manual_seed(0)
    monitor = Keeping(num_images=6, views=["prism", "grad_cam"])
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    wb = WandbLogger(project="prism", save_dir=str(tmp_path), offline=True)
    module, train, val = MultiLabel(), Attributes(24, seed=1), Attributes(16, seed=2)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[monitor], logger=[tb, wb], accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8))
    run_dir = Path(wb.experiment.dir).parent
    wandb.finish()

    indices = monitor.state_dict()["probe_indices"]
    truth = val.labels[indices].long()
    # The probe spreads over the labels: every attribute, and an image with none.
    assert truth.any(dim=0).all() and not truth[0].any() and 0 in indices
    assert monitor._probe.multi_hot and torch.equal(monitor._probe.labels, truth)
    images = val.images[indices]
    with torch.no_grad():
        scores = module.eval()(images)
    predicted = torch.sigmoid(scores) > 0.5
    expected = [f"{label_set(t)} → {label_set(p)}" for t, p in zip(truth, predicted, strict=True)]
    wrong = [bool((t.bool() != p).any()) for t, p in zip(truth, predicted, strict=True)]
    assert any(wrong) and not all(wrong)

    # W&B's caption text under each image.
    rows = [
        {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
        for record in finished_records(run_dir)
        if record.WhichOneof("record_type") == "history"
    ]
    last = [r for r in rows if "prism/maps/_type" in r][-1]
    marked = [text + (" ✗" if w else "") for text, w in zip(expected, wrong, strict=True)]
    assert json.loads(last["prism/maps/captions"]) == marked
    inputs = next(r for r in rows if "prism/inputs/_type" in r)
    assert json.loads(inputs["prism/inputs/captions"]) == [label_set(t) for t in truth]

    # The picture the TensorBoard server shows: PRISM's maps with those captions, wrong sets in red.
    written = events(tb.log_dir).Images("prism/maps")
    with tensorboard_server(tmp_path, readme_tensorboard_flags()) as base:
        served = wait_for_images(base, "tb/version_0", "prism/maps", len(written))
        assert [e["step"] for e in served] == [e.step for e in written]
        shown = served_image(base, served[-1])
    reference = torch.tensor(monitor.state_dict()["reference"])
    grid = caption_grid(prism(module, images, basis="aligned", reference=reference).maps, expected, wrong)
    assert shown.shape == grid.shape and np.abs(shown.astype(int) - grid.astype(int)).max() <= 1
    np.testing.assert_array_equal(shown, decode(written[-1]))

    # Grad-CAM explains each image's highest-scoring label.
    kept_images, out = monitor.kept
    torch.testing.assert_close(out.maps["grad_cam"], grad_cam(module, kept_images, scores.argmax(1)).maps)


def test_task_says_what_scores_cannot_tell_and_a_wrong_task_is_one_warning(tmp_path):
    torch.manual_seed(0)
    probe_images = Attributes(16, seed=2).images[:4]
    module = MultiLabel().eval()
    with torch.no_grad():
        scores = module(probe_images)
    from lightning_prism.probe import Probe

    unlabelled = Probe(probe_images, None, [0, 1, 2, 3], ATTRIBUTES)
    as_sets, _ = PRISMMonitor(task="multilabel")._captions(unlabelled, scores)
    assert as_sets == [f"? → {label_set(s > 0)}" for s in scores]
    as_classes, _ = PRISMMonitor()._captions(unlabelled, scores)  # nothing says multi-label: the argmax
    assert as_classes == [f"? → {ATTRIBUTES[int(i)]}" for i in scores.argmax(1)]
    monitor = PRISMMonitor(task="binary")
    with pytest.warns(
        UserWarning, match=r"task='binary'\) does not fit this model: task='binary' needs a single"
    ):
        monitor._captions(unlabelled, scores)
    with pytest.raises(ValueError, match=r"task must be None \(inferred\) or one of .* got 'sigmoid'"):
        PRISMMonitor(task="sigmoid")
