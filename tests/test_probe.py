from __future__ import annotations

import pytest
import torch
from lit_helpers import Stripes
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_prism.probe import build_probe, select_indices, split_batch


def test_select_indices_spreads_over_classes_deterministically():
    labels = [0] * 50 + [1] * 30 + [2] * 20  # sorted by class, as ImageFolder is
    chosen = select_indices(len(labels), 6, labels)
    assert chosen == [0, 1, 50, 51, 80, 81]
    assert select_indices(len(labels), 6, labels) == chosen
    assert select_indices(len(labels), 6, lambda i: labels[i]) == chosen  # scanning gives the same
    assert select_indices(10, 4) == [0, 3, 6, 9]  # no labels: evenly spaced
    assert select_indices(3, 8) == [0, 1, 2]


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
    with pytest.raises(TypeError, match="label_key 1 holds Tensor, not integer class labels"):
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

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from zip(dataset.images, dataset.targets, strict=True)

    streamed = build_probe(DataLoader(Stream(), batch_size=3), 5)
    assert streamed.indices is None and torch.equal(streamed.images, dataset.images[:5])
    with pytest.raises(TypeError, match="probe images must be a floating"):
        build_probe(DataLoader(TensorDataset(torch.zeros(4, 3, 2, 2, dtype=torch.uint8))), 2)


def test_build_probe_takes_the_datasets_class_names():
    dataset = Stripes(20, seed=3)
    assert build_probe(DataLoader(dataset), 2).class_names is None
    dataset.classes = ("vertical", "horizontal")  # as torchvision datasets (ImageFolder) have
    assert build_probe(DataLoader(dataset), 2).class_names == ["vertical", "horizontal"]
    assert build_probe(DataLoader(Subset(dataset, [1, 2, 3])), 2).class_names == ["vertical", "horizontal"]
