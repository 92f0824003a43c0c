"""The monitor across real training loops: reuse, resume, loggers, fast_dev_run, bad probe images."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import Stripes, decode, events, loaders, make_module_class, trainer
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from conftest import tiny_cnn
from lightning_prism import PRISMMonitor, prism
from lightning_prism.render import caption_grid, with_invalid_tiles

TinyClassifier = make_module_class(pl)


class Wide(TinyClassifier):
    """The same task with a 64-channel final feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_cnn(num_classes=2, width=64)


def caught_warnings(run) -> list[str]:
    """The monitor's warnings, but for the note of its validation-set metrics (with 16 validation
    samples, too few for the k-NN's k=20: tested in test_callback_validation.py)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [
        str(w.message)
        for w in caught
        if "PRISMMonitor" in str(w.message) and "validation-set metrics" not in str(w.message)
    ]


def test_a_monitor_reused_for_another_fit_starts_afresh(tmp_path):
    # A k-fold loop that builds the callback list once: fold 2 has other data and another model.
    torch.manual_seed(0)
    monitor = PRISMMonitor(num_images=4)
    train, val = loaders()
    first = trainer(tmp_path / "fold1", [monitor], max_epochs=2)
    first.fit(TinyClassifier(), train, val)
    assert len(monitor.state_dict()["first"]) == 32

    other_val = DataLoader(Stripes(20, seed=11), batch_size=5)
    second = trainer(tmp_path / "fold2", [monitor], max_epochs=3)
    messages = caught_warnings(lambda: second.fit(Wide(), train, other_val))
    assert messages == []  # no stale probe, no stale basis
    indices = monitor.state_dict()["probe_indices"]
    assert torch.equal(monitor._probe.images, other_val.dataset.images[indices])
    acc = events(second.logger.log_dir)
    assert len(acc.Images("prism/maps")) == 4 and len(acc.Images("prism/inputs")) == 1
    assert len(monitor.state_dict()["first"]) == 64
    steps = [e.step for e in acc.Scalars("val_loss")]
    assert [e.step for e in acc.Scalars("prism/similarity/first")] == steps  # first: fold 2's "before"
    strip = Image.open(monitor.evolution_path)
    assert monitor.evolution_path.startswith(str(tmp_path / "fold2"))
    assert strip.size[1] == (1 + 4) * 98 + 2  # inputs + fold 2's model before training and three epochs


def test_each_fit_of_a_reused_monitor_warns_afresh(tmp_path):
    monitor, (train, val) = PRISMMonitor(final_layer="model.9"), loaders()  # a 2-D output: fails
    for fold in ("1", "2"):
        t = trainer(tmp_path / fold, [monitor], max_epochs=2)
        (message,) = caught_warnings(lambda t=t: t.fit(TinyClassifier(), train, val))
        assert message.startswith(
            "PRISMMonitor skipped the row of the model before training: ValueError: final_layer 'model.9'"
        )


def test_a_restored_basis_that_does_not_fit_is_replaced_with_one_warning(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer(
        tmp_path / "a", [PRISMMonitor(num_images=4), checkpoint], max_epochs=1, enable_checkpointing=True
    ).fit(TinyClassifier(), train, val)
    # The saved basis no longer fits (as after a change of the final layer): 64 channels, not 32.
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    (key,) = [k for k in saved["callbacks"] if k.startswith("PRISMMonitor")]
    saved["callbacks"][key]["reference"] = saved["callbacks"][key]["first"] = np.eye(64, 3).tolist()
    torch.save(saved, path)

    resumed = PRISMMonitor(num_images=4)
    t = trainer(tmp_path / "b", [resumed], max_epochs=4)
    messages = caught_warnings(lambda: t.fit(TinyClassifier(), train, val, ckpt_path=str(path)))
    assert len(messages) == 1
    assert "the saved colour basis does not fit this model (reference basis has shape (64, 3)" in messages[0]
    assert "a fresh basis starts now" in messages[0]
    acc = events(t.logger.log_dir)
    steps = [e.step for e in acc.Scalars("val_loss")]
    assert (
        len(steps) == 3 and [e.step for e in acc.Images("prism/maps")] == steps
    )  # every epoch after the resume
    assert len(resumed.state_dict()["first"]) == 32


def test_validate_with_another_model_after_fit_gets_a_fresh_basis(tmp_path):
    train, val = loaders()
    monitor = PRISMMonitor(num_images=4)
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(TinyClassifier(), train, val)
    messages = caught_warnings(lambda: t.validate(Wide(), val, verbose=False))
    assert len(messages) == 1 and "a fresh basis starts now" in messages[0]
    assert len(events(t.logger.log_dir).Images("prism/maps")) == 3  # before, epoch 0, validate()


def resume(tmp_path, first: PRISMMonitor, second: PRISMMonitor, val=None):
    torch.manual_seed(0)
    train, default_val = loaders()
    val = val if val is not None else default_val
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer(tmp_path / "a", [first, checkpoint], max_epochs=1, enable_checkpointing=True).fit(
        TinyClassifier(), train, default_val
    )
    t = trainer(tmp_path / "b", [second], max_epochs=2)
    return caught_warnings(
        lambda: t.fit(TinyClassifier(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    )


def test_resuming_with_the_same_options_keeps_the_probe_silently(tmp_path):
    first, second = PRISMMonitor(num_images=5), PRISMMonitor(num_images=5)
    assert resume(tmp_path, first, second) == []
    assert second.state_dict()["probe_indices"] == first.state_dict()["probe_indices"]
    assert second.state_dict()["first"] == first.state_dict()["first"]  # the basis carries on


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"num_images": 3}, "was chosen with num_images=5; this monitor is configured with num_images=3"),
        ({"indices": [2, 7]}, "configured with num_images=2, indices=[2, 7], so it builds a new probe"),
    ],
)
def test_resuming_with_other_probe_options_says_what_happens(tmp_path, options, expected):
    first, second = PRISMMonitor(num_images=5), PRISMMonitor(**options)
    (message,) = resume(tmp_path, first, second)
    assert expected in message and "The colour basis carries on from the checkpoint" in message
    indices = second.state_dict()["probe_indices"]
    assert len(indices) == len(options.get("indices", [0, 0, 0]))
    assert indices == options.get("indices", indices)
    assert second.state_dict()["first"] == first.state_dict()["first"]


def test_resuming_on_other_validation_data_chooses_a_new_probe(tmp_path):
    first, second = PRISMMonitor(num_images=5), PRISMMonitor(num_images=5)
    small = DataLoader(Stripes(4, seed=5), batch_size=2)  # the saved index 4 does not exist here
    (message,) = resume(tmp_path, first, second, val=small)
    assert (
        "the checkpoint's probe indices [0, 1, 2, 3, 4] are not samples of this run's validation" in message
    )
    assert second.state_dict()["probe_indices"] == [0, 1, 2, 3]


class WithTestStep(TinyClassifier):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.cross_entropy(self(x), y))


def test_logger_false_is_an_error_only_where_the_monitor_logs(tmp_path):
    module, (train, val) = WithTestStep(), loaders()
    t = trainer(tmp_path, [PRISMMonitor()], logger=False)
    t.test(module, val, verbose=False)  # LightningCLI configs keep the monitor for test and predict
    assert len(t.predict(module, DataLoader(Stripes(4).images, batch_size=2))) == 2
    for run in (lambda: t.fit(module, train, val), lambda: t.validate(module, val)):
        with pytest.raises(MisconfigurationException, match=r"Trainer\(logger=False\)"):
            run()


@pytest.mark.parametrize(
    ("options", "before"),
    [
        ({"limit_val_batches": 0}, ""),  # no validation at all: no probe, not even before training
        ({"check_val_every_n_epoch": 3}, " (only those of the model before training)"),
    ],
)
def test_a_fit_without_validation_epochs_says_that_no_maps_were_logged(tmp_path, options, before):
    train, val = loaders()
    t = trainer(tmp_path, [PRISMMonitor()], max_epochs=2, **options)
    (message,) = caught_warnings(lambda: t.fit(TinyClassifier(), train, val))
    assert message.startswith(
        f"PRISMMonitor logged no maps of a training epoch in this fit{before}: no validation epoch ended"
    )


@pytest.mark.parametrize("views", [["prism"], ["prism", "grad_cam", "saliency"]])
def test_fast_dev_run_is_quiet_and_writes_no_file_into_the_working_directory(tmp_path, monkeypatch, views):
    """fast_dev_run switches logging off on purpose (its loggers become a DummyLogger): the monitor
    runs once, so that a bug shows up, and says nothing about the files it does not store."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    train, val = loaders()
    monitor = PRISMMonitor(num_images=4, strict=True, views=views)
    t = pl.Trainer(fast_dev_run=True, callbacks=[monitor], enable_progress_bar=False)
    assert caught_warnings(lambda: t.fit(TinyClassifier(), train, val)) == []
    assert monitor._reference is not None  # it ran
    assert os.listdir(work) == []


