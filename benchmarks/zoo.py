"""``prism()`` on the model zoos: every timm and torchvision classifier it can run in reasonable time.

Each model is built with random weights (timm ``pretrained=False``, torchvision ``weights=None``) at a
small input size (``--size``, default 128; models that cannot take it run at their own input size)
and given two random images. For each model the sweep prints one row:

* **ran**: ``prism()`` returned maps, or **error** with the exception (a clear error is a result
  too: a model without a usable feature map must say so);
* **final**: the final feature map equals an *independent reference*, computed without
  lightning-prism: timm's ``forward_features`` output (read as ``(N, C, h, w)``, channels-last
  ``(N, h, w, C)``, or the last ``h·w`` tokens of a token sequence on the patch grid); for torchvision,
  the tensor entering global pooling (per family: ``avgpool``'s input, ``features``' output, …; for
  ``vit_*`` the encoder's patch tokens). ``n/a`` when the reference is no spatial map (PiT returns
  class tokens, CrossViT a list);
* **stages**: the stage maps that the discovery rules find (with ``feature_info`` hidden: where a
  model declares it, ``prism()`` takes its stages from it, which match by construction) equal
  ``mean_c |A|`` of the outputs of the modules that timm's ``feature_info`` lists, at every
  resolution larger than the final map's (the last listed module at each resolution), and there
  are no others (timm only);
* **grey**: the RGB maps are uniform (what under- or overflowing extrapolation used to give);
* **grad-cam**: ``prism_and_grad_cam()`` as the monitor runs it, in its first epoch and then told where
  the first call's last graph cut fell (``cut_from``, its later epochs): ``yes`` when both ran on
  PRISM's final map and the second gave the first's Grad-CAM (to 1e-4 of its largest value) from a cut
  that fitted; ``zero`` when, in addition, the gradient at the final map is zero everywhere (a model
  that reads out a class token: only that token reaches the score; or a head that timm initialises to
  zeros); ``no`` with the reason in the note. (A Grad-CAM that is zero because its weighted sum is
  negative everywhere, which random weights can give, counts as ``yes``: the gradient is there.)

The summary counts them per reference layout (``nchw``: CNNs and hybrids with convolutional
outputs; ``nhwc``: channels-last models; ``tokens``: vision transformers and other token models).

    python benchmarks/zoo.py                         # every model up to 30 M parameters (hours)
    python benchmarks/zoo.py --source timm --per-family 2     # the two smallest of every timm family
    python benchmarks/zoo.py --models 'vit_*' resnet18 --source timm
    python benchmarks/zoo.py --source torchvision --max-params 1e9 --jsonl tv.jsonl
    python benchmarks/zoo.py --source timm --min-params 30e6 --max-params 100e6 --per-family 1  # larger ones
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import signal
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from lightning_prism import prism
from lightning_prism.gradients import _prism_and_grad_cam
from lightning_prism.recording import record

#: torchvision: where the tensor entering global pooling is, by model class
#: (``"<module>"``: that module's output, ``"<module>:input"``: the tensor entering it).
TORCHVISION_REFERENCE = {
    "DenseNet": "features",  # F.relu (in place) and F.adaptive_avg_pool2d follow
    "MobileNetV2": "features",
    "MNASNet": "layers",  # x.mean([2, 3])
    "ShuffleNetV2": "conv5",  # x.mean([2, 3])
    "SqueezeNet": "features",  # the classifier is a class-score convolution, then pooling
    "MaxVit": "classifier:input",
    "VisionTransformer": "encoder",  # tokens; the class token is read out
}
TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


@dataclass
class Row:
    source: str
    family: str
    model: str
    params: float  # millions
    size: int = 0
    status: str = "skipped"  # ran / error / skipped
    layout: str = ""  # of the reference: nchw / nhwc / tokens / other
    final: str = ""  # yes / no / n/a
    stages: str = ""  # stage resolutions as feature_info's: yes / no / n/a
    stage_maps: str = ""  # and the stage maps too: yes / no / n/a
    grey: bool = False
    grad_cam: str = ""  # yes / zero / no
    final_layer: str = ""
    stage_layers: list[str] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------------------------- references
def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-12)))


def _readings(t: Tensor) -> list[tuple[str, Tensor]]:
    """Every way of reading ``t`` as (N, C, h, w), named."""
    if t.ndim == 4:
        return [("nchw", t), ("nhwc", t.permute(0, 3, 1, 2))]
    return []


def final_matches(final: Tensor, reference: Any, grid: tuple[int, int] | None = None) -> tuple[str, str]:
    """(layout of the reference, "yes"/"no"/"n/a") for a recorded (N, C, h, w) final map.

    A 3-D reference is a token sequence whose last ``h·w`` tokens are the patches on the grid that
    the model states (``grid``: the input size over timm's last ``feature_info`` reduction), or else
    the recorded map's; with fewer tokens than that it is no spatial map (PiT's class tokens).
    """
    if not isinstance(reference, Tensor) or reference.ndim not in (3, 4):
        return "other", "n/a"
    if reference.ndim == 4:
        for layout, view in _readings(reference):
            if view.shape == final.shape and _close(final, view):
                return layout, "yes"
        nchw = reference.shape[2] * reference.shape[3] > 1 and reference.shape[1] > reference.shape[3]
        return ("nchw" if nchw else "nhwc"), "no"
    n, length, c = reference.shape
    h, w = grid if grid is not None else final.shape[-2:]
    if length < h * w or h * w < 2:
        return "other", "n/a"
    patches = reference[:, length - h * w :].reshape(n, h, w, c).permute(0, 3, 1, 2)
    return "tokens", "yes" if _close(final, patches) else "no"


def _reference_map(t: Tensor, channels: int) -> tuple[tuple[int, int], Tensor] | None:
    """``mean_c |A|`` of a feature_info output, read in the layout whose channel dimension has the
    ``num_chs`` that feature_info lists: (N, C, h, w), (N, h, w, C), or square-grid tokens."""
    if t.ndim == 4 and t.shape[1] == channels:
        view = t
    elif t.ndim == 4 and t.shape[3] == channels:
        view = t.permute(0, 3, 1, 2)
    elif t.ndim == 3 and t.shape[2] == channels:
        side = int(t.shape[1] ** 0.5)  # square images: the last side² tokens are the patches
        view = t[:, t.shape[1] - side * side :].reshape(t.shape[0], side, side, -1).permute(0, 3, 1, 2)
    else:
        return None
    return (view.shape[2], view.shape[3]), view.abs().mean(dim=1, keepdim=True, dtype=torch.float64)


def stages_match(result: Any, references: dict[tuple[int, int], Tensor]) -> tuple[str, str, str]:
    """Whether a :class:`~lightning_prism.recording.Recording`'s stages are at the references'
    resolutions (every one larger than its final map's, and no others), whether their maps are the
    references' too, and a note on any difference."""
    h, w = result.final.shape[-2:]
    expected = {hw: m for hw, m in references.items() if hw[0] >= h and hw[1] >= w and hw[0] * hw[1] > h * w}
    ours = {tuple(m.shape[-2:]): m for m in result.stage_maps}
    same_grids = set(expected) == set(ours)
    differ = sorted(hw for hw in expected if hw in ours and not _close(ours[hw].double(), expected[hw]))
    maps = same_grids and not differ
    note = (
        ""
        if maps
        else f"stages: ours {sorted(ours, reverse=True)} ({', '.join(result.stage_layers)}), feature_info "
        f"{sorted(expected, reverse=True)}" + (f", different maps at {differ}" if differ else "")
    )
    return ("yes" if same_grids else "no"), ("yes" if maps else "no"), note


def timm_references(model: nn.Module, images: Tensor) -> tuple[Any, dict[tuple[int, int], Tensor] | None]:
    """timm's ``forward_features`` output and the ``feature_info`` stage maps (None without it)."""
    info = getattr(model, "feature_info", None)
    modules = dict(model.named_modules())
    outputs: dict[int, Tensor] = {}
    handles = []
    if isinstance(info, list) and info:
        for i, entry in enumerate(info):
            module = modules.get(entry.get("module", ""))
            if module is None:
                info = None
                break

            def keep(m: nn.Module, args: Any, output: Any, i: int = i) -> None:
                first = (
                    output
                    if isinstance(output, Tensor)
                    else next((o for o in output if isinstance(o, Tensor)), None)
                    if isinstance(output, (tuple, list))
                    else None
                )
                if first is not None:
                    outputs[i] = first

            handles.append(module.register_forward_hook(keep))
    else:
        info = None
    try:
        with torch.no_grad():
            features = model.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    if info is None or len(outputs) != len(info):
        return features, None
    maps: dict[tuple[int, int], Tensor] = {}
    for i, entry in enumerate(info):  # the last listed module at each resolution
        found = _reference_map(outputs[i], int(entry["num_chs"]))
        if found is not None:
            maps[found[0]] = found[1]
    return features, maps


def _timm_grid(model: nn.Module, images: Tensor) -> tuple[int, int] | None:
    """The final grid timm states: the input size over the last ``feature_info`` reduction."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info:
        return None
    reduction = int(info[-1]["reduction"])
    return (-(-images.shape[-2] // reduction), -(-images.shape[-1] // reduction))


def torchvision_reference(model: nn.Module, images: Tensor) -> Any:
    spec = TORCHVISION_REFERENCE.get(type(model).__name__, "avgpool:input")
    name, _, part = spec.partition(":")
    module = dict(model.named_modules())[name]
    seen: list[Tensor] = []
    if part == "input":
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, output: seen.append(output))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return seen[-1]


# ------------------------------------------------------------------------------- models
def timm_models(patterns: list[str]) -> list[tuple[str, str]]:
    import timm

    names = timm.list_models()
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return [("timm", n) for n in names]


def torchvision_models(patterns: list[str]) -> list[tuple[str, str]]:
    names = torchvision.models.list_models(module=torchvision.models)
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return [("torchvision", n) for n in names]


def build(source: str, name: str, size: int, *, own_size: bool = False) -> tuple[nn.Module, int]:
    """The model with random weights, and the input size it runs at (``own_size``: the size of
    its pretrained configuration)."""
    if source == "timm":
        import timm

        try:
            if own_size:
                raise TypeError
            model = timm.create_model(name, pretrained=False, img_size=size)
            return model.eval(), size
        except TypeError:  # no img_size argument: the model takes any size, or only its own
            model = timm.create_model(name, pretrained=False)
            fixed = own_size or model.pretrained_cfg.get("fixed_input_size", False)
            own = model.pretrained_cfg.get("input_size", (3, size, size))[-1]
            return model.eval(), own if fixed else size
    kwargs = dict(TORCHVISION_KWARGS.get(name, {}))
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.eval(), 224 if name.startswith("maxvit") else size


def params_on_meta(source: str, name: str) -> float:
    """Parameter count in millions, from a model built on the meta device (no memory, fast)."""
    try:
        with torch.device("meta"):
            if source == "timm":
                import timm

                model = timm.create_model(name, pretrained=False)
            else:
                model = torchvision.models.get_model(name, weights=None, **TORCHVISION_KWARGS.get(name, {}))
        return sum(p.numel() for p in model.parameters()) / 1e6
    except Exception:  # counted when the model is built for real
        return float("nan")


class _Timeout(Exception):
    pass


def _forward_error(model: nn.Module, images: Tensor) -> str | None:
    try:
        with torch.no_grad():
            model(images)
    except _Timeout:
        raise
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


@contextmanager
def undeclared(model: nn.Module) -> Iterator[None]:
    """Hide timm's ``feature_info`` for the body, so the stages come from the discovery rules."""
    hidden = [(m, m.__dict__.pop("feature_info")) for m in model.modules() if "feature_info" in m.__dict__]
    try:
        yield
    finally:
        for m, info in hidden:
            m.feature_info = info


def check(source: str, family: str, name: str, params: float, size: int, timeout: int) -> Row:
    row = Row(source, family, name, round(params, 2))
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        torch.manual_seed(0)
        model, row.size = build(source, name, size)
        if row.params != row.params:  # nan
            row.params = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        images = torch.rand(2, 3, row.size, row.size)
        failure = _forward_error(model, images)
        if failure is not None and source == "timm":  # at its own input size, then
            model, row.size = build(source, name, size, own_size=True)
            images = torch.rand(2, 3, row.size, row.size)
            failure = _forward_error(model, images)
        if failure is not None:  # the model itself cannot run: not PRISM's error
            row.status, row.note = "skipped", f"the model itself fails: {failure}"[:300]
            return row
        try:
            result = prism(model, images)
        except _Timeout:
            raise
        except Exception as error:  # an error is a result of the sweep
            row.status, row.note = "error", f"{type(error).__name__}: {error}"[:300]
            return row
        row.status = "ran"
        row.final_layer, row.stage_layers = result.final_layer, list(result.stage_layers)
        row.grey = float(result.maps.max() - result.maps.min()) < 1e-6
        try:
            if source == "timm":
                features, maps = timm_references(model, images)
                row.layout, row.final = final_matches(result.final, features, _timm_grid(model, images))
                row.stages = row.stage_maps = "n/a"
                if maps is not None:
                    with undeclared(model):  # the discovery rules: declared stages match by construction
                        discovered = record(model, images)
                    row.stages, row.stage_maps, row.note = stages_match(discovered, maps)
            else:
                row.layout, row.final = final_matches(result.final, torchvision_reference(model, images))
                row.stages = row.stage_maps = "n/a"
        except _Timeout:
            raise
        except Exception as error:  # the reference itself failed
            row.final = row.final or "n/a"
            row.stages = row.stages or "n/a"
            row.note = f"reference failed: {type(error).__name__}: {error}"[:300]
        row.grad_cam, why = grad_cam_check(model, images, result.final_layer)
        row.note = "; ".join(note for note in (row.note, why) if note)
    except _Timeout:
        row.status, row.note = "error", f"timeout after {timeout} s (not a PRISM error)"
    except Exception as error:  # building the model failed: not PRISM's
        row.status, row.note = "skipped", f"cannot build: {type(error).__name__}: {error}"[:300]
    finally:
        signal.alarm(0)
        row.seconds = round(time.perf_counter() - start, 2)
        gc.collect()
    return row


def grad_cam_check(model: nn.Module, images: Tensor, final_layer: str) -> tuple[str, str]:
    """``(yes / zero / no, why not)`` for Grad-CAM from PRISM's forward, first without and then with
    the ``cut_from`` that the first call returned, as the monitor's epochs run it."""
    try:
        _, first, cut = _prism_and_grad_cam(model, images)
        _, again, cut_again = _prism_and_grad_cam(model, images, cut_from=cut)
    except _Timeout:
        raise
    except Exception as error:
        return "no", f"grad-cam: {type(error).__name__}: {error}"[:300]
    if first.layer != final_layer:
        return "no", f"grad-cam: layer {first.layer!r}, PRISM's {final_layer!r}"
    scale = float(first.cams.abs().max())
    if cut_again != cut or not torch.allclose(again.cams, first.cams, rtol=0, atol=1e-4 * scale + 1e-12):
        return "no", f"grad-cam: told where to cut ({cut}, then {cut_again}), a different Grad-CAM"
    return ("yes" if bool(first.alpha.any()) else "zero"), ""


# ------------------------------------------------------------------------------- report
def summary(rows: list[Row]) -> str:
    ran = [r for r in rows if r.status == "ran"]
    errors = [r for r in rows if r.status == "error"]
    lines = [
        f"models: {len(rows)}; ran: {len(ran)}; error: {len(errors)}; "
        f"skipped (could not be built, or over the size limit): {sum(r.status == 'skipped' for r in rows)}",
        "",
        "| source | reference layout | ran | final map matches | stage resolutions match | stage maps match | grey "
        "| Grad-CAM as the monitor runs it (of which zero) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in ran:
        groups[(r.source, r.layout)].append(r)
    for (source, layout), group in sorted(groups.items()):
        final_known = [r for r in group if r.final != "n/a"]
        staged = [r for r in group if r.stages in ("yes", "no")]
        lines.append(
            f"| {source} | {layout} | {len(group)} | {sum(r.final == 'yes' for r in final_known)}/{len(final_known)} "
            f"| {sum(r.stages == 'yes' for r in staged)}/{len(staged)} "
            f"| {sum(r.stage_maps == 'yes' for r in staged)}/{len(staged)} | {sum(r.grey for r in group)} "
            f"| {sum(r.grad_cam in ('yes', 'zero') for r in group)}/{len(group)} "
            f"({sum(r.grad_cam == 'zero' for r in group)}) |"
        )
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    lines = [
        "| source | family | model | M params | size | status | layout | final | stage resolutions | stage maps "
        "| grey | grad-cam | final layer | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.note.replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {r.source} | {r.family} | {r.model} | {r.params} | {r.size} | {r.status} | {r.layout} | {r.final} "
            f"| {r.stages} | {r.stage_maps} | {'grey' if r.grey else ''} | {r.grad_cam} | {r.final_layer} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", nargs="+", default=["timm", "torchvision"], choices=["timm", "torchvision"]
    )
    parser.add_argument("--models", nargs="*", default=[], help="name patterns (fnmatch); all if omitted")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-params", type=float, default=30e6, help="skip larger models (default 30 M)")
    parser.add_argument("--min-params", type=float, default=0, help="leave out smaller models (default 0)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--jsonl", help="also write one JSON line per model here")
    parser.add_argument("--table", action="store_true", help="print the full per-model table at the end")
    parser.add_argument(
        "--per-family",
        type=int,
        default=0,
        help="only the N smallest models (by parameters) of each family: timm module or torchvision name stem",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    models = []
    if "timm" in args.source:
        models += timm_models(args.models)
    if "torchvision" in args.source:
        models += torchvision_models(args.models)
    listed = [(source, name, params_on_meta(source, name), _family(source, name)) for source, name in models]
    if args.min_params:  # models whose size could not be read stay in
        listed = [entry for entry in listed if not entry[2] * 1e6 < args.min_params]
    if args.per_family:
        listed = smallest_per_family(listed, args.per_family, args.max_params / 1e6)
    out = open(args.jsonl, "w") if args.jsonl else None  # noqa: SIM115 - written row by row
    rows: list[Row] = []
    for source, name, params, family in listed:
        if params == params and params > args.max_params / 1e6:
            row = Row(
                source, family, name, round(params, 2), note=f"over {args.max_params / 1e6:g} M parameters"
            )
        else:
            row = check(source, family, name, params, args.size, args.timeout)
        rows.append(row)
        print(
            f"{row.source:11} {row.model:48} {row.status:7} {row.layout:6} final={row.final:3} "
            f"stages={row.stages:3} maps={row.stage_maps:3} cam={row.grad_cam:4} {'GREY ' if row.grey else ''}"
            f"{row.seconds:6.1f}s "
            f"{row.note[:160]}",
            file=sys.stderr,
            flush=True,
        )
        if out is not None:
            out.write(json.dumps(asdict(row)) + "\n")
            out.flush()
    print(summary(rows))
    if args.table:
        print()
        print(table(rows))
    counts = Counter(r.status for r in rows)
    print(f"\n{dict(counts)}", file=sys.stderr)


def smallest_per_family(
    listed: list[tuple[str, str, float, str]], count: int, max_params: float
) -> list[tuple[str, str, float, str]]:
    """The ``count`` smallest models of each (source, family) within ``max_params`` millions (models
    whose size could not be read on the meta device count as large), in the listing's order."""
    by_family: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
    for source, name, params, family in listed:
        if not params > max_params:
            by_family[source, family].append((params if params == params else float("inf"), name))
    keep = {name for group in by_family.values() for _, name in sorted(group)[:count]}
    return [entry for entry in listed if entry[1] in keep]


def _family(source: str, name: str) -> str:
    return name.split("_")[0] if source == "torchvision" else _timm_family(name)


_FAMILIES: dict[str, str] = {}


def _timm_family(name: str) -> str:
    """The timm module that defines the model (``vision_transformer``, ``resnet``, …)."""
    if not _FAMILIES:
        import timm

        for module in timm.list_modules():
            _FAMILIES.update(dict.fromkeys(timm.list_models(module=module), module))
    return _FAMILIES.get(name, name.split("_")[0])


if __name__ == "__main__":
    main()
