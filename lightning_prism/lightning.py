"""``PRISMMonitor`` for the ``lightning`` package (``lightning.pytorch``).

``lightning.pytorch.Trainer`` and its ``LightningCLI`` expect callbacks derived from
``lightning.pytorch.Callback``; this class is :class:`lightning_prism.PRISMMonitor` built on that
base, with the same arguments and behaviour::

    trainer:
      callbacks:
        - class_path: lightning_prism.lightning.PRISMMonitor

Importing this module requires ``pip install lightning``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .callback import PRISMMonitorBase

__all__ = ["PRISMMonitor"]


class PRISMMonitor(PRISMMonitorBase, Callback):
    __doc__ = PRISMMonitorBase.__doc__

    misconfiguration: ClassVar[type[Exception]] = MisconfigurationException
    warn: ClassVar[Callable[..., None]] = staticmethod(rank_zero_warn)
