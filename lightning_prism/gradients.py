"""Gradient views beside PRISM: Grad-CAM and (guided) saliency, for about the cost of one forward.

:func:`grad_cam` (Selvaraju et al.) weights the channels of a feature map ``A`` by the spatial mean of
the gradient of a class score, ``alpha_k = mean_ij d y_c / d A_k[i, j]``, and keeps the positive part of
``sum_k alpha_k A_k``. It needs the gradient from the score back to ``A`` only, a backward through the
network's head, and the forward it runs keeps no autograd graph of the layers before ``A``: every
module output that is a feature map of the batch (convolutional, channels-last or tokens) is cut from
the graph where it leaves its module and becomes a fresh root (:class:`_GraphCuts`), so each segment's
graph is released as soon as the next feature map appears. A caller that runs the same model on the
same batch shape again (the monitor, every epoch) can pass where the last cut fell: then gradients
stay off until that cut, and nothing before it is recorded at all. The same forward is recorded as
:func:`~lightning_prism.prism` records it, so ``A`` is PRISM's final feature map, read through its
:class:`~lightning_prism.layout.FeatureLayout`; :func:`prism_and_grad_cam` returns both from that one
forward. For a network that ends in global average pooling and one linear layer, Grad-CAM equals CAM
(Zhou et al.) up to a positive factor.

:func:`saliency` (Simonyan et al.) is the gradient of the class score with respect to the input
pixels, a full backward to the input; with ``guided=True`` the backward of every ``nn.ReLU`` module
passes only positive gradients where its input was positive (guided backpropagation, Springenberg et
al.).

Both run the model in eval mode and restore every ``training`` flag, and leave the grad mode,
inference mode, autocast state, every ``requires_grad`` and every ``.grad`` as they found them; the
forward wrappers or hooks they attach exist only during the call. They work under
``torch.no_grad()``, ``torch.inference_mode()`` (the caller's inference tensors are cloned) and
autocast (the forward runs in the caller's precision, the maths in float32).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .engine import Basis, PRISMResult, check_inputs, from_recording
from .hooks import ModuleTaps, wrappers_allowed
from .layout import FeatureLayout, declared_prefix_tokens, infer_layout
from .recording import FeatureRecorder, Recording, observed_modules, resolve_module
from .scores import class_score, class_scores, explained_classes

__all__ = [
    "GradCAMResult",
    "SaliencyResult",
    "attention_input",
    "cam",
    "grad_cam",
    "normalise_maps",
    "prism_and_grad_cam",
    "saliency",
]

_MISSING = object()


@dataclass(frozen=True)
class GradCAMResult:
    """Grad-CAM of one batch.

    Attributes:
        maps: ``(N, 1, H, W)`` float32 in ``[0, 1]`` on the images' device: ``cams`` resized bilinearly
            (``align_corners=False``) to the input's ``H×W``, then min-max normalised per image (a
            constant map gives zeros).
        cams: ``(N, 1, h, w)`` float32 ``ReLU(sum_k alpha_k A_k)`` at the layer's resolution, not
            normalised.
        alpha: ``(N, C)`` float32 channel weights ``alpha_k``, the spatial mean of ``d y_c / d A_k``.
        targets: ``(N,)`` long, the class ``c`` of every image.
        layer: name of the module whose output is ``A``.
        output: the model's scores for the batch, ``(N, K)``, detached.
    """

    maps: Tensor
    cams: Tensor
    alpha: Tensor
    targets: Tensor
    layer: str
    output: Tensor


@dataclass(frozen=True)
class SaliencyResult:
    """Saliency (or guided backpropagation) of one batch.

    Attributes:
        maps: ``(N, 1, H, W)`` float32 in ``[0, 1]``: the maximum over input channels of
            ``|gradients|``, min-max normalised per image (a constant map gives zeros).
        gradients: ``(N, C, H, W)`` float32 ``d y_c / d x``; with ``guided=True`` the guided
            backpropagation of ``y_c`` instead.
        targets: ``(N,)`` long, the class ``c`` of every image.
        output: the model's scores for the batch, ``(N, K)``, detached.
    """

    maps: Tensor
    gradients: Tensor
    targets: Tensor
    output: Tensor


# ------------------------------------------------------------------------------------------ maths
def cam(activations: Tensor, gradients: Tensor) -> tuple[Tensor, Tensor]:
    """Grad-CAM of a feature map from its gradient.

    Args:
        activations: ``(N, C, h, w)`` feature map ``A``.
        gradients: ``(N, C, h, w)`` gradient ``d y_c / d A`` of each image's class score.

    Returns:
        ``(cams, alpha)``: ``(N, 1, h, w)`` ``ReLU(sum_k alpha_k A_k)`` and ``(N, C)`` channel weights
        ``alpha_k = mean_ij d y_c / d A_k[i, j]``, in the inputs' dtype.

    Example::

        >>> a = torch.tensor([[[[1.0, 2.0]], [[3.0, -4.0]]]])  # N=1, C=2, h=1, w=2
        >>> cams, alpha = cam(a, torch.tensor([[[[1.0, 1.0]], [[-1.0, 0.0]]]]))
        >>> alpha, cams
        (tensor([[ 1.0000, -0.5000]]), tensor([[[[0., 4.]]]]))
    """
    alpha = gradients.mean(dim=(2, 3))
    cams = torch.einsum("nc,nchw->nhw", alpha, activations).unsqueeze(1).clamp_(min=0)
    return cams, alpha


def attention_input(model: nn.Module) -> str | None:
    """The tokens that go into the block of a model's last attention: ``"<block>:input"``, or ``None``.

    The last attention is the last module (in registration order, the outermost of nested ones)
    whose class name says attention (``Attention``, ``Attn``: timm's, Hugging Face's,
    ``nn.MultiheadAttention``); its block is that module itself if its class name says block or
    layer (CaiT's and XCiT's class-attention blocks), else the module that holds it. The block's
    input feeds the attention's queries, keys and values alike.

    A model that reads out a class token sees its patch tokens only through attention, so Grad-CAM at
    its final map is zero; here it is what pytorch-grad-cam's ViT recipe shows (the last block's first
    norm), one norm earlier.

    Example::

        >>> from torchvision.models import VisionTransformer
        >>> vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
        >>> attention_input(vit)
        'encoder.layers.encoder_layer_1:input'
    """
    last: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if module is model or (last is not None and name.startswith(last[0] + ".")):
            continue
        if _ATTENTION.search(type(module).__name__):
            last = (name, module)
    if last is None:
        return None
    name, module = last
    block = name if _BLOCK.search(type(module).__name__) or "." not in name else name.rsplit(".", 1)[0]
    return block + ":input"


_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_BLOCK = re.compile(r"block|layer", re.IGNORECASE)


def normalise_maps(maps: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Resize maps bilinearly (``align_corners=False``) and min-max normalise each one to ``[0, 1]``.

    A map whose values are all equal (to within a few float32 rounding steps, which is what a
    bilinear resize leaves of a constant map) becomes zeros.

    Args:
        maps: ``(N, 1, h, w)`` maps.
        size: ``(H, W)`` to resize to; ``None`` keeps ``h×w``.

    Returns:
        ``(N, 1, H, W)`` float32.

    Example::

        >>> normalise_maps(torch.tensor([[[[1.0, 3.0, 2.0]]], [[[2.0, 2.0, 2.0]]]])).flatten(1)
        tensor([[0.0000, 1.0000, 0.5000],
                [0.0000, 0.0000, 0.0000]])
    """
    maps = maps.to(torch.float32)
    lo, hi = maps.amin(dim=(2, 3), keepdim=True), maps.amax(dim=(2, 3), keepdim=True)
    constant = (hi - lo) <= 1e-6 * torch.maximum(hi.abs(), lo.abs())
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        lo, hi = maps.amin(dim=(2, 3), keepdim=True), maps.amax(dim=(2, 3), keepdim=True)
    span = torch.where(constant | (hi <= lo), torch.inf, hi - lo)
    return (maps - lo).div_(span)


