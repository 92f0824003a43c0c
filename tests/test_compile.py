"""A ``torch.compile``'d LightningModule with the monitor: no graph compiled again epoch after epoch
because of it, and the validation set's metrics as without compilation.

Dynamo's ``eager`` backend traces and guards as every backend does (what recompiles is decided there)
and runs the graphs without generating code, which keeps these fits quick on a CPU.
"""

from __future__ import annotations

import gc

import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import events, loaders, trainer

from conftest import tiny_cnn
from lightning_prism import PRISMMonitor

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402  (after the importorskip)


class Plain(pl.LightningModule):
    """A LightningModule whose steps compile without graph breaks of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_cnn(num_classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.fixture(autouse=True)
def _forget_compiled_code():
    """Dynamo's caches are global: no compiled frame of these tests is left to the others."""
    yield
    dynamo.reset()
    gc.collect()


def fit(tmp_path, epochs: int, monitor: bool, compiled: bool = True) -> tuple[int, int, dict]:
    """Graphs compiled, frames traced, and the validation set's metrics of a fit."""
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    module = Plain()
    callbacks = (
        [PRISMMonitor(num_images=4, views=["prism", "grad_cam"], knn_k=5, strict=True)] if monitor else []
    )
    t = trainer(tmp_path, callbacks, max_epochs=epochs)
    train, val = loaders()
    t.fit(torch.compile(module, backend="eager") if compiled else module, train, val)
    acc = events(t.logger.log_dir)
    metrics = {
        name: [round(e.value, 5) for e in acc.Scalars(name)]
        for name in acc.Tags()["scalars"]
        if name.startswith("prism/val/")
    }
    return counters["stats"]["unique_graphs"], counters["frames"]["total"], metrics


def test_a_compiled_model_compiles_no_graph_again_epoch_after_epoch_because_of_the_monitor(tmp_path):
    graphs = {
        (monitor, epochs): fit(tmp_path / f"{monitor}-{epochs}", epochs, monitor)[:2]
        for monitor in (False, True)
        for epochs in (4, 8)
    }
    # The monitor's own forwards run eagerly (torch.compiler.set_stance); what it adds is compiled
    # once (Lightning's `log` traced again as the monitor's scalars join the validation results), the
    # same for 4 and 8 epochs.
    assert graphs[True, 4] == graphs[True, 8]
    assert graphs[False, 4] == graphs[False, 8]
    added = graphs[True, 4][0] - graphs[False, 4][0]
    assert 0 <= added <= 4, graphs


def test_the_validation_capture_sees_the_compiled_model_as_the_eager_one(tmp_path):
    *_, compiled = fit(tmp_path / "compiled", 2, monitor=True)
    *_, eager = fit(tmp_path / "eager", 2, monitor=True, compiled=False)
    assert set(compiled) == {
        "prism/val/knn_accuracy",
        "prism/val/class_separation",
        "prism/val/effective_rank",
    }
    assert compiled == eager and all(len(values) == 3 for values in compiled.values())  # before, 2 epochs
