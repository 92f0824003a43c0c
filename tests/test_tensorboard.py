"""TensorBoard as a user runs it: the real ``tensorboard`` server, started with the README's flags,
asked through its HTTP API."""

from __future__ import annotations

import io

import numpy as np
import pytorch_lightning as pl
import torch
from lit_helpers import (
    loaders,
    make_module_class,
    served_image,
    served_images,
    tensorboard_server,
    wait_for_images,
)
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import readme_tensorboard_flags
from lightning_prism import PRISMMonitor

EPOCHS = 12  # more than the 10 images per tag TensorBoard keeps by default


def test_the_readme_command_serves_every_epochs_maps(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=[PRISMMonitor(num_images=4, views=["prism", "grad_cam", "saliency"])],
        logger=logger,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(make_module_class(pl)(), train, val)
    written = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    written.Reload()
    epochs = [e.step for e in written.Scalars("val_loss")]
    assert len(epochs) == EPOCHS

    with tensorboard_server(tmp_path, readme_tensorboard_flags()) as base:
        served = wait_for_images(base, "run/version_0", "prism/maps", 1 + EPOCHS)
        log = (tmp_path / "tensorboard.log").read_text()[-2000:]
        assert [image["step"] for image in served] == [0, *epochs], log  # 0: the model before training
        # What the dashboard shows for the last epoch is the picture the monitor wrote.
        last = Image.open(io.BytesIO(written.Images("prism/maps")[-1].encoded_image_string))
        np.testing.assert_array_equal(served_image(base, served[-1]), np.asarray(last.convert("RGB")))
        for tag in ["prism/overlay", "prism/grad_cam", "prism/saliency", "prism/views"]:
            assert [image["step"] for image in served_images(base, "run/version_0", tag)] == [0, *epochs], tag
