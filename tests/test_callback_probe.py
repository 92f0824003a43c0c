"""The probe is exactly a validation batch: Trainer-level tests of where it comes from and what the
model receives."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import Stripes, events, loaders, make_module_class, trainer
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Subset, SubsetRandomSampler

from conftest import tiny_cnn
from lightning_prism import PRISMMonitor

TinyClassifier = make_module_class(pl)


class Recorder(TinyClassifier):
    """Keeps what ``validation_step`` received and what every other eval forward (the monitor's)
    received."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step_inputs: list[torch.Tensor] = []
        self.probe_inputs: list[torch.Tensor] = []
        self._stepping = False

    def forward(self, x):
        if not self.training:
            (self.step_inputs if self._stepping else self.probe_inputs).append(x.detach().clone())
        return super().forward(x)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._stepping = True
        try:
            return super().validation_step(batch, batch_idx, dataloader_idx)
        finally:
            self._stepping = False

    def received_in_validation(self, image: torch.Tensor) -> bool:
        return any((rows == image).flatten(1).all(1).any() for rows in self.step_inputs)


def prism_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "PRISMMonitor" in str(w.message)]


class DictToTuple(pl.LightningDataModule):
    """Batches are dicts; the DataModule's ``on_before_batch_transfer`` turns them into tuples."""

    def train_dataloader(self):
        return DataLoader(Stripes(16, seed=1, as_dict=True), batch_size=8)

    def val_dataloader(self):
        return DataLoader(Stripes(12, seed=2, as_dict=True), batch_size=4)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch["image"], batch["label"]


class Normalising(Recorder):
    """Normalises on the device, in ``on_after_batch_transfer`` (Lightning's place for it), and
    counts transfers."""

    def __init__(self) -> None:
        super().__init__()
        self.transfers: list[bool] = []  # whether each transfer was for training

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.transfers.append(self.trainer.training)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return (x - 0.5) / 0.25, y


def test_the_probe_goes_through_every_batch_hook(tmp_path):
    torch.manual_seed(0)
    module, data, monitor = Normalising(), DictToTuple(), PRISMMonitor(num_images=5)
    trainer(tmp_path, [monitor], max_epochs=2).fit(module, datamodule=data)
    dataset = data.val_dataloader().dataset
    indices = monitor.state_dict()["probe_indices"]
    expected = (dataset.images[indices] - 0.5) / 0.25
    assert torch.equal(monitor._probe.images, expected)
    assert monitor._probe.labels.tolist() == dataset.targets[indices].tolist()
    # The monitor's forwards: the probe before training, the validation set before training (three
    # batches), then the probe once per epoch; each on exactly what validation_step receives.
    assert len(module.probe_inputs) == 1 + 3 + 2
    for received in [module.probe_inputs[0], *module.probe_inputs[4:]]:
        assert torch.equal(received, expected)
        assert all(module.received_in_validation(image) for image in received)
    for batch in module.probe_inputs[1:4]:
        assert all(module.received_in_validation(image) for image in batch)
    assert sum(len(batch) for batch in module.probe_inputs[1:4]) == len(dataset)
    # Outside training: the sanity check (1 batch) and 2 epochs × 3 validation batches. In training:
    # 2 epochs × 2 batches, and the monitor's transfers before the first step: the probe's one and the
    # validation set's three.
    assert module.transfers.count(False) == 1 + 2 * 3
    assert module.transfers.count(True) == 2 * 2 + 1 + 3


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
def test_the_probe_has_the_precision_of_validation_batches(tmp_path, precision, dtype):
    torch.manual_seed(0)
    module, (train, val) = Recorder(), loaders()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4)], max_epochs=1, precision=precision)
    t.fit(module, train, val)
    assert module.probe_inputs[0].dtype == dtype == module.step_inputs[0].dtype
    assert all(module.received_in_validation(image) for image in module.probe_inputs[0])
    assert len(events(t.logger.log_dir).Images("prism/maps")) == 2  # before training, epoch 0


def test_a_sampler_over_a_shared_dataset_gives_only_validation_samples(tmp_path):
    shared = Stripes(48, seed=4)
    validation = [1, 6, 13, 20, 27, 34, 41, 44]
    training = [i for i in range(48) if i not in validation]
    chosen = []
    for seed in (0, 1):  # another seed: the same probe
        pl.seed_everything(seed)
        train = DataLoader(Subset(shared, training), batch_size=8, shuffle=True)
        val = DataLoader(shared, batch_size=4, sampler=SubsetRandomSampler(validation))
        module, monitor = Recorder(), PRISMMonitor(num_images=6)
        trainer(tmp_path / str(seed), [monitor], max_epochs=1).fit(module, train, val)
        indices = monitor.state_dict()["probe_indices"]
        assert set(indices) <= set(validation) and len(indices) == 6
        assert {int(shared.targets[i]) for i in indices} == {0, 1}
        assert all(module.received_in_validation(image) for image in module.probe_inputs[0])
        chosen.append(indices)
    assert chosen[0] == chosen[1]