def test_a_nan_probe_image_is_named_and_the_others_keep_their_maps(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    val.dataset.images[5, 1, 3, 4] = float("nan")
    val.dataset.images[8, 0, 0, 0] = float("inf")
    monitor = PRISMMonitor(indices=[2, 5, 8, 11], class_names=["v", "h"])
    t = trainer(tmp_path, [monitor], max_epochs=2)
    module = TinyClassifier()
    messages = caught_warnings(lambda: t.fit(module, train, val))
    assert messages == [
        "PRISMMonitor: probe image(s) [1, 2] (dataset indices [5, 8]) contain NaN or infinite values; they "
        "are shown as invalid tiles and left out of the PCA, the other images get their maps."
    ]
    acc = events(t.logger.log_dir)
    assert [e.step for e in acc.Images("prism/maps")] == [0, *(e.step for e in acc.Scalars("val_loss"))]
    assert len(acc.Scalars("prism/explained_variance/pc1")) == 3
    # The last logged grid: prism() of the two finite images, the bad ones as invalid tiles.
    valid = torch.tensor([True, False, False, True])
    reference = torch.tensor(monitor.state_dict()["reference"])
    expected = prism(module, val.dataset.images[[2, 11]], basis="aligned", reference=reference)
    predictions = expected.output.argmax(1).tolist()
    names = ["v", "h"]
    captions = [
        f"v → {names[predictions[0]]}",
        "h: NaN/inf input",
        "v: NaN/inf input",
        f"h → {names[predictions[1]]}",
    ]
    marked = [predictions[0] != 0, True, True, predictions[1] != 1]
    grid = caption_grid(with_invalid_tiles(expected.maps, valid), captions, marked)
    logged = decode(acc.Images("prism/maps")[-1])
    assert np.abs(logged.astype(int) - grid.astype(int)).max() <= 1


def test_indices_that_validation_never_yields_are_refused(tmp_path):
    train, _ = loaders()
    shared = Stripes(16, seed=2)
    val = DataLoader(shared, batch_size=4, sampler=torch.utils.data.SubsetRandomSampler([0, 1, 2, 3]))
    t = trainer(tmp_path, [PRISMMonitor(indices=[1, 9])], max_epochs=2)
    messages = caught_warnings(lambda: t.fit(TinyClassifier(), train, val))
    assert (
        len(messages) == 1
        and "probe indices [9] are samples that the validation dataloader never" in messages[0]
    )
    assert "prism/maps" not in events(t.logger.log_dir).Tags()["images"]
    strict = trainer(tmp_path, [PRISMMonitor(indices=[1, 9], strict=True)])
    with pytest.raises(IndexError, match=r"probe indices \[9\] are samples that the validation dataloader"):
        strict.fit(TinyClassifier(), train, val)