def _feature_map(activation: Tensor, gradient: Tensor, layout: FeatureLayout) -> tuple[Tensor, Tensor]:
    """A layer's tensor and its gradient as float32 ``(N, C, h, w)`` feature maps, read through the
    layer's :class:`~lightning_prism.layout.FeatureLayout` (channels-last maps permuted, the patch
    tokens of a token sequence on their grid, prefix tokens dropped)."""
    return layout.to_nchw(activation.detach()).to(torch.float32), layout.to_nchw(gradient).to(torch.float32)


# ----------------------------------------------------------------------------- forward plumbing
class _GraphRoot(torch.autograd.Function):
    """Identity that starts a new autograd graph at a feature map.

    Applied to ``t.detach().requires_grad_()``, it returns a tensor that shares ``t``'s memory, has
    no history before this point and, unlike a leaf or a view of one, may be modified in place by the
    code that follows (an in-place ReLU after a module, as in ResNet and DenseNet).
    """

    @staticmethod
    def forward(ctx: Any, leaf: Tensor) -> Tensor:
        return leaf.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def _graph_root(t: Tensor) -> Tensor:
    return _GraphRoot.apply(t.detach().requires_grad_())


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients, and only where its input was positive."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            out = x.relu_()
            ctx.mark_dirty(out)
        else:
            out = x.relu()
        ctx.save_for_backward(out)  # out > 0 exactly where x > 0
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        # ReLU's own backward (the gradient where out > 0), then only its positive part
        return torch.ops.aten.threshold_backward(grad, out, 0).clamp_(min=0), None


