"""Recording what PRISM needs from one forward pass: the hook lifecycle.

:class:`FeatureRecorder` is a context manager. On entry it attaches to the model's modules; on exit
(also after an exception) it detaches from every one of them. While the forward runs it keeps only

* a reference to the final feature map (read after the forward has finished, so in-place
  activations applied to it later are included), and
* one ``(N, 1, h, w)`` map, ``mean_c |A|``, per stage,

never other activations, so its memory cost is a few small maps.

Discovery has to see every module call (199 per forward of EfficientNet-Lite0). A forward hook puts
a module on the slow path of ``nn.Module.__call__``, about 5 µs per call inside a forward that
streams megabytes between calls, so the recorder instead sets a wrapper as each module's own
``forward`` attribute, which keeps the fast path, and deletes it (or puts back a ``forward`` the
instance already had) on exit. It uses forward hooks where a wrapper could see something else than
a hook would: on a module with forward hooks of its own (they may replace the output after the
wrapper has seen it), while a global forward hook is registered, and inside ``nn.DataParallel``
(its replicas copy each module's attributes). Modules named by ``final_layer``/``stage_layers``
always get forward hooks.

Which tensors these are is discovered from the forward itself (see :meth:`FeatureRecorder.recording`)
or given by module name:

* **final feature map**: the output of the last module, in order of completion, that produces a
  4-D tensor with spatial size larger than 1×1;
* **stage maps**: for every spatial resolution the network downsamples from, the tensor entering
  the outermost module that reduces that resolution. Such a stage is named after the last module
  that produced the tensor, or ``"<module>:input"`` when a functional operation produced it.
  Modules that enlarge the map (padding) and global pooling to 1×1 do not downsample, a map
  enlarged by padding is no new resolution, and the model's input (or a tensor of the input's
  shape) is never a stage; only resolutions larger than the final map's count.
* channels-last tensors whose last two dims do not scale like the image's ``H×W`` (ConvNeXt's
  ``(N, h, w, c)`` permutes) are not feature maps at all;
* an ``nn.Identity`` (a placeholder, as in ``model.avgpool = nn.Identity()`` or timm's
  ``drop_path``) hands its input on and produces nothing, so it is never the final layer or a
  stage's name: the tensor keeps the name of the module that produced it.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks
from torch.utils.hooks import RemovableHandle

from .extrapolation import stage_map

__all__ = ["FeatureRecorder", "Recording", "resolve_module"]

INPUT_SUFFIX = ":input"
_MISSING = object()


@dataclass(frozen=True)
class Recording:
    """What one forward pass left behind.

    Attributes:
        final: ``(N, c, h, w)`` final feature map, as it was after the forward finished.
        final_layer: name of the module that produced it.
        stage_maps: ``(N, 1, h_i, w_i)`` float32 maps ``mean_c |A|``, in execution order.
        stage_layers: names of the stages, same order.
        complete: ``False`` when a deferred stage map turned out to be needed after its activation
            was gone (see ``defer_nested``); record again with ``defer_nested=False``.
    """

    final: Tensor
    final_layer: str
    stage_maps: list[Tensor]
    stage_layers: list[str]
    complete: bool = True


def resolve_module(model: nn.Module, name: str, *, allow_input: bool = False) -> tuple[nn.Module, bool]:
    """Look a module up by name.

    Args:
        model: the network.
        name: a name from ``model.named_modules()``; with ``allow_input``, ``"<name>:input"``
            names the tensor entering that module.
        allow_input: accept the ``":input"`` suffix.

    Returns:
        ``(module, is_input)``.

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: if no module has that name; the message lists the nearest valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"layer names must be strings, got {type(name).__name__}: {name!r}")
    is_input = allow_input and name.endswith(INPUT_SUFFIX)
    key = name[: -len(INPUT_SUFFIX)] if is_input else name
    modules = dict(model.named_modules())
    modules.pop("", None)
    if key not in modules:
        nearest = difflib.get_close_matches(key, list(modules), n=5, cutoff=0.5) or list(modules)[-5:]
        raise ValueError(
            f"{name!r} is not a module of {type(model).__name__}; nearest valid names: "
            + ", ".join(repr(n) for n in nearest)
        )
    return modules[key], is_input


def _first_tensor(values: Any) -> Tensor | None:
    if isinstance(values, Tensor):
        return values
    if isinstance(values, (tuple, list)):
        for value in values:
            if isinstance(value, Tensor):
                return value
    return None


