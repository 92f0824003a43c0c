"""Recording what PRISM needs from one forward pass, and discovering where it is.

:func:`record` runs a model's forward once and returns a :class:`Recording`: the final feature map
(as an ``(N, C, h, w)`` view), the name and :class:`~lightning_prism.layout.FeatureLayout` of the layer
that produced it, and one ``(N, 1, h, w)`` map ``mean_c |A|`` per stage. Nothing else is kept, so its
memory cost is a few small maps. :class:`FeatureRecorder` is the discovery behind it, a context
manager around a forward; :class:`~lightning_prism.hooks.ModuleTaps` attaches and detaches its
callbacks.

Every tensor is read through its layout (:func:`~lightning_prism.layout.infer_layout`): convolutional
``(N, C, h, w)`` maps, channels-last ``(N, h, w, C)`` maps and token sequences ``(N, P + h·w, C)`` are
all *feature maps* on a patch grid ``h×w`` of the image, and only tensors whose first dimension is the
batch size ``N`` are. Discovered from the forward itself (or given by module name):

* **final feature map**: the output of the last module, in order of completion, that produces a
  feature map larger than 1×1, read after the forward has finished (in-place activations applied to
  it later are included), except

  - a map larger than its module's input in either dimension (padding, an adaptive pooling that
    enlarges, upsampling) is never the final map;
  - when modules take the last spatial map and return no spatial map (*heads*: global or attention
    pooling, a class-score convolution with its pooling, the last downsampling of a small input to
    1×1), the final map is the map entering the outermost of them; only modules that return after
    the last spatial map was made count (CaiT's class-attention blocks return class tokens, and then
    the patch tokens go on);
  - when the model's last module with parameters is a convolution whose output is the final map, or
    becomes it through modules without parameters (a container handing it on, upsampling, the sum
    of two score maps in LRASPP), and the model returns other spatial class scores with as many
    channels (a segmentation model's upsampled scores: torchvision's FCN, DeepLabV3, LRASPP), that
    convolution is a class-score layer: the final map is the one entering it. (A convolution pooled into the output, as in Network-in-Network, is not told apart from a
    pooled feature extractor and stays the final map, unless a head module pools it.) Likewise
    when a linear layer made the final map with as many channels as the model's ``(N, K)`` output
    has classes: per-token class scores (VOLO's auxiliary head), the map entering it is the final map.

* **stage maps**: for every resolution the network downsamples from on its main path, the feature
  map entering the outermost module that takes it down to the next resolution of the main path.
  Such a stage is named after the last module that produced that tensor, or ``"<module>:input"``
  when a functional operation produced it. Precisely:

  - a module *reduces* when its output map is no larger than its input map in both dimensions and
    at most two thirds of it in one, a stride of 1.5 or more (global pooling to 1×1 does not count,
    nor does a valid convolution that trims a few pixels). Padding does not, and a map enlarged by
    padding is no new resolution; the model's input (or a tensor of the input's shape) is never a
    stage;
  - a reduction inside a module whose output map is larger than the reduced one (a spatial-reduction
    attention's keys, a global-context branch, a down-and-up block) is a *side branch* and never a
    stage;
  - of several modules that reduce the same resolution, the outermost one whose output has the next
    resolution is the stage's module: a container that runs several stages (timm's ``stages``,
    EfficientNet's ``blocks``) is not, its first stage is;
  - inside a *stem*, a module that takes the model's input and hands on a map that is reduced
    further outside it, a reduction by a layer with parameters (a second strided convolution) is
    no stage, a reduction by pooling is (ResNet's max-pool keeps the map before it);
  - only resolutions larger than the final map's count.

  A model that declares its stages, as timm's models do in ``feature_info`` (also a timm model
  inside a wrapper, such as a LightningModule), gets those: the output of the last listed module at
  every resolution larger than the final map's. The rules above apply when nothing is declared, or
  when the declared modules give no stage (a hybrid ViT whose ``feature_info`` lists only blocks at
  the patch grid keeps its convolutional backbone's stages).

* an ``nn.Identity`` (a placeholder, as in ``model.avgpool = nn.Identity()`` or timm's
  ``drop_path``) hands its input on and produces nothing, so it is never the final layer or a
  stage's name: the tensor keeps the name of the module that produced it.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from .extrapolation import stage_map
from .hooks import ModuleTaps, wrappers_allowed
from .layout import FeatureLayout, declared_prefix_tokens, infer_layout

__all__ = [
    "FeatureLayout",
    "FeatureRecorder",
    "Recording",
    "declared_stages",
    "infer_layout",
    "observed_modules",
    "output_tensor",
    "record",
    "resolve_module",
]

INPUT_SUFFIX = ":input"
Grid = tuple[int, int]
_NOTHING_KEPT: frozenset[Grid] = frozenset()


@dataclass(frozen=True)
class Recording:
    """What one forward pass left behind.

    Attributes:
        final: ``(N, c, h, w)`` final feature map, as it was after the forward finished (a view of
            the layer's tensor through ``final_layout``: permuted for a channels-last map, the patch
            tokens on their grid for a token sequence).
        final_layer: name of the module whose output (:func:`output_tensor`: the tensor itself, or
            the first tensor of a tuple) is the final feature map, or ``"<module>:input"`` for the
            tensor entering that module (see :func:`resolve_module`).
        final_layout: how that tensor reads as ``final``; the same layout turns the gradient with
            respect to it into ``(N, c, h, w)``.
        stage_maps: ``(N, 1, h_i, w_i)`` float32 maps ``mean_c |A|``, in execution order.
        stage_layers: names of the stages, same order.
        output: the model's own output for the batch.
        source: the final layer's tensor itself, as the forward produced it (``final`` is read from
            it through ``final_layout``); what a gradient with respect to the final map is taken of.
    """

    final: Tensor
    final_layer: str
    final_layout: FeatureLayout
    stage_maps: list[Tensor]
    stage_layers: list[str]
    output: Any = None
    source: Tensor | None = None


def observed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a recording watches: every module of ``model`` but the model itself and
    ``nn.Identity`` placeholders (they hand their input on and produce nothing), with their names."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if module is not model and type(module) is not nn.Identity
    ]


def declared_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The stage modules a model declares: the ``module`` names of timm's ``feature_info`` (a list of
    dicts), of the outermost module that has one, named relative to ``model``; ``[]`` if none does
    or a name does not resolve.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, stride=2))
        >>> net.feature_info = [{"module": "0", "reduction": 1}, {"module": "1", "reduction": 2}]
        >>> [name for name, _ in declared_stages(nn.Sequential(net))]  # inside a wrapper
        ['0.0', '0.1']
    """
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        if not isinstance(info, (list, tuple)) or not info:
            continue
        names = [entry.get("module") if isinstance(entry, Mapping) else None for entry in info]
        if not all(isinstance(name, str) and name for name in names):
            return []
        stages = []
        for name in names:
            full = f"{prefix}.{name}" if prefix else name
            try:
                stages.append((full, model.get_submodule(full)))
            except AttributeError:
                return []
        return stages
    return []


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


