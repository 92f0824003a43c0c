"""The monitor's views of its probe: what is computed every epoch, and the pictures made of it.

:class:`ProbeViews` runs PRISM and the gradient views (:mod:`lightning_prism.gradients`) on the probe
batch: PRISM and Grad-CAM from one forward when both are asked for, each other view on its own, a
view that fails left out (the others go on), and, for a class-token vision transformer whose
Grad-CAM is zero at PRISM's final map, Grad-CAM at the input of the block of the last attention.
It remembers across epochs only where Grad-CAM's graph cut fell (so later forwards record nothing
before it) and that fallback layer; :meth:`ProbeViews.reset` forgets both. :func:`captions` words
each image's label and prediction for any kind of classifier (:mod:`lightning_prism.scores`), and
:func:`probe_pictures` turns the views into the captioned pictures the loggers receive.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .engine import BasisMismatchError, PRISMResult, prism
from .gradients import _grad_cam, _prism_and_grad_cam, attention_input, saliency
from .loggers import Picture
from .prototypes import PrototypeResult, class_prototypes
from .render import (
    caption_grid,
    denormalize,
    display_tiles,
    heat_overlay,
    overlay,
    to_uint8,
    views_grid,
    with_invalid_tiles,
)
from .scores import explained_classes, predictions

__all__ = [
    "PROBE_VIEWS",
    "PROTOTYPE_CLASSES",
    "SALIENCY_CLIP",
    "VIEWS",
    "ProbePrototypes",
    "ProbeViews",
    "ViewsOutput",
    "captions",
    "label_text",
    "probe_pictures",
    "probe_prototypes",
    "prototype_classes",
]

#: The views the monitor can log, with the name under which each is shown.
VIEWS: dict[str, str] = {
    "prism": "PRISM",
    "grad_cam": "Grad-CAM",
    "saliency": "saliency",
    "guided_saliency": "guided saliency",
    "prototypes": "prototypes",
}
#: The views drawn on the probe's images (the others, such as the class prototypes, are images of
#: their own).
PROBE_VIEWS = ("prism", "grad_cam", "saliency", "guided_saliency")
#: The most classes the monitor draws a prototype of.
PROTOTYPE_CLASSES = 16
#: Saliency views are drawn against this quantile of each map (a few bright pixels otherwise vanish).
SALIENCY_CLIP = 0.99


@dataclass
class ViewsOutput:
    """What :class:`ProbeViews` computed for one probe batch.

    Attributes:
        result: PRISM's result, or ``None`` (not asked for).
        maps: ``(N, 1, H, W)`` maps of every gradient view that succeeded, by view name.
        output: the model's output for the batch (from whichever forward ran first).
        warnings: ``(key, message)`` pairs to warn about once per fit (a view that failed, the
            gradient functions' own warnings, the note of Grad-CAM's move to another layer).
    """

    result: PRISMResult | None
    maps: dict[str, Tensor]
    output: Any
    warnings: list[tuple[str, str]] = field(default_factory=list)


class ProbeViews:
    """Every view of the probe, computed as the monitor needs it each epoch.

    Args:
        views: names from :data:`VIEWS`.
        extrapolate, basis: as for :func:`~lightning_prism.prism`.
        final_layer, stage_layers: PRISM's layers, relative to the module the forward runs on.
        grad_cam_layer: Grad-CAM's layer (relative to that module), or ``None`` for PRISM's final map
            (from PRISM's own forward when both views are asked for).
        strict: raise when a gradient view fails, instead of leaving it out with a warning.
        module_prefix: the forward module's name and a dot (``""`` for the LightningModule), to name
            layers as the user does in messages.
    """

    def __init__(
        self,
        views: Sequence[str],
        *,
        extrapolate: bool = True,
        basis: str = "aligned",
        final_layer: str | None = None,
        stage_layers: Sequence[str] | None = None,
        grad_cam_layer: str | None = None,
        strict: bool = False,
        module_prefix: str = "",
    ) -> None:
        self.views = list(views)
        self.extrapolate = extrapolate
        self.basis = basis
        self.final_layer = final_layer
        self.stage_layers = None if stage_layers is None else list(stage_layers)
        self.grad_cam_layer = grad_cam_layer
        self.strict = strict
        self.module_prefix = module_prefix
        self.reset()

    def reset(self) -> None:
        """Forget what earlier epochs taught (for another model, or a new fit)."""
        # Per Grad-CAM forward ("shared" or "grad_cam"): where its last graph cut fell in the previous
        # epoch, so that the next forward records nothing before it (a wrong one costs a second forward).
        self.cut_from: dict[str, int] = {}
        # Grad-CAM's layer when PRISM's final map gave a zero gradient (a class-token ViT)
        self.grad_cam_fallback: str | None = None

    @property
    def gradient_views(self) -> bool:
        """Whether any view needs the class a gradient explains."""
        return any(view in PROBE_VIEWS and view != "prism" for view in self.views)

    def prism(self, target: nn.Module, images: Tensor, reference: Tensor | None) -> PRISMResult:
        """PRISM alone, in the grad mode the caller chose (Lightning's for the loop)."""
        return prism(
            target,
            images,
            extrapolate=self.extrapolate,
            final_layer=self.final_layer,
            stage_layers=self.stage_layers,
            basis=self.basis,  # type: ignore[arg-type]
            reference=reference,
            # never during fit (inference tensors could reach training), nor where Lightning avoids it
            inference_mode=torch.is_inference_mode_enabled(),
        )

    def __call__(
        self, target: nn.Module, images: Tensor, reference: Tensor | None, classes: Tensor | None
    ) -> ViewsOutput:
        """Every view of ``images`` on ``target``, under the caller's precision context.

        Args:
            target: the module whose forward takes the images.
            images: ``(N, C, H, W)`` probe images.
            reference: PRISM's colour basis to align to (or project on).
            classes: what the gradient views explain: ``(N,)`` classes, an ``(N, K)`` bool mask of
                allowed classes, or ``None`` for the predictions.

        Raises:
            BasisMismatchError: when ``reference`` does not fit the model.
            Exception: what PRISM's forward raised; a gradient view's error only with ``strict``.
        """
        own_layer = self.grad_cam_layer is not None or self.grad_cam_fallback is not None
        shared = "prism" in self.views and "grad_cam" in self.views and not own_layer
        out = ViewsOutput(None, {}, None)
        alpha = None
        moved = None
        # The gradient functions' warnings (such as a Grad-CAM that is zero everywhere) once per fit.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if shared:
                try:
                    out.result, cam, self.cut_from["shared"] = _prism_and_grad_cam(
                        target,
                        images,
                        classes,
                        extrapolate=self.extrapolate,
                        final_layer=self.final_layer,
                        stage_layers=self.stage_layers,
                        basis=self.basis,  # type: ignore[arg-type]
                        reference=reference,
                        cut_from=self.cut_from.get("shared", 0),
                    )
                    out.maps["grad_cam"], out.output, alpha = cam.maps, out.result.output, cam.alpha
                except BasisMismatchError:
                    raise
                except Exception:
                    # PRISM on its own, then Grad-CAM as a view of its own (left out if it fails)
                    shared = False
            if not shared and "prism" in self.views:
                out.result = self.prism(target, images, reference)
                out.output = out.result.output
            for view in self.views:
                if view == "prism" or view in out.maps or view not in PROBE_VIEWS:
                    continue
                try:
                    if view == "grad_cam":
                        gradient_view, self.cut_from["grad_cam"] = _grad_cam(
                            target,
                            images,
                            classes,
                            layer=self.grad_cam_layer or self.grad_cam_fallback,
                            cut_from=self.cut_from.get("grad_cam", 0),
                        )
                        alpha = gradient_view.alpha
                    else:
                        gradient_view = saliency(target, images, classes, guided=view == "guided_saliency")
                except Exception as error:
                    if self.strict:
                        raise
                    reason = str(error).replace("pass layer=", "pass grad_cam_layer=")
                    out.warnings.append(
                        (
                            f"view:{view}",
                            f"PRISMMonitor could not compute the {view!r} view: {type(error).__name__}: "
                            f"{reason}. The other views go on; pass strict=True to raise instead.",
                        )
                    )
                    continue
                out.maps[view] = gradient_view.maps
                out.output = gradient_view.output if out.output is None else out.output
            if alpha is not None and not own_layer and not bool(alpha.any()):
                moved = self._grad_cam_at_attention(target, images, classes, out.result)
                if moved is not None:  # the zero map's warning gives way to the note of the move
                    out.maps["grad_cam"] = moved[0]
                    caught = [w for w in caught if "is zero for every image" not in str(w.message)]
        for warning in caught:
            message = str(warning.message).replace("Pass layer=", "Pass grad_cam_layer=")
            out.warnings.append((f"view-warning:{message[:100]}", message))
        if moved is not None:
            out.warnings.append(("grad-cam-at-attention", moved[1]))
        return out

    def _grad_cam_at_attention(
        self, target: nn.Module, images: Tensor, classes: Tensor | None, result: PRISMResult | None
    ) -> tuple[Tensor, str] | None:
        """Grad-CAM's maps at the input of the block of the last attention
        (:func:`~lightning_prism.gradients.attention_input`) and a note saying so, for a model whose
        gradient at PRISM's final map is zero everywhere (a class-token readout); from then on the view
        uses that layer. ``None`` if the model has no attention module or the gradient there is zero
        too (a classifier still at zero)."""
        layer = attention_input(target)
        if layer is None:
            return None
        try:
            view, self.cut_from["grad_cam"] = _grad_cam(target, images, classes, layer=layer)
        except Exception:
            return None
        if not bool(view.alpha.any()):
            return None
        self.grad_cam_fallback = layer
        prefix = self.module_prefix
        final = "" if result is None else f" {prefix + result.final_layer!r}"
        return view.maps, (
            f"PRISMMonitor: Grad-CAM at PRISM's final feature map{final} is zero for every image (the class "
            "scores do not depend on its positions: a vision transformer that reads out its class token sees the "
            f"patch tokens only through attention), so the grad_cam view shows Grad-CAM at {prefix + layer!r}, "
            "the input of the block of its last attention. Pass grad_cam_layer= to choose the layer."
        )


def _name(names: Sequence[str] | None, index: int) -> str:
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


def label_text(label: Tensor | int, names: Sequence[str] | None) -> str:
    """A label in words: a class name, or for a multi-hot row the names of its classes (``∅`` for none).

    Example::

        >>> label_text(1, ["cat", "dog"]), label_text(torch.tensor([1, 0, 1]), ["a", "b", "c"])
        ('dog', 'a, c')
    """
    if isinstance(label, Tensor) and label.ndim == 1:
        chosen = label.nonzero()[:, 0].tolist()
        return ", ".join(_name(names, i) for i in chosen) if chosen else "∅"
    return _name(names, int(label))


def captions(
    labels: Tensor | None,
    scores: Tensor | None,
    task: str | None,
    names: Sequence[str] | None,
    finite: Sequence[bool],
) -> tuple[list[str] | None, list[bool] | None]:
    """One caption per probe image, ``true → predicted``, and whether to mark it.

    Args:
        labels: ``(N,)`` class indices, ``(N, K)`` multi-hot labels, or ``None``.
        scores: ``(M, K)`` class scores of the ``M`` finite images, or ``None`` (no predictions).
        task: the kind of classifier (:func:`~lightning_prism.scores.infer_task`); ``None`` when
            ``scores`` is ``None``.
        names: class names, or ``None`` for the indices.
        finite: whether each of the ``N`` images is finite (only those have scores).

    Returns:
        ``(captions, marked)``: a multi-label image shows its label set and its predicted set (the
        labels scored above 0.5); an image is marked when its prediction differs from its label
        (for a multi-label image: the sets differ) or its input is not finite. ``(None, None)``
        when there is nothing to say.

    Example::

        >>> captions(torch.tensor([0, 1]), torch.tensor([[2.0], [-1.0]]), "binary", ["cat", "dog"], [True, True])
        (['cat → dog', 'dog → cat'], [True, True])
    """
    predicted = None
    if scores is not None and task is not None:
        values = predictions(scores, task)
        rows = iter(values)
        predicted = [next(rows) if ok else None for ok in finite]
    if labels is None and predicted is None and all(finite):
        return None, None
    texts, marked = [], []
    for i, ok in enumerate(finite):
        true = label_text(labels[i], names) if labels is not None else "?"
        if not ok:
            texts.append(f"{true}: NaN/inf input")
            marked.append(True)
        elif predicted is None:
            texts.append(true)
            marked.append(False)
        else:
            guess = predicted[i]
            assert guess is not None
            texts.append(f"{true} → {label_text(guess, names)}")
            if labels is None:
                marked.append(False)
            elif guess.ndim == 1:  # a multi-label prediction: the sets must agree
                marked.append(bool((guess.to(labels.device) != labels[i].bool()).any()))
            else:
                marked.append(int(guess) != int(labels[i]))
    return texts, marked


def probe_pictures(
    prefix: str,
    inputs: Tensor,
    finite: Tensor,
    result: PRISMResult | None,
    gradient_maps: dict[str, Tensor],
    views: Sequence[str],
    texts: list[str] | None,
    marked: list[bool] | None,
    truths: list[str] | None,
    *,
    alpha: float,
    font: str | None,
    separate: bool,
) -> tuple[dict[str, Picture], dict[str, Tensor], Picture]:
    """The pictures of one epoch's views.

    Args:
        prefix: tag prefix.
        inputs: ``(N, 3, H, W)`` de-normalised probe images in ``[0, 1]``.
        finite: ``(N,)`` bool, which images got maps.
        result: PRISM's result, or ``None``.
        gradient_maps: ``(M, 1, H, W)`` maps of the finite images, by view.
        views: the views asked for, in order.
        texts, marked: the captions and marks (:func:`captions`).
        truths: the true labels in words, for the inputs picture.
        alpha: weight of a map over its image.
        font: caption font path, or ``None``.
        separate: also keep the tiles and captions apart (W&B captions each image itself).

    Returns:
        ``(pictures, blended, inputs_picture)``: the tagged pictures, every view blended over the
        inputs ``(N, 3, H, W)`` (for the evolution strip), and the picture of the inputs.
    """
    tiles: dict[str, Tensor] = {}
    blended: dict[str, Tensor] = {}
    if result is not None:
        tiles["prism"] = with_invalid_tiles(result.maps, finite)
        blended["prism"] = overlay(inputs, tiles["prism"], alpha)
    for view, view_maps in gradient_maps.items():
        # Heat weighted by its value, so the image shows where a view sees nothing; saliency is a few
        # bright pixels, shown against its 99th percentile.
        clip = None if view == "grad_cam" else SALIENCY_CLIP
        heat = heat_overlay(inputs[finite], view_maps.to(inputs.device), alpha, clip=clip)
        blended[view] = with_invalid_tiles(heat, finite)

    def picture(images: Tensor, words: list[str] | None, marks: list[bool] | None = None) -> Picture:
        grid = caption_grid(images, words, marks, font=font)
        if not separate or words is None:
            return Picture(grid)
        # W&B shows each image with its caption as text: a wrong prediction is marked there too.
        notes = [f"{t} ✗" if marks and marks[i] else t for i, t in enumerate(words)]
        return Picture(grid, to_uint8(display_tiles(images)), notes)

    pictures: dict[str, Picture] = {}
    if "prism" in tiles:
        pictures[f"{prefix}/maps"] = picture(tiles["prism"], texts, marked)
        pictures[f"{prefix}/overlay"] = picture(blended["prism"], texts, marked)
    for view in gradient_maps:
        pictures[f"{prefix}/{view}"] = picture(blended[view], texts, marked)
    if sum(view in PROBE_VIEWS for view in views) > 1:
        # PRISM's own colours side by side; the gradient views as heatmaps over the input.
        shown = [(VIEWS[v], tiles[v] if v == "prism" else blended[v]) for v in views if v in blended]
        pictures[f"{prefix}/views"] = Picture(views_grid(inputs, shown, texts, marked, font=font))
    return pictures, blended, picture(inputs, truths)


def prototype_classes(
    labels: Tensor | None, predicted: Tensor | None, limit: int = PROTOTYPE_CLASSES
) -> list[int]:
    """The classes of the probe that get a prototype: its labels' classes (for multi-hot labels, every
    label that occurs), else the classes it is predicted as; the first ``limit``, in order.

    Args:
        labels: ``(N,)`` class indices, ``(N, K)`` multi-hot labels, or ``None``.
        predicted: ``(N,)`` predicted classes, or ``None``.
        limit: the most classes.

    Example::

        >>> prototype_classes(torch.tensor([3, 1, 3, 0]), None), prototype_classes(torch.tensor([[0, 1, 1]]), None)
        ([0, 1, 3], [1, 2])
    """
    if labels is not None:
        found = labels.any(dim=0).nonzero()[:, 0] if labels.ndim == 2 else labels.unique()
    elif predicted is not None:
        found = predicted.unique()
    else:
        return []
    return sorted(int(c) for c in found.tolist())[:limit]


@dataclass
class ProbePrototypes:
    """The class prototypes of a probe's classes (:func:`probe_prototypes`).

    Attributes:
        classes: the classes, in order.
        result: :func:`~lightning_prism.class_prototypes`'s result.
        tiles: ``(K, 3, H, W)`` the prototypes to draw, in ``[0, 1]`` (grey ones in all three channels).
        examples: ``(K,)`` the position in the probe of one image of each class (its first).
    """

    classes: list[int]
    result: PrototypeResult
    tiles: Tensor
    examples: list[int]


def probe_prototypes(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None,
    scores: Tensor | None,
    finite: Tensor,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    steps: int,
) -> ProbePrototypes | None:
    """The class prototype of every class of the probe (:func:`prototype_classes`), in the probe's image
    size and the model's normalisation; grey ones when the probe's images are grey images shown as colour
    ones (every channel alike, as the model saw them). ``None`` without a class.

    Args:
        model: the module whose forward takes the images.
        images: ``(N, C, H, W)`` the probe's images, as the model takes them.
        labels: ``(N,)`` or ``(N, K)`` the probe's labels, or ``None``.
        scores: ``(M, K)`` the model's scores of the ``M`` finite images, or ``None``.
        finite: ``(N,)`` bool, which images are finite.
        mean, std: the input normalisation.
        steps: optimisation steps.
    """
    predicted = None
    if scores is not None:
        predicted = torch.full((len(finite),), -1, dtype=torch.long, device=scores.device)
        predicted[finite.to(scores.device)] = explained_classes(scores)
    classes = prototype_classes(labels, None if predicted is None else predicted[predicted >= 0])
    if not classes:
        return None
    channels = images.shape[1]
    init = None
    if channels != 3:  # a model of one (or more) channels: start from grey in its input space
        init = torch.full((1, channels, *images.shape[-2:]), 0.5, device=images.device)
        if mean is not None and std is not None:
            init = (init - images.new_tensor(mean).view(1, -1, 1, 1)) / images.new_tensor(std).view(
                1, -1, 1, 1
            )
    shown = denormalize(images[finite], mean, std)
    grey = channels == 3 and bool((shown - shown[:, :1]).abs().amax() < 1e-3)
    result = class_prototypes(
        model, classes, tuple(images.shape[-2:]), mean=mean, std=std, steps=steps, init=init, grey=grey
    )
    tiles = result.display.float().cpu()
    if tiles.shape[1] != 3:  # a one-channel model's prototypes, drawn grey
        tiles = tiles[:, :1].expand(-1, 3, -1, -1)
    by = labels if labels is not None and labels.ndim == 1 else predicted
    examples = [int((by.to(images.device) == c).nonzero()[0, 0]) for c in classes] if by is not None else []
    return ProbePrototypes(classes, result, tiles, examples)
