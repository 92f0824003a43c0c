"""``PRISMMonitor``: PRISM maps of a fixed validation probe, logged every epoch. Lightning glue only.

The monitor's behaviour lives in :class:`PRISMMonitorBase`, which does not depend on which Lightning
package runs it; :class:`PRISMMonitor` is the ``pytorch_lightning`` callback and
:class:`lightning_prism.lightning.PRISMMonitor` the same for the ``lightning`` package
(``lightning.pytorch``), whose ``Trainer`` and ``LightningCLI`` check for their own ``Callback``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, closing, nullcontext
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from .capture import MAX_SAMPLES
from .discrimination import KNN_K
from .embedding import EmbeddingView, log_embedding
from .engine import BASES, BasisMismatchError
from .layout import FeatureLayout
from .loggers import TAKES_PICTURES, Picture, backend, log_pictures, save_file
from .pca import subspace_similarity
from .probe import Probe, build_probe, isolated_random_state, loader_samplers
from .prototypes import DEFAULT_STEPS
from .recording import record, resolve_module
from .render import (
    EvolutionHistory,
    caption_grid,
    denormalize,
    display_tiles,
    load_font,
    missing_glyphs,
    to_uint8,
)
from .scores import TASKS, class_scores, infer_task
from .separation import class_separation
from .validation import EpochFeatures, ValidationFeatures
from .views import VIEWS, ProbeViews, ViewsOutput, captions, label_text, probe_pictures, probe_prototypes

__all__ = ["PRISMMonitor", "PRISMMonitorBase"]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


#: The scalars ``_run`` may compute, under ``<prefix>/``.
SCALARS = (
    "explained_variance/pc1",
    "explained_variance/pc2",
    "explained_variance/pc3",
    "similarity/previous",
    "similarity/first",
    "class_separation",
    "val/knn_accuracy",
    "val/class_separation",
    "val/effective_rank",
)
TARGETS = ("prediction", "label")
#: A tag prefix: ``/``-separated words of letters, digits, ``_`` and ``-`` (a valid key everywhere).
PREFIX = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")


def _logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logger connector gives the metrics logged at the end of this epoch."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def _check_key(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise ValueError(f"{name} must be None (find it), an int position or a str key, got {value!r}")


def _cpu(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.cpu()


def eager() -> AbstractContextManager[Any]:
    """The monitor's own forwards run eagerly in a ``torch.compile``'d model
    (``torch.compiler.set_stance("force_eager")``, PyTorch 2.6 and later): recording a forward needs
    every module call, and a compiled forward would recompile every epoch for the recorder's wrappers
    (and, past dynamo's recompile limit, leave the training forward uncompiled)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def _expected_samples(loader: Any, batches: float) -> int | None:
    """How many samples one rank's pass over a validation dataloader sees, if it can be known: its
    sampler's length (per rank under a ``DistributedSampler``), within ``limit_val_batches``."""
    try:
        samples = len(loader.sampler)
    except TypeError:
        return None
    batch_size = getattr(loader, "batch_size", None)
    if batch_size and math.isfinite(batches):
        samples = min(samples, int(batches) * batch_size)
    return samples


def _raised_in_call_of(error: BaseException, module: nn.Module) -> bool:
    """Whether ``error`` came out of calling ``module`` (its ``forward``, or binding its arguments)."""
    call = nn.Module._call_impl.__code__
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is call and tb.tb_frame.f_locals.get("self") is module:
            return True
        tb = tb.tb_next
    return False


def _forward_error(error: Exception, target: nn.Module, images: Tensor) -> Exception:
    """``error`` itself, or, if calling ``target`` on the images raised it, an error that says what
    PRISM called and which option to pass when that forward takes something else (raise it from
    ``error``)."""
    if not _raised_in_call_of(error, target):
        return error
    children = [name for name, _ in target.named_children()]
    return RuntimeError(
        f"the probe forward failed: {type(error).__name__}: {error}. PRISM calls "
        f"{type(target).__name__}.forward(images) with the image batch of shape {tuple(images.shape)}; "
        "if that forward takes something else (a dict, several arguments), pass module='<name>' naming "
        "the submodule whose forward takes the images"
        + (f" (submodules of {type(target).__name__}: {', '.join(map(repr, children))})" if children else "")
    )


class PRISMMonitorBase:
    r"""Log PRISM maps of a fixed probe batch of validation images, and the feature discrimination of the
    whole validation set, from the model before training and at the end of validation.

    The probe is a validation batch: chosen once per ``fit`` (and per ``validate()``),
    deterministically, from the samples that the validation dataloader yields (its dataset *and* its
    sampler, over every rank, within ``limit_val_batches``; spread over as many classes as the labels
    show), collated by the dataloader's ``collate_fn`` and put through every step a validation batch
    goes through before ``validation_step``: the precision plugin's input conversion, the
    DataModule's and LightningModule's ``on_before_batch_transfer``, ``transfer_batch_to_device`` and
    ``on_after_batch_transfer``. It is identical on every rank and epoch; its dataset indices, the
    options that chose it and the colour basis are saved in checkpoints. At the end of every
    ``every_n_epochs``-th validation epoch (never during the sanity check, and also in
    ``trainer.validate()``) the monitor runs :func:`~lightning_prism.prism` on the probe with the
    LightningModule itself (or its submodule ``module``), in eval mode under the trainer's precision
    and the grad mode Lightning chose for the loop (``torch.no_grad()`` during ``fit``, inference
    mode in ``validate()`` unless the trainer avoids it), and logs:

    * scalars, through ``pl_module.log`` (so they are in ``trainer.callback_metrics``, can be
      monitored by ``ModelCheckpoint`` and ``EarlyStopping``, and every logger records them at the
      step of the epoch's validation metrics): ``<prefix>/explained_variance/pc1``..``pc3`` (the
      share of the probe's variance along the red, green and blue axes,
      :attr:`~lightning_prism.PRISMResult.colour_variance`), ``<prefix>/similarity/previous`` and
      ``<prefix>/similarity/first`` (mean cosine of the principal angles between this epoch's
      top-three subspace and the previous/first logged epoch's) and, with labels,
      ``<prefix>/class_separation``; and the validation set's ``<prefix>/val/knn_accuracy``,
      ``<prefix>/val/class_separation`` and ``<prefix>/val/effective_rank``
      (:mod:`lightning_prism.discrimination`), from each sample's pooled final feature map kept during
      the validation pass itself (:class:`~lightning_prism.validation.ValidationFeatures`: at most
      ``val_samples``, gathered across ranks); the values are the same on every rank;
    * pictures, at that same step and under the same tag every epoch (so a slider scrubs through
      the epochs), to every logger that takes them (:mod:`lightning_prism.loggers`: TensorBoard,
      W&B, MLflow): ``<prefix>/maps`` and ``<prefix>/overlay``, grids with each image's true label
      and the model's prediction underneath (a wrong prediction in red), and ``<prefix>/inputs``,
      the de-normalised probe (once per run and logger); ``<prefix>/embedding``, the validation samples
      on two principal axes aligned from pass to pass, with the features for each tracker's projector
      (:mod:`lightning_prism.embedding`). Any other logger gets one warning;
    * with ``views`` beyond ``"prism"``, the gradient views of the same probe at the same step:
      ``<prefix>/grad_cam`` (:func:`~lightning_prism.grad_cam` of the class ``target`` names, at
      PRISM's final feature map, from PRISM's own forward), ``<prefix>/saliency`` and
      ``<prefix>/guided_saliency`` (:func:`~lightning_prism.saliency`), each a jet-coloured heatmap
      over the input with the same captions; with two views or more, ``<prefix>/views``, one row per
      probe image: the input, then every view side by side. They run on the LightningModule itself
      (never the DDP wrapper), with gradients switched on for the probe only: no parameter gets a
      gradient, and the optimiser, gradient accumulation and DDP's gradient sync never see them.
      From the second epoch on, Grad-CAM's forward is told where the previous epoch's last graph
      cut fell, so autograd records only the head (a model that now runs differently costs one
      more forward, never a wrong map);
    * with ``"prototypes"`` in ``views``, every ``prototype_every_n_epochs`` epochs,
      ``<prefix>/prototypes``: the class prototype (:func:`~lightning_prism.class_prototypes`) of every
      class of the probe, at most 16, computed by global rank zero alone;
    * at the end of ``fit``, ``<prefix>_evolution.png``, stored with every logger's run that keeps
      files (TensorBoard's and CSV's log directory, W&B run files, MLflow artifacts; never the
      working directory): the probe, then one row of ``evolution_view`` overlays per logged epoch, at most
      ``evolution_rows`` rows spread evenly over the whole run (also across a resume: the rows are
      saved in checkpoints).

    With ``baseline=True`` the same is logged for the model as loaded when ``fit`` starts, before the
    first optimiser step, at step 0 (the strip's row "before"; ``similarity/first`` and
    ``basis="fixed"`` refer to it), from one pass over the validation data.

    During a monitored validation epoch the model carries a forward hook of the monitor on the module
    that hands on PRISM's final feature map, and one on the forward's module for the predictions the
    projectors show (not with ``embedding_samples=0``), attached when the epoch starts and removed when it ends, before the probe's forward, and on every
    exception; during training steps none. Its own forwards run eagerly in a ``torch.compile``'d model.
    The global random state is left as found. A failure at run time is one warning per cause and training goes on, unless ``strict=True``. A
    probe image with NaN or infinite values is named in a warning and shown as an invalid tile; the
    other images still get their maps. A monitor reused for another ``fit`` starts afresh (new
    probe, basis, strip) unless its state is restored from a checkpoint; a colour basis that does
    not fit the model (restored, or after the model changed) is replaced by a fresh one, with a
    warning.

    Args:
        num_images: probe size (ignored when ``indices`` is given).
        indices: explicit dataset indices of the probe images; each must be a sample that the
            validation dataloader yields.
        every_n_epochs: run every this many epochs during ``fit``.
        dataloader_idx: which validation dataloader supplies the probe: its position (in the order
            Lightning numbers them, as the ``dataloader_idx`` of ``validation_step``) or, for a dict
            of dataloaders, its key.
        image_key: position (tuple/list batch) or key (dict batch) of the images; ``None`` finds them.
        label_key: position or key of the labels; ``None`` finds them if there are any.
        module: dotted name of the LightningModule's submodule whose ``forward`` takes the image
            batch (e.g. ``"model"`` when the LightningModule's own ``forward`` takes a dict);
            ``None``: the LightningModule itself. PRISM calls ``forward(images)``.
        extrapolate: gradual extrapolation to the input resolution (``False``: final-map resolution).
        final_layer: module name of the final feature map, always relative to the LightningModule
            (e.g. ``"model.layer4"``, also with ``module="model"``); discovered if ``None``.
        stage_layers: module names of the stages (relative to the LightningModule); discovered if
            ``None``.
        mean: per-channel mean of the input normalisation, to undo it for display.
        std: per-channel std of the input normalisation.
        prefix: tag prefix.
        basis: ``"aligned"`` keeps a feature's colour across epochs by matching each epoch's axes
            to the previous logged epoch's; ``"refit"`` is the raw per-epoch PCA; ``"fixed"``
            projects every epoch onto the first logged epoch's axes.
        class_names: names for the label indices in captions; by default the validation
            dataset's ``classes`` (torchvision datasets such as ``ImageFolder``), else the indices.
        overlay_alpha: weight of the map in the overlay, in ``[0, 1]``.
        evolution_strip: store the evolution PNG with the loggers' runs at the end of ``fit``.
        evolution_rows: most epoch rows in the evolution strip (at least 2; the first and last
            logged epochs are always shown).
        font: path of a TrueType/OpenType font for captions and labels, for class names in a
            script the bundled DejaVu Sans Bold lacks (such as Chinese); ``None`` for the bundled font.
        views: what to log every epoch, one or more of ``"prism"``, ``"grad_cam"``, ``"saliency"``,
            ``"guided_saliency"`` and ``"prototypes"``.
        target: the class the gradient views explain: ``"prediction"`` (the model's) or ``"label"``
            (the probe's true labels). For a multi-label classifier, each image's highest-scoring
            predicted label, or its highest-scoring true label.
        task: the kind of classifier, for its captions (:mod:`lightning_prism.scores`):
            ``"multiclass"`` (the highest score is the prediction), ``"binary"`` (a single logit:
            class 1 where it is above 0) or ``"multilabel"`` (independent sigmoids: the predicted set
            is every label scored above 0.5); ``None`` infers it: a single logit is binary, multi-hot
            labels are multi-label, anything else multi-class.
        grad_cam_layer: module name (relative to the LightningModule) of Grad-CAM's layer; ``None``:
            PRISM's final feature map, computed from PRISM's own forward, unless the gradient there is
            zero for every image (a vision transformer that reads out its class token: only that token
            reaches the head); then, with one warning, the input of the block of the model's last
            attention (:func:`~lightning_prism.gradients.attention_input`; for timm's ViT-B,
            ``"model.blocks.11:input"``), from the next epoch on in a forward of its own.
        evolution_view: the view the evolution strip shows (one of ``views``; default the first).
        baseline: log every view of the model as loaded when ``fit`` starts (before the first optimiser
            step, at step 0; not when resuming a run that has it): the "before" row of the strip, and
            the basis that ``similarity/first`` and ``basis="fixed"`` refer to.
        prototype_every_n_epochs: with ``"prototypes"`` in ``views``, draw them in every this many of
            the epochs the monitor works in (and before training).
        prototype_steps: optimisation steps of each prototype call.
        val_samples: validation samples kept for the validation set's metrics and embedding (spread
            over each rank's share of the set; the same every epoch with an unshuffled loader); ``0``
            turns them off.
        knn_k: the k-NN accuracy's number of neighbours (weighted votes ``exp(s / 0.07)``).
        embedding_samples: samples sent to the trackers' projectors (TensorBoard's Projector, a W&B
            table, MLflow artifacts) each time; ``0``: none.
        strict: raise instead of warning when PRISM fails at run time.

    Raises:
        ValueError: for an invalid argument (the message names the valid choices); at ``setup``, for
            a ``module``, ``final_layer``, ``stage_layers`` or ``grad_cam_layer`` name that the LightningModule does not
            have (listing the nearest names), or a layer outside ``module``.
        MisconfigurationException: at ``setup`` of ``fit`` or ``validate`` with
            ``Trainer(logger=False)`` (``test`` and ``predict`` run normally).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from lightning_prism import PRISMMonitor
        >>> monitor = PRISMMonitor(num_images=8, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=1)  # doctest: +SKIP

    With the ``lightning`` package, import it from :mod:`lightning_prism.lightning` instead.
    """

    #: What ``setup`` raises for ``Trainer(logger=False)``: the running package's own class.
    misconfiguration: ClassVar[type[Exception]] = MisconfigurationException
    #: How warnings are issued: once, from global rank zero.
    warn: ClassVar[Callable[..., None]] = staticmethod(rank_zero_warn)

    def __init__(
        self,
        num_images: int = 8,
        indices: list[int] | None = None,
        every_n_epochs: int = 1,
        dataloader_idx: int | str = 0,
        image_key: int | str | None = None,
        label_key: int | str | None = None,
        module: str | None = None,
        extrapolate: bool = True,
        final_layer: str | None = None,
        stage_layers: list[str] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        prefix: str = "prism",
        basis: str = "aligned",
        class_names: list[str] | None = None,
        overlay_alpha: float = 0.5,
        evolution_strip: bool = True,
        evolution_rows: int = 10,
        font: str | None = None,
        views: list[str] | tuple[str, ...] = ("prism",),
        target: str = "prediction",
        task: str | None = None,
        grad_cam_layer: str | None = None,
        evolution_view: str | None = None,
        baseline: bool = True,
        prototype_every_n_epochs: int = 1,
        prototype_steps: int = DEFAULT_STEPS,
        val_samples: int = MAX_SAMPLES,
        knn_k: int = KNN_K,
        embedding_samples: int = 1000,
        strict: bool = False,
    ) -> None:
        _check_int("num_images", num_images, 1)
        _check_int("every_n_epochs", every_n_epochs, 1)
        if not (isinstance(dataloader_idx, str) and dataloader_idx):
            try:
                _check_int("dataloader_idx", dataloader_idx, 0)
            except ValueError:
                raise ValueError(
                    f"dataloader_idx must be an integer >= 0 (position) or a dict key, got {dataloader_idx!r}"
                ) from None
        if indices is not None:
            if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
                raise ValueError(f"indices must be a non-empty list of dataset indices, got {indices!r}")
            for i in indices:
                _check_int("every entry of indices", i, 0)
            if len(set(indices)) != len(indices):
                raise ValueError(f"indices must be distinct, got {list(indices)}")
        _check_key("image_key", image_key)
        _check_key("label_key", label_key)
        if module is not None and (not isinstance(module, str) or not module or module.startswith(".")):
            raise ValueError(
                f"module must be None (the LightningModule) or the dotted name of a submodule, got {module!r}"
            )
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (both per-channel lists) or not at all")
        if mean is not None and std is not None:
            if len(mean) != len(std) or len(mean) not in (1, 3):
                raise ValueError(
                    f"mean and std must be lists of 1 or 3 numbers of equal length, got {mean} and {std}"
                )
            if any(s <= 0 for s in std):
                raise ValueError(f"std must be positive, got {std}")
        if not isinstance(prefix, str) or not PREFIX.fullmatch(prefix):
            raise ValueError(
                f"prefix must be a non-empty tag such as 'prism' or 'monitor/prism' (letters, digits, '_' "
                f"and '-', parts separated by '/'), got {prefix!r}"
            )
        if not 0 <= overlay_alpha <= 1:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha}")
        _check_int("evolution_rows", evolution_rows, 2)
        _check_int("val_samples", val_samples, 0)
        _check_int("prototype_every_n_epochs", prototype_every_n_epochs, 1)
        _check_int("prototype_steps", prototype_steps, 1)
        _check_int("knn_k", knn_k, 1)
        _check_int("embedding_samples", embedding_samples, 0)
        if font is not None:
            try:
                load_font(12, font)
            except OSError as error:
                raise ValueError(
                    f"font must be a TrueType/OpenType font file, got {font!r}: {error}"
                ) from None
        if isinstance(stage_layers, str):
            raise ValueError(f"stage_layers must be a list of module names, got the string {stage_layers!r}")
        choices = ", ".join(map(repr, VIEWS))
        if isinstance(views, str) or not isinstance(views, Sequence) or not views:
            raise ValueError(f"views must be a non-empty list of {choices}, got {views!r}")
        unknown = [v for v in views if v not in VIEWS]
        if unknown or len(set(views)) != len(views):
            raise ValueError(f"views must be distinct entries of {choices}, got {list(views)!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if task is not None and task not in TASKS:
            raise ValueError(f"task must be None (inferred) or one of {TASKS}, got {task!r}")
        if grad_cam_layer is not None and (not isinstance(grad_cam_layer, str) or "grad_cam" not in views):
            raise ValueError(
                f"grad_cam_layer must be a module name, with 'grad_cam' in views, got {grad_cam_layer!r} "
                f"with views={list(views)!r}"
            )
        if evolution_view is not None and evolution_view not in views:
            raise ValueError(f"evolution_view must be one of views {list(views)!r}, got {evolution_view!r}")
        self.num_images = len(indices) if indices is not None else num_images
        self.indices = None if indices is None else [int(i) for i in indices]
        self.every_n_epochs = every_n_epochs
        self.dataloader_idx = dataloader_idx
        self.image_key = image_key
        self.label_key = label_key
        self.module = module
        self.extrapolate = extrapolate
        self.final_layer = final_layer
        self.stage_layers = None if stage_layers is None else list(stage_layers)
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.prefix = prefix
        self.basis = basis
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.overlay_alpha = float(overlay_alpha)
        self.evolution_strip = evolution_strip
        self.evolution_rows = evolution_rows
        self.font = font
        self.views = list(views)
        self.target = target
        self.task = task
        self.grad_cam_layer = grad_cam_layer
        self.evolution_view = evolution_view if evolution_view is not None else self.views[0]
        self.baseline = baseline
        self.prototype_every_n_epochs = prototype_every_n_epochs
        self.prototype_steps = prototype_steps
        self.val_samples = val_samples
        self.knn_k = knn_k
        self.embedding_samples = embedding_samples
        self.strict = strict
        self._validation = ValidationFeatures(
            max(val_samples, 1),
            k=knn_k,
            image_key=image_key,
            label_key=label_key,
            mean=self.mean,
            std=self.std,
            thumbnails=embedding_samples > 0,
        )
        self._validation_index = 0

        self._evolution = EvolutionHistory(evolution_rows)
        self._embedding = EmbeddingView()
        self._probe_views = ProbeViews(
            self.views,
            extrapolate=extrapolate,
            basis=basis,
            final_layer=self._relative(final_layer),
            stage_layers=None if stage_layers is None else [str(self._relative(s)) for s in stage_layers],
            grad_cam_layer=self._relative(grad_cam_layer),
            strict=strict,
            module_prefix="" if module is None else module + ".",
        )
        self._new_run()

    @property
    def evolution_path(self) -> str | None:
        """The first place the evolution strip was stored at the end of ``fit``, or ``None``."""
        return self.evolution_paths[0] if self.evolution_paths else None

    def _new_run(self) -> None:
        """Forget everything a previous ``fit`` chose: probe, basis, strip, what was logged and warned."""
        self._warned: set[str] = set()
        self._probe: Probe | None = None
        self._ran = False  # whether a validation epoch of this run reached the monitor
        self._baseline_logged = False  # whether this run's "before" row (the model as loaded) is logged
        # PRISM's final layer (relative to the forward's module) and layout, and which module they are of
        self._final_map: tuple[int, str, FeatureLayout] | None = None
        # the probe's pooled final map and labels, from the last views' pass (marked in the embedding)
        self._probe_pooled: tuple[Tensor, Tensor | None] | None = None
        self._embedding.reset()  # the embedding's axes of the previous pass, and its frame
        self._probe_indices: list[int] | None = self.indices
        self._reference: Tensor | None = None  # basis of the previous logged epoch
        self._first: Tensor | None = None  # basis of the first logged epoch
        self._inputs_logged_to: weakref.WeakSet[Any] = weakref.WeakSet()  # loggers that got `inputs`
        self._probe_views.reset()  # where Grad-CAM's cut fell, and its layer for a class-token ViT
        self._evolution.reset()
        #: Where ``on_fit_end`` stored the evolution strip: local paths, or MLflow artifact URIs.
        self.evolution_paths: list[str] = []

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict[str, Any]:
        """What pickling and ``copy.deepcopy`` keep: options, probe, colour basis, strip and the views'
        memory. Not the objects of the run it is part of, which a copy in another process or fit does
        not have: the loggers that got the ``inputs`` picture (the copy logs it again), and the
        LightningModule's ``log`` and ``log_dict`` that Lightning attaches to every callback (it attaches
        them again at the next fit)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
        state["_inputs_logged_to"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._inputs_logged_to = weakref.WeakSet()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(  # type: ignore[attr-defined] - from the Callback base
            prefix=self.prefix, final_layer=self.final_layer, stage_layers=self.stage_layers
        )

    def _probe_options(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "indices": self.indices, "dataloader_idx": self.dataloader_idx}

    def state_dict(self) -> dict[str, Any]:
        def plain(t: Tensor | None) -> list[list[float]] | None:
            return None if t is None else t.detach().cpu().double().tolist()

        return {
            "probe_indices": self._probe_indices,
            "probe_options": self._probe_options(),
            "reference": plain(self._reference),
            "first": plain(self._first),
            "evolution": self._evolution.state_dict(),
            "baseline_logged": self._baseline_logged,
            "embedding_axes": plain(self._embedding.axes),
            "embedding_limit": self._embedding.limit,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def tensor(value: Any) -> Tensor | None:
            return None if value is None else torch.tensor(value, dtype=torch.float32)

        self._probe = None
        self._probe_indices = self.indices
        self._evolution.load_state_dict(state_dict.get("evolution", {}))
        saved = state_dict.get("probe_indices")
        if saved is not None:
            # Older checkpoints did not save the options: what the saved probe itself shows.
            options = state_dict.get("probe_options") or {"num_images": len(saved), "indices": None}
            asked = self._probe_options()
            changed = {
                key: (options.get(key), asked[key])
                for key in ("num_images", "indices", "dataloader_idx")
                if key in options and options[key] != asked[key]
            }
            if self.indices is None and not changed:
                self._probe_indices = [int(i) for i in saved]
            elif changed and list(saved) != self._probe_indices:
                was = ", ".join(f"{key}={old!r}" for key, (old, _) in changed.items())
                now = ", ".join(f"{key}={new!r}" for key, (_, new) in changed.items())
                self._warn_once(
                    "resumed-probe",
                    f"PRISMMonitor: the checkpoint's probe ({len(saved)} images, dataset indices {list(saved)}) "
                    f"was chosen with {was}; this monitor is configured with {now}, so it builds a new probe from "
                    "those options. The colour basis carries on from the checkpoint; the evolution strip and the "
                    "`inputs` image start again with the new probe.",
                )
                self._evolution.reset()
        self._reference = tensor(state_dict.get("reference"))
        self._first = tensor(state_dict.get("first"))
        self._baseline_logged = bool(state_dict.get("baseline_logged", False))
        self._embedding.axes = tensor(state_dict.get("embedding_axes"))
        self._embedding.limit = float(state_dict.get("embedding_limit", 0.0))

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):  # the monitor only works at the end of validation
            return
        if not trainer.loggers:
            raise self.misconfiguration(
                "Cannot use `PRISMMonitor` callback with `Trainer(logger=False)`: it logs images to the loggers."
            )
        self._target(pl_module)
        prefix = "" if self.module is None else self.module + "."
        names = [
            (self.final_layer, False),
            (self.grad_cam_layer, True),
            *((s, True) for s in self.stage_layers or []),
        ]
        for name, allow_input in names:
            if name is None:
                continue
            resolve_module(pl_module, name, allow_input=allow_input)
            if not name.startswith(prefix):
                raise ValueError(
                    f"layer {name!r} is not inside module={self.module!r}; layer names are relative to the "
                    f"LightningModule and must start with {prefix!r}"
                )
        if stage == "fit":
            self._new_run()  # restoring a checkpoint (after setup) brings the saved state back
        else:
            self._probe = None  # the probe of this run's validation dataloader
            self._probe_indices = self.indices
            self._probe_views.reset()  # perhaps another model

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The "before" row: every view of the model as loaded and its validation-set metrics, before the
        first optimiser step, at step 0 (not when resuming a run that has it, or one that has trained)."""
        if not self.baseline or self._baseline_logged or trainer.global_step > 0:
            return
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        if val_loop._combined_loader is None:  # no sanity check: Lightning sets it up at the first validation
            val_loop.setup_data()
        if val_loop._combined_loader is None or not sum(trainer.num_val_batches):
            return  # no validation: no probe (on_fit_end says so)
        self._baseline_logged = True
        scalars: dict[str, float] = {}
        try:
            probe = self._get_probe(trainer, pl_module)
            with eager(), torch.no_grad():
                scalars = self._run(trainer, pl_module, probe, row="before")
        except Exception as error:
            self._fail("the row of the model before training", error)
        if self.val_samples:  # every rank takes part in the gather, whatever happened above
            features = self._baseline_pass(trainer, pl_module)
            scalars.update(self._validation_metrics(trainer, pl_module, features, row="before"))
        if trainer.is_global_zero and scalars:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=_logging_step(trainer))

    def _runs_now(self, trainer: pl.Trainer) -> bool:
        """Whether this validation epoch is one the monitor works in."""
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != "fit" or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the validation capture on PRISM's final layer (taken off at the epoch's end, and on an
        exception), if this epoch is one the monitor works in."""
        self._validation.remove()
        if not (self.val_samples and self._runs_now(trainer)):
            return
        try:
            target = self._target(pl_module)
            layer, layout = self._final_map_of(trainer, pl_module)
            loader, self._validation_index = self._dataloader(trainer)
            self._validation.start(
                target,
                layer,
                layout,
                world_size=trainer.world_size,
                expected=_expected_samples(loader, trainer.num_val_batches[self._validation_index]),
                predictions=self.embedding_samples > 0,
            )
        except Exception as error:
            self._validation.remove()
            self._fail("the validation set's features", error)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._validation.active or dataloader_idx != self._validation_index:
            return
        try:
            self._validation.take(batch)
        except Exception as error:
            self._validation.remove()
            self._fail("the validation set's features", error)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._runs_now(trainer):
            return
        self._ran = True
        features = None
        if self.val_samples:  # hooks off before the probe's forward; every rank takes part in the gather
            features = self._finish_validation(trainer, pl_module)
        scalars: dict[str, float] | None = None
        try:
            # Under DDP the probe is built once and broadcast from rank zero: every rank gets here.
            probe = self._get_probe(trainer, pl_module)
            with eager():
                scalars = self._run(trainer, pl_module, probe)
        except Exception as error:
            self._fail(f"epoch {trainer.current_epoch}", error)
        if self.val_samples:
            scalars = {**(scalars or {}), **self._validation_metrics(trainer, pl_module, features)}
        self._log_scalars(trainer, pl_module, scalars)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._validation.remove()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._validation.remove()

    def _fail(self, what: str, error: Exception) -> None:
        """A failure at run time: raised with ``strict``, else one warning per cause."""
        if self.strict:
            raise error
        self._warn_once(
            type(error).__name__ + str(error).split("\n", 1)[0],
            f"PRISMMonitor skipped {what}: {type(error).__name__}: {error}. Training goes on; pass strict=True "
            "to raise instead.",
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._ran and not trainer.interrupted:
            self._warn_once(
                "never-ran",
                "PRISMMonitor logged no maps of a training epoch in this fit"
                + (" (only those of the model before training)" if self._baseline_logged else "")
                + ": no validation epoch ended where it runs (is there a val_dataloader, limit_val_batches > 0, "
                f"and every_n_epochs={self.every_n_epochs} <= the number of validation epochs?).",
            )
        if not (self.evolution_strip and trainer.is_global_zero) or trainer.fast_dev_run:
            return  # fast_dev_run switches logging off on purpose: no file, no warning about it
        strip = self._evolution.render(self.font)
        if strip is None:
            return
        buffer = io.BytesIO()
        strip.save(buffer, format="PNG")
        name = f"{self.prefix.replace('/', '_')}_evolution.png"
        paths: list[str] = []
        for logger in trainer.loggers:
            path = save_file(logger, name, buffer.getvalue())
            if path is not None and path not in paths:
                paths.append(path)
        self.evolution_paths = paths
        if not paths:
            names = ", ".join(type(logger).__name__ for logger in trainer.loggers)
            self._warn_once(
                "evolution:nowhere",
                f"PRISMMonitor did not save {name}: none of the loggers ({names}) stores files. "
                "TensorBoardLogger, CSVLogger, WandbLogger and MLFlowLogger do.",
            )

    # ------------------------------------------------------------------ the probe
    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module whose ``forward`` takes the images (raises for an unknown ``module`` name)."""
        return pl_module if self.module is None else resolve_module(pl_module, self.module)[0]

    def _dataloader(self, trainer: pl.Trainer) -> tuple[Any, int]:
        """The validation dataloader that supplies the probe, and its ``dataloader_idx``."""
        loop = (
            trainer.validate_loop if trainer.state.fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
        )
        combined = loop._combined_loader
        if combined is None:
            raise RuntimeError("no validation dataloader to take the probe from")
        loaders = combined.flattened
        iterables = combined.iterables
        if isinstance(self.dataloader_idx, str):
            keys = list(iterables) if isinstance(iterables, Mapping) else []
            if self.dataloader_idx not in keys:
                raise ValueError(
                    f"dataloader_idx={self.dataloader_idx!r} names no validation dataloader; "
                    + (f"the keys are {keys}" if keys else "the validation dataloaders are not a dict")
                )
            index = keys.index(self.dataloader_idx)
        else:
            index = self.dataloader_idx
        if index >= len(loaders):
            raise ValueError(
                f"dataloader_idx={self.dataloader_idx} but there are {len(loaders)} validation dataloaders"
            )
        return loaders[index], index

    def _get_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Probe:
        if self._probe is not None:
            return self._probe
        loader, index = self._dataloader(trainer)

        def as_validation_batch(batch: Any) -> Any:
            # What the evaluation loop does to every batch before `validation_step`.
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=index)
            return trainer.strategy.batch_to_device(batch, dataloader_idx=index)

        limit = trainer.num_val_batches[index] if index < len(trainer.num_val_batches) else None

        def build() -> Probe:
            def from_indices(indices: list[int] | None) -> Probe:
                return build_probe(
                    loader,
                    self.num_images,
                    indices,
                    self.image_key,
                    self.label_key,
                    process=as_validation_batch,
                    max_batches=limit,
                )

            try:
                return from_indices(self._probe_indices)
            except IndexError:
                if self._probe_indices is None or self.indices is not None:
                    raise
                # Indices restored from a checkpoint that this validation data does not yield.
                self._warn_once(
                    "restored-indices",
                    f"PRISMMonitor: the checkpoint's probe indices {self._probe_indices} are not samples of this "
                    "run's validation dataloader; a new probe is chosen from it.",
                )
                return from_indices(None)

        if trainer.world_size > 1:
            # One probe for every rank: rank zero builds it (a transform with randomness, or a
            # dataset that streams different samples to each rank, would otherwise differ) and
            # broadcasts it, together with its error if it failed, so that no rank waits forever.
            payload: tuple[Probe | None, str | None] = (None, None)
            if trainer.is_global_zero:
                try:
                    probe = build()
                    payload = (
                        dataclasses.replace(probe, images=probe.images.cpu(), labels=_cpu(probe.labels)),
                        None,
                    )
                except Exception as error:
                    payload = (None, f"{type(error).__name__}: {error}")
            shared, failure = trainer.strategy.broadcast(payload, src=0)
            if shared is None:
                raise RuntimeError(f"building the probe failed on rank zero: {failure}")
            device = pl_module.device
            probe = dataclasses.replace(
                shared,
                images=shared.images.to(device),
                labels=None if shared.labels is None else shared.labels.to(device),
            )
        else:
            probe = build()
        bad = (~probe.finite).nonzero().flatten().tolist()
        if len(bad) == len(probe.finite):
            raise ValueError("every probe image contains NaN or infinite values")
        if bad:
            where = "" if probe.indices is None else f" (dataset indices {[probe.indices[i] for i in bad]})"
            self._warn_once(
                "non-finite-probe",
                f"PRISMMonitor: probe image(s) {bad}{where} contain NaN or infinite values; they are shown as "
                "invalid tiles and left out of the PCA, the other images get their maps.",
            )
        self._probe = probe
        self._probe_indices = probe.indices
        return probe

    # ------------------------------------------------------------------ the validation set
    def _final_map_of(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[str, FeatureLayout]:
        """PRISM's final layer (relative to the forward's module) and its layout: from the last views'
        pass on this module, else found by recording one forward of the probe."""
        target = self._target(pl_module)
        if self._final_map is None or self._final_map[0] != id(target):
            probe = self._get_probe(trainer, pl_module)
            images = probe.images[probe.finite]
            try:
                with eager(), trainer.precision_plugin.forward_context():
                    recording = record(
                        target,
                        images,
                        final_layer=self._relative(self.final_layer),
                        stage_layers=[],
                        inference_mode=torch.is_inference_mode_enabled(),
                    )
            except Exception as error:
                wrapped = _forward_error(error, target, images)
                if wrapped is error:
                    raise
                raise wrapped from error
            self._final_map = (id(target), recording.final_layer, recording.final_layout)
        return self._final_map[1:]

    def _baseline_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EpochFeatures | None:
        """The validation pass of the model as loaded (outside the validation loop, before training):
        every validation batch as ``validation_step`` would receive it, the forward in eval mode without
        gradients under the trainer's precision, the capture on; then the samples of every rank."""
        try:
            target = self._target(pl_module)
            layer, layout = self._final_map_of(trainer, pl_module)
            loader, index = self._dataloader(trainer)
            limit = trainer.num_val_batches[index]

            def batches() -> Any:
                # A random sampler draws from the global random state: the pass must leave it (and
                # the sampler's own generator) as found, so that training goes on exactly as without it.
                with isolated_random_state(*loader_samplers(loader)):
                    for i, batch in enumerate(loader):
                        if i >= limit:
                            return
                        batch = trainer.precision_plugin.convert_input(batch)
                        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=index)
                        yield trainer.strategy.batch_to_device(batch, dataloader_idx=index)

            modules = list(target.modules())
            training = [m.training for m in modules]
            try:
                target.eval()
                with (
                    eager(),
                    torch.no_grad(),
                    trainer.precision_plugin.forward_context(),
                    closing(batches()) as stream,
                ):
                    self._validation.run(
                        target,
                        layer,
                        layout,
                        stream,
                        target,
                        world_size=trainer.world_size,
                        expected=_expected_samples(loader, limit),
                        predictions=self.embedding_samples > 0,
                    )
            finally:
                for module, flag in zip(modules, training, strict=True):
                    module.training = flag
        except Exception as error:
            self._validation.remove()
            self._fail("the validation set's features before training", error)
        return self._finish_validation(trainer, pl_module)

    def _finish_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EpochFeatures | None:
        """The pass's samples of every rank and their metrics (a collective: every rank calls this)."""
        try:
            return self._validation.finish(pl_module.all_gather, pl_module.device)
        except Exception as error:
            self._fail("the validation set's metrics", error)
            return None

    def _validation_metrics(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        features: EpochFeatures | None,
        row: str | None = None,
    ) -> dict[str, float]:
        """The validation set's metrics as scalars (the same on every rank), one warning for what is
        absent and why, and from rank zero the embedding's picture and projectors."""
        if features is None:
            if self._validation.seen:
                self._warn_once(
                    "validation-nothing",
                    f"PRISMMonitor's validation-set metrics: the validation batches ({self._validation.seen} samples on "
                    "this rank) went by without a feature map of PRISM's final layer, so there are none this time "
                    "(does validation_step run the model's forward on the images?).",
                )
            return {}
        note = features.result.note
        if note is not None:
            reasons = ";".join(sorted(set(features.result.absent.values())))
            self._warn_once(
                f"validation-note:{reasons}:{bool(features.result.left_out)}",
                f"PRISMMonitor's validation-set metrics ({features.result.num_samples} samples): {note}.",
            )
        scalars = {
            f"{self.prefix}/val/{name}": float(value) for name, value in features.result.metrics.items()
        }
        if trainer.is_global_zero:
            try:
                self._log_embedding(trainer, features, scalars, row)
            except Exception as error:
                self._fail("the embedding picture", error)
        return scalars

    def _log_embedding(
        self, trainer: pl.Trainer, features: EpochFeatures, scalars: dict[str, float], row: str | None
    ) -> None:
        """``<prefix>/embedding``: the samples on two principal axes aligned with the previous pass's,
        the probe marked; and the features for each tracker's projector (global rank zero's samples)."""
        kept = features.result.kept
        labels = None if features.labels is None else features.labels[kept.to(features.labels.device)]
        measured = [
            f"{label} {scalars[f'{self.prefix}/val/{name}']:{fmt}}"
            for name, label, fmt in (
                ("knn_accuracy", f"{self.knn_k}-NN", ".3f"),
                ("class_separation", "η²", ".2f"),
                ("effective_rank", "RankMe", ".0f"),
            )
            if f"{self.prefix}/val/{name}" in scalars
        ]
        names = self.class_names if self.class_names is not None else self._class_names()
        title = " · ".join([row or f"epoch {trainer.current_epoch}", *measured])
        image = self._embedding.picture(
            features.features[kept], labels, self._probe_pooled, title, names, font=self.font
        )
        step = _logging_step(trainer)
        for logger in trainer.loggers:
            if image is not None:
                log_pictures(logger, {f"{self.prefix}/embedding": Picture(image)}, step)
            if self.embedding_samples:
                own_labels = features.own_labels
                log_embedding(
                    logger,
                    f"{self.prefix}/embedding",
                    features.own_features,
                    step,
                    labels=own_labels if own_labels is not None and own_labels.ndim == 1 else None,
                    predictions=features.own_predictions,
                    class_names=names,
                    thumbnails=features.thumbnails,
                    max_points=self.embedding_samples,
                )

    def _log_prototypes(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        probe: Probe,
        out: ViewsOutput,
        row: str | None,
    ) -> None:
        """``<prefix>/prototypes``: the class prototype of every class of the probe (at most 16), every
        ``prototype_every_n_epochs`` epochs and before training; also the strip's row when it shows them."""
        if (
            row is None
            and trainer.state.fn == "fit"
            and (trainer.current_epoch + 1) % self.prototype_every_n_epochs
        ):
            return
        finite = probe.finite
        with eager(), trainer.precision_plugin.forward_context():
            found = probe_prototypes(
                self._target(pl_module),
                probe.images,
                probe.labels,
                class_scores(out.output, int(finite.sum())),
                finite,
                mean=self.mean,
                std=self.std,
                steps=self.prototype_steps,
            )
        if found is None:
            return
        names = self.class_names if self.class_names is not None else probe.class_names
        probabilities = found.result.probabilities.tolist()
        texts = [f"{label_text(c, names)} {p:.2f}" for c, p in zip(found.classes, probabilities, strict=True)]
        separate = any(backend(logger) == "wandb" for logger in trainer.loggers)
        grid = caption_grid(found.tiles, texts, font=self.font)
        picture = Picture(grid, to_uint8(display_tiles(found.tiles)), texts) if separate else Picture(grid)
        step = _logging_step(trainer)
        for logger in trainer.loggers:
            log_pictures(logger, {f"{self.prefix}/prototypes": picture}, step)
        if self.evolution_strip and trainer.state.fn == "fit" and self.evolution_view == "prototypes":
            inputs = None
            if not self._evolution.has_inputs and found.examples:  # one probe image of each class above
                inputs = to_uint8(denormalize(probe.images[found.examples], self.mean, self.std))
            self._evolution.add(row or f"epoch {trainer.current_epoch}", to_uint8(found.tiles), inputs)

    def _class_names(self) -> list[str] | None:
        return None if self._probe is None else self._probe.class_names

    # ------------------------------------------------------------------ work
    def _relative(self, name: str | None) -> str | None:
        """A layer name relative to the LightningModule, made relative to the forward's module."""
        return name if name is None or self.module is None else name[len(self.module) + 1 :]

    def _targets(self, probe: Probe, finite: Tensor) -> Tensor | None:
        """What the gradient views explain: ``None`` for the model's predictions; the labels, or for
        multi-hot labels a mask of them (each image's highest-scoring true label)."""
        if self.target == "prediction":
            return None
        if probe.labels is None:
            self._warn_once(
                "target-label",
                "PRISMMonitor(target='label'): the probe has no labels, so the gradient views explain the "
                "model's predictions. Pass label_key= to name the labels in the batch.",
            )
            return None
        labels = probe.labels[finite.cpu()].to(probe.images.device)
        return labels.bool() if probe.multi_hot else labels

    def _views(self, target: nn.Module, images: Tensor, reference: Tensor | None, classes: Tensor | None):
        """Every view of the probe (:class:`~lightning_prism.views.ProbeViews`), its warnings once per fit."""
        out = self._probe_views(target, images, reference, classes)
        for key, message in out.warnings:
            self._warn_once(key, message)
        return out

    def _run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe, row: str | None = None
    ) -> dict[str, float]:
        """One pass of every view on the probe; pictures logged from rank zero (the evolution strip's row
        labelled ``row``, by default the epoch); the scalars returned."""
        target = self._target(pl_module)
        finite = probe.finite
        images = probe.images if bool(finite.all()) else probe.images[finite]
        reference = self._first if self.basis == "fixed" else self._reference
        classes = self._targets(probe, finite) if self._probe_views.gradient_views else None
        try:
            with trainer.precision_plugin.forward_context():
                try:
                    out = self._views(target, images, reference, classes)
                except BasisMismatchError as error:
                    self._warn_once(
                        "basis-mismatch",
                        f"PRISMMonitor: the saved colour basis does not fit this model ({error}); a fresh basis "
                        "starts now, so colours and similarities are not comparable with earlier epochs.",
                    )
                    self._reference = self._first = None
                    out = self._views(target, images, None, classes)
        except Exception as error:
            wrapped = _forward_error(error, target, images)
            if wrapped is error:
                raise
            raise wrapped from error
        if "prototypes" in self.views and trainer.is_global_zero:  # rank zero alone: no collective
            try:
                self._log_prototypes(trainer, pl_module, probe, out, row)
            except Exception as error:
                self._fail("the prototypes view", error)
        result = out.result
        if result is None:
            if trainer.is_global_zero:
                self._log(trainer, probe, out, row)
            return {}
        self._final_map = (id(target), result.final_layer, result.final_layout)
        labels = None if probe.labels is None else probe.labels[finite.to(probe.labels.device)]
        self._probe_pooled = (result.final.float().mean(dim=(2, 3)), labels)
        components = result.components.detach()
        scalars = {
            f"{self.prefix}/explained_variance/pc{i + 1}": float(v)
            for i, v in enumerate(result.colour_variance.tolist())
        }
        if self._reference is not None and self._reference.shape == components.shape:
            scalars[f"{self.prefix}/similarity/previous"] = float(
                subspace_similarity(components, self._reference)
            )
        if self._first is not None and self._first.shape == components.shape:
            scalars[f"{self.prefix}/similarity/first"] = float(subspace_similarity(components, self._first))
        if probe.labels is not None and not probe.multi_hot:
            separation = class_separation(result.features, probe.labels[finite])
            if separation is not None:
                scalars[f"{self.prefix}/class_separation"] = float(separation)
        if self._first is None:
            self._first = components.float().cpu()
        self._reference = components.float().cpu()
        if trainer.is_global_zero:
            self._log(trainer, probe, out, row)
        return scalars

    def _task(self, scores: Tensor, probe: Probe) -> str:
        """The kind of classifier: ``task`` if it fits the scores, else what the scores and labels say."""
        try:
            return infer_task(scores, probe.labels, self.task)
        except ValueError as error:
            self._warn_once(
                "task",
                f"PRISMMonitor(task={self.task!r}) does not fit this model: {error}. The captions read its "
                "scores as the scores and labels show them.",
            )
            return infer_task(scores, probe.labels)

    def _captions(self, probe: Probe, output: Any) -> tuple[list[str] | None, list[bool] | None]:
        """One caption per probe image (``true → predicted``) and whether to mark it (wrong, or an
        invalid input left out of the PCA)."""
        finite = probe.finite.tolist()
        scores = class_scores(output, sum(finite))
        task = None if scores is None else self._task(scores, probe)
        names = self.class_names if self.class_names is not None else probe.class_names
        return captions(probe.labels, scores, task, names, finite)

    def _log_scalars(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scalars: dict[str, float] | None
    ) -> None:
        """Log the scalars through Lightning, on every rank (so callbacks can monitor them on every rank).

        The values are the same on every rank. They are still reduced across ranks (``sync_dist``),
        as Lightning expects of epoch-level metrics, and a reduction needs every rank to take part:
        so only the names that every rank has are logged (after a PRISM pass failed on some rank, or
        left it with another history, the others log less rather than wait for it forever).
        """
        names = [f"{self.prefix}/{name}" for name in SCALARS]
        present = torch.tensor(
            [float(scalars is not None and n in scalars) for n in names], device=pl_module.device
        )
        everywhere = trainer.strategy.reduce(present, reduce_op="sum").tolist()
        for name, count in zip(names, everywhere, strict=True):
            if scalars is not None and count == trainer.world_size:
                pl_module.log(
                    name, scalars[name], on_step=False, on_epoch=True, prog_bar=False, logger=True,
                    add_dataloader_idx=False, batch_size=1, sync_dist=True,
                )  # fmt: skip

    def _log(self, trainer: pl.Trainer, probe: Probe, out: ViewsOutput, row: str | None = None) -> None:
        """Pictures to every logger, and the strip's row (global rank zero only)."""
        inputs = denormalize(probe.images, self.mean, self.std)
        texts, marked = self._captions(probe, out.output)
        truths = self._label_captions(probe)
        self._check_glyphs([*(texts or []), *(truths or [])])
        separate = any(backend(logger) == "wandb" for logger in trainer.loggers)
        pictures, blended, inputs_picture = probe_pictures(
            self.prefix,
            inputs,
            probe.finite,
            out.result,
            out.maps,
            self.views,
            texts,
            marked,
            truths,
            alpha=self.overlay_alpha,
            font=self.font,
            separate=separate,
        )
        if self.evolution_strip and trainer.state.fn == "fit" and self.evolution_view in blended:
            probe_row = None if self._evolution.has_inputs else to_uint8(inputs)
            self._evolution.add(
                row or f"epoch {trainer.current_epoch}", to_uint8(blended[self.evolution_view]), probe_row
            )
        step = _logging_step(trainer)
        first_time = [logger for logger in trainer.loggers if logger not in self._inputs_logged_to]
        with_inputs = {**pictures, f"{self.prefix}/inputs": inputs_picture} if first_time else pictures
        for logger in trainer.loggers:
            if log_pictures(logger, with_inputs if logger in first_time else pictures, step):
                self._inputs_logged_to.add(logger)
            else:
                self._warn_once(
                    f"logger:{type(logger).__name__}",
                    f"PRISMMonitor cannot log images to {type(logger).__name__}; its scalars are logged there. "
                    f"Pictures go to {TAKES_PICTURES}.",
                )

    def _label_captions(self, probe: Probe) -> list[str] | None:
        """The true class name(s) of each probe image (captions of the inputs), or ``None`` without labels."""
        if probe.labels is None:
            return None
        names = self.class_names if self.class_names is not None else probe.class_names
        return [label_text(label, names) for label in probe.labels]

    def _check_glyphs(self, texts: list[str]) -> None:
        missing = missing_glyphs("".join(texts), load_font(12, self.font))
        if missing:
            self._warn_once(
                "glyphs",
                f"PRISMMonitor's caption font has no glyph for {''.join(missing)!r}; they are drawn as '?'. "
                "Pass font= the path of a font that has them (for example a Noto font).",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            type(self).warn(message)


class PRISMMonitor(PRISMMonitorBase, Callback):
    __doc__ = PRISMMonitorBase.__doc__
