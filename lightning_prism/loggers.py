"""How PRISMMonitor's pictures and files reach each Lightning logger.

* TensorBoard (``TensorBoardLogger``, or another logger without ``log_image`` whose ``experiment``
  has ``add_image``): ``SummaryWriter.add_image`` of the captioned grid.
* Weights & Biases (``WandbLogger``): ``log_image`` with one image per probe image and its caption
  as text (W&B shows them as a gallery with the captions underneath).
* MLflow (``MLFlowLogger``): ``MlflowClient.log_image(run_id, image, key=..., step=...)``, which the
  MLflow UI shows with a step slider; files become run artifacts.
* Any other logger with a ``log_image(key=..., images=[...], step=...)`` method (the signature of
  ``WandbLogger``'s): the captioned grid.
* Every other logger takes no pictures (:func:`log_pictures` returns ``False``).

Files (the evolution strip) go to the MLflow run's artifacts, the W&B run's files, or the
directory of a logger that has a ``log_dir`` (``TensorBoardLogger``, ``CSVLogger``).

Loggers are recognised by class name, so the loggers of ``pytorch_lightning`` and of
``lightning.pytorch`` (and subclasses of either) are handled alike without importing a tracker.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TAKES_PICTURES", "Picture", "backend", "log_pictures", "save_file"]

#: The loggers that receive pictures, as a message names them.
TAKES_PICTURES = "TensorBoardLogger, WandbLogger, MLFlowLogger and loggers with a WandbLogger-style log_image"


@dataclass(frozen=True)
class Picture:
    """One picture for the loggers.

    Attributes:
        grid: ``(H, W, 3)`` uint8 grid of all probe images, captions drawn in (what TensorBoard,
            MLflow and other loggers show).
        tiles: ``(N, h, w, 3)`` uint8 probe images without captions, for loggers that caption
            images themselves (W&B), or ``None`` to send the grid there too.
        captions: one text caption per tile, or ``None``.
    """

    grid: np.ndarray
    tiles: np.ndarray | None = None
    captions: Sequence[str] | None = None


def _is(logger: Any, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(logger).__mro__)


def backend(logger: Any) -> str:
    """Which way pictures reach ``logger``.

    Returns:
        ``"wandb"``, ``"mlflow"``, ``"tensorboard"``, ``"log_image"`` (a WandbLogger-style
        ``log_image`` method) or ``"none"``.
    """
    if _is(logger, "WandbLogger"):
        return "wandb"
    if _is(logger, "MLFlowLogger"):
        return "mlflow"
    if _is(logger, "TensorBoardLogger"):
        return "tensorboard"
    if callable(getattr(logger, "log_image", None)):
        return "log_image"
    if hasattr(getattr(logger, "experiment", None), "add_image"):  # a SummaryWriter of its own
        return "tensorboard"
    return "none"


def log_pictures(logger: Any, pictures: Mapping[str, Picture], step: int) -> bool:
    """Log each picture under its tag at ``step``.

    Args:
        logger: a Lightning logger.
        pictures: tag → picture; tags are ``/``-separated words of letters, digits, ``_`` and ``-``
            (valid keys for every backend above).
        step: the step of the epoch's other metrics.

    Returns:
        ``False`` if the logger takes no pictures (nothing was logged), else ``True``.
    """
    kind = backend(logger)
    if kind == "tensorboard":
        writer = logger.experiment
        for tag, picture in pictures.items():
            writer.add_image(tag, picture.grid, global_step=step, dataformats="HWC")
    elif kind == "wandb":
        for tag, picture in pictures.items():
            if picture.tiles is not None and picture.captions is not None:
                logger.log_image(
                    key=tag, images=list(picture.tiles), step=step, caption=list(picture.captions)
                )
            else:
                logger.log_image(key=tag, images=[picture.grid], step=step)
    elif kind == "mlflow":
        client, run_id = logger.experiment, logger.run_id
        for tag, picture in pictures.items():
            client.log_image(run_id, picture.grid, key=tag, step=step)
    elif kind == "log_image":
        for tag, picture in pictures.items():
            logger.log_image(key=tag, images=[picture.grid], step=step)
    else:
        return False
    return True


def save_file(logger: Any, name: str, data: bytes) -> str | None:
    """Store a file with the logger's run.

    Args:
        logger: a Lightning logger.
        name: file name (no directories).
        data: the file's contents.

    Returns:
        Where it went: a local path, or for MLflow the artifact URI; ``None`` if the logger stores
        no files.
    """
    kind = backend(logger)
    if kind == "mlflow":
        client, run_id = logger.experiment, logger.run_id
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            client.log_artifact(run_id, path)
        return f"{client.get_run(run_id).info.artifact_uri}/{name}"
    if kind == "wandb":
        run = logger.experiment
        path = os.path.join(run.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        run.save(path, base_path=run.dir, policy="now")
        return path
    directory = getattr(logger, "log_dir", None)
    if not isinstance(directory, (str, os.PathLike)):
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path