def output_tensor(value: Any) -> Tensor | None:
    """The tensor a layer hands on: ``value`` itself, or the first tensor of a tuple or list
    (``None`` otherwise). A layer named in a :class:`Recording` hands its map on this way.

    Example::

        >>> output_tensor((None, torch.zeros(2), torch.ones(1))), output_tensor({"x": torch.ones(1)})
        (tensor([0., 0.]), None)
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                return item
    return None


_first_tensor = output_tensor


def _scores(output: Any) -> Tensor | None:
    """The model's first output tensor, also from a mapping (torchvision's segmentation dicts,
    Hugging Face's ``ModelOutput``)."""
    if isinstance(output, Mapping):
        output = tuple(output.values())
    return output_tensor(output)


def _tensors(values: Any) -> Iterator[Tensor]:
    if isinstance(values, Tensor):
        yield values
    elif isinstance(values, (tuple, list)):
        yield from (v for v in values if isinstance(v, Tensor))
    elif isinstance(values, Mapping):
        yield from (v for v in values.values() if isinstance(v, Tensor))


def _downsampled(a: Grid, b: Grid) -> bool:
    """``a`` no larger than ``b`` in both dimensions and at most two thirds of it in one (a stride of
    1.5 or more; a valid convolution that trims a few pixels does not downsample)."""
    return a[0] <= b[0] and a[1] <= b[1] and (3 * a[0] <= 2 * b[0] or 3 * a[1] <= 2 * b[1])


