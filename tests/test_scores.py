"""lightning_prism.scores: how a classifier's output reads, for multi-class, binary and multi-label models."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_prism.scores import (
    class_score,
    class_scores,
    explained_classes,
    infer_task,
    is_multi_hot,
    predictions,
)


def test_class_scores_are_found_in_every_output_a_classifier_returns():
    logits = torch.randn(4, 3)
    for output in (logits, {"logits": logits, "loss": None}, SimpleNamespace(logits=logits), (logits, None)):
        assert class_scores(output) is logits
    single = torch.randn(4)
    assert class_scores(single).shape == (4, 1) and torch.equal(class_scores(single)[:, 0], single)
    assert class_scores(single[:, None], batch_size=4).shape == (4, 1)
    # No scores: spatial maps (a segmentation dict), another batch size, nothing tensor-like.
    assert class_scores({"out": torch.zeros(4, 3, 8, 8)}) is None
    assert class_scores(logits, batch_size=5) is None
    assert class_scores(None) is None and class_scores(torch.zeros(0, 3)) is None


def test_multi_hot_labels_are_zero_one_matrices_of_two_or_more_columns():
    assert is_multi_hot(torch.tensor([[1, 0, 1], [0, 0, 0]]))
    assert is_multi_hot(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert is_multi_hot(torch.tensor([[True, False]]))
    assert not is_multi_hot(torch.tensor([1, 0, 1]))  # class indices
    assert not is_multi_hot(torch.tensor([[1], [0]]))  # one column: a binary label
    assert not is_multi_hot(torch.tensor([[0.2, 0.8]]))  # soft labels
    assert not is_multi_hot(None)


def test_the_task_is_inferred_from_the_scores_and_labels_or_checked_when_given():
    two, one = torch.zeros(2, 3), torch.zeros(2, 1)
    assert infer_task(one) == "binary"
    assert infer_task(two) == "multiclass"
    assert infer_task(two, torch.tensor([0, 2])) == "multiclass"
    assert infer_task(two, torch.tensor([[1, 0, 1], [0, 1, 0]])) == "multilabel"
    assert infer_task(two, task="multilabel") == "multilabel"  # no labels: only the user can tell
    with pytest.raises(ValueError, match=r"task='binary' needs a single logit per image.*\(2, 3\)"):
        infer_task(two, task="binary")
    with pytest.raises(ValueError, match=r"task='multiclass' needs \(N, K\) scores with K >= 2.*\(2, 1\)"):
        infer_task(one, task="multiclass")
    with pytest.raises(ValueError, match=r"task must be None \(infer it\) or one of .* got 'regression'"):
        infer_task(two, task="regression")


def test_predictions_and_the_explained_class_of_each_kind_of_classifier():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 4)).astype(np.float32)
    t = torch.from_numpy(scores)
    assert predictions(t, "multiclass").tolist() == scores.argmax(1).tolist()
    assert predictions(t, "multilabel").tolist() == (1 / (1 + np.exp(-scores)) > 0.5).tolist()
    assert predictions(t[:, :1], "binary").tolist() == (scores[:, 0] > 0).astype(int).tolist()
    allowed = rng.random((6, 4)) > 0.5
    allowed[0] = False  # allows nothing: its prediction
    expected = [
        int(np.argmax(np.where(row, s, -np.inf))) if row.any() else int(np.argmax(s))
        for s, row in zip(scores, allowed, strict=True)
    ]
    assert explained_classes(t, torch.from_numpy(allowed)).tolist() == expected
    assert explained_classes(t).tolist() == scores.argmax(1).tolist()
    assert explained_classes(t[:, :1]).tolist() == (scores[:, 0] > 0).astype(int).tolist()


def test_the_score_of_a_class_is_its_logit_and_for_one_logit_class_zero_is_the_negation():
    scores = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]])
    assert class_score(scores, torch.tensor([2, 1])).tolist() == [3.0, 0.25]
    logit = torch.tensor([[1.5], [-0.5], [2.0]])
    assert class_score(logit, torch.tensor([1, 1, 0])).tolist() == [1.5, -0.5, -2.0]
