"""``PRISMMonitor``: PRISM maps of a fixed validation probe, logged every epoch. Lightning glue only.

The monitor's behaviour lives in :class:`PRISMMonitorBase`, which does not depend on which Lightning
package runs it; :class:`PRISMMonitor` is the ``pytorch_lightning`` callback and
:class:`lightning_prism.lightning.PRISMMonitor` the same for the ``lightning`` package
(``lightning.pytorch``), whose ``Trainer`` and ``LightningCLI`` check for their own ``Callback``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from .engine import BASES, PRISMResult, prism
from .loggers import TAKES_PICTURES, Picture, backend, log_pictures, save_file
from .pca import subspace_similarity
from .probe import Probe, build_probe
from .recording import resolve_module
from .render import (
    EvolutionHistory,
    caption_grid,
    denormalize,
    display_tiles,
    load_font,
    missing_glyphs,
    overlay,
    to_uint8,
)
from .separation import class_separation

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
)
#: A tag prefix: ``/``-separated words of letters, digits, ``_`` and ``-`` (a valid key everywhere).
PREFIX = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")


def _logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logger connector gives the metrics logged at the end of this epoch."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


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
    the trainer avoids it), and logs:

    * scalars, through ``pl_module.log`` (so they are in ``trainer.callback_metrics``, can be
      monitored by ``ModelCheckpoint`` and ``EarlyStopping``, and every logger records them at the
      step of the epoch's validation metrics): ``<prefix>/explained_variance/pc1``..``pc3`` (the
      share of the probe's variance along the red, green and blue axes,
      :attr:`~lightning_prism.PRISMResult.colour_variance`), ``<prefix>/similarity/previous`` and
      ``<prefix>/similarity/first`` (mean cosine of the principal angles between this epoch's
      top-three subspace and the previous/first logged epoch's) and, with labels,
      ``<prefix>/class_separation``; the values are the same on every rank;
    * pictures, at that same step and under the same tag every epoch (so a slider scrubs through
      the epochs), to every logger that takes them (:mod:`lightning_prism.loggers`: TensorBoard,
      W&B, MLflow): ``<prefix>/maps`` and ``<prefix>/overlay``, grids with each image's true label
      and the model's prediction underneath (a wrong prediction in red), and ``<prefix>/inputs``,
      the de-normalised probe (first logged epoch only). Any other logger gets one warning;
    * at the end of ``fit``, ``<prefix>_evolution.png``, stored with every logger's run that keeps
      files (TensorBoard's and CSV's log directory, W&B run files, MLflow artifacts): the probe,
      then one row of overlays per logged epoch, at most ``evolution_rows`` rows spread evenly
      over the whole run (also across a resume: the rows are saved in checkpoints).

    Outside its own forward pass the model carries no hook of the monitor. A failure at run time
    is one warning per cause and training goes on, unless ``strict=True``.

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
        evolution_strip: store the evolution PNG with the loggers' runs at the end of ``fit``.
        evolution_rows: most epoch rows in the evolution strip (at least 2; the first and last
            logged epochs are always shown).
        font: path of a TrueType/OpenType font for captions and labels, for class names in a
            script the bundled DejaVu Sans Bold lacks (such as Chinese); ``None`` for the bundled font.
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
        evolution_rows: int = 10,
        font: str | None = None,
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
        if not isinstance(prefix, str) or not PREFIX.fullmatch(prefix):
            raise ValueError(
                f"prefix must be a non-empty tag such as 'prism' or 'monitor/prism' (letters, digits, '_' "
                f"and '-', parts separated by '/'), got {prefix!r}"
            )
        if not 0 <= overlay_alpha <= 1:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha}")
        _check_int("evolution_rows", evolution_rows, 2)
        if font is not None:
            try:
                load_font(12, font)
            except OSError as error:
                raise ValueError(
                    f"font must be a TrueType/OpenType font file, got {font!r}: {error}"
                ) from None
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
        self.evolution_rows = evolution_rows
        self.font = font
        self.strict = strict

        self._probe: Probe | None = None
        self._probe_indices: list[int] | None = self.indices
        self._reference: Tensor | None = None  # basis of the previous logged epoch
        self._first: Tensor | None = None  # basis of the first logged epoch
        self._inputs_logged = False
        self._warned: set[str] = set()
        self._evolution = EvolutionHistory(evolution_rows)
        #: Where ``on_fit_end`` stored the evolution strip: local paths, or MLflow artifact URIs.
        self.evolution_paths: list[str] = []

    @property
    def evolution_path(self) -> str | None:
        """The first place the evolution strip was stored at the end of ``fit``, or ``None``."""
        return self.evolution_paths[0] if self.evolution_paths else None

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
            "evolution": self._evolution.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def tensor(value: Any) -> Tensor | None:
            return None if value is None else torch.tensor(value, dtype=torch.float32)

        if self.indices is None:
            self._probe_indices = state_dict.get("probe_indices", self._probe_indices)
        self._reference = tensor(state_dict.get("reference"))
        self._first = tensor(state_dict.get("first"))
        self._probe = None
        self._evolution.load_state_dict(state_dict.get("evolution", {}))

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
        if stage == "fit":  # a new strip for each fit; a resumed fit's checkpoint restores it after setup
            self._evolution.reset()
            self.evolution_paths = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        scalars = None
        try:
            scalars = self._run(trainer, pl_module)
        except Exception as error:
            if self.strict:
                raise
            self._warn_once(
                type(error).__name__ + str(error).split("\n", 1)[0],
                f"PRISMMonitor skipped epoch {trainer.current_epoch}: {type(error).__name__}: {error}. "
                "Training goes on; pass strict=True to raise instead.",
            )
        self._log_scalars(trainer, pl_module, scalars)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.evolution_strip and trainer.is_global_zero):
            return
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

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
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
            self._log(trainer, probe, result)
        return scalars

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

    def _log(self, trainer: pl.Trainer, probe: Probe, result: PRISMResult) -> None:
        """Pictures to every logger, and the strip's row (global rank zero only)."""
        inputs = denormalize(probe.images, self.mean, self.std)
        blended = overlay(inputs, result.maps, self.overlay_alpha)
        if self.evolution_strip and trainer.state.fn == "fit":
            probe_row = None if self._evolution.has_inputs else to_uint8(inputs)
            self._evolution.add(f"epoch {trainer.current_epoch}", to_uint8(blended), probe_row)

        captions, wrong = self._captions(probe, result)
        truths = self._label_captions(probe)
        self._check_glyphs([*(captions or []), *(truths or [])])

        separate = any(backend(logger) == "wandb" for logger in trainer.loggers)

        def picture(tiles: Tensor, texts: list[str] | None, marks: list[bool] | None = None) -> Picture:
            grid = caption_grid(tiles, texts, marks, font=self.font)
            if not separate or texts is None:
                return Picture(grid)
            # W&B shows each image with its caption as text: a wrong prediction is marked there too.
            notes = [f"{t} ✗" if marks and marks[i] else t for i, t in enumerate(texts)]
            return Picture(grid, to_uint8(display_tiles(tiles)), notes)

        pictures = {
            f"{self.prefix}/maps": picture(result.maps, captions, wrong),
            f"{self.prefix}/overlay": picture(blended, captions, wrong),
        }
        if not self._inputs_logged:
            pictures[f"{self.prefix}/inputs"] = picture(inputs, truths)
            self._inputs_logged = True

        step = _logging_step(trainer)
        for logger in trainer.loggers:
            if not log_pictures(logger, pictures, step):
                self._warn_once(
                    f"logger:{type(logger).__name__}",
                    f"PRISMMonitor cannot log images to {type(logger).__name__}; its scalars are logged there. "
                    f"Pictures go to {TAKES_PICTURES}.",
                )

    def _label_captions(self, probe: Probe) -> list[str] | None:
        """The true class name of each probe image (captions of the inputs), or ``None`` without labels."""
        if probe.labels is None:
            return None
        names = self.class_names if self.class_names is not None else probe.class_names
        return [
            names[y] if names is not None and 0 <= y < len(names) else str(y) for y in probe.labels.tolist()
        ]

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
