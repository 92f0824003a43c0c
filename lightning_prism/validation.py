"""Feature discrimination of the whole validation set, from the validation pass Lightning already runs.

:class:`ValidationFeatures` is what :class:`~lightning_prism.PRISMMonitor` runs around a validation
epoch: :meth:`~ValidationFeatures.start` puts a :class:`~lightning_prism.capture.FeatureCapture` on
PRISM's final layer (and a second hook on the forward's module, for the predictions the projectors
show); :meth:`~ValidationFeatures.take`, after every validation batch, keeps each selected sample's
pooled final feature map with its label, prediction and thumbnail, on the device;
:meth:`~ValidationFeatures.finish` takes the hooks off, gathers the samples of every DDP rank and
computes :func:`~lightning_prism.discrimination.discrimination` on the device. The hooks exist from
``start`` to ``finish`` (or :meth:`~ValidationFeatures.remove`, on an exception) only.

At most ``max_samples`` samples are kept, split evenly between the ranks, and spread evenly over each
rank's share of the epoch when its size is known (a class-sorted validation set still gives every
class its share); with an unshuffled validation loader they are the same samples every epoch.
:meth:`~ValidationFeatures.run` is the same pass over the validation data outside the validation
loop (the pretrained model's row, before training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .capture import FeatureCapture, gather
from .discrimination import KNN_K, KNN_TEMPERATURE, Discrimination, discrimination
from .layout import FeatureLayout
from .probe import as_labels, split_batch
from .recording import resolve_module
from .render import denormalize
from .scores import class_scores, explained_classes

__all__ = ["THUMBNAIL", "EpochFeatures", "ValidationFeatures"]

#: Side of the thumbnails kept for the projectors, in pixels.
THUMBNAIL = 32


@dataclass
class EpochFeatures:
    """The samples of one validation pass and what they measure.

    Attributes:
        features: ``(M, D)`` pooled final feature maps of every rank's samples (the same on every rank).
        labels: ``(M,)`` or ``(M, K)`` labels, or ``None``.
        result: the discrimination metrics of ``features`` and ``labels``.
        own_features: ``(m, D)`` this rank's samples (what the projectors show, from global rank zero).
        own_labels: ``(m,)`` or ``(m, K)`` labels of those, or ``None``.
        own_predictions: ``(m,)`` the model's predicted class of each, or ``None`` (no class scores).
        thumbnails: ``(m, C, 32, 32)`` uint8 images of each, or ``None``.
    """

    features: Tensor
    labels: Tensor | None
    result: Discrimination
    own_features: Tensor
    own_labels: Tensor | None
    own_predictions: Tensor | None
    thumbnails: Tensor | None


def _spread(start: int, count: int, expected: int | None, cap: int) -> Tensor | None:
    """Which of the positions ``start .. start + count - 1`` of an epoch of ``expected`` samples to
    keep so that ``cap`` of them are kept, evenly spaced; ``None``: all (no more than ``cap`` expected,
    or the size is unknown: the first ``cap`` are kept)."""
    if expected is None or expected <= cap:
        return None
    positions = torch.arange(start, start + count)
    chosen = (positions + 1) * cap // expected > positions * cap // expected
    return chosen.nonzero()[:, 0]


class ValidationFeatures:
    """Each validation sample's pooled final feature map, kept from the validation pass, and the
    discrimination metrics of all of them.

    Args:
        max_samples: samples kept per pass, over all ranks.
        k, temperature: the k-NN's (:func:`~lightning_prism.discrimination.knn_accuracy`).
        image_key, label_key: where the images and labels are in a batch (:func:`~lightning_prism.probe.split_batch`).
        mean, std: the input normalisation, undone for the thumbnails.
        thumbnails: keep a thumbnail of every sample (for the projectors).
    """

    def __init__(
        self,
        max_samples: int,
        *,
        k: int = KNN_K,
        temperature: float = KNN_TEMPERATURE,
        image_key: int | str | None = None,
        label_key: int | str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        thumbnails: bool = True,
    ) -> None:
        self.max_samples = max_samples
        self.k = k
        self.temperature = temperature
        self.image_key = image_key
        self.label_key = label_key
        self.mean = mean
        self.std = std
        self.keep_thumbnails = thumbnails
        self._capture: FeatureCapture | None = None
        self._handles: list[RemovableHandle] = []
        self._reset(None, None)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (pickle, ``copy.deepcopy``) carries the options, not a pass in flight: its hooks and
        samples belong to the model of this run."""
        state = self.__dict__.copy()
        state.update(_capture=None, _handles=[], _scores=None, _predictions=[], _thumbnails=[])
        return state

    def _reset(self, expected: int | None, cap: int | None) -> None:
        self._expected, self._cap = expected, cap
        self._seen = 0
        self._scores: Tensor | None = None
        self._predictions: list[Tensor] = []
        self._thumbnails: list[Tensor] = []
        self._no_predictions = False

    @property
    def seen(self) -> int:
        """Samples of this rank's current (or last) pass that reached :meth:`take`."""
        return self._seen

    @property
    def active(self) -> bool:
        """Whether a pass is under way (its hooks are on the model)."""
        return self._capture is not None and self._capture.attached

    def start(
        self,
        model: nn.Module,
        layer: str,
        layout: FeatureLayout,
        *,
        world_size: int = 1,
        expected: int | None = None,
        predictions: bool = True,
    ) -> None:
        """Put the hooks on: the capture on ``layer`` of ``model`` and, with ``predictions``, one on
        ``model`` itself that keeps a reference to its class scores (the predictions the projectors show).

        Args:
            model: the module whose forward takes the images.
            layer: PRISM's final layer, relative to ``model`` (``"<name>:input"`` for a module's input).
            layout: how that layer's tensor reads as ``(N, C, h, w)``.
            world_size: ranks sharing the pass (each keeps its share of ``max_samples``).
            expected: samples this rank will see in the pass, if known (for an even spread).
            predictions: keep each sample's predicted class too.
        """
        self.remove()
        module, is_input = resolve_module(model, layer, allow_input=True)
        cap = math.ceil(self.max_samples / world_size)
        self._capture = FeatureCapture(module, layout, is_input=is_input, max_samples=cap).attach()
        if predictions:
            self._handles.append(model.register_forward_hook(self._on_output))
        self._reset(expected, cap)

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._scores = class_scores(output)

    def _detach(self) -> None:
        """Take every hook off; what was kept stays."""
        if self._capture is not None:
            self._capture.remove()
        while self._handles:
            self._handles.pop().remove()
        self._scores = None

    def remove(self) -> None:
        """Take every hook off and forget the pass (idempotent)."""
        self._detach()
        self._capture = None

    def take(self, batch: Any) -> None:
        """Keep the selected samples of the batch that just ran: pooled features, labels, predictions
        and thumbnails, on the device. Nothing runs once ``max_samples`` are kept."""
        capture = self._capture
        if capture is None or not capture.attached or capture.full:
            self._scores = None
            return
        images, labels = split_batch(batch, self.image_key, self.label_key)
        count = images.shape[0] if isinstance(images, Tensor) else (len(labels) if labels is not None else 0)
        select = _spread(self._seen, count, self._expected, int(self._cap or 0))
        self._seen += count
        if labels is not None:
            labels = as_labels(labels)
            labels = labels if select is None else labels[select.to(labels.device)]
        kept = capture.take(labels, select)
        scores, self._scores = self._scores, None
        if not kept:
            return
        if self._handles and scores is not None and scores.shape[0] == count:
            chosen = scores if select is None else scores[select.to(scores.device)]
            self._predictions.append(explained_classes(chosen[:kept].detach()))
        else:
            self._no_predictions = True
        if self.keep_thumbnails and isinstance(images, Tensor) and images.ndim == 4:
            chosen = images if select is None else images[select.to(images.device)]
            self._thumbnails.append(self._thumbnail(chosen[:kept]))

    def _thumbnail(self, images: Tensor) -> Tensor:
        """``(n, C, 32, 32)`` uint8: averaged down first (an anti-aliased reduction), then de-normalised
        (a per-channel affine map, which commutes with averaging), so only the small images are mapped."""
        with torch.no_grad():
            small = F.adaptive_avg_pool2d(images.detach().float(), THUMBNAIL)
            shown = denormalize(small, self.mean, self.std)
            return (shown.clamp(0, 1) * 255).round().to(torch.uint8)

    def finish(self, all_gather: Callable[[Tensor], Tensor], device: torch.device) -> EpochFeatures | None:
        """End the pass: hooks off, every rank's samples gathered (a collective: every rank calls
        this), the metrics computed on the device. ``None`` if no rank kept a sample."""
        capture = self._capture
        self.remove()  # what the capture kept stays with it
        own_features = None if capture is None else capture.features
        own_labels = None if capture is None else capture.labels
        features, labels = gather(own_features, own_labels, all_gather, device)
        if features is None:
            return None
        result = discrimination(features, labels, k=self.k, temperature=self.temperature)
        count = 0 if own_features is None else own_features.shape[0]
        predictions = None
        if self._predictions and not self._no_predictions:
            predictions = torch.cat(self._predictions)
        thumbnails = torch.cat(self._thumbnails) if self._thumbnails else None
        if thumbnails is not None and thumbnails.shape[0] != count:
            thumbnails = None
        return EpochFeatures(
            features=features,
            labels=labels,
            result=result,
            own_features=own_features if own_features is not None else features[:0],
            own_labels=own_labels,
            own_predictions=predictions,
            thumbnails=thumbnails,
        )

    def run(
        self,
        model: nn.Module,
        layer: str,
        layout: FeatureLayout,
        batches: Iterable[Any],
        forward: Callable[[Tensor], Any],
        *,
        world_size: int = 1,
        expected: int | None = None,
        predictions: bool = True,
    ) -> None:
        """The pass over ``batches`` outside the validation loop: :meth:`start`, then for every batch
        ``forward(images)`` and :meth:`take`, until ``max_samples`` are kept (call :meth:`finish`
        afterwards, which finds the hooks already off)."""
        self.start(model, layer, layout, world_size=world_size, expected=expected, predictions=predictions)
        try:
            for batch in batches:
                if not self.active or self._capture is None or self._capture.full:
                    break
                forward(split_batch(batch, self.image_key, self.label_key)[0])
                self.take(batch)
        finally:
            self._detach()
