from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import Stripes, decode, events, loaders, make_module_class, trainer
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prism import PRISMMonitor, prism
from lightning_prism.probe import Probe
from lightning_prism.render import caption_grid

TinyClassifier = make_module_class(pl)
STEPS_PER_EPOCH = 4  # 32 training images, batch 8


def test_fit_logs_maps_every_epoch_and_the_last_equals_prism(tmp_path):
    torch.manual_seed(0)
    module, (train, val) = TinyClassifier(), loaders()
    monitor = PRISMMonitor(num_images=6, class_names=["vertical", "horizontal"])
    t = trainer(tmp_path, [monitor], max_epochs=3)
    t.fit(module, train, val)

    acc = events(t.logger.log_dir)
    for tag in ("prism/maps", "prism/overlay"):
        assert [e.step for e in acc.Images(tag)] == [STEPS_PER_EPOCH * k for k in (1, 2, 3)]
    assert [e.step for e in acc.Images("prism/inputs")] == [STEPS_PER_EPOCH]
    for i in (1, 2, 3):
        assert len(acc.Scalars(f"prism/explained_variance/pc{i}")) == 3
    assert [e.step for e in acc.Scalars("prism/similarity/previous")] == [8, 12]
    separation = [e.value for e in acc.Scalars("prism/class_separation")]
    assert len(separation) == 3 and all(0 <= s <= 1 for s in separation)

    # Probe: 6 images, spread over both classes, from the validation dataset.
    val_set = val.dataset
    indices = monitor.state_dict()["probe_indices"]
    assert len(indices) == 6 and sorted({int(val_set.targets[i]) for i in indices}) == [0, 1]

    # The last logged map equals prism() on the probe with the final weights, to uint8 rounding.
    images = torch.stack([val_set[i][0] for i in indices])
    labels = [int(val_set.targets[i]) for i in indices]
    reference = torch.tensor(monitor.state_dict()["reference"])
    expected = prism(module, images, basis="aligned", reference=reference)
    predictions = expected.output.argmax(1).tolist()
    names = ["vertical", "horizontal"]
    captions = [f"{names[y]} → {names[p]}" for y, p in zip(labels, predictions, strict=True)]
    grid = caption_grid(expected.maps, captions, [y != p for y, p in zip(labels, predictions, strict=True)])
    logged = decode(acc.Images("prism/maps")[-1])
    assert logged.shape == grid.shape
    assert np.abs(logged.astype(int) - grid.astype(int)).max() <= 1

    # No hook of ours during training or validation steps, and train flags intact in training.
    assert module.hook_counts and max(module.hook_counts) == 0
    assert all(module.flags_ok)
    # The evolution strip: a row of inputs plus one per logged epoch, one column per probe image.
    strip = Image.open(monitor.evolution_path)
    assert strip.size == (64 + 6 * 98 + 2, 4 * 98 + 2)


def test_every_n_epochs_and_dict_batches(tmp_path):
    torch.manual_seed(0)
    train, val = loaders(as_dict=True)
    t = trainer(tmp_path, [PRISMMonitor(num_images=4, every_n_epochs=2, prefix="dict")], max_epochs=4)
    t.fit(TinyClassifier(), train, val)
    acc = events(t.logger.log_dir)
    assert [e.step for e in acc.Images("dict/maps")] == [2 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH]


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
    recoloured = caption_grid(fresh.maps, *resumed._captions(resumed._probe, fresh)).astype(int)
    assert np.abs(recoloured - last_before).mean() > 10


def test_mixed_precision_training(tmp_path):
    # The probe pass runs under the trainer's bf16 autocast; the PCA and the logged numbers stay float32.
    torch.manual_seed(0)
    train, val = loaders()
    monitor = PRISMMonitor(num_images=4)
    t = trainer(tmp_path, [monitor], max_epochs=1, precision="bf16-mixed")
    t.fit(TinyClassifier(), train, val)
    acc = events(t.logger.log_dir)
    assert [e.step for e in acc.Images("prism/maps")] == [STEPS_PER_EPOCH]
    shares = [acc.Scalars(f"prism/explained_variance/pc{i}")[0].value for i in (1, 2, 3)]
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
    # the monitor. Sanity check (1 batch), validation (2) and the monitor's forward (1).
    assert module.eval_inference_modes == [False] * 4
    module.eval_inference_modes.clear()
    t.validate(module, val, verbose=False)
    assert module.eval_inference_modes == [inference_mode] * 3
    assert len(events(t.logger.log_dir).Images("prism/maps")) == 2


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
        UserWarning, match=r"PRISMMonitor skipped epoch 0: ValueError: final_layer 'model.9'"
    ) as caught:
        t.fit(module, train, val)
    assert sum("PRISMMonitor skipped" in str(w.message) for w in caught) == 1
    assert t.current_epoch == 3
    strict = trainer(tmp_path, [PRISMMonitor(final_layer="model.9", strict=True)])
    with pytest.raises(ValueError, match=r"final_layer 'model.9' produced shape \(8, 32\)"):
        strict.fit(TinyClassifier(), train, val)


def test_logger_without_images_gets_one_warning(tmp_path):
    train, val = loaders()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4)], max_epochs=2, logger=CSVLogger(str(tmp_path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(TinyClassifier(), train, val)
    assert sum("cannot log images to CSVLogger" in str(w.message) for w in caught) == 1


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
    assert monitor.state_dict() == {
        "probe_indices": None,
        "probe_options": {"num_images": 8, "indices": None, "dataloader_idx": 0},
        "reference": None,
        "first": None,
    }


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
    assert [e.step for e in events(logger.log_dir).Images("prism/maps")] == [4, 8]
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

    steps = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert [(key, step) for key, step, _ in listing.images] == [
        ("prism/maps", steps[0]),
        ("prism/overlay", steps[0]),
        ("prism/inputs", steps[0]),
        ("prism/maps", steps[1]),
        ("prism/overlay", steps[1]),
    ]
    acc = events(tb.log_dir)
    for key, step, images in listing.images:
        assert len(images) == 1 and images[0].dtype == np.uint8 and images[0].ndim == 3
        logged = next(e for e in acc.Images(key) if e.step == step)
        np.testing.assert_array_equal(images[0], decode(logged))  # PNG is lossless
    pc1 = [
        m["prism/explained_variance/pc1"] for _, m in listing.metrics if "prism/explained_variance/pc1" in m
    ]
    assert pc1 == pytest.approx([e.value for e in acc.Scalars("prism/explained_variance/pc1")])


def test_captions_name_classes_from_the_dataset_unless_given():
    probe = Probe(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), [0, 1], ["vertical", "horizontal"])
    result = SimpleNamespace(output=torch.tensor([[2.0, 1.0], [3.0, 0.0]]))  # predicts 0 and 0
    captions, wrong = PRISMMonitor()._captions(probe, result)
    assert captions == ["vertical → vertical", "horizontal → vertical"] and wrong == [False, True]
    captions, _ = PRISMMonitor(class_names=["v", "h"])._captions(probe, result)
    assert captions == ["v → v", "h → v"]
    captions, _ = PRISMMonitor()._captions(Probe(probe.images, probe.labels, [0, 1]), result)
    assert captions == ["0 → 0", "1 → 0"]
    # Hugging Face outputs carry `logits`; tuples lead with them.
    logits = result.output
    for output in ({"logits": logits, "loss": None}, SimpleNamespace(logits=logits), (logits, None)):
        captions, _ = PRISMMonitor()._captions(probe, SimpleNamespace(output=output))
        assert captions == ["vertical → vertical", "horizontal → vertical"]
