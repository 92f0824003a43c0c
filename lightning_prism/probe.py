"""The fixed probe batch: which validation images PRISM shows, chosen once, the same everywhere.

The probe is drawn only from the samples that the validation dataloader actually yields: for a
map-style dataset, the indices its sampler or batch sampler hands out in one pass (over every rank of
a ``DistributedSampler``, within Lightning's ``limit_val_batches``); for an iterable dataset, the first
samples it streams. Selection is deterministic (the sampler is enumerated with a fixed seed, and the
global random state, Python's and NumPy's included, is left exactly as found), so every rank, every
epoch and a resumed run see the same images. The chosen samples are collated with the dataloader's own
``collate_fn`` and handed to a ``process`` callable, which the callback sets to the steps that every
validation batch goes through before ``validation_step`` (batch hooks, transfer, precision).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "Probe",
    "as_labels",
    "build_probe",
    "dataloader_indices",
    "isolated_random_state",
    "loader_samplers",
    "select_indices",
    "split_batch",
]

IMAGE_KEYS = ("image", "images", "img", "x", "input", "inputs", "pixel_values")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls")
SCAN_LIMIT = 256  # samples read to discover labels when a dataset has no `targets`
#: Indices enumerated per rank at most (a sampler may be unbounded).
ENUMERATION_LIMIT = 10_000_000
#: The seed the sampler is enumerated with (inside a forked random state).
SEED = 0


@dataclass
class Probe:
    """Probe images with their labels and dataset indices.

    Attributes:
        images: ``(N, C, H, W)`` floating images, exactly as ``validation_step`` receives them.
        labels: ``(N,)`` long class indices, ``(N, K)`` long 0/1 multi-hot labels (a multi-label
            classifier's), or ``None``.
        indices: dataset indices of the images, or ``None`` for an iterable dataset.
        class_names: the dataset's names for the label indices (the ``classes`` attribute of
            torchvision datasets such as ``ImageFolder``, also through ``Subset``), or ``None``.
    """

    images: Tensor
    labels: Tensor | None
    indices: list[int] | None
    class_names: list[str] | None = None

    @property
    def multi_hot(self) -> bool:
        """Whether the labels are multi-hot ``(N, K)`` (a multi-label classifier's)."""
        return self.labels is not None and self.labels.ndim == 2

    @property
    def finite(self) -> Tensor:
        """``(N,)`` bool: which images hold only finite values."""
        return torch.isfinite(self.images).flatten(1).all(dim=1)


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
    """Find the images (and labels) in a batch.

    Args:
        batch: a tensor (images only), a tuple/list (images first, labels second by default) or a
            dict (keys from :data:`IMAGE_KEYS` / :data:`LABEL_KEYS` by default).
        image_key: position or key of the images; ``None`` to find them.
        label_key: position or key of the labels; ``None`` to find them if present.

    Returns:
        ``(images, labels)``; ``labels`` is ``None`` when there are none, or when what was found is
        not class labels: integer class indices ``(N,)`` (or one ``int``), a single 0/1 label per
        image ``(N, 1)`` (a binary classifier's targets, also as floats), or multi-hot ``(N, K)``
        labels of a multi-label classifier (values 0 and 1, any dtype), which come back as they are.

    Raises:
        KeyError, IndexError, TypeError: if the given keys do not fit the batch.
    """
    images = _pick(batch, image_key, IMAGE_KEYS, 0, "image")
    labels = _pick(batch, label_key, LABEL_KEYS, 1, "label")
    if labels is not None and not _is_class_label(labels):
        if label_key is not None:
            raise TypeError(
                f"label_key {label_key!r} holds {type(labels).__name__}, not class labels (integer class indices, "
                "or 0/1 multi-hot labels)"
            )
        labels = None
    return images, labels


def _zero_one(value: Tensor) -> bool:
    return not value.is_complex() and bool(((value == 0) | (value == 1)).all())


def _is_class_label(value: Any) -> bool:
    """Class indices (an int, an integer tensor of at most one dimension), 0/1 labels (a binary
    classifier's float targets), or multi-hot ``(N, K)`` labels."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if not isinstance(value, Tensor) or value.numel() == 0:
        return False
    if value.ndim <= 1:
        integer = not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        return integer or (value.is_floating_point() and _zero_one(value))
    return value.ndim == 2 and _zero_one(value)


def as_labels(labels: Any, device: torch.device | str | None = None) -> Tensor:
    """Labels as the probe keeps them (what :func:`split_batch` found): ``(N,)`` long class indices, or
    ``(N, K)`` long 0/1 multi-hot labels."""
    value = torch.as_tensor(labels)
    if value.ndim == 2 and value.shape[1] >= 2:
        return value.long().to(device)
    return value.long().reshape(-1).to(device)


def _sample_label(value: Any) -> int | tuple[int, ...] | None:
    """One sample's label: a class index, or the tuple of a multi-hot label's classes."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return None
    if value.numel() == 1 and (not value.is_floating_point() or _zero_one(value)):
        return int(value.reshape(()))
    if value.ndim == 1 and _zero_one(value):
        return tuple(value.nonzero()[:, 0].tolist())
    return None


def _unwrap_subsets(dataset: Any) -> tuple[Any, list[int] | None]:
    """The dataset under any ``Subset`` layers, and the map from outer indices to its indices."""
    mapping: list[int] | None = None
    while isinstance(dataset, Subset):
        inner = [int(i) for i in dataset.indices]
        mapping = inner if mapping is None else [inner[i] for i in mapping]
        dataset = dataset.dataset
    return dataset, mapping


def _dataset_classes(dataset: Any) -> list[str] | None:
    classes = getattr(_unwrap_subsets(dataset)[0], "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return [str(c) for c in classes]
    return None


def _dataset_targets(dataset: Dataset) -> Sequence[int | tuple[int, ...]] | None:
    """The labels of every sample from the dataset's ``targets`` (through ``Subset`` layers): class
    indices, or for multi-hot targets ``(len, K)`` the tuple of each sample's classes."""
    base, mapping = _unwrap_subsets(dataset)
    targets = getattr(base, "targets", None)
    if targets is None or isinstance(targets, (str, bytes)):
        return None
    try:
        value = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):
        return None
    labels: list[int | tuple[int, ...]]
    if value.ndim == 1 and not value.is_floating_point() and value.dtype != torch.bool:
        labels = value.tolist()
    elif value.ndim == 2 and value.shape[1] >= 2 and _zero_one(value):
        labels = [tuple(row.nonzero()[:, 0].tolist()) for row in value]
    else:
        return None
    return labels if mapping is None else [labels[i] for i in mapping]


@contextmanager
def isolated_random_state(*owners: Any) -> Iterator[None]:
    """Run the body with the CPU generator seeded with :data:`SEED`; afterwards the global random
    state of torch (CPU), Python and NumPy, and that of every ``generator`` the owners carry, are
    exactly as before."""
    generators = [
        g for g in (getattr(o, "generator", None) for o in owners) if isinstance(g, torch.Generator)
    ]
    saved = [g.get_state() for g in generators]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(SEED)
            yield
    finally:
        for generator, state in zip(generators, saved, strict=True):
            generator.set_state(state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _index_passes(batch_sampler: Any) -> list[Any]:
    """One batch sampler per rank: copies with each rank of a ``DistributedSampler``, else itself."""
    sampler = getattr(batch_sampler, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return [batch_sampler]
    passes = []
    for rank in range(sampler.num_replicas):
        per_rank = copy.copy(sampler)
        per_rank.rank = rank
        batches = copy.copy(batch_sampler)
        batches.sampler = per_rank
        passes.append(batches)
    return passes


def loader_samplers(dataloader: DataLoader) -> list[Any]:
    """The dataloader and every sampler inside it (whose generators must be left as found)."""
    found: list[Any] = [dataloader, dataloader.sampler, dataloader.batch_sampler]
    inner = getattr(dataloader.batch_sampler, "sampler", None)
    found.append(inner)
    # Lightning's DistributedSamplerWrapper keeps the user's sampler in `dataset._sampler`.
    found.append(getattr(getattr(inner, "dataset", None), "_sampler", None))
    return [o for o in found if o is not None]


def dataloader_indices(dataloader: DataLoader, max_batches: float | None = None) -> list[int] | None:
    """Indices into ``dataloader.dataset`` that one pass of the dataloader yields, over all ranks.

    The batch sampler (or the sampler inside Lightning's ``BatchSampler``) is enumerated as the
    dataloader would, once per rank of a ``DistributedSampler``, with the CPU generator seeded
    with :data:`SEED` and every random state restored afterwards.

    Args:
        dataloader: a validation dataloader.
        max_batches: batches per rank that validation runs (``trainer.num_val_batches``);
            ``None`` or infinite for all.

    Returns:
        Sorted distinct indices, or ``None`` when the dataloader does not index a map-style dataset
        in batches (an ``IterableDataset``, or ``batch_size=None``).
    """
    if isinstance(dataloader.dataset, IterableDataset) or dataloader.batch_sampler is None:
        return None
    limit = None if max_batches is None or math.isinf(max_batches) else int(max_batches)
    seen: set[int] = set()
    with isolated_random_state(*loader_samplers(dataloader)):
        for batch_sampler in _index_passes(dataloader.batch_sampler):
            taken = 0
            for batch in itertools.islice(batch_sampler, limit):
                seen.update(int(i) for i in batch)
                taken += len(batch)
                if taken >= ENUMERATION_LIMIT:
                    break
    return sorted(seen)


def select_indices(
    candidates: int | Sequence[int],
    num_images: int,
    label_of: Callable[[int], Any] | Sequence[Any] | None = None,
) -> list[int]:
    """Choose probe indices deterministically, spreading over as many classes as there are.

    With labels, classes are visited in sorted order, taking each class's first unused candidate in
    turn, until ``num_images`` are chosen; a labelling function is asked about up to
    :data:`SCAN_LIMIT` evenly spaced candidates only. A multi-hot label (a tuple of classes) puts its
    sample under each of its classes (and one with no class under a group of its own), so the probe
    spreads over labels as it does over classes. Without labels the indices are evenly spaced over
    the candidates.

    Args:
        candidates: the dataset indices to choose from (sorted), or a dataset length for all.
        num_images: how many indices (fewer if there are fewer candidates).
        label_of: the labels of the whole dataset (indexed by dataset index), or a function giving
            one index's label: a class index, a tuple of classes (multi-hot), or ``None``.

    Returns:
        Sorted list of distinct indices.

    Example::

        >>> select_indices([10, 11, 12, 13, 14, 15], 4, lambda i: i % 3)
        [10, 11, 12, 15]
        >>> select_indices(range(6), 3, [(0,), (0,), (0, 1), (0,), (2,), ()])
        [0, 2, 4]
    """
    pool = list(range(candidates)) if isinstance(candidates, int) else list(candidates)
    count = min(num_images, len(pool))
    positions = {round(i * (len(pool) - 1) / max(count - 1, 1)) for i in range(count)} if count else set()
    evenly = [pool[p] for p in sorted(positions)]
    if label_of is None or count == 0:
        return evenly
    if callable(label_of):
        step = max(1, len(pool) // SCAN_LIMIT)
        labelled = [(i, label_of(i)) for i in pool[::step]]
    else:
        labelled = [(i, label_of[i]) for i in pool]
    NONE = -1  # the group of multi-hot samples without any class, visited after the classes
    by_class: dict[int, list[int]] = {}
    for index, label in labelled:
        if label is None:
            continue
        classes = [int(c) for c in label] if isinstance(label, tuple) else [int(label)]
        for c in classes or [NONE]:
            by_class.setdefault(c, []).append(index)
    if not by_class:
        return evenly
    chosen: list[int] = []
    taken: set[int] = set()
    queues = [by_class[c] for c in sorted(by_class, key=lambda c: (c == NONE, c))]
    heads = [0] * len(queues)
    while len(chosen) < count and any(h < len(q) for h, q in zip(heads, queues, strict=True)):
        for q, queue in enumerate(queues):
            while heads[q] < len(queue) and queue[heads[q]] in taken:  # already chosen for another class
                heads[q] += 1
            if heads[q] < len(queue) and len(chosen) < count:
                chosen.append(queue[heads[q]])
                taken.add(queue[heads[q]])
                heads[q] += 1
    if len(chosen) < count:  # fewer labelled candidates than requested: fill evenly
        chosen.extend(i for i in evenly if i not in taken)
    return sorted(chosen[:count])


def _to_device(device: torch.device | str | None) -> Callable[[Any], Any]:
    return lambda batch: batch if device is None else move_data_to_device(batch, device)


def build_probe(
    dataloader: DataLoader,
    num_images: int,
    indices: Sequence[int] | None = None,
    image_key: int | str | None = None,
    label_key: int | str | None = None,
    device: torch.device | str | None = None,
    *,
    process: Callable[[Any], Any] | None = None,
    max_batches: float | None = None,
) -> Probe:
    """Build the probe batch from the samples a validation dataloader yields.

    A map-style dataset: the indices come from :func:`dataloader_indices` (``indices`` must be
    among them; otherwise :func:`select_indices` chooses), the samples are read with
    ``dataset[i]`` and collated with the dataloader's own ``collate_fn`` into one batch. An iterable
    dataset (or ``batch_size=None``): the first ``num_images`` samples that the dataloader yields.
    Every batch goes through ``process`` before the images and labels are taken out of it.

    Args:
        dataloader: the validation dataloader.
        num_images: probe size (ignored when ``indices`` is given).
        indices: explicit dataset indices.
        image_key, label_key: where the images and labels are in a batch (see :func:`split_batch`).
        device: where to move a batch when ``process`` is not given.
        process: what to apply to each collated batch before it is split (the callback passes the
            validation loop's batch hooks, transfer and precision conversion).
        max_batches: batches per rank that validation runs (``trainer.num_val_batches``).

    Returns:
        :class:`Probe`.

    Raises:
        IndexError: if an explicit index is out of range, or not yielded by the dataloader.
        ValueError: if the dataloader yields no samples.
        TypeError: if the images are not a floating ``(N, C, H, W)`` tensor.
    """
    process = process if process is not None else _to_device(device)
    dataset = dataloader.dataset
    candidates = dataloader_indices(dataloader, max_batches)
    if candidates is not None:
        length = len(dataset)  # type: ignore[arg-type]
        if indices is None:
            targets = _dataset_targets(dataset)

            def label_of(i: int) -> int | tuple[int, ...] | None:
                return _sample_label(_pick(dataset[i], label_key, LABEL_KEYS, 1, "label"))

            indices = select_indices(candidates, num_images, targets if targets is not None else label_of)
        indices = [int(i) for i in indices]
        outside = [i for i in indices if not 0 <= i < length]
        if outside:
            raise IndexError(
                f"probe indices {outside} are out of range for a validation dataset of {length} samples"
            )
        yielded = set(candidates)
        unused = [i for i in indices if i not in yielded]
        if unused:
            raise IndexError(
                f"probe indices {unused} are samples that the validation dataloader never yields (its "
                f"sampler hands out {len(yielded)} of the dataset's {length} samples)"
            )
        if not indices:
            raise ValueError("the validation dataloader yields no samples to build the probe from")
        batch = process(dataloader.collate_fn([dataset[i] for i in indices]))
        images, labels = split_batch(batch, image_key, label_key)
        found: list[int] | None = indices
    else:
        images, labels = _stream(dataloader, num_images, image_key, label_key, process, max_batches)
        found = None
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"probe images must be a floating (N, C, H, W) tensor, got {shape}; check image_key")
    if labels is not None:
        labels = as_labels(labels, images.device)
    return Probe(images, labels, found, _dataset_classes(dataset))


def _stream(
    dataloader: DataLoader,
    num_images: int,
    image_key: int | str | None,
    label_key: int | str | None,
    process: Callable[[Any], Any],
    max_batches: float | None,
) -> tuple[Tensor, Tensor | None]:
    """The first ``num_images`` samples that the dataloader yields, processed batch by batch."""
    limit = None if max_batches is None or math.isinf(max_batches) else int(max_batches)
    taken_images: list[Tensor] = []
    taken_labels: list[Any] = []
    with isolated_random_state(*loader_samplers(dataloader)):
        for batch in itertools.islice(iter(dataloader), limit):
            images, labels = split_batch(process(batch), image_key, label_key)
            if not isinstance(images, Tensor):
                kind = type(images).__name__
                raise TypeError(
                    f"probe images must be a floating (N, C, H, W) tensor, got {kind}; check image_key"
                )
            taken_images.append(images)
            taken_labels.append(labels)
            if sum(len(t) for t in taken_images) >= num_images:
                break
    if not taken_images:
        raise ValueError("the validation dataloader yields no samples to build the probe from")
    images = torch.cat(taken_images)[:num_images]
    if any(t is None for t in taken_labels):
        return images, None
    labels = torch.cat([as_labels(t, images.device) for t in taken_labels])
    return images, labels[:num_images]