def _grad_on(*args: Any) -> None:
    """Switch gradients on if the model switched them off."""
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)


def _with_first_tensor(output: Any, replace: Callable[[Tensor], Tensor]) -> Any:
    """``output`` with its tensor (a tensor, or the first tensor of a tuple or list) replaced."""
    if isinstance(output, Tensor):
        return replace(output)
    if isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            if isinstance(item, Tensor):
                items = list(output)
                items[i] = replace(item)
                return type(output)(items) if isinstance(output, list) else tuple(items)
    return output


class _GraphCuts:
    """Cuts the autograd graph of one forward at feature maps, so that it holds only the head.

    Every module output that is a floating feature map of the batch (by
    :func:`~lightning_prism.layout.infer_layout`: ``(N, C, h, w)``, channels-last ``(N, h, w, C)`` or
    tokens on a patch grid, larger than 1×1) is replaced by a graph root (:class:`_GraphRoot`): the
    same values, no history. The graph of the layers before a feature map is therefore released as
    soon as the next one appears, and the backward from the score stops at the last one. With a
    ``final_layer`` (a module name, or ``"<name>:input"`` for the tensor entering it), feature maps
    are cut only until that layer's tensor appears, and that tensor (at every call) is cut too, so
    that its path to the score is kept whatever follows.

    With ``cut_from`` > 0, nothing is cut before the ``cut_from``-th module call has returned (the
    :attr:`last_root_exit` of an earlier forward of the same model and batch shape), and the forward
    starts with gradients off: nothing before that cut is recorded at all (and a checkpointed
    segment before it runs as a plain forward, so a backward never recomputes it).

    After the first cut, every module call switches gradients on if the model switched them off
    (``with torch.no_grad(): features = self.backbone(x)`` in a forward), at its end and, with
    ``cut_from``, also at its start, so the head is differentiated whatever the model's own grad
    mode.

    Attach it before the :class:`~lightning_prism.recording.FeatureRecorder` of the same forward:
    the recorder then sees (and names) the roots, the tensors that flow on.
    """

    def __init__(
        self, model: nn.Module, images: Tensor, final_layer: str | None = None, cut_from: int = 0
    ) -> None:
        self.model = model
        self.image_size = (images.shape[-2], images.shape[-1])
        self.batch = images.shape[0]
        self.final_layer = final_layer
        self.cut_from = cut_from
        self.prefixes = declared_prefix_tokens(model.modules())
        # The autograd node that starts the last root (only the last: a node keeps its root's memory alive).
        self.last_root: Any = None
        self.exits = 0  # module calls that returned so far
        self.last_root_exit = 0  # ... when the last root was made
        self.seen = False  # the named final layer's tensor has appeared: cut nothing else
        self._layouts: dict[torch.Size, bool] = {}

    def attach(self, taps: ModuleTaps) -> None:
        modules = observed_modules(self.model)
        wrap = wrappers_allowed(m for _, m in modules)
        named: nn.Module | None = None
        is_input = False
        if self.final_layer is not None:
            named, is_input = resolve_module(self.model, self.final_layer, allow_input=True)
        on_enter = self._on_enter if self.cut_from > 0 else None
        for _, module in modules:
            taps.around(module, on_enter, self._on_exit(module is named and not is_input), wrap=wrap)
        if named is not None and is_input:
            taps.before(named, self._cut_input)
        elif named is not None and all(named is not module for _, module in modules):  # a named nn.Identity
            taps.around(named, None, self._on_exit(True), wrap=wrap)

    def _is_map(self, t: Tensor) -> bool:
        if not t.is_floating_point():
            return False
        try:
            return self._layouts[t.shape]
        except KeyError:
            layout = infer_layout(t.shape, self.image_size, batch=self.batch, prefix_tokens=self.prefixes)
            is_map = layout is not None and layout.spatial
            self._layouts[t.shape] = is_map
            return is_map

    def _root(self, t: Tensor) -> Tensor:
        if not t.is_floating_point():
            return t
        _grad_on()
        root = _graph_root(t)
        self.last_root, self.last_root_exit = root.grad_fn, self.exits
        return root

    def _on_enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.last_root is not None:
            _grad_on()

    def _on_exit(self, named: bool) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def on_exit(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            self.exits += 1
            if self.exits < self.cut_from:
                return None
            if named:
                self.seen = True
                return _with_first_tensor(output, self._root)
            if self.last_root is not None:
                _grad_on()
            if not self.seen and isinstance(output, Tensor) and self._is_map(output):
                return self._root(output)
            return None

        return on_exit

    def _cut_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.exits < self.cut_from:
            return None
        self.seen = True
        if args:
            return _with_first_tensor(args, self._root), kwargs
        for key, value in kwargs.items():
            if isinstance(value, Tensor):
                return args, {**kwargs, key: self._root(value)}
        return None

    def follows_last_root(self, t: Tensor) -> bool:
        """Whether ``t`` is the last root or was computed from it: then no cut lies between ``t`` and
        anything computed after it, and its whole path to the score is in the graph."""
        if self.last_root is None or t.grad_fn is None:
            return False
        last, seen, todo = self.last_root, set(), [t.grad_fn]
        while todo and len(seen) < 10_000:
            node = todo.pop()
            if node is last:
                return True
            if node is None or node in seen:
                continue
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
        return False


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The module inside ``nn.DataParallel``/``DistributedDataParallel`` wrappers, and the prefix of
    its names in the wrapper's. A DDP wrapper's forward may broadcast buffers (a collective that every
    rank must join) and prepares its reducer for a backward of the parameters, which Grad-CAM and
    saliency never run."""
    prefix = ""
    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model, prefix = model.module, prefix + "module."
    return model, prefix


@contextmanager
def _differentiable_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on and inference mode off for the body; every ``training`` flag, the grad
    mode and the inference mode restored afterwards (the caller's autocast state is kept)."""
    modules = list(model.modules())
    training = [module.training for module in modules]
    try:
        if any(training):
            model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, flag in zip(modules, training, strict=True):
            if module.training != flag:
                module.training = flag


def _maths(device: torch.device) -> Any:
    """The context of the maths after the backward: no gradients, no autocast (float32), and no
    inference mode, so that the results are normal tensors whatever the caller's mode."""
    stack = ExitStack()
    for context in (torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False)):
        stack.enter_context(context)
    return stack


