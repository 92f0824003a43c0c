"""TensorBoard as a user runs it: the real ``tensorboard`` server, started with the README's flags,
asked through its HTTP API."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lit_helpers import loaders, make_module_class
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import readme_tensorboard_flags
from lightning_prism import PRISMMonitor

EPOCHS = 12  # more than the 10 images per tag TensorBoard keeps by default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def served_images(base: str, run: str, tag: str) -> list[dict]:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return json.loads(get(f"{base}/data/plugin/images/images?{query}"))


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

    flags = readme_tensorboard_flags()
    port = free_port()
    command = [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(tmp_path), *flags]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "tensorboard.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    served: list[dict] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the server loads the event files in the background
            try:
                served = served_images(base, "run/version_0", "prism/maps")
            except OSError:
                served = []
            if len(served) >= EPOCHS:
                break
            time.sleep(0.5)
        assert [image["step"] for image in served] == epochs, log.read_text()[-2000:]
        # What the dashboard shows for the last epoch is the picture the monitor wrote.
        shown = Image.open(
            io.BytesIO(get(f"{base}/data/plugin/images/individualImage?{served[-1]['query']}"))
        )
        last = Image.open(io.BytesIO(written.Images("prism/maps")[-1].encoded_image_string))
        np.testing.assert_array_equal(np.asarray(shown.convert("RGB")), np.asarray(last.convert("RGB")))
        for tag in ["prism/overlay", "prism/grad_cam", "prism/saliency", "prism/views"]:
            assert [image["step"] for image in served_images(base, "run/version_0", tag)] == epochs, tag
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
