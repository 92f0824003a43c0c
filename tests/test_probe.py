from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from lit_helpers import Stripes
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
)

from lightning_prism.probe import build_probe, dataloader_indices, select_indices, split_batch


def test_select_indices_spreads_over_classes_deterministically():
    labels = [0] * 50 + [1] * 30 + [2] * 20  # sorted by class, as ImageFolder is
    chosen = select_indices(len(labels), 6, labels)
    assert chosen == [0, 1, 50, 51, 80, 81]
    assert select_indices(len(labels), 6, labels) == chosen
    assert select_indices(len(labels), 6, lambda i: labels[i]) == chosen  # scanning gives the same
    assert select_indices(10, 4) == [0, 3, 6, 9]  # no labels: evenly spaced
    assert select_indices(3, 8) == [0, 1, 2]
    # Candidates: only those, spread over their classes (labels indexed by dataset index).
    assert select_indices([3, 50, 60, 99], 2, labels) == [3, 50]
    assert select_indices([5, 7, 9, 11, 13], 3) == [5, 9, 13]


def test_dataloader_indices_are_what_the_sampler_yields():
    dataset = Stripes(40)
    assert dataloader_indices(DataLoader(dataset, batch_size=8)) == list(range(40))
    subset = [3, 7, 11, 19, 23, 31, 38]
    loader = DataLoader(dataset, batch_size=2, sampler=SubsetRandomSampler(subset))
    assert dataloader_indices(loader) == subset
    # Only the batches validation runs (limit_val_batches): the first 2 of a sequential loader.
    assert dataloader_indices(DataLoader(dataset, batch_size=4), max_batches=2) == list(range(8))
    dropping = DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(dataset), 16, drop_last=True))
    assert dataloader_indices(dropping) == list(range(32))
    # Under DDP Lightning gives each rank a DistributedSampler: the union over the ranks counts.
    ranked = DataLoader(
        dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=3, rank=1, shuffle=False)
    )
    assert dataloader_indices(ranked) == list(range(40))
    assert dataloader_indices(ranked, max_batches=1) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(3)

        def __len__(self) -> int:  # a length does not make it indexable
            return 3

    assert dataloader_indices(DataLoader(Stream())) is None
    assert dataloader_indices(DataLoader(dataset, batch_size=None)) is None  # no automatic batching


def test_enumerating_a_random_sampler_is_deterministic_and_leaves_random_state_alone():
    dataset = Stripes(40)
    generator = torch.Generator().manual_seed(5)
    loader = DataLoader(
        dataset, batch_size=4, sampler=RandomSampler(dataset, num_samples=12, generator=generator)
    )
    states = (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state()[1].copy(),
        generator.get_state(),
    )
    first = dataloader_indices(loader)
    assert len(first) <= 12 and first == sorted(first)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2]) and torch.equal(
        generator.get_state(), states[3]
    )
    torch.manual_seed(123)  # another global seed: the same indices
    assert dataloader_indices(loader) == first
    # Without a generator of its own the sampler draws from the global generator, seeded inside.
    unseeded = DataLoader(dataset, batch_size=4, sampler=RandomSampler(dataset, num_samples=12))
    torch.manual_seed(1)
    once = dataloader_indices(unseeded)
    torch.manual_seed(2)
    assert dataloader_indices(unseeded) == once


def test_split_batch_finds_images_and_labels():
    x, y = torch.rand(2, 3, 4, 4), torch.tensor([1, 0])
    assert split_batch((x, y))[1] is y
    assert split_batch({"pixel_values": x, "labels": y})[0] is x
    assert split_batch(x) == (x, None)
    assert split_batch((x, torch.rand(2, 5)))[1] is None  # a float second element is no label
    assert split_batch({"a": x, "b": y}, image_key="a", label_key="b") == (x, y)
    with pytest.raises(KeyError, match=r"cannot find the images in a batch with keys \['a'\]"):
        split_batch({"a": x})
    with pytest.raises(KeyError, match=r"image_key 'img' is not in the batch; its keys are \['a'\]"):
        split_batch({"a": x}, image_key="img")
    with pytest.raises(
        TypeError,
        match=r"label_key 1 holds Tensor, not class labels \(integer class indices, or 0/1 multi-hot",
    ):
        split_batch((x, torch.rand(2)), label_key=1)


