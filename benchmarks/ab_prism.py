"""``prism()``'s cost in two source trees, side by side: did a change make it slower?

One worker process per tree (``PYTHONPATH`` set to it), each with its own copy of the model and the
same images. Rounds alternate between the two trees (which tree goes first alternates too); in each
round a worker times a plain no-grad forward and ``prism()`` in a shuffled order and reports their
ratio, so the two trees' ratios are measured under the same load, one after the other. Prints the
median ratio of each tree and the median of the per-round differences.

    python benchmarks/ab_prism.py --a /path/to/main --b . --model efficientnet-lite0 --batch 8 --rounds 40
    python benchmarks/ab_prism.py --a /path/to/main --b . --model vit_tiny --batch 8 --keep-heap
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


MARK = "@ab "  # the protocol's lines on stdout; anything else a library prints is skipped


def _send(message: dict[str, object]) -> None:
    print(MARK + json.dumps(message), flush=True)


def _receive(proc: subprocess.Popen[str]) -> dict[str, float]:
    while line := proc.stdout.readline():  # type: ignore[union-attr]  # (iterating would read ahead and block)
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"the worker ended without an answer (exit code {proc.wait()})")


def worker(model_name: str, batch: int, keep: bool) -> None:
    """Serve timing requests on stdin: one line per round, one JSON line back."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_prism import build, keep_heap, plain

    from lightning_prism import prism

    if keep:
        keep_heap()
    torch.manual_seed(0)
    model, images = build(model_name), torch.rand(batch, 3, 224, 224)
    for _ in range(2):  # warm-up of every path
        plain(model, images)
        prism(model, images)
    order = random.Random(0)
    _send({"ready": True})
    for line in sys.stdin:
        repeats = int(line)
        times: dict[str, list[float]] = {"plain": [], "prism": []}
        for _ in range(repeats):
            for key in order.sample(["plain", "prism"], 2):
                start = time.perf_counter()
                (plain if key == "plain" else prism)(model, images)
                times[key].append(time.perf_counter() - start)
        ratios = [b / a for a, b in zip(times["plain"], times["prism"], strict=True)]
        _send({"ratio": statistics.median(ratios), "plain": statistics.median(times["plain"])})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", help="source tree A (its lightning_prism is imported)")
    parser.add_argument("--b", help="source tree B")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="plain/prism pairs per round")
    parser.add_argument("--keep-heap", action="store_true", help="glibc keeps freed memory (see bench_prism)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.batch, args.keep_heap)
        return
    if args.a is None or args.b is None:
        parser.error("--a and --b (the two source trees) are required")

    procs = {}
    for key, tree in (("A", args.a), ("B", args.b)):
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
        command = [sys.executable, __file__, "--worker", "--model", args.model, "--batch", str(args.batch)]
        procs[key] = subprocess.Popen(
            command + (["--keep-heap"] if args.keep_heap else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert _receive(procs[key])["ready"]
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    try:
        for round_ in range(args.rounds):
            for key in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                proc = procs[key]
                proc.stdin.write(f"{args.repeats}\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                results[key].append(_receive(proc))
    finally:
        for proc in procs.values():
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait()
    a = [r["ratio"] for r in results["A"]]
    b = [r["ratio"] for r in results["B"]]
    print(
        f"{args.model} batch {args.batch}, {args.rounds} rounds of {args.repeats}"
        f"{', heap kept' if args.keep_heap else ''}: plain forward {statistics.median(r['plain'] for r in results['A']):.3f} s"
    )
    print(f"A {args.a}: median prism/plain {statistics.median(a):.3f}")
    print(f"B {args.b}: median prism/plain {statistics.median(b):.3f}")
    print(f"median of per-round B - A: {statistics.median(y - x for x, y in zip(a, b, strict=True)):+.3f}")


if __name__ == "__main__":
    main()