def _alive(registry: dict[int, weakref.ref[Tensor]], t: Tensor) -> bool:
    ref = registry.get(id(t))
    return ref is not None and ref() is t


class _Frame:
    """A module call in progress (modules with children only)."""

    __slots__ = ("input", "layout", "params", "pending", "producer", "start")

    def __init__(
        self,
        start: int,
        x: Tensor | None,
        layout: FeatureLayout | None,
        producer: str | None,
        params: int,
    ) -> None:
        self.start = start  # call index: smaller = outer / earlier
        self.input = x
        self.layout = layout  # of the input, if it is a feature map
        self.producer = producer  # of the input, when the call began
        self.params = params  # calls of modules with parameters completed before this one began
        self.pending: list[_Candidate] | None = None  # stage candidates of reductions inside it


class _Candidate:
    """A reduction ``gi → go`` whose input may be a stage."""

    __slots__ = ("gi", "go", "layout", "learned", "map", "name", "ref", "source", "start", "stem")

    def __init__(self, start: int, name: str, x: Tensor, layout: FeatureLayout, go: Grid) -> None:
        self.start = start
        self.name = name
        self.gi, self.go = layout.grid, go
        self.layout = layout
        self.ref = weakref.ref(x)  # identity of the input
        self.source: Tensor | None = x  # held until the map is computed or no longer needed
        self.map: Tensor | None = None
        self.stem: Grid | None = None  # output grid of the outermost module around it that took the image
        self.learned = True  # modules with parameters ran inside the reducing module

    def materialize(self) -> None:
        if self.map is None and self.source is not None:
            self.map = stage_map(self.layout.to_nchw(self.source))
        self.source = None


