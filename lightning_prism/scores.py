"""How a classifier's output reads: its class scores, which kind of classifier it is, its predictions,
and the score that a gradient view explains.

Three kinds of image classifier (``task``):

* ``"multiclass"``: ``(N, K)`` scores with ``K ≥ 2``, one class per image (softmax); the prediction is
  the class with the highest score, the labels are ``(N,)`` class indices.
* ``"binary"``: one logit per image, ``(N, 1)`` or ``(N,)`` (``binary_cross_entropy_with_logits``);
  class 1 where the logit is above 0 (sigmoid above 0.5). The score of class 1 is the logit and the
  score of class 0 its negation, so a gradient view of a class-0 prediction shows the evidence for
  class 0.
* ``"multilabel"``: ``(N, K)`` independent logits (one sigmoid each), multi-hot ``(N, K)`` labels;
  the predicted set is every label whose logit is above 0. A gradient view explains one label per
  image: its highest-scoring one (among its true labels, when the labels are what it explains).

Scores alone tell a binary classifier from the others; multi-hot labels tell a multi-label one.
Where neither can (a multi-label model whose probe has no labels), the caller names the task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "TASKS",
    "Task",
    "class_score",
    "class_scores",
    "explained_classes",
    "infer_task",
    "is_multi_hot",
    "predictions",
]

Task = Literal["multiclass", "binary", "multilabel"]
TASKS: tuple[str, ...] = ("multiclass", "binary", "multilabel")


def class_scores(output: Any, batch_size: int | None = None) -> Tensor | None:
    """The class scores in a model's output, as ``(N, K)``, or ``None`` if it has none.

    Args:
        output: a tensor, a Hugging Face output or mapping with ``logits``, or a tuple/list whose
            first tensor holds the scores.
        batch_size: ``N``; when given, scores whose first dimension differs are no scores.

    Returns:
        ``(N, K)`` scores; a single logit per image, ``(N,)``, comes back as ``(N, 1)``.

    Example::

        >>> class_scores(torch.zeros(4, 10)).shape, class_scores(torch.zeros(4), 4).shape
        (torch.Size([4, 10]), torch.Size([4, 1]))
        >>> class_scores({"out": torch.zeros(4, 21, 8, 8)}) is None
        True
    """
    if isinstance(output, Mapping) or hasattr(output, "logits"):
        output = output.get("logits") if isinstance(output, Mapping) else output.logits
    elif isinstance(output, (tuple, list)):
        output = next((item for item in output if isinstance(item, Tensor)), None)
    if not isinstance(output, Tensor) or output.ndim not in (1, 2) or output.shape[0] == 0:
        return None
    if batch_size is not None and output.shape[0] != batch_size:
        return None
    return output[:, None] if output.ndim == 1 else output


def is_multi_hot(labels: Tensor | None) -> bool:
    """Whether ``labels`` are multi-hot: ``(N, K)`` with ``K ≥ 2`` and every value 0 or 1 (any dtype).

    Example::

        >>> is_multi_hot(torch.tensor([[1.0, 0.0, 1.0]])), is_multi_hot(torch.tensor([2, 0]))
        (True, False)
    """
    if labels is None or labels.ndim != 2 or labels.shape[1] < 2 or labels.is_complex():
        return False
    return bool(((labels == 0) | (labels == 1)).all())


def infer_task(scores: Tensor, labels: Tensor | None = None, task: str | None = None) -> str:
    """Which kind of classifier gave ``scores``: ``task`` if given (checked against the scores),
    else ``"binary"`` for a single logit, ``"multilabel"`` for multi-hot ``labels``, else
    ``"multiclass"``.

    Args:
        scores: ``(N, K)`` class scores (:func:`class_scores`).
        labels: the images' labels, ``(N,)`` or multi-hot ``(N, K)``, or ``None``.
        task: one of :data:`TASKS`, or ``None`` to infer it.

    Raises:
        ValueError: for an unknown ``task``, or one the scores cannot be: ``"binary"`` needs a
            single logit per image, the others ``K ≥ 2`` scores.

    Example::

        >>> infer_task(torch.zeros(2, 1)), infer_task(torch.zeros(2, 3), torch.tensor([[1, 0, 1], [0, 0, 0]]))
        ('binary', 'multilabel')
    """
    single = scores.shape[1] == 1
    if task is None:
        return "binary" if single else "multilabel" if is_multi_hot(labels) else "multiclass"
    if task not in TASKS:
        raise ValueError(f"task must be None (infer it) or one of {TASKS}, got {task!r}")
    if (task == "binary") != single:
        needs = (
            "a single logit per image, (N, 1) or (N,)" if task == "binary" else "(N, K) scores with K >= 2"
        )
        raise ValueError(f"task={task!r} needs {needs}; the model returns {tuple(scores.shape)}")
    return task


def predictions(scores: Tensor, task: str) -> Tensor:
    """The model's prediction of every image.

    Args:
        scores: ``(N, K)`` class scores.
        task: one of :data:`TASKS`.

    Returns:
        ``(N,)`` long class indices (``"multiclass"``: the highest score; ``"binary"``: 1 where the
        logit is above 0), or for ``"multilabel"`` the ``(N, K)`` bool predicted sets (logit above 0,
        that is sigmoid above 0.5).

    Example::

        >>> predictions(torch.tensor([[2.0], [-1.0]]), "binary").tolist()
        [1, 0]
        >>> predictions(torch.tensor([[2.0, -1.0, 0.5]]), "multilabel").tolist()
        [[True, False, True]]
    """
    scores = scores.detach()
    if task == "binary":
        return (scores[:, 0] > 0).long()
    if task == "multilabel":
        return scores > 0
    return scores.argmax(dim=1)


def explained_classes(scores: Tensor, allowed: Tensor | None = None) -> Tensor:
    """The class a gradient view explains for every image, when none was given: the prediction.

    For ``(N, K)`` scores, the highest-scoring class among those ``allowed`` (every class where an
    image allows none); for a multi-label model that is its highest-scoring label, or its
    highest-scoring true label. For a single logit, class 1 where it is above 0.

    Args:
        scores: ``(N, K)`` class scores.
        allowed: ``(N, K)`` bool, the classes each image may be explained by, or ``None``.

    Returns:
        ``(N,)`` long.

    Example::

        >>> s = torch.tensor([[3.0, 1.0, 2.0]])
        >>> explained_classes(s).tolist(), explained_classes(s, torch.tensor([[False, True, True]])).tolist()
        ([0], [2])
    """
    scores = scores.detach()
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0).long()
    if allowed is None:
        return scores.argmax(dim=1)
    allowed = allowed.to(device=scores.device, dtype=torch.bool)
    allowed = allowed | ~allowed.any(dim=1, keepdim=True)  # an image with no allowed class: any
    return scores.masked_fill(~allowed, float("-inf")).argmax(dim=1)


def class_score(scores: Tensor, classes: Tensor) -> Tensor:
    """Every image's score of its class: what a gradient view differentiates.

    Args:
        scores: ``(N, K)`` class scores.
        classes: ``(N,)`` long class indices (below ``K``; 0 or 1 for a single logit).

    Returns:
        ``(N,)``: the score of the class; for a single logit, the logit for class 1 and its negation
        for class 0 (the evidence for class 0).

    Example::

        >>> class_score(torch.tensor([[2.0], [2.0]]), torch.tensor([1, 0])).tolist()
        [2.0, -2.0]
    """
    if scores.shape[1] == 1:
        logit = scores[:, 0]
        return torch.where(classes.to(logit.device) == 1, logit, -logit)
    return scores.gather(1, classes.to(scores.device)[:, None])[:, 0]
