"""Cost of PRISMMonitor in a small ``fit``: wall time with and without it.

Runs the same ``fit`` (same seed, data and model) without and with the callback, ``--repeats``
pairs (which of the two runs first alternates from pair to pair), and prints per pair: both wall
times, their ratio, the time the callback spent in its own work (measured inside the run: building
the probe, the probe's PRISM pass, rendering and logging, the row of the model before training with its
pass over the validation set, the validation capture's work after every validation batch, the validation
set's metrics and embedding, the evolution strip), and the ratio once
that work is subtracted (target ≤ 1.03: training and validation steps pay nothing else). The last
row is the median over the pairs. It also prints the memory the probe pass adds (GPU: peak
allocated; CPU, Linux only: peak resident set).

    python benchmarks/bench_callback.py [--epochs 3] [--probe 8] [--repeats 5]
    python benchmarks/bench_callback.py --views prism grad_cam saliency  # with the gradient views
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prism import PRISMMonitor


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


class TimedMonitor(PRISMMonitor):
    """PRISMMonitor that records the wall time of all its own work and the memory of its probe pass
    (CUDA: peak allocated; CPU on Linux: peak resident set above the resident set before the pass)."""

    seconds = 0.0
    peak_bytes = 0

    def _run(self, trainer, pl_module, probe, row=None):
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident-set high-water mark
            before = resident_bytes()
        scalars = super()._run(trainer, pl_module, probe, row)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_resident_bytes()
        self.peak_bytes = max(self.peak_bytes, peak - before)
        return scalars

    def _timed(self, hook, *args, **kwargs):
        start = time.perf_counter()
        hook(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def setup(self, *args, **kwargs):
        self._timed(super().setup, *args, **kwargs)

    def on_train_start(self, *args, **kwargs):  # the row of the model before training
        self._timed(super().on_train_start, *args, **kwargs)

    def on_validation_epoch_start(self, *args, **kwargs):
        self._timed(super().on_validation_epoch_start, *args, **kwargs)

    def on_validation_batch_end(self, *args, **kwargs):  # the validation capture's take()
        self._timed(super().on_validation_batch_end, *args, **kwargs)

    def on_validation_epoch_end(self, *args, **kwargs):
        self._timed(super().on_validation_epoch_end, *args, **kwargs)

    def on_fit_end(self, *args, **kwargs):
        self._timed(super().on_fit_end, *args, **kwargs)


def fit(callbacks: list, epochs: int, out: str) -> float:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(1024, 3, 64, 64, generator=g), torch.randint(0, 10, (1024,), generator=g)
    )
    val = TensorDataset(torch.randn(256, 3, 64, 64, generator=g), torch.randint(0, 10, (256,), generator=g))
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=TensorBoardLogger(out), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, accelerator="auto",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(Net(), DataLoader(data, batch_size=64), DataLoader(val, batch_size=64))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--probe", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="/tmp/prism_bench_callback")
    parser.add_argument(
        "--views", nargs="+", default=["prism"], help="the monitor's views, e.g. prism grad_cam saliency"
    )
    args = parser.parse_args()
    fit([], 1, args.out)  # warm-up
    print(
        "| run | fit without (s) | fit with PRISMMonitor (s) | ratio | callback's own work (s) "
        "| ratio without the callback's own work |"
    )
    print("|---|---|---|---|---|---|")
    ratios, net_ratios, peak = [], [], 0
    for run in range(1, args.repeats + 1):
        monitor = TimedMonitor(num_images=args.probe, views=args.views)
        if run % 2:  # alternate which fit of the pair runs first, so drift within the process cancels
            without = fit([], args.epochs, args.out)
            with_cb = fit([monitor], args.epochs, args.out)
        else:
            with_cb = fit([monitor], args.epochs, args.out)
            without = fit([], args.epochs, args.out)
        ratios.append(with_cb / without)
        net_ratios.append((with_cb - monitor.seconds) / without)
        peak = max(peak, monitor.peak_bytes)
        print(
            f"| {run} | {without:.2f} | {with_cb:.2f} | {ratios[-1]:.3f} | {monitor.seconds:.2f} "
            f"| {net_ratios[-1]:.3f} |",
            flush=True,
        )
    print(f"| median | | | {statistics.median(ratios):.3f} | | {statistics.median(net_ratios):.3f} |")
    device = "GPU memory (peak allocated)" if torch.cuda.is_available() else "CPU memory (peak resident set)"
    print(f"\n{device} added by the probe pass, largest over the runs: {peak / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