@contextmanager
def _guided_relus(model: nn.Module) -> Iterator[int]:
    """Every ``nn.ReLU`` of ``model`` runs :class:`_GuidedReLU` for the body (its ``forward``
    attribute replaced, then restored); yields how many there are."""
    undo: list[tuple[dict[str, Any], Any, Any]] = []
    try:
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                state = vars(module)

                def guided(x: Tensor, inplace: bool = module.inplace) -> Tensor:
                    return _GuidedReLU.apply(x, inplace)

                undo.append((state, state.get("forward", _MISSING), guided))
                state["forward"] = guided
        yield len(undo)
    finally:
        for state, own, guided in reversed(undo):
            if state.get("forward") is guided:
                if own is _MISSING:
                    del state["forward"]
                else:
                    state["forward"] = own


def _saliency_forward(model: nn.Module, x: Tensor) -> Any:
    """The model's output for ``x``, a leaf that requires grad.

    On the CPU the forward takes a channels-last copy of ``x``, so that the whole forward and the
    backward to the input run in that layout (faster there); elsewhere, or when the model's forward
    rejects channels-last input (a ``view`` of it, say), ``x`` in its own layout. Never the leaf
    itself, which the model might modify in place.
    """
    if x.device.type == "cpu" and not x.is_contiguous(memory_format=torch.channels_last):
        try:
            return model(x.contiguous(memory_format=torch.channels_last))
        except RuntimeError:
            pass
    return model(_GraphRoot.apply(x))


# ---------------------------------------------------------------------------------- arguments
def _check_targets(targets: Any, n: int, device: torch.device) -> Tensor | None:
    """``targets`` as an ``(N,)`` long tensor on ``device``, or an ``(N, K)`` bool mask of the classes
    each image may be explained by (``None`` stays ``None``).

    Raises:
        TypeError: for anything but an int, a sequence of ints, an integer tensor or a 2-D bool mask.
        ValueError: for the wrong length or a negative class.
    """
    if targets is None:
        return None
    if isinstance(targets, Tensor) and targets.dtype == torch.bool and targets.ndim == 2:
        if targets.shape[0] != n:
            raise ValueError(
                f"a targets mask must have one row per image ({n}), got shape {tuple(targets.shape)}"
            )
        return targets.detach().to(device)
    if isinstance(targets, bool) or (isinstance(targets, Tensor) and targets.dtype == torch.bool):
        raise TypeError(
            "targets must be class indices (int, sequence or integer tensor) or an (N, K) bool mask, "
            f"got {targets!r}"
        )
    if isinstance(targets, Tensor):
        value = targets.detach()
    else:
        try:
            value = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"targets must be class indices (int, sequence or integer tensor), got {targets!r}"
            ) from error
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got a {value.dtype} value: {targets!r}")
    if value.ndim == 0:
        value = value.expand(n)
    if value.ndim != 1 or value.shape[0] != n:
        raise ValueError(f"targets must hold one class per image ({n}), got shape {tuple(value.shape)}")
    if bool((value < 0).any()):
        raise ValueError(f"targets must be class indices >= 0, got {value.tolist()}")
    return value.to(device=device, dtype=torch.long)