def _is_feature_map(hw: tuple[int, int] | None, image_hw: tuple[int, int] | None) -> bool:
    """Whether a 4-D tensor's last two dims scale like the image's ``H×W``.

    Excludes channels-last intermediates such as ConvNeXt's ``(N, h, w, c)`` permutes: their last
    two dims ``(w, c)`` do not shrink in proportion to the image (a factor of two of slack allows
    for rounding on small maps).
    """
    if hw is None:
        return False
    if image_hw is None:
        return True
    scale_h, scale_w = hw[0] / image_hw[0], hw[1] / image_hw[1]
    return max(scale_h, scale_w) <= 2 * min(scale_h, scale_w)


def _alive(registry: dict[int, weakref.ref[Tensor]], t: Tensor) -> bool:
    ref = registry.get(id(t))
    return ref is not None and ref() is t


class _ForwardWrapper:
    """Calls ``on_enter(module, args)`` before and ``on_exit(module, args, output)`` after a module's
    ``forward``, by setting a wrapper as the module's own ``forward`` attribute until :meth:`remove`.

    What a forward pre-hook and a forward hook would see, without taking the module off the fast
    path of ``nn.Module.__call__`` (see the module docstring for when hooks are used instead).
    """

    def __init__(
        self,
        module: nn.Module,
        on_enter: Callable[[nn.Module, tuple[Any, ...]], None] | None,
        on_exit: Callable[[nn.Module, tuple[Any, ...], Any], None],
    ) -> None:
        self.module = module
        state = vars(module)
        self._own = state.get("forward", _MISSING)  # a forward already set on the instance: put back
        forward = module.forward
        if on_enter is None:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                output = forward(*args, **kwargs)
                on_exit(module, args, output)
                return output

        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                on_enter(module, args)
                output = forward(*args, **kwargs)
                on_exit(module, args, output)
                return output

        self.wrapper = wrapper
        state["forward"] = wrapper

    def remove(self) -> None:
        """Restore the module's ``forward`` exactly as found (idempotent)."""
        state = vars(self.module)
        if state.get("forward") is self.wrapper:
            if self._own is _MISSING:
                del state["forward"]
            else:
                state["forward"] = self._own


@dataclass
class _StageCandidate:
    start: int  # call index of the downsampling module: smaller = outer / earlier
    name: str
    map: Tensor | None  # None: deferred, an enclosing module is expected to take over
    source: weakref.ref[Tensor]  # the activation the map is (to be) computed from


