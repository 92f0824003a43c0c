"""PRISMMonitor under a sharded strategy on a GPU: a real ``fit`` with ``strategy="fsdp"`` (or
``"deepspeed"`` where installed) on one or more GPUs, and what the monitor logged.

FSDP and DeepSpeed need a GPU in Lightning (``The strategy fsdp requires a GPU accelerator``), so
this is a script for a GPU machine, not a test. A torchvision ResNet-18 with a new head is fine-tuned
for two epochs on random images of two classes (bf16-mixed), with every view of the monitor on; the
script prints the tags the TensorBoard log holds, the steps of each, the monitor's warnings, and
whether the weights come out the same as in a fit without the monitor.

    python benchmarks/fsdp_check.py                     # strategy fsdp on every visible GPU
    python benchmarks/fsdp_check.py --strategy ddp      # the same check under DDP, for comparison
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prism import PRISMMonitor


class Finetune(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = torchvision.models.resnet18(num_classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 96, 96, generator=g)
    labels = torch.arange(n) % 2
    images[labels == 1, 0] += 0.5  # a class to tell apart: more red
    return DataLoader(TensorDataset(images, labels), batch_size=16)


def fit(
    strategy: str, accelerator: str, monitor: PRISMMonitor | None, log_dir: str
) -> tuple[Finetune, list[str]]:
    torch.manual_seed(0)
    module = Finetune()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices="auto" if accelerator == "gpu" else 1,
        strategy=strategy,
        precision="bf16-mixed",
        max_epochs=2,
        callbacks=[monitor] if monitor else [],
        logger=TensorBoardLogger(log_dir, name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data(128, 1), data(64, 2))
    return module, [str(w.message) for w in caught if "PRISMMonitor" in str(w.message)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="fsdp")
    parser.add_argument(
        "--accelerator", default="gpu", help="gpu; cpu only to try the script with --strategy auto"
    )
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("this check needs a GPU")
    where = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
    print(f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, {where}")
    views = ["prism", "grad_cam", "saliency", "prototypes"]
    with tempfile.TemporaryDirectory() as directory:
        monitor = PRISMMonitor(num_images=8, views=views, prototype_steps=32, knn_k=5)
        with_monitor, messages = fit(args.strategy, args.accelerator, monitor, directory)
        acc = EventAccumulator(f"{directory}/run/version_0", size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        print(f"strategy={args.strategy}: monitor warnings: {messages or 'none'}")
        for kind in ("images", "scalars"):
            for tag in sorted(acc.Tags()[kind]):
                events = acc.Images(tag) if kind == "images" else acc.Scalars(tag)
                values = "" if kind == "images" else " " + " ".join(f"{e.value:.3f}" for e in events)
                print(f"  {kind[:-1]} {tag}: steps {[e.step for e in events]}{values}")
        without, _ = fit(args.strategy, args.accelerator, None, f"{directory}/without")
    same = all(
        torch.equal(a, b)
        for a, b in zip(with_monitor.state_dict().values(), without.state_dict().values(), strict=True)
    )
    print(f"weights the same as without the monitor: {same}")


if __name__ == "__main__":
    main()
