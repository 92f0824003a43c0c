"""Small Lightning pieces shared by the callback tests and the DDP script."""

from __future__ import annotations

import glob
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from conftest import hook_count, tiny_cnn


def striped_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 32×32 images: vertical (0) or horizontal (1) stripes, with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    phase = torch.rand(n, generator=g) * 6.28
    grid = torch.arange(32, dtype=torch.float32)
    images = torch.empty(n, 3, 32, 32)
    for i in range(n):
        wave = torch.sin(grid * 0.8 + phase[i])
        pattern = wave.view(1, 32).expand(32, 32) if labels[i] == 0 else wave.view(32, 1).expand(32, 32)
        images[i] = pattern + 0.3 * torch.randn(3, 32, 32, generator=g)
    return images, labels


class Stripes(Dataset):
    def __init__(self, n: int = 24, seed: int = 0, as_dict: bool = False) -> None:
        self.images, self.targets = striped_images(n, seed)
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if self.as_dict:
            return {"image": self.images[i], "label": self.targets[i]}
        return self.images[i], int(self.targets[i])


def make_module_class(pl):
    """A LightningModule class for the given Lightning package (pytorch_lightning or lightning.pytorch)."""

    class TinyClassifier(pl.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = tiny_cnn(num_classes=2)
            self.hook_counts: list[int] = []  # hooks and wrappers on the model in each training step
            self.val_hook_counts: list[int] = []  # and in each validation step
            self.flags_ok: list[bool] = []
            self.eval_inference_modes: list[bool] = []  # of every forward in eval mode

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                self.eval_inference_modes.append(torch.is_inference_mode_enabled())
            return self.model(x)

        def _split(self, batch):
            return (batch["image"], batch["label"]) if isinstance(batch, dict) else batch

        def training_step(self, batch, batch_idx):
            x, y = self._split(batch)
            self.hook_counts.append(hook_count(self))
            self.flags_ok.append(all(m.training for m in self.modules()))
            return torch.nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
            x, y = self._split(batch)
            self.val_hook_counts.append(hook_count(self))
            self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    return TinyClassifier


def loaders(batch_size: int = 8, as_dict: bool = False):
    return (
        DataLoader(Stripes(32, seed=1, as_dict=as_dict), batch_size=batch_size, shuffle=True),
        DataLoader(Stripes(16, seed=2, as_dict=as_dict), batch_size=batch_size),
    )


def make_datamodule_class(pl):
    class StripesData(pl.LightningDataModule):
        def __init__(self, batch_size: int = 8) -> None:
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self):
            return loaders(self.batch_size)[0]

        def val_dataloader(self):
            return loaders(self.batch_size)[1]

    return StripesData


def trainer(tmp_path, callbacks, max_epochs=2, logger=True, trainer_cls=pl.Trainer, **kwargs):
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0) if logger is True else logger
    options = {
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 1,
    }
    return trainer_cls(max_epochs=max_epochs, callbacks=callbacks, logger=tb, **{**options, **kwargs})


def events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def wandb_records(path: str) -> list:
    """The records of a W&B run's transaction log (``run-<id>.wandb``), parsed with W&B's own protobufs.

    The file is a 7-byte header (``:W&B``, magic, version) and a LevelDB-style log: 32 KiB blocks of
    records, each a 7-byte header (checksum, length, type: full, first, middle or last) and data;
    a full record, or first + middle… + last, is one serialised ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, _, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left in the block for a header
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, or last of several
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@contextmanager
def tensorboard_server(logdir, flags: list[str]) -> Iterator[str]:
    """The real ``tensorboard`` command serving ``logdir`` with ``flags`` on a free loopback port;
    yields its base URL, and stops it afterwards."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(logdir), *flags]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = Path(logdir) / "tensorboard.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


def served_images(base: str, run: str, tag: str) -> list[dict]:
    """The images TensorBoard's images dashboard lists for ``run`` and ``tag`` ([] while it loads)."""
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    try:
        return json.loads(http_get(f"{base}/data/plugin/images/images?{query}"))
    except OSError:
        return []


def wait_for_images(base: str, run: str, tag: str, count: int, timeout: float = 90) -> list[dict]:
    """Ask until the server has loaded ``count`` images of ``tag`` (it reads event files in the background)."""
    deadline = time.monotonic() + timeout
    served: list[dict] = []
    while time.monotonic() < deadline:
        served = served_images(base, run, tag)
        if len(served) >= count:
            break
        time.sleep(0.5)
    return served


def served_image(base: str, entry: dict) -> np.ndarray:
    """One image as the dashboard shows it, RGB."""
    data = http_get(f"{base}/data/plugin/images/individualImage?{entry['query']}")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def finished_records(run_dir: Path) -> list:
    """The records of an offline W&B run once its transaction log ends with the exit record: W&B's
    service may still be writing it when ``wandb.finish()`` returns (seen on a process's first run), so
    a read can also meet a record cut off mid-write (a ``DecodeError``): read again until it is whole."""
    from google.protobuf.message import DecodeError

    (log,) = glob.glob(str(run_dir / "run-*.wandb"))
    deadline = time.monotonic() + 30
    while True:
        try:
            records = wandb_records(log)
        except DecodeError:
            if time.monotonic() > deadline:
                raise
        else:
            if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
                return records
        time.sleep(0.2)
