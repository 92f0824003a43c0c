from __future__ import annotations

import copy
import csv
import os
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import Stripes, decode, events, loaders, make_module_class, trainer
from PIL import Image
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_prism import PRISMMonitor, prism
from lightning_prism.probe import Probe
from lightning_prism.render import caption_grid

TinyClassifier = make_module_class(pl)
STEPS_PER_EPOCH = 4  # 32 training images, batch 8


def matplotlib_fonts() -> str:
    """A directory with other fonts than the bundled one (matplotlib ships DejaVu in several faces)."""
    matplotlib = pytest.importorskip("matplotlib")
    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


def val_steps(acc: EventAccumulator) -> list[int]:
    """The steps at which Lightning logged the validation loss: one per validation run."""
    return [e.step for e in acc.Scalars("val_loss")]


def test_fit_logs_maps_every_epoch_and_the_last_equals_prism(tmp_path):
    torch.manual_seed(0)
    module, (train, val) = TinyClassifier(), loaders()
    pretrained = copy.deepcopy(module)
    monitor = PRISMMonitor(num_images=6, class_names=["vertical", "horizontal"])
    t = trainer(tmp_path, [monitor], max_epochs=3)
    t.fit(module, train, val)

    acc = events(t.logger.log_dir)
    # Lightning logs end-of-epoch validation metrics before the epoch's last step is counted; the
    # model as loaded ("before") is logged at step 0, before the first optimiser step.
    steps = [STEPS_PER_EPOCH * k - 1 for k in (1, 2, 3)]
    assert val_steps(acc) == steps
    for tag in ("prism/maps", "prism/overlay"):
        assert [e.step for e in acc.Images(tag)] == [0, *steps]
    assert [e.step for e in acc.Images("prism/inputs")] == [0]
    for i in (1, 2, 3):
        assert [e.step for e in acc.Scalars(f"prism/explained_variance/pc{i}")] == [0, *steps]
    assert [e.step for e in acc.Scalars("prism/similarity/previous")] == steps
    assert [e.step for e in acc.Scalars("prism/similarity/first")] == steps  # the first: "before"
    separation = [e.value for e in acc.Scalars("prism/class_separation")]
    assert len(separation) == 4 and all(0 <= s <= 1 for s in separation)
    assert monitor._evolution.labels == ["before", "epoch 0", "epoch 1", "epoch 2"]

    # Probe: 6 images, spread over both classes, from the validation dataset.
    val_set = val.dataset
    indices = monitor.state_dict()["probe_indices"]
    assert len(indices) == 6 and sorted({int(val_set.targets[i]) for i in indices}) == [0, 1]

    # The first logged map is prism() of the model as loaded, the last of the final weights (aligned
    # with the saved basis), to uint8 rounding.
    images = torch.stack([val_set[i][0] for i in indices])
    labels = [int(val_set.targets[i]) for i in indices]
    names = ["vertical", "horizontal"]
    reference = torch.tensor(monitor.state_dict()["reference"])
    for logged, expected in (
        (acc.Images("prism/maps")[0], prism(pretrained, images)),
        (acc.Images("prism/maps")[-1], prism(module, images, basis="aligned", reference=reference)),
    ):
        predictions = expected.output.argmax(1).tolist()
        captions = [f"{names[y]} → {names[p]}" for y, p in zip(labels, predictions, strict=True)]
        marks = [y != p for y, p in zip(labels, predictions, strict=True)]
        grid = caption_grid(expected.maps, captions, marks)
        assert decode(logged).shape == grid.shape
        assert np.abs(decode(logged).astype(int) - grid.astype(int)).max() <= 1
    first = torch.tensor(monitor.state_dict()["first"], dtype=torch.float32)
    torch.testing.assert_close(first, prism(pretrained, images).components)

    # No hook of ours during training steps; during validation steps the validation set's capture
    # (PRISM's final layer, and the model's output), not in the sanity check; train flags intact.
    assert module.hook_counts and max(module.hook_counts) == 0
    sanity = 1  # num_sanity_val_steps
    assert module.val_hook_counts[:sanity] == [0] and set(module.val_hook_counts[sanity:]) == {2}
    assert all(module.flags_ok)
    # The evolution strip, in the logger's directory: a row of inputs, "before", then one per logged
    # epoch, one column per probe image after the labels.
    assert monitor.evolution_paths == [f"{t.logger.log_dir}/prism_evolution.png"]
    width, height = Image.open(monitor.evolution_path).size
    assert height == 5 * 98 + 2 and 6 * 98 + 2 < width < 6 * 98 + 2 + 120