def _scores(output: Any) -> Tensor:
    """The ``(N, K)`` class scores in a model's output (:func:`~lightning_prism.scores.class_scores`:
    a single logit per image, ``(N,)``, as ``(N, 1)``)."""
    scores = class_scores(output)
    if scores is None:
        found = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(
            f"the model must return class scores (logits), (N, num_classes) or a single logit (N, 1) or (N,); "
            f"got {found}"
        )
    return scores


def _class_scores(scores: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(y, targets)``: the sum over the batch of each image's score of its class (so one backward
    gives every image's gradient), and the classes: the predicted ones when ``targets`` is None, the
    highest-scoring allowed one for a bool mask; for a single logit, class 1 is the logit and class 0
    its negation (:func:`~lightning_prism.scores.class_score`)."""
    k = scores.shape[1]
    if targets is not None and targets.dtype == torch.bool:
        if k == 1 or targets.shape[1] != k:
            raise ValueError(
                f"a targets mask must have one column per class of the model's (N, {k}) scores, got shape "
                f"{tuple(targets.shape)}"
            )
        targets = explained_classes(scores, targets)
    elif targets is None:
        targets = explained_classes(scores)
    elif k == 1 and bool((targets > 1).any()):
        raise ValueError(
            "targets of a single-logit (binary) model must be 0 or 1 (class 1: the logit, class 0: its "
            f"negation), got {targets.tolist()}"
        )
    elif k > 1 and bool((targets >= k).any()):
        raise ValueError(
            f"targets must be class indices below {k} (the model's classes), got {targets.tolist()}"
        )
    targets = targets.to(scores.device)
    if targets.is_inference():  # given under inference mode: autograd cannot save it as the gather's index
        targets = targets.clone()
    chosen = class_score(scores, targets)
    finite = torch.isfinite(chosen.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero()[:, 0].tolist()
        raise ValueError(f"the model's scores of the target classes are not finite (images {bad})")
    return chosen.sum(), targets


def _input(images: Tensor) -> Tensor:
    """The images as a tensor autograd can use: detached from the caller's graph, and a normal
    tensor (not an inference tensor, which cannot be saved for backward)."""
    return images.clone() if images.is_inference() else images.detach()


# -------------------------------------------------------------------------------------- grad-cam
def grad_cam(
    model: nn.Module, images: Tensor, targets: Any = None, layer: str | None = None
) -> GradCAMResult:
    """Grad-CAM (Selvaraju et al.) of a batch, for about the cost of one forward pass.

    ``cams = ReLU(sum_k alpha_k A_k)`` with ``A`` the output of ``layer`` and ``alpha_k`` the spatial
    mean of ``d y_c / d A_k``, ``y_c`` the model's score (logit) of class ``c``. The forward runs in
    eval mode and builds no autograd graph of the layers before ``A`` (see the module docstring), so
    the backward runs through the head only. Every module's ``training`` flag, the grad mode, every
    ``requires_grad`` and ``.grad`` are left as found (parameters get no gradient); the wrappers or
    hooks of the forward are removed on every path. Works under ``torch.no_grad()``,
    ``torch.inference_mode()`` and autocast (the forward in the caller's precision, the maths in
    float32), with frozen parameters, and for models that run their backbone under
    ``torch.no_grad()``. A model inside ``nn.DataParallel`` or ``DistributedDataParallel`` runs
    without the wrapper. For a network ending in global average pooling and a linear layer, ``cams``
    is CAM (Zhou et al.) up to the positive factor ``1 / (h·w)``.

    Args:
        model: a network returning class scores (a tensor, or an output with ``logits``): ``(N, K)``,
            or a single logit per image, ``(N, 1)`` or ``(N,)``.
        images: ``(N, C, H, W)`` floating batch on the model's device.
        targets: the class of every image: an int, a sequence or an integer tensor of ``N``; or an
            ``(N, K)`` bool mask, each image's highest-scoring class among those it allows (a
            multi-label model's true labels); ``None`` takes the model's prediction (argmax of the
            scores). For a single-logit (binary) model, class 1 is the logit and class 0 its negation
            (:mod:`lightning_prism.scores`); ``None`` takes class 1 where the logit is above 0.
        layer: name of the module whose output is ``A``, as in ``model.named_modules()``, or
            ``"<name>:input"`` for the tensor entering that module; by default the final feature map
            that :func:`~lightning_prism.prism` uses (a convolutional, channels-last or token map: for
            a vision transformer, the last block's normalised patch tokens on their grid). For a
            layer that runs more than once, its last output. ``A`` is that tensor as it is after the
            forward, including in-place operations applied to it later (DenseNet's final ReLU), and
            the gradient is taken with respect to that value.

    Returns:
        :class:`GradCAMResult`.

    Raises:
        TypeError: if ``model`` is not a module, ``images`` not a floating tensor, ``targets`` not
            class indices or ``layer`` not a string.
        ValueError: for images that are not a non-empty 4-D batch; ``targets`` of the wrong length,
            negative or beyond the model's classes; a ``layer`` that is not a module of the model
            (listing the nearest names), did not run, produced no 4-D tensor or does not lead to the
            score; scores that are not ``(N, K)``; a model without a spatial feature map; a feature
            map or gradient that is not finite.

    Example::

        >>> import torchvision
        >>> r = grad_cam(torchvision.models.resnet18(num_classes=10), torch.rand(2, 3, 64, 64), targets=3)
        >>> r.maps.shape, r.cams.shape, r.layer, r.targets.tolist()
        (torch.Size([2, 1, 64, 64]), torch.Size([2, 1, 2, 2]), 'layer4', [3, 3])
    """
    return _grad_cam(model, images, targets, layer)[0]


def _grad_cam(
    model: nn.Module, images: Tensor, targets: Any = None, layer: str | None = None, cut_from: int = 0
) -> tuple[GradCAMResult, int]:
    """:func:`grad_cam`, given where the last cut of an earlier call on the same model and batch shape
    fell (``cut_from``, see :class:`_GraphCuts`), and returning where this call's fell."""
    check_inputs(model, images)
    target_classes = _check_targets(targets, images.shape[0], images.device)
    inner, prefix = _unwrap(model)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str), got {layer!r}")
    layer = _strip(layer, prefix)
    with _differentiable_eval(inner):
        try:
            # Grad-CAM needs no stage maps (stage_layers=[]: none is taken)
            recording, scores, cut_from = _recorded_forward(
                inner, images, final_layer=layer, stage_layers=[], cut_from=cut_from
            )
        except ValueError as error:  # the recorder's words for this function's argument
            message = str(error)
            if message.startswith("final_layer "):
                raise ValueError("layer " + message.removeprefix("final_layer ")) from None
            raise
        return _grad_cam_of(recording, scores, target_classes, tuple(images.shape[-2:]), prefix), cut_from


def prism_and_grad_cam(
    model: nn.Module,
    images: Tensor,
    targets: Any = None,
    *,
    extrapolate: bool = True,
    final_layer: str | None = None,
    stage_layers: Sequence[str] | None = None,
    basis: Basis = "aligned",
    reference: Tensor | None = None,
) -> tuple[PRISMResult, GradCAMResult]:
    """PRISM and Grad-CAM of a batch from one forward pass: what ``prism(...)`` and
    ``grad_cam(model, images, targets, layer=final_layer)`` return, for about the cost of one of them.

    The forward is :func:`grad_cam`'s (no graph of the layers before the final feature map), recorded
    as :func:`~lightning_prism.prism` records it; Grad-CAM's layer is PRISM's final feature map. The
    arguments are those of the two functions; both run in eval mode and leave every flag, the grad
    mode, every ``requires_grad`` and ``.grad`` as found.

    Returns:
        ``(prism_result, grad_cam_result)``.

    Raises:
        TypeError, ValueError, BasisMismatchError: as :func:`~lightning_prism.prism` and
            :func:`grad_cam` raise them.

    Example::

        >>> import torchvision
        >>> p, g = prism_and_grad_cam(torchvision.models.resnet18(num_classes=5), torch.rand(2, 3, 64, 64))
        >>> p.maps.shape, g.maps.shape, p.final_layer == g.layer == 'layer4'
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 1, 64, 64]), True)
    """
    prism_result, cam_result, _ = _prism_and_grad_cam(
        model,
        images,
        targets,
        extrapolate=extrapolate,
        final_layer=final_layer,
        stage_layers=stage_layers,
        basis=basis,
        reference=reference,
    )
    return prism_result, cam_result


def _prism_and_grad_cam(
    model: nn.Module,
    images: Tensor,
    targets: Any = None,
    *,
    extrapolate: bool = True,
    final_layer: str | None = None,
    stage_layers: Sequence[str] | None = None,
    basis: Basis = "aligned",
    reference: Tensor | None = None,
    cut_from: int = 0,
) -> tuple[PRISMResult, GradCAMResult, int]:
    """:func:`prism_and_grad_cam`, given where the last cut of an earlier call on the same model and
    batch shape fell (``cut_from``, see :class:`_GraphCuts`), and returning where this call's fell."""
    check_inputs(model, images, basis)
    target_classes = _check_targets(targets, images.shape[0], images.device)
    inner, prefix = _unwrap(model)
    with _differentiable_eval(inner):
        recording, scores, cut_from = _recorded_forward(
            inner,
            images,
            final_layer=_strip(final_layer, prefix),
            stage_layers=stage_layers,
            cut_from=cut_from,
        )
        size = (images.shape[-2], images.shape[-1])
        cam_result = _grad_cam_of(recording, scores, target_classes, size, prefix)
    prism_result = from_recording(
        replace(recording, output=scores.detach()),
        size,
        extrapolate=extrapolate,
        basis=basis,
        reference=reference,
    )
    return prism_result, cam_result, cut_from


def _strip(layer: str | None, prefix: str) -> str | None:
    """A layer name of a wrapped model, relative to the module inside the wrapper."""
    return layer[len(prefix) :] if layer is not None and prefix and layer.startswith(prefix) else layer


def _recorded_forward(
    model: nn.Module,
    images: Tensor,
    *,
    final_layer: str | None = None,
    stage_layers: Sequence[str] | None = None,
    cut_from: int = 0,
) -> tuple[Recording, Tensor, int]:
    """One forward with the graph cut at feature maps (:class:`_GraphCuts`), recorded by a
    :class:`~lightning_prism.recording.FeatureRecorder`; the recording, the ``(N, K)`` scores, and
    the ``cut_from`` to give a later forward of the same model and batch shape.

    Without ``final_layer`` the graph is cut at every feature map, so the one the recorder chooses
    keeps its path to the score only if no cut came after it (it is the last cut or was computed
    from it: the usual case, a backbone then a head). Otherwise (the map entering a class-score
    convolution, or a head that makes feature maps of its own) a second forward cuts only up to the
    chosen layer, and the ``cut_from`` returned is 0 (none). A ``cut_from`` > 0 that fails (the
    final map or the scores do not follow its cut: the model now runs differently, or switches
    gradients off between its modules) costs a second forward without it, and the ``cut_from``
    returned is -1: do not try again. Runs in the caller's grad mode, which must have gradients on.
    """
    cuts = _GraphCuts(model, images, final_layer, max(cut_from, 0))
    recorder = FeatureRecorder(model, final_layer, stage_layers)
    x = _input(images)
    with torch.set_grad_enabled(cut_from <= 0), ModuleTaps() as taps:
        cuts.attach(taps)
        with recorder:
            output = model(x)
    scores = _scores(output)
    recording = recorder.recording(input_shape=images.shape)
    source = recording.source
    assert source is not None
    told_wrong = cut_from > 0 and not (cuts.follows_last_root(source) and cuts.follows_last_root(scores))
    if told_wrong or (final_layer is None and not cuts.follows_last_root(source)):
        if cut_from > 0:
            recording, scores, _ = _recorded_forward(
                model, images, final_layer=final_layer, stage_layers=stage_layers
            )
            return recording, scores, -1
        recording, scores, _ = _recorded_forward(
            model, images, final_layer=recording.final_layer, stage_layers=recording.stage_layers
        )
        return recording, scores, 0
    return replace(recording, output=output), scores, -1 if cut_from < 0 else cuts.last_root_exit


def _grad_cam_of(
    recording: Recording, scores: Tensor, targets: Tensor | None, size: tuple[int, int], prefix: str
) -> GradCAMResult:
    """Grad-CAM from a recorded forward whose graph runs from the final map to the scores."""
    source, layer = recording.source, prefix + recording.final_layer
    assert source is not None
    y, targets = _class_scores(scores, targets)
    gradient = None
    if source.requires_grad and y.requires_grad:
        (gradient,) = torch.autograd.grad(y, source, allow_unused=True)
    if gradient is None:
        raise ValueError(
            f"the class scores do not depend on the final feature map of layer {layer!r} (a model such as PiT "
            "reads a class token out beside it); pass layer= a map that the scores are computed from, such as "
            "the first norm of the last block"
        )
    with _maths(source.device):
        a, g = _feature_map(source, gradient, recording.final_layout)
        if not bool(g.any()):
            warnings.warn(
                f"Grad-CAM of layer {layer!r} is zero for every image: the class scores do not depend on its "
                "positions (a vision transformer that reads out its class token sees the patch tokens only through "
                "attention, and its final norm works token by token; or the classifier's weights are still all "
                "zero, as timm initialises some heads). Pass layer= a map before the last attention, such as the "
                "last block's first norm (timm: 'blocks.<last>.norm1').",
                UserWarning,
                stacklevel=3,
            )
        cams, alpha = cam(a, g)
        if not bool(torch.isfinite(cams).all()):
            raise ValueError(f"the feature map of layer {layer!r} or its gradient is not finite")
        maps = normalise_maps(cams, size)
    return GradCAMResult(
        maps=maps,
        cams=cams,
        alpha=alpha,
        targets=targets.to(source.device),
        layer=layer,
        output=scores.detach(),
    )


# -------------------------------------------------------------------------------------- saliency
def saliency(model: nn.Module, images: Tensor, targets: Any = None, guided: bool = False) -> SaliencyResult:
    """Vanilla saliency (Simonyan et al.) or guided backpropagation (Springenberg et al.) of a batch.

    ``gradients = d y_c / d x``, the gradient of the model's score (logit) of class ``c`` with respect
    to the input pixels, from one forward and one backward to the input (no parameter gradient is
    computed); ``maps`` is its maximum absolute value over the input channels, normalised per image.
    With ``guided=True`` the backward of every module that is an ``nn.ReLU`` (or a subclass), in-place
    or not, passes only positive gradients, and only where its input was positive. Functional
    rectifiers in a forward (``F.relu``, ``torch.relu``, ``Tensor.relu_``, such as DenseNet's last
    one) and other activation modules (``nn.ReLU6``, ``nn.LeakyReLU``, ``nn.GELU``, ``nn.SiLU``, …)
    backpropagate as usual; a model without any ``nn.ReLU`` gets a warning, since its guided
    gradient is the vanilla one.

    Runs in eval mode; every ``training`` flag, the grad mode, every ``requires_grad`` and ``.grad``
    are left as found; the wrappers are removed on every path. Works under ``torch.no_grad()``,
    ``torch.inference_mode()`` and autocast (the forward in the caller's precision, the maths in
    float32), with frozen parameters, and for models that run their backbone under
    ``torch.no_grad()`` (every module call switches gradients back on). A model inside
    ``nn.DataParallel`` or ``DistributedDataParallel`` runs without the wrapper.

    Args:
        model: a network returning class scores (a tensor, or an output with ``logits``): ``(N, K)``,
            or a single logit per image, ``(N, 1)`` or ``(N,)``.
        images: ``(N, C, H, W)`` floating batch on the model's device.
        targets: the class of every image, as for :func:`grad_cam` (an ``(N, K)`` bool mask of the
            classes it allows, or ``None`` for the prediction; class 0 of a single-logit model is the
            negated logit).
        guided: guided backpropagation instead of the plain gradient.

    Returns:
        :class:`SaliencyResult`.

    Raises:
        TypeError: if ``model`` is not a module, ``images`` not a floating tensor or ``targets`` not
            class indices.
        ValueError: for images that are not a non-empty 4-D batch; ``targets`` of the wrong length,
            negative or beyond the model's classes; scores that are not ``(N, K)`` or do not depend
            on the input; a gradient that is not finite.

    Example::

        >>> import torchvision
        >>> s = saliency(torchvision.models.resnet18(num_classes=10), torch.rand(2, 3, 64, 64), guided=True)
        >>> s.maps.shape, s.gradients.shape, s.targets.shape
        (torch.Size([2, 1, 64, 64]), torch.Size([2, 3, 64, 64]), torch.Size([2]))
    """
    check_inputs(model, images)
    if not isinstance(guided, bool):
        raise TypeError(f"guided must be a bool, got {guided!r}")
    target_classes = _check_targets(targets, images.shape[0], images.device)
    inner, _ = _unwrap(model)
    modules = observed_modules(inner)
    wrap = wrappers_allowed(m for _, m in modules)

    guide = _guided_relus(inner) if guided else nullcontext(-1)
    with _differentiable_eval(inner), guide as relus:
        if guided and relus == 0:
            warnings.warn(
                f"{type(inner).__name__} has no nn.ReLU module, so its guided backpropagation is the plain "
                "gradient (functional ReLUs and other activations are not modified)",
                UserWarning,
                stacklevel=2,
            )
        x = _input(images).requires_grad_()
        with ModuleTaps() as taps:
            for _, module in modules:
                taps.around(module, _grad_on, _grad_on, wrap=wrap)
            output = _saliency_forward(inner, x)
        scores = _scores(output)
        y, target_classes = _class_scores(scores, target_classes)
        if not y.requires_grad:
            raise ValueError("the class scores do not depend on the input through autograd")
        (gradient,) = torch.autograd.grad(y, x)
    with _maths(images.device):
        gradients = gradient.to(torch.float32).contiguous()
        if not bool(torch.isfinite(gradients).all()):
            raise ValueError("the gradient of the class scores with respect to the input is not finite")
        maps = normalise_maps(gradients.abs().amax(dim=1, keepdim=True))
    return SaliencyResult(
        maps=maps, gradients=gradients, targets=target_classes.to(images.device), output=scores.detach()
    )
