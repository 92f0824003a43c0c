"""``PRISMMonitor``: PRISM maps of a fixed validation probe, logged every epoch. Lightning glue only.

The monitor's behaviour lives in :class:`PRISMMonitorBase`, which does not depend on which Lightning
package runs it; :class:`PRISMMonitor` is the ``pytorch_lightning`` callback and
:class:`lightning_prism.lightning.PRISMMonitor` the same for the ``lightning`` package
(``lightning.pytorch``), whose ``Trainer`` and ``LightningCLI`` check for their own ``Callback``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from .engine import BASES, PRISMResult, prism
from .pca import subspace_similarity
from .probe import Probe, build_probe
from .recording import resolve_module
from .render import caption_grid, denormalize, overlay, to_uint8
from .render import evolution_strip as render_evolution_strip
from .separation import class_separation

__all__ = ["PRISMMonitor", "PRISMMonitorBase"]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_key(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise ValueError(f"{name} must be None (find it), an int position or a str key, got {value!r}")


class PRISMMonitorBase:
    r"""Log PRISM maps of a fixed probe batch of validation images at the end of validation.

    The probe is chosen once, deterministically, from the validation dataset (spread over as many
    classes as the labels show), kept on the training device and identical on every rank and epoch;
    its dataset indices and the colour basis are saved in checkpoints. At the end of every
    ``every_n_epochs``-th validation epoch (never during the sanity check, and also in
    ``trainer.validate()``) the monitor runs :func:`~lightning_prism.prism` on the probe with the
    LightningModule itself, in eval mode under the trainer's precision and the grad mode Lightning
    chose for the loop (``torch.no_grad()`` during ``fit``, inference mode in ``validate()`` unless
    the trainer avoids it), and logs to every logger:

    * ``<prefix>/maps`` and ``<prefix>/overlay``: grids with each image's true label and the
      model's prediction underneath (a wrong prediction in red);
    * ``<prefix>/inputs``: the de-normalised probe (first logged epoch only);
    * scalars ``<prefix>/explained_variance/pc1``..``pc3`` (the share of the probe's variance
      along the red, green and blue axes, :attr:`~lightning_prism.PRISMResult.colour_variance`),
      ``<prefix>/similarity/previous`` and
      ``<prefix>/similarity/first`` (mean cosine of the principal angles between this epoch's
      top-three subspace and the previous/first logged epoch's) and, with labels,
      ``<prefix>/class_separation``;
    * at the end of ``fit``, ``<prefix>_evolution.png`` in the logger's directory: one row of
      maps per logged epoch.

    Images go to TensorBoard's ``add_image`` (step = ``trainer.global_step``, same tag every epoch
    so the slider scrubs through epochs) or to a logger's ``log_image``. Outside its own forward
    pass the model carries no hook of the monitor. A failure at run time is one warning per cause
    and training goes on, unless ``strict=True``.

    Args:
        num_images: probe size (ignored when ``indices`` is given).
        indices: explicit dataset indices of the probe images.
        every_n_epochs: run every this many epochs during ``fit``.
        dataloader_idx: which validation dataloader supplies the probe.
        image_key: position (tuple/list batch) or key (dict batch) of the images; ``None`` finds them.
        label_key: position or key of the labels; ``None`` finds them if there are any.
        extrapolate: gradual extrapolation to the input resolution (``False``: final-map resolution).
        final_layer: module name (relative to the LightningModule, e.g. ``"model.layer4"``) of the
            final feature map; discovered if ``None``.
        stage_layers: module names of the stages; discovered if ``None``.
        mean: per-channel mean of the input normalisation, to undo it for display.
        std: per-channel std of the input normalisation.
        prefix: tag prefix.
        basis: ``"aligned"`` keeps a feature's colour across epochs by matching each epoch's axes
            to the previous logged epoch's; ``"refit"`` is the raw per-epoch PCA; ``"fixed"``
            projects every epoch onto the first logged epoch's axes.
        class_names: names for the label indices in captions; by default the validation
            dataset's ``classes`` (torchvision datasets such as ``ImageFolder``), else the indices.
        overlay_alpha: weight of the map in the overlay, in ``[0, 1]``.
        evolution_strip: write the evolution PNG at the end of ``fit``.
        strict: raise instead of warning when PRISM fails at run time.

    Raises:
        ValueError: for an invalid argument (the message names the valid choices).
        MisconfigurationException: at ``setup`` with ``Trainer(logger=False)``.

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
        dataloader_idx: int = 0,
        image_key: int | str | None = None,
        label_key: int | str | None = None,
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
        strict: bool = False,
    ) -> None:
        _check_int("num_images", num_images, 1)
        _check_int("every_n_epochs", every_n_epochs, 1)
        _check_int("dataloader_idx", dataloader_idx, 0)
        if indices is not None:
            if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
                raise ValueError(f"indices must be a non-empty list of dataset indices, got {indices!r}")
            for i in indices:
                _check_int("every entry of indices", i, 0)
            if len(set(indices)) != len(indices):
                raise ValueError(f"indices must be distinct, got {list(indices)}")
        _check_key("image_key", image_key)
        _check_key("label_key", label_key)
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
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty tag such as 'prism', got {prefix!r}")
        if not 0 <= overlay_alpha <= 1:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha}")
        if isinstance(stage_layers, str):
            raise ValueError(f"stage_layers must be a list of module names, got the string {stage_layers!r}")
        self.num_images = len(indices) if indices is not None else num_images
        self.indices = None if indices is None else [int(i) for i in indices]
        self.every_n_epochs = every_n_epochs
        self.dataloader_idx = dataloader_idx
        self.image_key = image_key
        self.label_key = label_key
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
        self.strict = strict

        self._probe: Probe | None = None
        self._probe_indices: list[int] | None = self.indices
        self._reference: Tensor | None = None  # basis of the previous logged epoch
        self._first: Tensor | None = None  # basis of the first logged epoch
        self._inputs_logged = False
        self._warned: set[str] = set()
        self._strip_rows: list[np.ndarray] = []
        self._strip_labels: list[str] = []
        self._strip_inputs: np.ndarray | None = None
        self.evolution_path: str | None = None  # where on_fit_end wrote the evolution strip

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(  # type: ignore[attr-defined] - from the Callback base
            prefix=self.prefix, final_layer=self.final_layer, stage_layers=self.stage_layers
        )

    def state_dict(self) -> dict[str, Any]:
        def plain(t: Tensor | None) -> list[list[float]] | None:
            return None if t is None else t.detach().cpu().double().tolist()

        return {
            "probe_indices": self._probe_indices,
            "reference": plain(self._reference),
            "first": plain(self._first),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def tensor(value: Any) -> Tensor | None:
            return None if value is None else torch.tensor(value, dtype=torch.float32)

        if self.indices is None:
            self._probe_indices = state_dict.get("probe_indices", self._probe_indices)
        self._reference = tensor(state_dict.get("reference"))
        self._first = tensor(state_dict.get("first"))
        self._probe = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.loggers:
            raise self.misconfiguration(
                "Cannot use `PRISMMonitor` callback with `Trainer(logger=False)`: it logs images to the loggers."
            )
        if self.final_layer is not None:
            resolve_module(pl_module, self.final_layer)
        for name in self.stage_layers or []:
            resolve_module(pl_module, name, allow_input=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        try:
            self._run(trainer, pl_module)
        except Exception as error:
            if self.strict:
                raise
            self._warn_once(
                type(error).__name__ + str(error).split("\n", 1)[0],
                f"PRISMMonitor skipped epoch {trainer.current_epoch}: {type(error).__name__}: {error}. "
                "Training goes on; pass strict=True to raise instead.",
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.evolution_strip and trainer.is_global_zero and self._strip_rows):
            return
        assert self._strip_inputs is not None
        directory = next(
            (logger.log_dir for logger in trainer.loggers if getattr(logger, "log_dir", None)),
            trainer.default_root_dir,
        )
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{self.prefix.replace('/', '_')}_evolution.png")
        render_evolution_strip(self._strip_inputs, self._strip_rows, self._strip_labels).save(path)
        self.evolution_path = path

    # ------------------------------------------------------------------ work
    def _get_probe(self, trainer: pl.Trainer, device: torch.device) -> Probe:
        if self._probe is None:
            loaders = trainer.val_dataloaders
            if loaders is None:
                raise RuntimeError("no validation dataloader to take the probe from")
            loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
            if self.dataloader_idx >= len(loaders):
                raise ValueError(
                    f"dataloader_idx={self.dataloader_idx} but there are {len(loaders)} validation dataloaders"
                )
            self._probe = build_probe(
                loaders[self.dataloader_idx],
                self.num_images,
                self._probe_indices,
                self.image_key,
                self.label_key,
                device,
            )
            self._probe_indices = self._probe.indices
        return self._probe

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = self._get_probe(trainer, pl_module.device)
        reference = self._first if self.basis == "fixed" else self._reference
        with trainer.precision_plugin.forward_context():
            result = prism(
                pl_module,
                probe.images,
                extrapolate=self.extrapolate,
                final_layer=self.final_layer,
                stage_layers=self.stage_layers,
                basis=self.basis,  # type: ignore[arg-type]
                reference=reference,
                # Lightning's choice for this loop: never during fit (inference tensors could reach
                # training), nor with Trainer(inference_mode=False), FSDP, XLA or gloo.
                inference_mode=torch.is_inference_mode_enabled(),
            )
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
        if probe.labels is not None:
            separation = class_separation(result.features, probe.labels)
            if separation is not None:
                scalars[f"{self.prefix}/class_separation"] = float(separation)
        if self._first is None:
            self._first = components.float().cpu()
        self._reference = components.float().cpu()
        if trainer.is_global_zero:
            self._log(trainer, probe, result, scalars)

    def _captions(self, probe: Probe, result: PRISMResult) -> tuple[list[str] | None, list[bool] | None]:
        predictions = None
        output = result.output
        if isinstance(output, Tensor) and output.ndim == 2 and output.shape[0] == probe.images.shape[0]:
            predictions = output.argmax(dim=1).tolist()
        if probe.labels is None and predictions is None:
            return None, None

        names = self.class_names if self.class_names is not None else probe.class_names

        def name(index: int) -> str:
            return names[index] if names is not None and 0 <= index < len(names) else str(index)

        labels = probe.labels.tolist() if probe.labels is not None else None
        captions, wrong = [], []
        for i in range(probe.images.shape[0]):
            true = name(labels[i]) if labels is not None else "?"
            if predictions is None:
                captions.append(true)
                wrong.append(False)
            else:
                captions.append(f"{true} → {name(predictions[i])}")
                wrong.append(labels is not None and labels[i] != predictions[i])
        return captions, wrong

    def _log(self, trainer: pl.Trainer, probe: Probe, result: PRISMResult, scalars: dict[str, float]) -> None:
        step = trainer.global_step
        inputs = denormalize(probe.images, self.mean, self.std)
        blended = overlay(inputs, result.maps, self.overlay_alpha)
        captions, wrong = self._captions(probe, result)
        images = {
            f"{self.prefix}/maps": caption_grid(result.maps, captions, wrong),
            f"{self.prefix}/overlay": caption_grid(blended, captions, wrong),
        }
        if not self._inputs_logged:
            images[f"{self.prefix}/inputs"] = caption_grid(inputs)
            self._inputs_logged = True
        if self._strip_inputs is None:
            self._strip_inputs = to_uint8(inputs)
        self._strip_rows.append(to_uint8(blended))
        self._strip_labels.append(f"epoch {trainer.current_epoch}")

        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                for tag, image in images.items():
                    experiment.add_image(tag, image, global_step=step, dataformats="HWC")
            elif hasattr(logger, "log_image"):
                for tag, image in images.items():
                    logger.log_image(key=tag, images=[image], step=step)
            else:
                self._warn_once(
                    f"logger:{type(logger).__name__}",
                    f"PRISMMonitor cannot log images to {type(logger).__name__} (no `add_image` or `log_image`);"
                    " only the scalars are logged there. Use TensorBoardLogger to see the maps.",
                )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            type(self).warn(message)


class PRISMMonitor(PRISMMonitorBase, Callback):
    __doc__ = PRISMMonitorBase.__doc__
