"""The fixed probe batch: which validation images PRISM shows, chosen once, the same everywhere.

Selection is deterministic (no random numbers), so every rank of a distributed run and every
epoch see the same images, and a resumed run rebuilds them from the saved indices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "Probe", "build_probe", "select_indices", "split_batch"]

IMAGE_KEYS = ("image", "images", "img", "x", "input", "inputs", "pixel_values")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls")
SCAN_LIMIT = 256  # samples read to discover labels when a dataset has no `targets`


@dataclass
class Probe:
    """Probe images with their labels and dataset indices.

    Attributes:
        images: ``(N, C, H, W)`` floating images (as the model receives them).
        labels: ``(N,)`` long labels, or ``None``.
        indices: dataset indices of the images, or ``None`` for an iterable dataset.
        class_names: the dataset's names for the label indices (the ``classes`` attribute of
            torchvision datasets such as ``ImageFolder``, also through ``Subset``), or ``None``.
    """

    images: Tensor
    labels: Tensor | None
    indices: list[int] | None
    class_names: list[str] | None = None


def _pick(
    container: Any, key: int | str | None, defaults: Sequence[str], position: int | None, what: str
) -> Any:
    if isinstance(container, Mapping):
        if key is not None:
            if key not in container:
                raise KeyError(
                    f"{what}_key {key!r} is not in the batch; its keys are {sorted(map(str, container))}"
                )
            return container[key]
        for name in defaults:
            if name in container:
                return container[name]
        if what == "image":
            raise KeyError(
                f"cannot find the images in a batch with keys {sorted(map(str, container))}; "
                f"pass image_key= (tried {list(defaults)})"
            )
        return None
    if isinstance(container, (tuple, list)):
        index = key if isinstance(key, int) else position
        if isinstance(key, str):
            raise TypeError(f"{what}_key {key!r} is a string but the batch is a {type(container).__name__}")
        if index is None or index >= len(container):
            if key is not None:
                raise IndexError(f"{what}_key {key} is out of range for a batch of {len(container)} elements")
            return None
        return container[index]
    if what == "image" and key is None:
        return container
    if key is not None:
        raise TypeError(f"{what}_key {key!r} given but the batch is a {type(container).__name__}")
    return None


def split_batch(batch: Any, image_key: int | str | None = None, label_key: int | str | None = None):
    """Find the images (and labels) in a batch or sample.

    Args:
        batch: a tensor (images only), a tuple/list (images first, labels second by default) or a
            dict (keys from :data:`IMAGE_KEYS` / :data:`LABEL_KEYS` by default).
        image_key: position or key of the images; ``None`` to find them.
        label_key: position or key of the labels; ``None`` to find them if present.

    Returns:
        ``(images, labels)``; ``labels`` is ``None`` when there are none, or when what was found
        is not integer class labels.

    Raises:
        KeyError, IndexError, TypeError: if the given keys do not fit the batch.
    """
    images = _pick(batch, image_key, IMAGE_KEYS, 0, "image")
    labels = _pick(batch, label_key, LABEL_KEYS, 1, "label")
    if labels is not None and not _is_class_label(labels):
        if label_key is not None:
            raise TypeError(
                f"label_key {label_key!r} holds {type(labels).__name__}, not integer class labels"
            )
        labels = None
    return images, labels


def _is_class_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return (
        isinstance(value, Tensor)
        and value.ndim <= 1
        and not value.is_floating_point()
        and value.dtype != torch.bool
    )


def _dataset_classes(dataset: Any) -> list[str] | None:
    if isinstance(dataset, Subset):
        return _dataset_classes(dataset.dataset)
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return [str(c) for c in classes]
    return None


def _dataset_targets(dataset: Dataset) -> Sequence[int] | None:
    if isinstance(dataset, Subset):
        inner = _dataset_targets(dataset.dataset)
        return None if inner is None else [int(inner[i]) for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is None or isinstance(targets, (str, bytes)):
        return None
    try:
        return [int(t) for t in targets]
    except (TypeError, ValueError):
        return None


def select_indices(
    length: int, num_images: int, label_of: Callable[[int], int | None] | Sequence[int] | None = None
) -> list[int]:
    """Choose probe indices deterministically, spreading over as many classes as there are.

    With labels, candidates are up to :data:`SCAN_LIMIT` evenly spaced indices (all of them for a
    sequence of labels); classes are visited in sorted order, taking each class's first unused
    candidate in turn, until ``num_images`` are chosen. Without labels the indices are evenly
    spaced over the dataset.

    Args:
        length: dataset length.
        num_images: how many indices (fewer if the dataset is smaller).
        label_of: the labels of the whole dataset, or a function giving one index's label.

    Returns:
        Sorted list of distinct indices.
    """
    count = min(num_images, length)
    evenly = sorted({round(i * (length - 1) / max(count - 1, 1)) for i in range(count)}) if count else []
    if label_of is None or count == 0:
        return evenly
    if callable(label_of):
        step = max(1, length // SCAN_LIMIT)
        candidates = range(0, length, step)
        labelled = [(i, label_of(i)) for i in candidates]
    else:
        labelled = list(enumerate(label_of))
    by_class: dict[int, list[int]] = {}
    for index, label in labelled:
        if label is not None:
            by_class.setdefault(int(label), []).append(index)
    if not by_class:
        return evenly
    chosen: list[int] = []
    queues = [by_class[c] for c in sorted(by_class)]
    depth = 0
    while len(chosen) < count and any(depth < len(q) for q in queues):
        chosen.extend(q[depth] for q in queues if depth < len(q) and len(chosen) < count)
        depth += 1
    if len(chosen) < count:  # fewer labelled candidates than requested: fill evenly
        chosen.extend(i for i in evenly if i not in chosen)
    return sorted(chosen[:count])


def build_probe(
    dataloader: DataLoader,
    num_images: int,
    indices: Sequence[int] | None = None,
    image_key: int | str | None = None,
    label_key: int | str | None = None,
    device: torch.device | str | None = None,
) -> Probe:
    """Build the probe batch from a validation dataloader's dataset.

    Samples are read with ``dataset[i]`` and collated with the dataloader's own ``collate_fn``, so
    the probe looks exactly like a validation batch. An iterable dataset (no ``__getitem__``)
    gives the first ``num_images`` samples of the dataloader instead.

    Raises:
        IndexError: if an explicit index is out of range.
        TypeError: if the images are not a floating ``(N, C, H, W)`` tensor.
    """
    dataset = dataloader.dataset
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        length = len(dataset)  # type: ignore[arg-type]
        if indices is None:
            targets = _dataset_targets(dataset)

            def label_of(i: int) -> int | None:
                labels = split_batch(dataset[i], image_key, label_key)[1]
                return None if labels is None else int(labels)

            indices = select_indices(length, num_images, targets if targets is not None else label_of)
        bad = [i for i in indices if not 0 <= i < length]
        if bad:
            raise IndexError(
                f"probe indices {bad} are out of range for a validation dataset of {length} samples"
            )
        indices = [int(i) for i in indices]
        batch = dataloader.collate_fn([dataset[i] for i in indices])
        images, labels = split_batch(batch, image_key, label_key)
    else:
        taken_images, taken_labels = [], []
        for batch in dataloader:
            images, labels = split_batch(batch, image_key, label_key)
            taken_images.append(images)
            taken_labels.append(labels)
            if sum(len(t) for t in taken_images) >= num_images:
                break
        images = torch.cat(taken_images)[:num_images]
        has_labels = all(t is not None for t in taken_labels)
        labels = torch.cat([torch.as_tensor(t) for t in taken_labels])[:num_images] if has_labels else None
        indices = None
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"probe images must be a floating (N, C, H, W) tensor, got {shape}; check image_key")
    labels = None if labels is None else torch.as_tensor(labels).long().reshape(-1).to(device)
    return Probe(
        images.to(device), labels, None if indices is None else list(indices), _dataset_classes(dataset)
    )