class FeatureRecorder:
    """Context manager that records the final feature map and the stage maps of one forward.

    Args:
        model: the network whose forward is recorded.
        final_layer: module whose (last) output, or ``"<name>:input"`` input, is the final feature
            map; discovered if ``None``.
        stage_layers: modules whose outputs (or ``"<name>:input"`` inputs) are the stages, in any
            order; discovered if ``None``.
        defer_nested: when a module reduces inside an enclosing module whose input has the same
            resolution (the strided convolution of a ResNet or MobileNet block), compute its stage
            map only if the enclosing module does not reduce the same way itself (it almost always
            does, and then its own input is the stage); until then its input is kept. ``False``
            computes every candidate's map at once (the same result).

    Raises:
        TypeError: for a ``stage_layers`` string or a name that is not a string.
        ValueError: for an unknown module name (listing the nearest valid names).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 1))
        >>> with FeatureRecorder(model) as recorder:
        ...     _ = model(torch.rand(2, 3, 16, 16))
        >>> rec = recorder.recording()
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
        self._final_module = (
            resolve_module(model, final_layer, allow_input=True) if final_layer is not None else None
        )
        self._stage_modules = [
            (name, *resolve_module(model, name, allow_input=True)) for name in self.stage_layers or []
        ]
        self._declared = declared_stages(model) if self.stage_layers is None else []
        self._taps = ModuleTaps()
        self._reset()

    # ---------------------------------------------------------------- lifecycle
    def _reset(self) -> None:
        self._calls = 0
        self._params = 0  # calls of modules with parameters completed so far
        self._stack: list[_Frame] = []
        self._final: tuple[str, Tensor, FeatureLayout] | None = None
        self._named_final: tuple[str, Tensor] | None = None
        # (its output, its input, the input's layout, the input's name, whether a linear layer, the
        # modules with parameters run so far) of a module that may be a class-score layer, from when it
        # made a final-map candidate until a module with parameters runs after it
        self._classifier: tuple[Tensor, Tensor, FeatureLayout, str, bool, int] | None = None
        # (call index, input, its layout, its name) of modules that took the last spatial map so far
        # and returned no spatial map
        self._heads: list[tuple[int, Tensor, FeatureLayout, str]] = []
        self._producers: dict[int, tuple[str, weakref.ref[Tensor]]] = {}
        self._padded: dict[int, weakref.ref[Tensor]] = {}  # outputs of modules that enlarge the map
        self._stages: list[_Candidate] = []  # candidates no enclosing module can supersede any more
        self._named_stages: dict[str, tuple[int, Tensor]] = {}
        self._declared_stages: dict[str, tuple[int, Tensor]] = {}
        self._input_shape: tuple[int, ...] | None = None
        self._image_size: Grid | None = None
        self._output: Any = None
        self._layouts: dict[tuple[int, ...], FeatureLayout | None] = {}
        self._all_modules: list[nn.Module] = []
        self._prefixes: tuple[int, ...] | None = None

    def __enter__(self) -> FeatureRecorder:
        if len(self._taps):
            raise RuntimeError("FeatureRecorder is already active; it cannot be entered twice")
        self._reset()
        try:
            self._register()
        except BaseException:
            self._taps.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._taps.remove()
        for frame in self._stack:  # after an exception: let go of every held input
            frame.pending = None
        self._stack.clear()
        self._producers.clear()
        self._padded.clear()

    def remove(self) -> None:
        """Remove every hook and forward wrapper this recorder attached (idempotent)."""
        self._taps.remove()

    def _register(self) -> None:
        taps = self._taps
        taps.before(self.model, self._on_model_input)
        taps.after(self.model, self._on_model_output)
        discover = self._final_module is None or self.stage_layers is None
        modules = list(self.model.named_modules())
        self._all_modules = [m for _, m in modules]  # for the prefix tokens, read at the first 3-D tensor
        if discover:
            wrap = wrappers_allowed(m for _, m in modules)
            # (name, module, has parameters of its own); an nn.Identity hands its input on: it
            # produces no tensor to name.
            observed = [
                (name, m, bool(m._parameters) and any(p is not None for p in m._parameters.values()))
                for name, m in observed_modules(self.model)
            ]
            with_parameters = [(name, m) for name, m, has in observed if has]
            classifier = (
                None  # the last module with parameters, if a convolution (class scores per position?)
            )
            if with_parameters and isinstance(with_parameters[-1][1], nn.modules.conv._ConvNd):
                classifier = with_parameters[-1][0]
            for name, module, has_parameters in observed:
                # A module without children runs nothing hooked inside, so its exit callback can see
                # what its entry callback would have (call order, input, producer): one callback.
                leaf = not module._modules  # no children (a None entry counts as one: harmless)
                on_exit = self._make_on_exit(
                    name,
                    leaf=leaf,
                    has_parameters=has_parameters,
                    # linear layers may make class scores per token (VOLO's auxiliary head)
                    classifier=name == classifier or isinstance(module, nn.Linear),
                )
                taps.around(module, None if leaf else self._on_enter, on_exit, wrap=wrap)
        if self._final_module is not None:
            module, is_input = self._final_module
            if is_input:
                taps.before(
                    module, lambda m, args, kwargs: self._on_named_final(args or tuple(kwargs.values()))
                )
            else:
                taps.after(module, lambda m, args, output: self._on_named_final(output))
        for name, module in self._declared:
            declared = self._make_named_stage(name, declared=True)
            taps.after(module, lambda m, args, output, take=declared: take(output))
        for name, module, is_input in self._stage_modules:
            take = self._make_named_stage(name)
            if is_input:
                taps.before(module, lambda m, args, kwargs, take=take: take(args or tuple(kwargs.values())))
            else:
                taps.after(module, lambda m, args, output, take=take: take(output))

    # ---------------------------------------------------------------- layouts
    def _on_model_input(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        x = _first_tensor(args) if args else _first_tensor(tuple(kwargs.values()))
        if x is not None and self._input_shape is None:
            self._set_input_shape(tuple(x.shape))

    def _on_model_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._output = output

    def _set_input_shape(self, shape: tuple[int, ...]) -> None:
        self._input_shape = shape
        self._image_size = (shape[-2], shape[-1]) if len(shape) >= 2 else None
        self._layouts.clear()

    def _layout(self, t: Tensor) -> FeatureLayout | None:
        """The tensor's layout if it is a feature map of this batch (cached per shape: this runs
        for every module call)."""
        shape = t.shape
        try:
            return self._layouts[shape]
        except KeyError:
            pass
        image, batch = self._image_size, None if self._input_shape is None else self._input_shape[0]
        if image is None:  # no image seen: 4-D tensors are (N, C, h, w), nothing else is a map
            layout = (
                FeatureLayout("nchw", (shape[2], shape[3])) if len(shape) == 4 and min(shape) > 0 else None
            )
        else:
            if len(shape) == 3 and self._prefixes is None:
                self._prefixes = declared_prefix_tokens(self._all_modules)
            layout = infer_layout(shape, image, batch=batch, prefix_tokens=self._prefixes or ())
        self._layouts[shape] = layout
        return layout

    def _is_image(self, x: Tensor) -> bool:
        return x.shape == self._input_shape

    # ---------------------------------------------------------------- discovery
    def _producer(self, x: Tensor) -> str | None:
        entry = self._producers.get(id(x))
        return entry[0] if entry is not None and entry[1]() is x else None

    def _on_enter(self, module: nn.Module, args: Any) -> None:
        self._calls += 1
        x = _first_tensor(args)
        layout = None if x is None else self._layout(x)
        producer = None if layout is None else self._producer(x)  # type: ignore[arg-type]
        self._stack.append(_Frame(self._calls, x, layout, producer, self._params))

    def _make_on_exit(self, name: str, *, leaf: bool, has_parameters: bool, classifier: bool) -> Any:
        def on_exit(module: nn.Module, args: Any, output: Any) -> None:
            # A module without children runs nothing hooked inside, so what its entry callback
            # would have seen (input, its producer, call order) is still there now; it is only looked
            # up when needed.
            frame = None if leaf or not self._stack else self._stack.pop()
            if has_parameters:
                self._params += 1
            out = output if isinstance(output, Tensor) else _first_tensor(output)
            out_layout = None if out is None else self._layout(out)
            kept, reuse = _NOTHING_KEPT, None
            if frame is not None and frame.pending:
                kept, reuse = self._settle(frame, out_layout)
            if out_layout is None or not out_layout.spatial:
                self._head(name, frame, args, output)
                if out_layout is None:
                    return
            assert out is not None
            if frame is None:
                x = _first_tensor(args)
                in_layout = None if x is None else self._layout(x)
            else:
                x, in_layout = frame.input, frame.layout
            grid, spatial = out_layout.grid, out_layout.spatial
            enlarged = in_layout is not None and (grid[0] > in_layout.grid[0] or grid[1] > in_layout.grid[1])
            if spatial and not enlarged and self._final_module is None:
                self._final = (name, out, out_layout)
                if self._heads:  # the network went on with a spatial map: those were no heads
                    self._heads.clear()
                if classifier and x is not None and in_layout is not None:
                    linear = isinstance(module, nn.Linear)
                    producer = self._producer(x) or name + INPUT_SUFFIX
                    self._classifier = (out, x, in_layout, producer, linear, self._params)
                elif self._classifier is not None and (
                    self._classifier[4] or self._classifier[5] != self._params
                ):
                    # a linear layer's per-token scores must be the final map itself; a convolution's
                    # may be handed on by modules without parameters. Else hold none of its tensors.
                    self._classifier = None
            if enlarged:
                self._padded[id(out)] = weakref.ref(out)
            elif (
                spatial and in_layout is not None and _downsampled(grid, in_layout.grid) and self._eligible(x)
            ):
                assert x is not None
                if frame is None:  # a leaf: nothing hooked ran since its entry, so this keeps the order
                    self._calls += 1
                    start, producer = self._calls, self._producer(x)
                else:
                    start, producer = frame.start, frame.producer
                if in_layout.grid not in kept:  # else it runs several reductions: the inner one is the stage
                    learned = has_parameters if frame is None else self._params > frame.params
                    self._reduced(start, producer or name + INPUT_SUFFIX, x, in_layout, grid, reuse, learned)
            self._producers[id(out)] = (name, weakref.ref(out))

        return on_exit

    def _eligible(self, x: Tensor | None) -> bool:
        """Whether a module's input can be a stage: discovery is on, and it is neither the model's
        input nor a map enlarged by padding."""
        return (
            x is not None
            and self.stage_layers is None
            and not self._is_image(x)
            and not _alive(self._padded, x)
        )

    def _head(self, name: str, frame: _Frame | None, args: Any, output: Any) -> None:
        """A module returned no spatial map: if it took one, it is a head candidate (global or
        attention pooling, class scores, the last downsampling of a small input to 1×1)."""
        if frame is None:
            x = _first_tensor(args)
            layout = None if x is None else self._layout(x)
        else:
            x, layout = frame.input, frame.layout
        if layout is None or not layout.spatial or self._is_image(x):  # type: ignore[arg-type]
            return
        tensors = list(_tensors(output))
        if not tensors or any((lay := self._layout(t)) is not None and lay.spatial for t in tensors):
            return
        if frame is None:  # a leaf: nothing hooked ran since its entry, so this keeps the order
            self._calls += 1
            start, producer = self._calls, self._producer(x)  # type: ignore[arg-type]
        else:
            start, producer = frame.start, frame.producer
        self._heads.append((start, x, layout, producer or name + INPUT_SUFFIX))  # type: ignore[arg-type]

    def _settle(
        self, frame: _Frame, out_layout: FeatureLayout | None
    ) -> tuple[frozenset[Grid] | set[Grid], Tensor | None]:
        """A module with children returns: each stage candidate of a reduction inside it is dropped
        as a side branch (the module hands on a larger map), superseded (the module reduces the same
        way, so its own input is the stage), or handed outwards.

        Returns:
            the input grids of the candidates handed outwards, and the map of a superseded candidate
            whose input is the module's own (to reuse).
        """
        pending, frame.pending = frame.pending or [], None
        grid = None if out_layout is None else out_layout.grid
        supersedes = grid is not None and frame.layout is not None and self._eligible(frame.input)
        kept: set[Grid] = set()
        reuse = None
        stem = grid if frame.input is not None and self._is_image(frame.input) else None
        for candidate in pending:
            if grid is not None and not (grid[0] <= candidate.go[0] and grid[1] <= candidate.go[1]):
                candidate.source = None  # a side branch
                continue
            if supersedes and grid == candidate.go and frame.layout.grid == candidate.gi:  # type: ignore[union-attr]
                if candidate.map is not None and candidate.ref() is frame.input:
                    reuse = candidate.map
                candidate.source = None
                continue
            kept.add(candidate.gi)
            if stem is not None:
                candidate.stem = stem
            self._hand_out(candidate)
        return kept, reuse

    def _hand_out(self, candidate: _Candidate) -> None:
        """Pass a candidate to the innermost running module, which may still supersede it or show
        it to be a side branch; compute its map now unless that module could supersede it."""
        parent = self._stack[-1] if self._stack else None
        if parent is None:
            candidate.materialize()
            self._stages.append(candidate)
            return
        if not (
            self.defer_nested
            and parent.layout is not None
            and parent.layout.grid == candidate.gi
            and self._eligible(parent.input)
        ):
            candidate.materialize()
        if parent.pending is None:
            parent.pending = []
        parent.pending.append(candidate)

    def _reduced(
        self,
        start: int,
        name: str,
        x: Tensor,
        layout: FeatureLayout,
        go: Grid,
        reuse: Tensor | None,
        learned: bool,
    ) -> None:
        """A module (entered at call ``start``) reduced ``x`` from ``layout.grid`` to ``go``; with
        ``learned``, modules with parameters ran inside it (a strided convolution, not a pooling)."""
        gi = layout.grid
        # A further reduction from gi: the modules running around a candidate that reduced to gi
        # will not end at gi, so none of them supersedes it.
        for open_frame in self._stack:
            for waiting in open_frame.pending or ():
                if waiting.go == gi and waiting.source is not None:
                    waiting.materialize()
        candidate = _Candidate(start, name, x, layout, go)
        candidate.learned = learned
        if reuse is not None:
            candidate.map, candidate.source = reuse, None
        self._hand_out(candidate)

    def _on_named_final(self, value: Any) -> None:
        t = _scores(value)
        if t is not None:
            self._named_final = (str(self.final_layer), t)

    def _make_named_stage(self, name: str, *, declared: bool = False) -> Any:
        taken = self._declared_stages if declared else self._named_stages

        def take(value: Any) -> None:
            t = _scores(value)
            if t is None:
                return
            layout = self._layout(t)
            if layout is None and t.ndim == 4:
                layout = FeatureLayout("nchw", (t.shape[2], t.shape[3]))  # named: taken as (N, C, h, w)
            if layout is not None:
                self._calls += 1
                taken[name] = (self._calls, stage_map(layout.to_nchw(t)))

        return take

    # ---------------------------------------------------------------- result
    def recording(self, input_shape: Sequence[int] | None = None) -> Recording:
        """Collect the result after the forward has finished.

        Args:
            input_shape: shape of the model input, to exclude it from the stages (taken from the
                forward if omitted).

        Raises:
            ValueError: if no suitable final feature map was seen, or a named layer did not run
                or produced no feature map.
        """
        if input_shape is not None and tuple(input_shape) != self._input_shape:
            self._set_input_shape(tuple(input_shape))
        final_layer, final, layout = self._final_map()
        if self.stage_layers is not None:
            missing = [s for s in self.stage_layers if s not in self._named_stages]
            if missing:
                raise ValueError(f"stage layers {missing} did not run or produced no feature map")
            ordered = sorted(self._named_stages.items(), key=lambda item: item[1][0])
            stage_layers = [stage for stage, _ in ordered]
            stage_maps = [value[1] for _, value in ordered]
        elif declared := self._declared_above(layout.grid):
            stage_layers = [name for name, _ in declared]
            stage_maps = [stage for _, stage in declared]
        else:
            h, w = layout.grid
            chosen: dict[Grid, _Candidate] = {}
            for c in self._stages:
                (sh, sw) = c.gi
                if c.learned and c.stem is not None and c.stem[0] * c.stem[1] > h * w:
                    continue  # a strided layer inside a stem whose output is reduced further: no stage
                if sh >= h and sw >= w and sh * sw > h * w and c.map is not None:
                    known = chosen.get(c.gi)
                    if known is None or c.start < known.start:
                        chosen[c.gi] = c
            ordered_candidates = sorted(chosen.values(), key=lambda c: c.start)
            stage_layers = [c.name for c in ordered_candidates]
            stage_maps = [c.map for c in ordered_candidates]  # type: ignore[misc]
        return Recording(
            layout.to_nchw(final), final_layer, layout, stage_maps, stage_layers, self._output, source=final
        )

    def _declared_above(self, grid: Grid) -> list[tuple[str, Tensor]]:
        """The declared stages at resolutions larger than ``grid``: the last one taken at each, in
        the order they were taken."""
        h, w = grid
        last: dict[Grid, tuple[int, str, Tensor]] = {}
        for name, (call, stage) in self._declared_stages.items():
            sh, sw = stage.shape[-2:]
            if sh >= h and sw >= w and sh * sw > h * w and call > last.get((sh, sw), (-1,))[0]:
                last[sh, sw] = (call, name, stage)
        return [(name, stage) for _, name, stage in sorted(last.values(), key=lambda item: item[0])]

    def _final_map(self) -> tuple[str, Tensor, FeatureLayout]:
        name = type(self.model).__name__
        shapes = (
            "PRISM needs a feature map: (N, C, h, w), channels-last (N, h, w, C) or tokens "
            "(N, prefix + h·w, C) on a patch grid of the image, with N the batch size"
        )
        if self.final_layer is not None:
            if self._named_final is None:
                raise ValueError(f"final_layer {self.final_layer!r} did not run or produced no tensor")
            final_layer, t = self._named_final
            layout = self._layout(t)
            if layout is None and t.ndim == 4:
                layout = FeatureLayout("nchw", (t.shape[2], t.shape[3]))
            if layout is None or not layout.spatial:
                raise ValueError(
                    f"final_layer {final_layer!r} produced shape {tuple(t.shape)}, which is no feature map "
                    f"larger than 1×1; {shapes}"
                )
            return final_layer, t, layout
        if self._final is None:
            raise ValueError(
                f"no module of {name} produced a feature map larger than 1×1; {shapes} "
                "(pass final_layer= to choose one)"
            )
        final_layer, final, layout = self._final
        heads = [head for head in self._heads if head[2].grid == layout.grid]
        if heads:  # the map entering the outermost head of the last spatial map
            _, x, x_layout, x_name = min(heads, key=lambda head: head[0])
            return x_name, x, x_layout
        if self._classifier is not None:
            # The final candidate is the class-score layer's output, or (a convolution's) made of it by
            # modules without parameters (a container handing it on, upsampling, LRASPP's sum of two maps).
            scores = _scores(self._output)
            made, x, x_layout, x_name, linear, _ = self._classifier
            channels = layout.to_nchw(final).shape[1]
            made_layout = self._layout(made)
            same = made_layout is not None and made_layout.to_nchw(made).shape[1] == channels
            if same and scores is not None and scores is not final and x_layout.spatial:
                spatial_scores = (
                    not linear
                    and scores.ndim == 4
                    and scores.shape[-1] * scores.shape[-2] > 1
                    and scores.shape[1] == channels
                )
                token_scores = linear and scores.ndim == 2 and scores.shape[1] == channels
                if spatial_scores or token_scores:
                    return x_name, x, x_layout  # a class-score layer: the map entering it
        return final_layer, final, layout


def record(
    model: nn.Module,
    images: Tensor,
    *,
    final_layer: str | None = None,
    stage_layers: Sequence[str] | None = None,
    inference_mode: bool = True,
) -> Recording:
    """One forward of ``model`` on ``images`` in eval mode without gradients, recorded.

    Every module's ``training`` flag is restored exactly as found, and every hook and wrapper
    removed, also after an exception. Under ``torch.inference_mode()`` when asked, unless a lazy
    module would create its parameters in this forward (they would be inference tensors that
    training cannot use): then under ``torch.no_grad()``.

    Args:
        model: the network.
        images: ``(N, C, H, W)`` batch.
        final_layer: module name (or ``"<name>:input"``) of the final feature map; discovered if
            ``None``.
        stage_layers: module names (or ``"<name>:input"``) of the stages; discovered if ``None``.
        inference_mode: ``torch.inference_mode()`` instead of ``torch.no_grad()``.

    Returns:
        :class:`Recording`, with the model's output.

    Raises:
        ValueError: for an unknown layer name, or a model without a usable feature map (see
            :class:`FeatureRecorder`).

    Example::

        >>> import torchvision
        >>> rec = record(torchvision.models.resnet18(), torch.rand(2, 3, 64, 64))
        >>> rec.final_layer, rec.final_layout.kind, tuple(rec.final.shape), rec.stage_layers
        ('layer4', 'nchw', (2, 512, 2, 2), ['relu', 'layer1', 'layer2', 'layer3'])
    """
    recorder = FeatureRecorder(model, final_layer, stage_layers)
    modules = list(model.modules())
    training = [module.training for module in modules]
    lazy = any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in modules)
    grad_off = torch.inference_mode() if inference_mode and not lazy else torch.no_grad()
    try:
        if any(training):
            model.eval()
        with grad_off, recorder:
            model(images)
    finally:
        for module, flag in zip(modules, training, strict=True):
            if module.training != flag:  # setting every flag costs more than the check
                module.training = flag
    return recorder.recording(input_shape=images.shape)
