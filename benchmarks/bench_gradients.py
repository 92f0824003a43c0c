"""Cost of ``grad_cam()`` and ``saliency()`` beside pytorch-grad-cam and Captum, on the CPU.

Prints a Markdown table per run, one row per model (batch 8, 224×224 by default): for every method
the median over rounds of its time divided by the time of a plain ``torch.no_grad()`` forward of
the same batch in the same round. Every round runs all methods once, in a shuffled order, so drift
on a shared machine hits them alike. Targets (issue #15): ``grad_cam()`` ≤ 1.15, ``saliency()`` ≤ 2.3.

* ``grad_cam``, ``saliency``, ``guided``: this library (``guided`` is ``saliency(guided=True)``;
  EfficientNet-Lite0 has no ``nn.ReLU``, only ``nn.ReLU6``, so there it is the plain gradient);
* ``prism``: ``prism()``, for reference; ``prism+grad_cam``: ``prism_and_grad_cam()``, both from
  one forward, as ``PRISMMonitor(views=["prism", "grad_cam"])`` runs them in its first epoch;
* ``grad_cam, monitor`` and ``prism+grad_cam, monitor``: the same as the monitor runs them from its
  second epoch on, told where the previous call's last graph cut fell (``cut_from``), so that
  nothing before it is recorded (target ≤ 1.20 for the shared forward);
* ``pgc GradCAM``, ``pgc EigenCAM``: pytorch-grad-cam, constructed and released inside the timed call
  (its hooks would otherwise slow every other method's forward), on ``layer4[-1]`` for ResNet-50
  and ``_bn1`` for EfficientNet-Lite0 (the map that our ``_swish`` rectifies: pytorch-grad-cam keeps
  every output of a module that runs twice, and ``_swish`` runs after the stem and the head);
* ``Captum Saliency``: ``captum.attr.Saliency(model).attribute(x, target, abs=True)`` given the
  predicted classes (computed once before timing: Captum needs them, our functions find them in
  their own forward);
* with ``--layouts``, ``saliency NCHW``: ``saliency()`` with its channels-last copy of the input
  switched off, for the A/B of the layout.

Then the peak memory of each: the peak of the bytes held by torch tensors during one call (from the
profiler's memory events: exact, but blind to NumPy, which pytorch-grad-cam uses for its maths), and
the resident-set high-water mark of one call in a fresh process whose high-water mark is reset just
before it (median of ``--memory-runs`` processes; it scatters by tens of MB with the allocator);
and the size of the final feature map that Grad-CAM differentiates (what the head's graph holds).

``--keep-heap`` makes glibc keep freed memory for the timed runs (see ``bench_prism.py``): the regime
without page faults, in which a forward is fastest and fixed costs weigh most.

    python benchmarks/bench_gradients.py                      # the README table (several minutes)
    python benchmarks/bench_gradients.py --keep-heap --repeats 21
    python benchmarks/bench_gradients.py --models resnet50 --repeats 3 --memory-runs 1

Needs the optional ``bench`` extra (``pip install -e ".[bench]"``) for pytorch-grad-cam and Captum.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prism import build, keep_heap, measure_peak, plain

from lightning_prism import grad_cam, gradients, prism, prism_and_grad_cam, saliency

MODELS = ("resnet50", "efficientnet-lite0")
warnings.filterwarnings("ignore", message=".*has no nn.ReLU module")  # Lite0's guided = plain gradient
warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")


def library_layer(name: str, model: nn.Module) -> nn.Module:
    return model.layer4[-1] if name == "resnet50" else model._bn1


_cut_from: dict[tuple[int, str], int] = {}  # (model, method): where the last call's last cut fell


def as_in_the_monitor(method: str, function: Callable) -> Callable:
    """``function(model, images, cut_from=...)`` told what its previous call on the model returned, as
    the monitor does from its second epoch on."""

    def run(model: nn.Module, images: torch.Tensor) -> object:
        key = (id(model), method)
        *result, _cut_from[key] = function(model, images, cut_from=_cut_from.get(key, 0))
        return result

    return run


def methods(name: str, model: nn.Module, targets: torch.Tensor, layouts: bool) -> dict[str, Callable]:
    """Every method as ``f(model, images)``."""
    from captum.attr import Saliency
    from pytorch_grad_cam import EigenCAM, GradCAM

    layer = library_layer(name, model)

    def pgc(method: type) -> Callable:
        def run(model: nn.Module, images: torch.Tensor) -> object:
            with method(model=model, target_layers=[layer]) as cam:
                return cam(input_tensor=images, targets=None)

        return run

    def nchw_saliency(model: nn.Module, images: torch.Tensor) -> object:
        nchw = lambda model, x: model(gradients._GraphRoot.apply(x))  # noqa: E731
        with mock.patch.object(gradients, "_saliency_forward", nchw):
            return saliency(model, images)

    calls = {
        "plain": plain,
        "grad_cam": grad_cam,
        "saliency": saliency,
        "guided": lambda model, images: saliency(model, images, guided=True),
        "prism": prism,
        "prism+grad_cam": prism_and_grad_cam,
        "grad_cam, monitor": as_in_the_monitor("grad_cam", gradients._grad_cam),
        "prism+grad_cam, monitor": as_in_the_monitor("prism+grad_cam", gradients._prism_and_grad_cam),
        "pgc GradCAM": pgc(GradCAM),
        "pgc EigenCAM": pgc(EigenCAM),
        "Captum Saliency": lambda model, images: Saliency(model).attribute(
            images.clone(), target=targets, abs=True
        ),
    }
    if layouts:
        calls["saliency NCHW"] = nchw_saliency
    return calls


def peak_memory_probe(name: str, batch: int, method: str) -> None:
    """Run in a fresh process: print the peak RSS increase (bytes) of one call."""
    torch.manual_seed(0)
    model, images = build(name), torch.rand(batch, 3, 224, 224)
    with torch.no_grad():
        targets = model(images).argmax(1)
    call = methods(name, model, targets[:1], layouts=True)[method]
    call(model, images[:1])  # allocator, kernels and the method's own code paths warmed on one image
    call = methods(name, model, targets, layouts=True)[method]
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident-set high-water mark (Linux)
    call(model, images)
    hwm = next(
        line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")
    )
    print(json.dumps({"peak": int(hwm.split()[1]) * 1024 - rss}))


def peak_tensor_memory(call: Callable, model: nn.Module, images: torch.Tensor) -> int:
    """Peak of the bytes held by torch tensors during one call, from the profiler's memory events
    (allocations attributed to the operators that make them, frees as they happen, in time order):
    exact for torch's allocations and free of the allocator's noise, blind to NumPy's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            call(model, images)
    events = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    held = peak = 0
    for _, delta in events:
        held += delta
        peak = max(peak, held)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument(
        "--memory-runs", type=int, default=5, help="fresh processes per method (0: no memory)"
    )
    parser.add_argument("--layouts", action="store_true", help="also time saliency() without channels-last")
    parser.add_argument("--keep-heap", action="store_true", help="glibc keeps freed memory (no page faults)")
    parser.add_argument("--probe", nargs=3, metavar=("MODEL", "BATCH", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        peak_memory_probe(args.probe[0], int(args.probe[1]), args.probe[2])
        return

    heap = "kept (mallopt)" if args.keep_heap and keep_heap() else "glibc default"
    mb = 2**20
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch {args.batch}, 224×224, "
        f"{args.repeats} interleaved rounds; heap for the times: {heap}; memory: fresh processes\n"
    )
    for name in args.models:
        torch.manual_seed(0)
        model, images = build(name), torch.rand(args.batch, 3, 224, 224)
        with torch.no_grad():
            targets = model(images).argmax(1)
        calls = methods(name, model, targets, args.layouts)
        for call in calls.values():  # warm-up of every path
            call(model, images)
        times: dict[str, list[float]] = {key: [] for key in calls}
        order = random.Random(0)
        for _ in range(args.repeats):
            for key in order.sample(list(calls), len(calls)):
                start = time.perf_counter()
                calls[key](model, images)
                times[key].append(time.perf_counter() - start)
        final = grad_cam(model, images[:1])
        map_bytes = args.batch * final.alpha.shape[1] * final.cams[0].numel() * 4  # (N, C, h, w) float32
        print(
            f"### {name}, batch {args.batch}: plain forward {statistics.median(times['plain']):.3f} s; "
            f"Grad-CAM layer {final.layer!r}, final feature map {map_bytes / mb:.1f} MB\n"
        )
        print(
            "| method | time (s) | ratio to plain forward | peak tensor memory (MB) | extra over plain (MB) "
            "| peak RSS (MB) | extra over plain (MB) |"
        )
        print("|---|---|---|---|---|---|---|")
        tensors = {key: peak_tensor_memory(call, model, images) for key, call in calls.items()}
        peaks = (
            {key: measure_peak(name, args.batch, key, args.memory_runs, script=__file__) for key in calls}
            if args.memory_runs
            else {}
        )
        for key in calls:
            ratio = statistics.median(b / a for a, b in zip(times["plain"], times[key], strict=True))
            tensor = f"{tensors[key] / mb:.1f} | {(tensors[key] - tensors['plain']) / mb:+.1f}"
            rss = f"{peaks[key] / mb:.0f} | {(peaks[key] - peaks['plain']) / mb:+.0f}" if peaks else "- | -"
            print(
                f"| {key} | {statistics.median(times[key]):.3f} | {ratio:.3f} | {tensor} | {rss} |",
                flush=True,
            )
        print()


if __name__ == "__main__":
    main()
