"""Two CPU processes under strategy="ddp" (or "ddp_spawn"): run by tests/test_distributed.py as a script.

Lightning's DDP launcher re-runs this script once per extra rank, so it must be a plain script;
ddp_spawn pickles the Trainer with its callbacks, the model and the data into each process, so every
class here is defined at module level. Each rank writes what it saw into OUT_DIR; rank zero alone
should write TensorBoard images.
"""

from __future__ import annotations

import json
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(__file__))

from lit_helpers import Stripes, loaders, make_module_class
from torch.utils.data import DataLoader, SubsetRandomSampler

from lightning_prism import PRISMMonitor
from lightning_prism.discrimination import discrimination
from lightning_prism.recording import record


class Record(pl.Callback):
    def __init__(self, monitor: PRISMMonitor, out_dir: str) -> None:
        self.monitor, self.out_dir = monitor, out_dir

    def on_fit_end(self, trainer, pl_module):
        probe = self.monitor._probe
        # The validation set's metrics computed in one process, on the same samples, with the final
        # weights (those of the last validation): its 10 samples' pooled final feature maps.
        images = VALIDATION_SET.images[VALIDATION]
        pooled = record(pl_module, images).final.mean(dim=(2, 3))
        alone = discrimination(pooled, VALIDATION_SET.targets[VALIDATION], k=KNN_K)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            metrics = {
                k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("prism")
            }
            json.dump(
                {
                    "indices": probe.indices,
                    "images_sum": float(probe.images.sum()),
                    "callback_metrics": metrics,
                    "weights_sum": float(sum(p.double().sum() for p in pl_module.parameters())),
                    "grads": [p.grad is None for p in pl_module.parameters()],
                    "one_process": {f"prism/val/{k}": float(v) for k, v in alone.metrics.items()},
                    "prototype_calls": self.monitor.prototype_calls,
                },
                f,
            )


class FailsOnceOnRankOne(PRISMMonitor):
    """The PRISM pass fails on rank 1 at the end of the first epoch, as an out-of-memory error on one
    GPU would."""

    prototype_calls = 0

    def _log_prototypes(self, *args, **kwargs):
        self.prototype_calls += 1
        return super()._log_prototypes(*args, **kwargs)

    def _run(self, trainer, pl_module, probe, row=None):
        if trainer.global_rank == 1 and trainer.current_epoch == 0 and row is None:
            raise RuntimeError("out of memory on rank 1")
        return super()._run(trainer, pl_module, probe, row)


class Classifier(make_module_class(pl)):  # a class ddp_spawn can pickle (by its module-level name)
    pass


#: The validation dataset, and the k-NN's k for its 10 validation samples.
VALIDATION_SET = Stripes(32, seed=2)
KNN_K = 3

#: Validation draws these samples of a shared dataset through its sampler (Lightning wraps it in a
#: DistributedSamplerWrapper, so each rank sees part of them).
VALIDATION = [1, 4, 6, 9, 12, 15, 19, 22, 23, 28]


if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    options = sys.argv[2:]
    views = ["prism", "grad_cam", "saliency", "prototypes"] if "views" in options else ["prism"]
    monitor = FailsOnceOnRankOne(num_images=4, views=views, target="label", knn_k=KNN_K, prototype_steps=8)
    train, _ = loaders()
    val = DataLoader(VALIDATION_SET, batch_size=4, sampler=SubsetRandomSampler(VALIDATION))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn" if "spawn" in options else "ddp",
        callbacks=[monitor, Record(monitor, out_dir)],
        logger=TensorBoardLogger(out_dir, name="tb", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(), train, val)
