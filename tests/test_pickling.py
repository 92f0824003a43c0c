"""A monitor pickles and deep-copies at every point of its life (ddp_spawn pickles the Trainer with its
callbacks; sweeps and k-fold loops deep-copy callback lists), and the copy means what the original
means: its options, probe, colour basis and strip, with no reference to a logger, trainer or model."""

from __future__ import annotations

import copy
import inspect
import io
import pickle
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lit_helpers import decode, events, loaders, make_module_class, trainer
from pytorch_lightning.loggers import Logger

from lightning_prism import PRISMMonitor

TinyClassifier = make_module_class(pl)
VIEWS = ["prism", "grad_cam"]


def pickled(monitor: PRISMMonitor) -> PRISMMonitor:
    return pickle.loads(pickle.dumps(monitor))


COPIES = {"pickle": pickled, "deepcopy": copy.deepcopy}
OPTIONS = [name for name in inspect.signature(PRISMMonitor).parameters]


class _Types(pickle.Pickler):
    """A pickler that notes the type of every object it reduces."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO())
        self.seen: set[type] = set()

    def reducer_override(self, obj: Any) -> Any:
        self.seen.add(type(obj))
        return NotImplemented


def pickled_types(monitor: PRISMMonitor) -> set[type]:
    pickler = _Types()
    pickler.dump(monitor)
    return pickler.seen


def meaning(monitor: PRISMMonitor) -> dict[str, Any]:
    """What a monitor means: its options, probe, colour basis, strip and what the views learnt."""
    probe = monitor._probe
    return {
        "options": {name: getattr(monitor, name) for name in OPTIONS},
        "evolution_paths": monitor.evolution_paths,
        "probe": None if probe is None else (probe.images, probe.labels, probe.indices, probe.class_names),
        "probe_indices": monitor._probe_indices,
        "reference": monitor._reference,
        "first": monitor._first,
        "state": monitor.state_dict(),
        "views": (monitor._probe_views.cut_from, monitor._probe_views.grad_cam_fallback),
    }


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


class RoundTrips(pl.Callback):
    """After the monitor (callbacks run in list order), at every stage of a fit: pickle and deep-copy
    it, check that the copies mean the same, and hold no logger, trainer or model. After the first
    validation, a pickled copy (prefix ``twin``) is kept and run beside the original from then on."""

    def __init__(self, monitor: PRISMMonitor) -> None:
        self.monitor = monitor
        self.stages: list[str] = []
        self.twin: PRISMMonitor | None = None

    def check(self, stage: str) -> None:
        for name, make_copy in COPIES.items():
            assert_same(meaning(make_copy(self.monitor)), meaning(self.monitor)), (stage, name)
        forbidden = [
            t for t in pickled_types(self.monitor) if issubclass(t, (torch.nn.Module, Logger, pl.Trainer))
        ]
        assert forbidden == [], (stage, forbidden)
        self.stages.append(stage)

    def setup(self, trainer, pl_module, stage):
        self.check("setup")

    def on_fit_start(self, trainer, pl_module):
        self.check("fit start")

    def on_train_start(self, trainer, pl_module):
        self.check("train start")  # after the row of the model before training

    def on_train_epoch_start(self, trainer, pl_module):
        self.check(f"train epoch {trainer.current_epoch}")

    def on_validation_epoch_start(self, trainer, pl_module):
        if self.twin is not None:
            self.twin.on_validation_epoch_start(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and batch_idx == 0:
            self.check(f"validation batch {trainer.current_epoch}")  # the capture's hooks are on the model
        if self.twin is not None:
            self.twin.on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        if self.twin is not None:
            self.twin.on_validation_epoch_end(trainer, pl_module)
        self.check(f"validation {trainer.current_epoch}")
        if self.twin is None:
            self.twin = pickled(self.monitor)
            self.twin.prefix = "twin"

    def on_fit_end(self, trainer, pl_module):
        self.check("fit end")


def test_a_monitor_pickles_and_deep_copies_at_every_stage_and_its_copy_logs_the_same_maps(tmp_path):
    torch.manual_seed(0)
    monitor = PRISMMonitor(num_images=4, views=VIEWS, class_names=["vertical", "horizontal"], knn_k=5)
    for make_copy in COPIES.values():  # before any fit
        assert_same(meaning(make_copy(monitor)), meaning(monitor))
    trips = RoundTrips(monitor)
    t = trainer(tmp_path, [monitor, trips], max_epochs=3)
    train, val = loaders()
    t.fit(TinyClassifier(), train, val)
    assert trips.stages == [
        "setup", "fit start", "train start",
        "train epoch 0", "validation batch 0", "validation 0",
        "train epoch 1", "validation batch 1", "validation 1",
        "train epoch 2", "validation batch 2", "validation 2", "fit end",
    ]  # fmt: skip
    # The copy made after the first validation logged, in epochs 1 and 2, exactly the original's maps,
    # embedding and numbers: the same probe, colour basis, Grad-CAM and embedding axes.
    acc = events(t.logger.log_dir)
    first_step = acc.Scalars("val_loss")[0].step
    for view in ("maps", "overlay", "grad_cam", "views", "embedding"):
        original, twin = acc.Images(f"prism/{view}"), acc.Images(f"twin/{view}")
        after_copy = [e for e in original if e.step > first_step]
        assert len(after_copy) == 2 and [e.step for e in twin] == [e.step for e in after_copy]
        for a, b in zip(after_copy, twin, strict=True):
            np.testing.assert_array_equal(decode(a), decode(b))
    names = ("explained_variance/pc1", "similarity/previous", "similarity/first", "class_separation")
    for name in (*names, "val/knn_accuracy", "val/class_separation", "val/effective_rank"):
        original, twin = acc.Scalars(f"prism/{name}"), acc.Scalars(f"twin/{name}")
        after_copy = [(e.step, e.value) for e in original if e.step > first_step]
        assert after_copy and [(e.step, e.value) for e in twin] == after_copy


def test_a_copy_made_after_a_fit_runs_the_next_fit_as_the_original_does(tmp_path):
    """A sweep or k-fold loop that copies the callback list between fits: the copy of a used monitor
    starts the next fit afresh exactly as the original does."""
    torch.manual_seed(0)
    monitor = PRISMMonitor(num_images=4, views=VIEWS)
    train, val = loaders()
    trainer(tmp_path / "first", [monitor], max_epochs=1).fit(TinyClassifier(), train, val)
    copies = {name: make_copy(monitor) for name, make_copy in COPIES.items()}
    logged = {}
    for name, twin in {"original": monitor, **copies}.items():
        torch.manual_seed(1)
        t = trainer(tmp_path / name, [twin], max_epochs=2)
        t.fit(TinyClassifier(), train, val)
        logged[name] = [decode(e) for e in events(t.logger.log_dir).Images("prism/maps")]
        assert len(logged[name]) == 3  # before training, two epochs
    for name in copies:
        for a, b in zip(logged["original"], logged[name], strict=True):
            np.testing.assert_array_equal(a, b)