def test_only_the_batches_validation_runs(tmp_path):
    module, (train, _) = Recorder(), loaders()
    val = DataLoader(Stripes(40, seed=2), batch_size=4)
    monitor = PRISMMonitor(num_images=8)
    trainer(tmp_path, [monitor], max_epochs=1, limit_val_batches=1).fit(module, train, val)
    assert monitor.state_dict()["probe_indices"] == [0, 1, 2, 3]  # the one batch validated


@pytest.mark.parametrize(
    ("container", "which"), [("list", 1), ("dict", 1), ("dict", "b"), ("combined", 1), ("combined", "b")]
)
def test_every_form_of_validation_dataloaders(tmp_path, container, which):
    train, first = loaders()
    second = DataLoader(Stripes(10, seed=7), batch_size=5)
    dataloaders = {"a": first, "b": second} if container != "list" else [first, second]
    if container == "combined":
        dataloaders = CombinedLoader(dataloaders, "sequential")
    monitor = PRISMMonitor(indices=[1, 4, 9], dataloader_idx=which)
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(TinyClassifier(), train, dataloaders)
    assert torch.equal(monitor._probe.images, second.dataset.images[[1, 4, 9]])
    assert len(events(t.logger.log_dir).Images("prism/maps")) == 2  # before training, epoch 0


def test_a_key_that_names_no_dataloader_is_one_clear_warning(tmp_path):
    train, val = loaders()
    t = trainer(tmp_path, [PRISMMonitor(dataloader_idx="c")], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(TinyClassifier(), train, {"a": val, "b": val})
    (message,) = prism_warnings(caught)
    assert "dataloader_idx='c' names no validation dataloader; the keys are ['a', 'b']" in message


class Stream(IterableDataset):
    def __init__(self) -> None:
        self.data = Stripes(12, seed=9)

    def __iter__(self):
        yield from zip(self.data.images, self.data.targets.tolist(), strict=True)


class SizedStream(Stream):
    def __len__(self) -> int:
        return len(self.data.images)


@pytest.mark.parametrize("dataset_cls", [Stream, SizedStream])
def test_iterable_datasets_with_or_without_a_length(tmp_path, dataset_cls):
    train, _ = loaders()
    dataset = dataset_cls()
    module, monitor = Recorder(), PRISMMonitor(num_images=5, strict=True)
    t = trainer(tmp_path, [monitor], max_epochs=2)
    t.fit(module, train, DataLoader(dataset, batch_size=2))
    assert torch.equal(monitor._probe.images, dataset.data.images[:5])
    assert monitor._probe.labels.tolist() == dataset.data.targets[:5].tolist()
    assert len(events(t.logger.log_dir).Images("prism/maps")) == 3


def test_the_monitor_leaves_training_exactly_as_without_it(tmp_path):
    # The probe is chosen by enumerating a random validation sampler: a monitor that consumed the
    # global random state would change the next epoch's shuffling, and so the weights.
    def fit(callbacks, name):
        pl.seed_everything(3)
        dataset = Stripes(32, seed=1)
        train = DataLoader(dataset, batch_size=4, shuffle=True)
        val = DataLoader(Stripes(16, seed=2), batch_size=4, sampler=RandomSampler(range(16), num_samples=8))
        module = TinyClassifier()
        trainer(tmp_path / name, callbacks, max_epochs=3).fit(module, train, val)
        return module

    with_monitor = fit([PRISMMonitor(num_images=4, strict=True)], "with")
    without = fit([], "without")
    for (name, a), b in zip(with_monitor.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class DictForward(pl.LightningModule):
    """A LightningModule whose ``forward`` takes the whole batch dict (as Hugging Face models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_cnn(num_classes=2)
        self.extra = torch.nn.Conv2d(3, 4, 1)  # outside `model`

    def forward(self, batch):
        return self.model(batch["image"])

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch), batch["label"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_module_names_the_submodule_that_takes_the_images(tmp_path):
    train, val = loaders(as_dict=True)
    monitor = PRISMMonitor(num_images=4, module="model", final_layer="model.7", strict=True)
    t = trainer(tmp_path, [monitor], max_epochs=2)
    t.fit(DictForward(), train, val)
    assert len(events(t.logger.log_dir).Images("prism/maps")) == 3
    assert monitor.state_dict()["first"] is not None and len(monitor.state_dict()["first"]) == 32


def test_a_forward_that_does_not_take_images_names_the_module_option(tmp_path):
    train, val = loaders(as_dict=True)
    t = trainer(tmp_path, [PRISMMonitor(num_images=4)], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(DictForward(), train, val)
    (message,) = prism_warnings(caught)
    assert "PRISM calls DictForward.forward(images) with the image batch of shape (4, 3, 32, 32)" in message
    assert "pass module='<name>'" in message and "(submodules of DictForward: 'model', 'extra')" in message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"module": "modle"}, r"'modle' is not a module of DictForward; nearest valid names: 'model'"),
        ({"module": "model", "final_layer": "extra"}, r"layer 'extra' is not inside module='model'"),
        (
            {"module": "model", "stage_layers": ["model.1", "extra:input"]},
            r"layer 'extra:input' is not inside",
        ),
    ],
)
def test_bad_module_or_layer_names_are_setup_errors(tmp_path, options, message):
    train, val = loaders(as_dict=True)
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, [PRISMMonitor(**options)]).fit(DictForward(), train, val)