def test_every_n_epochs_and_dict_batches(tmp_path):
    torch.manual_seed(0)
    train, val = loaders(as_dict=True)
    t = trainer(tmp_path, [PRISMMonitor(num_images=4, every_n_epochs=2, prefix="dict")], max_epochs=4)
    t.fit(TinyClassifier(), train, val)
    acc = events(t.logger.log_dir)
    assert [e.step for e in acc.Images("dict/maps")] == [0, 2 * STEPS_PER_EPOCH - 1, 4 * STEPS_PER_EPOCH - 1]
    assert [e.step for e in acc.Images("dict/maps")] == [0, *val_steps(acc)[1::2]]


def test_probe_from_the_chosen_validation_loader(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    second = torch.utils.data.DataLoader(Stripes(10, seed=7), batch_size=5)
    monitor = PRISMMonitor(indices=[1, 4, 9], dataloader_idx=1)
    trainer(tmp_path, [monitor], max_epochs=1).fit(TinyClassifier(), train, [val, second])
    assert torch.equal(monitor._probe.images, second.dataset.images[[1, 4, 9]])
    assert monitor._probe.labels.tolist() == second.dataset.targets[[1, 4, 9]].tolist()


def test_resume_keeps_the_colours(tmp_path):
    # basis="fixed": every epoch is projected onto the first logged epoch's axes, which training
    # has since moved away from; after a resume the colours must still come from those axes.
    torch.manual_seed(0)
    train, val = loaders()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = PRISMMonitor(num_images=6, basis="fixed")
    before = TensorBoardLogger(str(tmp_path), name="before", version=0)
    trainer(tmp_path, [first, checkpoint], max_epochs=3, logger=before, enable_checkpointing=True).fit(
        TinyClassifier(lr=0.2), train, val
    )

    class Frozen(TinyClassifier):  # training goes on, the weights do not change
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 0.0

    resumed, module = PRISMMonitor(num_images=6, basis="fixed"), Frozen(lr=0.2)
    after = TensorBoardLogger(str(tmp_path), name="after", version=0)
    trainer(tmp_path, [resumed], max_epochs=4, logger=after).fit(
        module, train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    last_before = decode(events(before.log_dir).Images("prism/maps")[-1]).astype(int)
    first_after = decode(events(after.log_dir).Images("prism/maps")[0]).astype(int)
    assert np.abs(first_after - last_before).max() <= 1
    assert resumed.state_dict()["first"] == first.state_dict()["first"]

    # Control: the same weights without the saved basis (a fresh PCA) give other colours.
    images = torch.stack([val.dataset[i][0] for i in resumed.state_dict()["probe_indices"]])
    fresh = prism(module, images)
    recoloured = caption_grid(fresh.maps, *resumed._captions(resumed._probe, fresh.output)).astype(int)
    assert np.abs(recoloured - last_before).mean() > 10


def test_mixed_precision_training(tmp_path):
    # The probe pass runs under the trainer's bf16 autocast; the PCA and the logged numbers stay float32.
    torch.manual_seed(0)
    train, val = loaders()
    monitor = PRISMMonitor(num_images=4)
    t = trainer(tmp_path, [monitor], max_epochs=1, precision="bf16-mixed")
    t.fit(TinyClassifier(), train, val)
    acc = events(t.logger.log_dir)
    assert [e.step for e in acc.Images("prism/maps")] == [0, *val_steps(acc)] == [0, STEPS_PER_EPOCH - 1]
    shares = [acc.Scalars(f"prism/explained_variance/pc{i}")[-1].value for i in (1, 2, 3)]
    assert (
        all(0 < v < 1 for v in shares) and sum(shares) <= 1 + 1e-6 and shares == sorted(shares, reverse=True)
    )
    assert monitor.evolution_path is not None


def test_validate_runs_under_inference_mode(tmp_path):
    module, (_, val) = TinyClassifier(), loaders()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4)])
    t.validate(module, val, verbose=False)
    assert len(events(t.logger.log_dir).Images("prism/maps")) == 1


