"""Keeping the pooled final feature map of every validation sample, from the validation pass itself.

:class:`FeatureCapture` puts one forward hook (a forward pre-hook for ``"<module>:input"``) on the
module that hands on PRISM's final feature map. The hook only keeps a reference to the latest tensor
of the right shape; :meth:`FeatureCapture.take`, called once per validation batch, pools it over its
positions into an ``(n, D)`` float32 block on its device and appends it, with the batch's labels,
until ``max_samples`` samples are kept. Nothing else runs during the forward, so the model's outputs
are those of a forward without the hook, bit for bit.

:func:`gather` brings the samples of all DDP ranks together (unequal counts, in rank order), so that
every rank computes the same metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layout import FeatureLayout
from .recording import output_tensor

__all__ = ["MAX_SAMPLES", "FeatureCapture", "gather"]

#: Samples kept per validation epoch by default. The k-NN accuracy of 10,000 samples has a binomial
#: standard error of at most half a point (0.3 at an accuracy of 90 %), and the three metrics of 10,000
#: samples of 1280 to 2048 channels take 2 to 11 s on two shared CPU cores (benchmarks/bench_capture.py), far
#: less on a GPU.
MAX_SAMPLES = 10_000


class FeatureCapture:
    """The pooled final feature map of the first ``max_samples`` validation samples, with their labels.

    Use :meth:`attach` when a validation epoch starts (or ``with capture:``), :meth:`take` after each
    validation batch and :meth:`remove` when the epoch ends; :meth:`remove` is idempotent and ``with``
    removes the hook also on an exception. :meth:`reset` forgets the samples for the next epoch.
    With an unshuffled validation loader the same samples are kept every epoch.

    The hook keeps only a reference to the latest tensor that the layout fits: a module that runs
    several times per forward (EfficientNet's shared ``_swish`` after the stem and after the head)
    is read at its last fitting call. It returns ``None`` and touches the tensor in no way, so the
    model's outputs are unchanged (also under ``torch.inference_mode()`` and autocast); pooling
    happens in :meth:`take`, in float32.

    Args:
        module: the module whose output (or input, with ``is_input``) is the final feature map.
        layout: how that tensor reads as ``(N, C, h, w)``
            (:class:`~lightning_prism.layout.FeatureLayout`, from the PRISM pass); tokens are pooled
            without the prefix tokens.
        is_input: read the tensor entering ``module`` (a layer named ``"<module>:input"``).
        max_samples: samples kept per epoch.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module`` or ``layout`` not a ``FeatureLayout``.
        ValueError: if ``max_samples`` is not a positive integer.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        >>> capture = FeatureCapture(model[1], FeatureLayout("nchw", (8, 8)), max_samples=5)
        >>> with capture, torch.inference_mode():
        ...     for _ in range(2):
        ...         _ = model(torch.rand(3, 3, 8, 8))
        ...         capture.take(torch.tensor([0, 1, 2]))
        3
        2
        >>> capture.features.shape, capture.labels.tolist(), len(model[1]._forward_hooks)
        (torch.Size([5, 4]), [0, 1, 2, 0, 1], 0)
    """

    def __init__(
        self,
        module: nn.Module,
        layout: FeatureLayout,
        *,
        is_input: bool = False,
        max_samples: int = MAX_SAMPLES,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(layout, FeatureLayout):
            raise TypeError(f"layout must be a FeatureLayout, got {type(layout).__name__}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer, got {max_samples!r}")
        self.module = module
        self.layout = layout
        self.is_input = is_input
        self.max_samples = max_samples
        self._handles: list[RemovableHandle] = []
        self._latest: Tensor | None = None
        self.reset()

    # ---------------------------------------------------------------- the hook's lifecycle
    def __enter__(self) -> FeatureCapture:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    @property
    def attached(self) -> bool:
        """Whether the hook is on the module."""
        return bool(self._handles)

    def attach(self) -> FeatureCapture:
        """Register the hook (once: attaching an attached capture does nothing). Returns ``self``."""
        if not self._handles:
            if self.is_input:
                handle = self.module.register_forward_pre_hook(self._on_input, with_kwargs=True)
            else:
                handle = self.module.register_forward_hook(self._on_output)
            self._handles.append(handle)
        return self

    def remove(self) -> None:
        """Take the hook off and drop the tensor it kept (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self._latest = None

    def _keep(self, value: Any) -> None:
        if self._count >= self.max_samples:
            return
        t = output_tensor(value)
        if t is not None and self.layout.fits(t.shape):
            self._latest = t

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._keep(output)

    def _on_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._keep(args or tuple(kwargs.values()))

    # ---------------------------------------------------------------- the samples
    def reset(self) -> None:
        """Forget the samples kept (a new epoch)."""
        self._blocks: list[Tensor] = []
        self._label_blocks: list[Tensor] = []
        self._without_labels = False
        self._count = 0
        self._latest = None
        self._features: Tensor | None = None
        self._labels: Tensor | None = None

    def __len__(self) -> int:
        """Samples kept."""
        return self._count

    @property
    def full(self) -> bool:
        """Whether ``max_samples`` samples are kept (further batches are not looked at)."""
        return self._count >= self.max_samples

    def take(self, labels: Tensor | None = None, select: Tensor | None = None) -> int:
        """Pool the feature map of the batch that just ran and keep it, with its labels.

        Args:
            labels: the batch's labels, ``(n,)`` class indices or ``(n, K)`` multi-hot targets (any
                dtype), or ``None`` (then the epoch's :attr:`labels` are ``None``); with ``select``,
                those of the selected samples.
            select: ``(s,)`` positions in the batch of the samples to keep (a spread subset of the
                epoch), or ``None`` for all.

        Returns:
            The number of samples kept from this batch: 0 once ``max_samples`` are kept, or when the
            module produced no tensor the layout fits since the last call.

        Raises:
            TypeError: if ``labels`` is neither a tensor nor ``None``.
            ValueError: if ``labels`` do not have one row per sample of the feature map, or their
                shape per sample differs from that of earlier batches.
        """
        t, self._latest = self._latest, None
        if t is not None and select is not None:
            t = t[select.to(t.device)]
        if labels is not None and not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a tensor or None, got {type(labels).__name__}")
        room = self.max_samples - self._count
        if t is None or room <= 0:
            return 0
        if labels is not None:
            if labels.ndim == 0 or labels.shape[0] != t.shape[0]:
                raise ValueError(
                    f"got labels of shape {tuple(labels.shape)} for a batch of {t.shape[0]} samples"
                )
            if self._label_blocks and labels.shape[1:] != self._label_blocks[0].shape[1:]:
                raise ValueError(
                    f"labels of shape {tuple(labels.shape)} after labels of shape (n, "
                    + ", ".join(str(s) for s in self._label_blocks[0].shape[1:])
                    + ") in earlier batches"
                )
        pooled = self.layout.to_nchw(t[:room].detach()).mean(dim=(2, 3), dtype=torch.float32)
        self._blocks.append(pooled)
        if labels is None:
            self._without_labels = True
        else:
            self._label_blocks.append(labels[:room].detach().to(pooled.device, copy=True))
        self._count += pooled.shape[0]
        self._features = self._labels = None
        return pooled.shape[0]

    @property
    def features(self) -> Tensor | None:
        """``(M, D)`` float32 pooled features of the samples kept, on the model's device (``None``
        before the first :meth:`take` that kept a sample)."""
        if self._features is None and self._blocks:
            self._blocks = [torch.cat(self._blocks)]
            self._features = self._blocks[0]
        return self._features

    @property
    def labels(self) -> Tensor | None:
        """``(M,)`` or ``(M, K)`` labels of the samples kept, as given to :meth:`take`; ``None`` if
        any batch came without labels."""
        if self._without_labels or not self._label_blocks:
            return None
        if self._labels is None:
            self._label_blocks = [torch.cat(self._label_blocks)]
            self._labels = self._label_blocks[0]
        return self._labels


# ---------------------------------------------------------------------- DDP
_NO_LABELS, _INTEGER, _FLOATING = 0, 1, 2


def _gathered(all_gather: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """``all_gather`` with the leading world dimension, also for one process (Lightning's
    ``all_gather`` then hands the tensor back unchanged)."""
    out = all_gather(t)
    return out if out.ndim == t.ndim + 1 else out.unsqueeze(0)


def gather(
    features: Tensor | None,
    labels: Tensor | None,
    all_gather: Callable[[Tensor], Tensor],
    device: torch.device | str | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """The samples of every DDP rank, in rank order, on every rank.

    Every rank calls this with what it kept (the counts may differ, also be zero). A first gather
    shares each rank's count, feature width and kind of labels; the features (and the labels) are then
    padded to the largest count, gathered, and trimmed. Labels come back only if every rank with
    samples has labels of the same shape per sample (integer labels stay integer; if any rank's are
    floating point, all become float32).

    Args:
        features: ``(M_r, D)`` this rank's pooled features, or ``None`` if it kept none.
        labels: ``(M_r,)`` or ``(M_r, K)`` labels, or ``None``.
        all_gather: Lightning-style ``all_gather(tensor) -> (world, *tensor.shape)``
            (``LightningModule.all_gather``; with one process it may return the tensor itself).
        device: where the tensors of the collective live (``pl_module.device``: NCCL gathers CUDA
            tensors only); by default the features' device, else the labels', else the CPU. A rank
            that kept nothing knows no other.

    Returns:
        ``(features, labels)``: ``(Σ M_r, D)`` and ``(Σ M_r, …)`` or ``None``; ``(None, None)`` if no
        rank kept a sample.

    Raises:
        ValueError: if ranks report different feature widths or label shapes, or the labels of a rank
            do not have one row per sample.

    Example::

        >>> ranks = [torch.ones(2, 3), torch.zeros(1, 3)]  # what two ranks kept
        >>> def fake_all_gather(t):  # rank 0's view: its own tensor, and rank 1's of the same shape
        ...     other = torch.tensor([1, 3, 0, 0]) if t.dtype == torch.long else torch.zeros_like(t)
        ...     return torch.stack([t, other])
        >>> gather(ranks[0], None, fake_all_gather)[0].tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    """
    if device is None:
        device = features.device if features is not None else labels.device if labels is not None else "cpu"
    count = 0 if features is None else features.shape[0]
    width = 0 if features is None else features.shape[1]
    if labels is not None and (labels.ndim == 0 or labels.shape[0] != count):
        raise ValueError(f"got labels of shape {tuple(labels.shape)} for {count} samples")
    kind = _NO_LABELS if labels is None else _FLOATING if labels.is_floating_point() else _INTEGER
    label_width = -1 if labels is None else (0 if labels.ndim == 1 else labels.shape[1])
    header = torch.tensor([count, width, kind, label_width], dtype=torch.long, device=device)
    headers = _gathered(all_gather, header).reshape(-1, 4).tolist()
    counts = [h[0] for h in headers]
    largest = max(counts)
    if largest == 0:
        return None, None
    widths = {h[1] for h in headers if h[0] > 0}
    if len(widths) != 1:
        raise ValueError(f"ranks kept features of different widths: {sorted(widths)}")
    (width,) = widths
    padded = torch.zeros(largest, width, dtype=torch.float32, device=device)
    if features is not None and count:
        padded[:count] = features.to(device)
    everyone = _gathered(all_gather, padded)
    gathered = torch.cat([everyone[r, :n] for r, n in enumerate(counts)])

    with_samples = [h for h in headers if h[0] > 0]
    if any(h[2] == _NO_LABELS for h in with_samples):
        return gathered, None
    label_widths = {h[3] for h in with_samples}
    if len(label_widths) != 1:
        raise ValueError(
            f"ranks kept labels of different shapes per sample: {sorted(label_widths)} (0: (n,))"
        )
    (label_width,) = label_widths
    dtype = torch.float32 if any(h[2] == _FLOATING for h in with_samples) else torch.long
    shape = (largest,) if label_width == 0 else (largest, label_width)
    padded_labels = torch.zeros(shape, dtype=dtype, device=device)
    if labels is not None and count:
        padded_labels[:count] = labels.to(device, dtype)
    all_labels = _gathered(all_gather, padded_labels)
    return gathered, torch.cat([all_labels[r, :n] for r, n in enumerate(counts)])