class FeatureRecorder:
    """Context manager that records the final feature map and the stage maps of one forward.

    Args:
        model: the network whose forward is recorded.
        final_layer: module whose (last) output is the final feature map; discovered if ``None``.
        stage_layers: modules whose outputs (or ``"<name>:input"`` inputs) are the stages, in any
            order; discovered if ``None``.
        defer_nested: when a downsampling module runs inside an enclosing module whose own input
            has the same resolution (a MobileNet/EfficientNet/ResNet block around its strided
            convolution), skip its stage map: the enclosing module almost always downsamples too
            and takes the stage over, with its own input. If it does not and the skipped
            activation is gone, :meth:`recording` reports ``complete=False`` and the forward must
            be recorded again with ``defer_nested=False`` (``prism()`` does this). No second pass was
            needed on any of 56 torchvision CNNs (96×96 inputs) or on EfficientNet-Lite0 (224×224).

    Raises:
        ValueError: for an unknown module name (listing the nearest valid names).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 1))
        >>> with FeatureRecorder(model) as recorder:
        ...     _ = model(torch.rand(2, 3, 16, 16))
        >>> rec = recorder.recording(input_shape=(2, 3, 16, 16))
        >>> rec.final_layer, rec.stage_layers, tuple(rec.final.shape)
        ('2', ['0'], (2, 8, 8, 8))
    """

    def __init__(
        self,
        model: nn.Module,
        final_layer: str | None = None,
        stage_layers: Sequence[str] | None = None,
        *,
        defer_nested: bool = True,
    ) -> None:
        if isinstance(stage_layers, str):
            raise TypeError(f"stage_layers must be a list of module names, got the string {stage_layers!r}")
        self.model = model
        self.final_layer = final_layer
        self.stage_layers = None if stage_layers is None else list(stage_layers)
        self.defer_nested = defer_nested
        self._final_module = resolve_module(model, final_layer)[0] if final_layer is not None else None
        self._stage_modules = [
            (name, *resolve_module(model, name, allow_input=True)) for name in self.stage_layers or []
        ]
        self._handles: list[RemovableHandle | _ForwardWrapper] = []
        self._reset()

    # ---------------------------------------------------------------- lifecycle
    def _reset(self) -> None:
        self._calls = 0
        # (call index, 4-D input, its producer when the call began) per open call
        self._stack: list[tuple[int, Tensor | None, str | None]] = []
        self._final: tuple[str, Tensor] | None = None
        self._producers: dict[int, tuple[str, weakref.ref[Tensor]]] = {}
        self._padded: dict[int, weakref.ref[Tensor]] = {}  # outputs of modules that enlarge the map
        self._candidates: dict[tuple[int, int], _StageCandidate] = {}
        self._named_stages: dict[str, tuple[int, Tensor]] = {}
        self._input_shape: tuple[int, ...] | None = None
        self._feature_hws: dict[tuple[int, ...], tuple[int, int] | None] = {}

    def __enter__(self) -> FeatureRecorder:
        if self._handles:
            raise RuntimeError("FeatureRecorder is already active; it cannot be entered twice")
        self._reset()
        try:
            self._register()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
        self._stack.clear()
        self._producers.clear()
        self._padded.clear()

    def remove(self) -> None:
        """Remove every hook and forward wrapper this recorder attached (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _register(self) -> None:
        discover = self._final_module is None or self.stage_layers is None
        root = self._handles.append
        root(self.model.register_forward_pre_hook(self._on_model_input))
        if discover:
            modules = list(self.model.named_modules())
            # Where a wrapper would not see what a hook sees (module docstring): hooks everywhere.
            wrap = not _global_forward_hooks and not any(isinstance(m, nn.DataParallel) for _, m in modules)
            for name, module in modules:
                if module is self.model or type(module) is nn.Identity:
                    continue  # an nn.Identity hands its input on: it produces no tensor to name
                # A module without children runs nothing hooked inside, so its exit hook can see
                # what its entry hook would have (call order, input, producer): one hook, not two.
                leaf = not module._modules  # no children (a None entry counts as one: harmless)
                on_enter, on_exit = None if leaf else self._on_enter, self._make_on_exit(name, leaf=leaf)
                if wrap and not module._forward_hooks:
                    root(_ForwardWrapper(module, on_enter, on_exit))
                    continue
                if on_enter is not None:
                    root(module.register_forward_pre_hook(on_enter))
                root(module.register_forward_hook(on_exit))
        if self._final_module is not None:
            root(self._final_module.register_forward_hook(self._on_final))
        for name, module, is_input in self._stage_modules:
            if is_input:
                root(module.register_forward_pre_hook(self._make_named_stage(name, from_input=True)))
            else:
                root(module.register_forward_hook(self._make_named_stage(name, from_input=False)))

    # ---------------------------------------------------------------- hooks
    def _on_model_input(self, module: nn.Module, args: Any) -> None:
        x = _first_tensor(args)
        if x is not None and self._input_shape is None:
            self._input_shape = tuple(x.shape)
            self._feature_hws.clear()

    def _entry(self, args: Any) -> tuple[int, Tensor | None, str | None]:
        """Call index, 4-D input and the input's producer, as a module is entered."""
        self._calls += 1
        x = _first_tensor(args)
        if x is None or x.dim() != 4:
            return self._calls, None, None
        return self._calls, x, self._producer(x)

    def _producer(self, x: Tensor) -> str | None:
        entry = self._producers.get(id(x))
        return entry[0] if entry is not None and entry[1]() is x else None

    def _on_enter(self, module: nn.Module, args: Any) -> None:
        self._stack.append(self._entry(args))

    def _feature_hw(self, t: Tensor) -> tuple[int, int] | None:
        """``(h, w)`` of a 4-D tensor whose last two dims scale like the image's, else ``None``
        (cached per shape: this runs twice for every module call)."""
        shape = t.shape
        try:
            return self._feature_hws[shape]
        except KeyError:
            pass
        hw = (shape[-2], shape[-1]) if len(shape) == 4 else None
        image = self._input_shape
        if hw is not None and not _is_feature_map(hw, None if image is None else (image[-2], image[-1])):
            hw = None
        self._feature_hws[shape] = hw
        return hw

    def _make_on_exit(self, name: str, *, leaf: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # A module without children runs nothing hooked inside, so what its entry hook would
            # have seen (input, its producer, call order) is still there now; it is only looked up
            # when needed.
            entry = None if leaf else self._stack.pop() if self._stack else (0, None, None)
            if not isinstance(output, Tensor):
                return
            out_hw = self._feature_hw(output)
            if out_hw is None:
                return
            spatial = out_hw[0] * out_hw[1] > 1  # global pooling (squeeze-excitation, head) is no map
            if spatial and self._final_module is None:
                self._final = (name, output)
            if entry is None:
                x = _first_tensor(args)
                start, producer = 0, None
            else:
                start, x, producer = entry
            in_hw = None if x is None else self._feature_hw(x)
            if in_hw is not None and in_hw != out_hw:
                assert x is not None
                reduces = out_hw[0] <= in_hw[0] and out_hw[1] <= in_hw[1]
                if reduces and spatial and x.shape != self._input_shape and not _alive(self._padded, x):
                    # A leaf: nothing hooked ran since its entry, so this index keeps the entry order.
                    if entry is None:
                        self._calls += 1
                        start, producer = self._calls, self._producer(x)
                    self._add_candidate(start, name, producer, x, in_hw)
                elif out_hw[0] >= in_hw[0] and out_hw[1] >= in_hw[1]:
                    self._padded[id(output)] = weakref.ref(output)
            self._producers[id(output)] = (name, weakref.ref(output))

        return hook

    def _add_candidate(
        self, start: int, name: str, producer: str | None, x: Tensor, hw: tuple[int, int]
    ) -> None:
        """A module called ``name`` (entered at call ``start``) reduced ``x`` from ``hw``; keep it as
        the stage of ``hw`` if it is the outermost such module so far."""
        known = self._candidates.get(hw)
        if known is not None and start >= known.start:
            return
        stage = producer if producer is not None else name + INPUT_SUFFIX
        if known is None or known.source() is not x or known.map is None:
            deferred = self.defer_nested and self._enclosed(x, hw)
            known = _StageCandidate(start, stage, None if deferred else stage_map(x), weakref.ref(x))
        # else: nested reducers that share their input share its map
        self._candidates[hw] = _StageCandidate(start, stage, known.map, known.source)

    def _enclosed(self, x: Tensor, hw: tuple[int, int]) -> bool:
        """Whether a module still running around this one took another tensor of ``hw`` as input
        (and may therefore downsample ``hw`` itself, superseding this stage candidate)."""
        return any(
            t is not None
            and t is not x
            and t.shape[-2:] == hw
            and t.shape != self._input_shape
            and not _alive(self._padded, t)
            for _, t, _ in self._stack
        )

    def _on_final(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            self._final = (str(self.final_layer), output)

    def _make_named_stage(self, name: str, *, from_input: bool) -> Any:
        def take(value: Any) -> None:
            t = _first_tensor(value)
            if t is not None and t.ndim == 4:
                self._calls += 1
                self._named_stages[name] = (self._calls, stage_map(t))

        if from_input:
            return lambda module, args: take(args)
        return lambda module, args, output: take(output)

    # ---------------------------------------------------------------- result
    def recording(self, input_shape: Sequence[int] | None = None) -> Recording:
        """Collect the result after the forward has finished.

        Args:
            input_shape: shape of the model input, to exclude it from the stages (taken from the
                forward if omitted).

        Raises:
            ValueError: if no suitable final feature map was seen, or a named layer did not run
                or produced no 4-D tensor.
        """
        if input_shape is not None:
            self._input_shape = tuple(input_shape)
        name = type(self.model).__name__
        if self._final is None:
            if self.final_layer is not None:
                raise ValueError(f"final_layer {self.final_layer!r} did not run or produced no tensor")
            raise ValueError(
                f"no module of {name} produced a 4-D feature map larger than 1×1; PRISM needs a "
                "convolutional feature map (pass final_layer= to choose one)"
            )
        final_layer, final = self._final
        if final.ndim != 4 or final.shape[-1] * final.shape[-2] < 2:
            raise ValueError(
                f"final_layer {final_layer!r} produced shape {tuple(final.shape)}; PRISM needs a 4-D "
                "(N, c, h, w) feature map larger than 1×1"
            )
        if self.stage_layers is not None:
            missing = [s for s in self.stage_layers if s not in self._named_stages]
            if missing:
                raise ValueError(f"stage layers {missing} did not run or produced no 4-D tensor")
            ordered = sorted(self._named_stages.items(), key=lambda item: item[1][0])
            stage_layers = [stage for stage, _ in ordered]
            stage_maps = [value[1] for _, value in ordered]
        else:
            h, w = final.shape[-2:]
            chosen = sorted(
                (c for (sh, sw), c in self._candidates.items() if sh >= h and sw >= w and sh * sw > h * w),
                key=lambda c: c.start,
            )
            stage_layers = [c.name for c in chosen]
            stage_maps = []
            for c in chosen:
                if c.map is None:  # deferred, and no enclosing module took over
                    source = c.source()
                    if source is None:
                        return Recording(final, final_layer, [], stage_layers, complete=False)
                    c.map = stage_map(source)
                stage_maps.append(c.map)
        return Recording(final, final_layer, stage_maps, stage_layers)