@pytest.mark.parametrize("inference_mode", [True, False])
def test_forward_runs_in_the_grad_mode_lightning_chose_for_the_loop(tmp_path, inference_mode):
    (train, val), module = loaders(), TinyClassifier()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4)], max_epochs=1, inference_mode=inference_mode)
    t.fit(module, train, val)
    # During fit, validation runs under no_grad (inference tensors could reach training): so does
    # the monitor. Sanity check (1 batch), the model before training (the probe 1, the validation set
    # 2), validation (2) and the monitor's forward (1).
    assert module.eval_inference_modes == [False] * 7
    module.eval_inference_modes.clear()
    t.validate(module, val, verbose=False)
    assert module.eval_inference_modes == [inference_mode] * 3
    assert len(events(t.logger.log_dir).Images("prism/maps")) == 3


def test_logger_false_is_a_setup_error(tmp_path):
    train, val = loaders()
    t = trainer(tmp_path, [PRISMMonitor()], logger=False)
    with pytest.raises(
        MisconfigurationException, match=r"Cannot use `PRISMMonitor` callback with `Trainer\(logger=False\)`"
    ):
        t.fit(TinyClassifier(), train, val)


def test_unknown_layer_is_a_setup_error(tmp_path):
    train, val = loaders()
    t = trainer(tmp_path, [PRISMMonitor(final_layer="model.77")])
    with pytest.raises(
        ValueError, match=r"'model.77' is not a module of TinyClassifier; nearest valid names: 'model.7'"
    ):
        t.fit(TinyClassifier(), train, val)


def test_runtime_failure_warns_once_and_training_goes_on(tmp_path):
    train, val = loaders()
    module = TinyClassifier()
    # 'model.9' is the Flatten: a 2-D output, so PRISM fails at run time, every epoch.
    t = trainer(tmp_path, [PRISMMonitor(final_layer="model.9")], max_epochs=3)
    with pytest.warns(
        UserWarning,
        match=r"PRISMMonitor skipped the row of the model before training: ValueError: final_layer 'model.9'",
    ) as caught:
        t.fit(module, train, val)
    assert sum("PRISMMonitor skipped" in str(w.message) for w in caught) == 1
    assert t.current_epoch == 3
    strict = trainer(tmp_path, [PRISMMonitor(final_layer="model.9", strict=True)])
    with pytest.raises(ValueError, match=r"final_layer 'model.9' produced shape \(8, 32\)"):
        strict.fit(TinyClassifier(), train, val)