def test_build_probe_from_dataset_subset_and_iterable():
    dataset = Stripes(20, seed=3)
    probe = build_probe(DataLoader(dataset, batch_size=4), 4)
    assert probe.indices == [0, 1, 2, 3]  # both classes alternate; two of each
    assert probe.labels.tolist() == [0, 1, 0, 1]
    subset = Subset(dataset, [5, 6, 7, 8, 9, 10])
    sub = build_probe(DataLoader(subset), 2)
    assert torch.equal(sub.images, dataset.images[[5, 6]])
    explicit = build_probe(DataLoader(dataset), 2, indices=[7, 3])
    assert torch.equal(explicit.images, dataset.images[[7, 3]])
    with pytest.raises(
        IndexError, match=r"probe indices \[20\] are out of range for a validation dataset of 20"
    ):
        build_probe(DataLoader(dataset), 2, indices=[1, 20])
    sampled = DataLoader(dataset, batch_size=2, sampler=SubsetRandomSampler([4, 6, 8, 9]))
    assert build_probe(sampled, 3).indices == [4, 6, 9]  # both classes, only yielded samples
    with pytest.raises(
        IndexError, match=r"probe indices \[3\] are samples that the validation dataloader never yields"
    ):
        build_probe(sampled, 2, indices=[4, 3])

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from zip(dataset.images, dataset.targets, strict=True)

    streamed = build_probe(DataLoader(Stream(), batch_size=3), 5)
    assert streamed.indices is None and torch.equal(streamed.images, dataset.images[:5])
    assert streamed.labels.tolist() == dataset.targets[:5].tolist()

    class SizedStream(Stream):  # an IterableDataset with __len__ is still read as a stream
        def __len__(self) -> int:
            return len(dataset)

    sized = build_probe(DataLoader(SizedStream(), batch_size=2), 3)
    assert sized.indices is None and torch.equal(sized.images, dataset.images[:3])


def test_build_probe_puts_every_batch_through_process():
    dataset = Stripes(20, seed=3)
    seen = []

    def process(batch):
        seen.append(len(batch[0]))
        return {"pixel_values": batch[0] * 2 - 1, "labels": batch[1]}

    probe = build_probe(DataLoader(dataset, batch_size=4), 4, process=process)
    assert seen == [4] and torch.equal(probe.images, dataset.images[probe.indices] * 2 - 1)
    assert probe.labels.tolist() == dataset.targets[probe.indices].tolist()
    with pytest.raises(TypeError, match="probe images must be a floating"):
        build_probe(DataLoader(TensorDataset(torch.zeros(4, 3, 2, 2, dtype=torch.uint8))), 2)


def test_build_probe_takes_the_datasets_class_names():
    dataset = Stripes(20, seed=3)
    assert build_probe(DataLoader(dataset), 2).class_names is None
    dataset.classes = ("vertical", "horizontal")  # as torchvision datasets (ImageFolder) have
    assert build_probe(DataLoader(dataset), 2).class_names == ["vertical", "horizontal"]
    assert build_probe(DataLoader(Subset(dataset, [1, 2, 3])), 2).class_names == ["vertical", "horizontal"]


MULTI_HOT = [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]]


class MultiLabel(torch.utils.data.Dataset):
    """Images with multi-hot float labels over three classes (as a chest X-ray or attribute dataset
    returns them), as dict samples; ``targets`` only when asked."""

    def __init__(self, with_targets: bool) -> None:
        self.images = torch.rand(len(MULTI_HOT), 3, 8, 8, generator=torch.Generator().manual_seed(0))
        if with_targets:
            self.targets = torch.tensor(MULTI_HOT)

    def __len__(self) -> int:
        return len(MULTI_HOT)

    def __getitem__(self, i: int):
        return {"image": self.images[i], "labels": torch.tensor(MULTI_HOT[i], dtype=torch.float32)}


def test_multi_hot_and_zero_one_labels_are_labels():
    x = torch.rand(2, 3, 4, 4)
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert split_batch((x, multi_hot))[1] is multi_hot
    binary = torch.tensor([1.0, 0.0])  # a binary classifier's float targets
    assert split_batch((x, binary))[1] is binary
    assert split_batch((x, torch.tensor([[0.3, 0.7], [1.0, 0.0]])))[1] is None  # soft labels are none


@pytest.mark.parametrize("with_targets", [True, False])  # labels from `targets`, or read sample by sample
def test_a_multi_label_probe_keeps_its_multi_hot_labels_and_spreads_over_labels(with_targets):
    dataset = MultiLabel(with_targets)
    probe = build_probe(DataLoader(dataset, batch_size=4), 3)
    # Round robin over the classes: class 0's first sample, class 1's (sample 3), class 2's (sample 6);
    # the evenly spaced choice would have been [0, 4, 7], which misses classes 1 and 2.
    assert probe.indices == [0, 3, 6]
    assert probe.multi_hot and probe.labels.dtype == torch.long
    assert probe.labels.tolist() == [MULTI_HOT[i] for i in (0, 3, 6)]
    # A sample without any label is a group of its own, after the classes.
    assert build_probe(DataLoader(dataset, batch_size=4), 4).indices == [0, 3, 4, 6]


def test_select_indices_spreads_over_the_labels_of_multi_hot_samples():
    labels = [(0,), (0,), (0, 1), (1,), (), (2,), (0, 2)]
    assert select_indices(range(7), 3, labels) == [0, 2, 5]
    assert select_indices(range(7), 5, labels) == [0, 1, 2, 4, 5]
    # a sample under two classes is taken once
    assert select_indices(range(3), 3, [(0, 1), (0, 1), (1,)]) == [0, 1, 2]