def test_logger_without_images_gets_one_warning_the_scalars_and_the_strip(tmp_path):
    train, val = loaders()
    monitor = PRISMMonitor(num_images=4, knn_k=5)  # 16 validation samples: k=20 would say too few
    t = trainer(tmp_path, [monitor], max_epochs=2, logger=CSVLogger(str(tmp_path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(TinyClassifier(), train, val)
    messages = [str(w.message) for w in caught if "PRISMMonitor" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("PRISMMonitor cannot log images to CSVLogger")
    assert "TensorBoardLogger, WandbLogger, MLFlowLogger" in messages[0]
    # The scalars share the row (and so the step) of the epoch's validation loss in metrics.csv; the
    # model before training has a row of its own at step 0.
    with open(os.path.join(t.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    before, *epochs = rows
    assert int(before["step"]) == 0 and before["prism/val/knn_accuracy"] and not before["val_loss"]
    for row, step in zip(epochs, (STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH - 1), strict=True):
        assert int(row["step"]) == step and row["val_loss"] and row["prism/explained_variance/pc1"]
        assert row["prism/val/knn_accuracy"] and row["prism/val/effective_rank"]
    assert all(row["prism/similarity/previous"] for row in epochs) and not before["prism/similarity/previous"]
    assert monitor.evolution_paths == [os.path.join(t.logger.log_dir, "prism_evolution.png")]


def test_scalars_are_callback_metrics_and_drive_checkpointing_and_early_stopping(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    checkpoint = ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), monitor="prism/class_separation", mode="max", save_top_k=1
    )
    t = trainer(tmp_path, [PRISMMonitor(num_images=6), checkpoint], max_epochs=4, enable_checkpointing=True)
    t.fit(TinyClassifier(lr=0.2), train, val)
    acc = events(t.logger.log_dir)
    before, *separation = [e.value for e in acc.Scalars("prism/class_separation")]  # step 0: before training
    assert 0 <= before <= 1 and len(separation) == 4 and len(set(separation)) > 1
    assert float(checkpoint.best_model_score) == pytest.approx(max(separation))
    best_epoch = separation.index(max(separation))
    assert os.path.basename(checkpoint.best_model_path).startswith(f"epoch={best_epoch}-")
    for tag in ("prism/class_separation", "prism/explained_variance/pc1", "prism/similarity/first"):
        assert float(t.callback_metrics[tag]) == pytest.approx(acc.Scalars(tag)[-1].value)

    # EarlyStopping on a score that cannot improve by 1 stops after `patience` + 1 epochs; a
    # missing key would raise instead.
    stopper = EarlyStopping(monitor="prism/class_separation", mode="max", min_delta=1.0, patience=1)
    t = trainer(tmp_path, [PRISMMonitor(num_images=6), stopper], max_epochs=10)
    t.fit(TinyClassifier(), train, val)
    assert t.current_epoch == 2 and stopper.stopped_epoch == 1


def test_scalars_and_pictures_keep_the_validation_step_when_global_step_differs(tmp_path):
    # Two optimizers stepped on every batch: global_step counts 2 per batch, Lightning's logging
    # step 1. Every picture and scalar sits at the step of its epoch's validation loss.
    class TwoOptimizers(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            for optimizer in self.optimizers():
                optimizer.zero_grad()
                self.manual_backward(super().training_step(batch, batch_idx))
                optimizer.step()

        def configure_optimizers(self):
            half = len(self.model) // 2
            return [torch.optim.SGD(self.model[:half].parameters(), lr=0.05),
                    torch.optim.SGD(self.model[half:].parameters(), lr=0.05)]  # fmt: skip

    train, val = loaders()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4)], max_epochs=2)
    t.fit(TwoOptimizers(), train, val)
    assert t.global_step == 2 * 2 * STEPS_PER_EPOCH
    acc = events(t.logger.log_dir)
    steps = val_steps(acc)
    assert steps == [STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH - 1]
    assert [e.step for e in acc.Images("prism/maps")] == [0, *steps]
    assert [e.step for e in acc.Scalars("prism/explained_variance/pc1")] == [0, *steps]


def test_two_validations_per_epoch_log_twice_at_their_own_steps(tmp_path):
    train, val = loaders(batch_size=4)  # 8 training batches per epoch, validation after 4 and 8
    monitor = PRISMMonitor(num_images=4)
    t = trainer(tmp_path, [monitor], max_epochs=2, val_check_interval=0.5)
    t.fit(TinyClassifier(), train, val)
    acc = events(t.logger.log_dir)
    assert val_steps(acc) == [3, 7, 11, 15]
    assert [e.step for e in acc.Images("prism/maps")] == [0, *val_steps(acc)]
    pc1 = [e.value for e in acc.Scalars("prism/explained_variance/pc1")]
    assert [e.step for e in acc.Scalars("prism/explained_variance/pc1")] == [0, *val_steps(acc)]
    assert len(set(pc1)) == 5  # each validation's own value, not an average over the epoch
    assert monitor._evolution.labels == ["before", "epoch 0", "epoch 0", "epoch 1", "epoch 1"]


def test_the_strip_covers_the_whole_run_after_a_resume(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = PRISMMonitor(num_images=4)
    before = TensorBoardLogger(str(tmp_path), name="before", version=0)
    trainer(tmp_path, [first, checkpoint], max_epochs=3, logger=before, enable_checkpointing=True).fit(
        TinyClassifier(), train, val
    )
    resumed = PRISMMonitor(num_images=4)
    after = TensorBoardLogger(str(tmp_path), name="after", version=0)
    trainer(tmp_path, [resumed], max_epochs=5, logger=after).fit(
        TinyClassifier(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    # The row of the model before training comes from the first run: the resumed run logs none.
    assert resumed._evolution.labels == ["before", *(f"epoch {e}" for e in range(5))]
    assert 0 not in [e.step for e in events(after.log_dir).Images("prism/maps")]
    assert Image.open(resumed.evolution_path).size[1] == 7 * 98 + 2
    # The rows from before the resume are the ones the first run drew.
    before_strip = np.asarray(Image.open(first.evolution_path))
    after_strip = np.asarray(Image.open(resumed.evolution_path))
    np.testing.assert_array_equal(after_strip[: 5 * 98 + 2], before_strip)
    # A fit without a checkpoint starts a new strip.
    fresh = TensorBoardLogger(str(tmp_path), name="fresh", version=0)
    trainer(tmp_path, [resumed], max_epochs=1, logger=fresh).fit(TinyClassifier(), train, val)
    assert resumed._evolution.labels == ["before", "epoch 0"]


def test_a_long_run_has_a_bounded_strip_and_a_small_checkpoint(tmp_path):
    train, val = loaders()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    monitor = PRISMMonitor(num_images=4, evolution_rows=3)
    t = trainer(tmp_path, [monitor, checkpoint], max_epochs=7, enable_checkpointing=True)
    t.fit(TinyClassifier(), train, val)
    assert monitor._evolution.labels == ["before", "epoch 3", "epoch 6"]
    assert Image.open(monitor.evolution_path).size[1] == 4 * 98 + 2
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][monitor.state_key]
    assert len(saved["evolution"]["rows"]) == 3
    # Three rows and the inputs, four 96-pixel JPEG thumbnails each: less than one row would take raw.
    assert len(pickle.dumps(saved)) < 4 * 96 * 96 * 3


def test_the_strip_never_lands_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, val = loaders()
    monitor = PRISMMonitor(num_images=4)
    t = trainer(tmp_path, [monitor], max_epochs=1, logger=ImageListLogger())
    with pytest.warns(
        UserWarning,
        match=r"PRISMMonitor did not save prism_evolution.png: none of the loggers \(ImageListLogger\)",
    ):
        t.fit(TinyClassifier(), train, val)
    assert monitor.evolution_paths == [] and list(tmp_path.rglob("*.png")) == []


def test_the_strip_goes_to_every_logger_that_stores_files(tmp_path):
    train, val = loaders()
    monitor = PRISMMonitor(num_images=4, prefix="run/prism")
    tb, csv_logger = TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")
    trainer(tmp_path, [monitor], max_epochs=1, logger=[tb, csv_logger]).fit(TinyClassifier(), train, val)
    expected = [os.path.join(d, "run_prism_evolution.png") for d in (tb.log_dir, csv_logger.log_dir)]
    assert monitor.evolution_paths == expected
    assert Path(expected[0]).read_bytes() == Path(expected[1]).read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0}, r"num_images must be an integer >= 1, got 0"),
        ({"every_n_epochs": 1.5}, r"every_n_epochs must be an integer >= 1, got 1.5"),
        ({"indices": []}, r"indices must be a non-empty list of dataset indices"),
        ({"indices": [1, 1]}, r"indices must be distinct, got \[1, 1\]"),
        ({"indices": [-1]}, r"every entry of indices must be an integer >= 0, got -1"),
        ({"basis": "pretty"}, r"basis must be one of \('refit', 'aligned', 'fixed'\), got 'pretty'"),
        ({"mean": [0.5]}, r"mean and std must be given together"),
        ({"mean": [0.5, 0.5], "std": [0.5, 0.5]}, r"lists of 1 or 3 numbers"),
        ({"mean": [0.5], "std": [0.0]}, r"std must be positive"),
        ({"prefix": ""}, r"prefix must be a non-empty tag"),
        ({"prefix": "prism/"}, r"prefix must be a non-empty tag such as 'prism' or 'monitor/prism'"),
        ({"prefix": "my prism"}, r"\(letters, digits, '_' and '-', parts separated by '/'\), got 'my prism'"),
        ({"prefix": "prism:v1"}, r"got 'prism:v1'"),
        ({"evolution_rows": 1}, r"evolution_rows must be an integer >= 2, got 1"),
        (
            {"font": "/no/such/font.ttf"},
            r"font must be a TrueType/OpenType font file, got '/no/such/font.ttf'",
        ),
        ({"overlay_alpha": 2}, r"overlay_alpha must be in \[0, 1\], got 2"),
        ({"image_key": 1.0}, r"image_key must be None \(find it\), an int position or a str key, got 1.0"),
        ({"stage_layers": "layer1"}, r"stage_layers must be a list of module names, got the string 'layer1'"),
        (
            {"dataloader_idx": -1},
            r"dataloader_idx must be an integer >= 0 \(position\) or a dict key, got -1",
        ),
        (
            {"dataloader_idx": ""},
            r"dataloader_idx must be an integer >= 0 \(position\) or a dict key, got ''",
        ),
        ({"module": ""}, r"module must be None \(the LightningModule\) or the dotted name of a submodule"),
        (
            {"module": 3},
            r"module must be None \(the LightningModule\) or the dotted name of a submodule, got 3",
        ),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PRISMMonitor(**kwargs)


def test_state_key_distinguishes_monitors():
    assert PRISMMonitor(final_layer="a").state_key != PRISMMonitor(final_layer="b").state_key
    assert PRISMMonitor().state_key == PRISMMonitor().state_key
    monitor = PRISMMonitor()
    monitor.load_state_dict({})  # keys added by newer versions default sensibly
    state = monitor.state_dict()
    assert {k: state[k] for k in ("probe_indices", "reference", "first")} == dict.fromkeys(
        ("probe_indices", "reference", "first")
    )
    assert state["probe_options"] == {"num_images": 8, "indices": None, "dataloader_idx": 0}
    assert state["evolution"]["rows"] == [] and state["evolution"]["inputs"] is None


def test_works_with_the_lightning_package_trainer(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning_prism.lightning import PRISMMonitor as LightningPRISMMonitor

    assert isinstance(LightningPRISMMonitor(), lightning.Callback)
    module_cls = make_module_class(lightning)
    train, val = loaders()
    logger = lightning.loggers.TensorBoardLogger(str(tmp_path), name="L", version=0)
    monitor = LightningPRISMMonitor(num_images=4)
    t = trainer(tmp_path, [monitor], max_epochs=2, logger=logger, trainer_cls=lightning.Trainer)
    t.fit(module_cls(), train, val)
    acc = events(logger.log_dir)
    assert [e.step for e in acc.Images("prism/maps")] == [0, *val_steps(acc)] == [0, 3, 7]
    assert "prism/explained_variance/pc1" in t.callback_metrics
    assert monitor.evolution_path is not None

    from lightning.fabric.utilities.exceptions import MisconfigurationException as LightningMisconfiguration

    t = trainer(tmp_path, [LightningPRISMMonitor()], logger=False, trainer_cls=lightning.Trainer)
    with pytest.raises(
        LightningMisconfiguration, match=r"Cannot use `PRISMMonitor` callback with `Trainer\(logger=False\)`"
    ):
        t.fit(module_cls(), train, val)


class ImageListLogger(pl.loggers.Logger):
    """A logger in the style of WandbLogger: no TensorBoard writer, images through ``log_image``."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, int, list[np.ndarray]]] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "images"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs) -> None:
        self.images.append((key, step, images))


def test_log_image_loggers_get_the_same_pictures_as_tensorboard(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    tb, listing = TensorBoardLogger(str(tmp_path), name="tb", version=0), ImageListLogger()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4)], max_epochs=2, logger=[tb, listing])
    t.fit(TinyClassifier(), train, val)

    steps = [0, STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH - 1]  # before training, then every epoch
    assert [(key, step) for key, step, _ in listing.images] == [
        ("prism/maps", 0),
        ("prism/overlay", 0),
        ("prism/inputs", 0),
        ("prism/embedding", 0),
        *((key, step) for step in steps[1:] for key in ("prism/maps", "prism/overlay", "prism/embedding")),
    ]
    acc = events(tb.log_dir)
    for key, step, images in listing.images:
        assert len(images) == 1 and images[0].dtype == np.uint8 and images[0].ndim == 3
        logged = next(e for e in acc.Images(key) if e.step == step)
        np.testing.assert_array_equal(images[0], decode(logged))  # PNG is lossless
    pc1 = [
        (step, m["prism/explained_variance/pc1"])
        for step, m in listing.metrics
        if "prism/explained_variance/pc1" in m
    ]
    assert pc1 == [(e.step, pytest.approx(e.value)) for e in acc.Scalars("prism/explained_variance/pc1")]


def test_captions_name_classes_from_the_dataset_unless_given():
    probe = Probe(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), [0, 1], ["vertical", "horizontal"])
    result = SimpleNamespace(output=torch.tensor([[2.0, 1.0], [3.0, 0.0]]))  # predicts 0 and 0
    captions, wrong = PRISMMonitor()._captions(probe, result.output)
    assert captions == ["vertical → vertical", "horizontal → vertical"] and wrong == [False, True]
    captions, _ = PRISMMonitor(class_names=["v", "h"])._captions(probe, result.output)
    assert captions == ["v → v", "h → v"]
    captions, _ = PRISMMonitor()._captions(Probe(probe.images, probe.labels, [0, 1]), result.output)
    assert captions == ["0 → 0", "1 → 0"]
    # Hugging Face outputs carry `logits`; tuples lead with them.
    logits = result.output
    for output in ({"logits": logits, "loss": None}, SimpleNamespace(logits=logits), (logits, None)):
        captions, _ = PRISMMonitor()._captions(probe, output)
        assert captions == ["vertical → vertical", "horizontal → vertical"]


def test_scalars_keep_their_names_with_two_validation_loaders_and_in_validate(tmp_path):
    train, val = loaders()
    second = torch.utils.data.DataLoader(Stripes(10, seed=7), batch_size=5)
    monitor = PRISMMonitor(num_images=4)
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(TinyClassifier(), train, [val, second])
    assert "prism/explained_variance/pc1" in t.callback_metrics
    assert not [k for k in t.callback_metrics if k.startswith("prism") and "dataloader_idx" in k]
    # validate() returns them with the validation metrics; it adds no row to the fit's strip.
    (results, _) = t.validate(t.lightning_module, [val, second], verbose=False)
    assert results["prism/explained_variance/pc1"] == pytest.approx(
        float(t.callback_metrics["prism/explained_variance/pc1"])
    )
    assert monitor._evolution.labels == ["before", "epoch 0"]


def test_captions_in_another_script_warn_once_and_take_a_font(tmp_path):
    train, val = loaders()
    monitor = PRISMMonitor(num_images=4, class_names=["縦", "横"])
    t = trainer(tmp_path, [monitor], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(TinyClassifier(), train, val)
    messages = [str(w.message) for w in caught if "glyph" in str(w.message)]
    assert len(messages) == 1 and "'縦横'" in messages[0] and "font=" in messages[0]
    # Another font (here DejaVu Sans, the regular face) draws the captions.
    regular = Path(matplotlib_fonts(), "DejaVuSans.ttf")
    bold = PRISMMonitor(num_images=4, class_names=["v", "h"])
    other = PRISMMonitor(num_images=4, class_names=["v", "h"], font=str(regular))
    grids = []
    for name, m in (("bold", bold), ("regular", other)):
        logger = TensorBoardLogger(str(tmp_path), name=name, version=0)
        torch.manual_seed(0)
        trainer(tmp_path, [m], max_epochs=1, logger=logger).fit(TinyClassifier(), train, val)
        grids.append(decode(events(logger.log_dir).Images("prism/maps")[-1]))
    assert grids[0].shape == grids[1].shape and (grids[0] != grids[1]).any()
    h = 96  # 32-pixel tiles, enlarged three times: the tiles agree, the captions differ
    np.testing.assert_array_equal(grids[0][2 : 2 + h], grids[1][2 : 2 + h])


def test_every_n_epochs_scalars_drive_a_checkpoint_on_the_same_schedule(tmp_path):
    # The scalars exist only in the epochs the monitor runs: a ModelCheckpoint on them runs then too.
    train, val = loaders()
    checkpoint = ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), monitor="prism/class_separation", mode="max", every_n_epochs=2
    )
    t = trainer(
        tmp_path,
        [PRISMMonitor(num_images=6, every_n_epochs=2), checkpoint],
        max_epochs=4,
        enable_checkpointing=True,
    )
    t.fit(TinyClassifier(), train, val)
    before, *separation = [e.value for e in events(t.logger.log_dir).Scalars("prism/class_separation")]
    assert (
        0 <= before <= 1
        and len(separation) == 2
        and float(checkpoint.best_model_score) == pytest.approx(max(separation))
    )
