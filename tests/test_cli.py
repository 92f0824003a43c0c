from __future__ import annotations

import pytest
import pytorch_lightning as pl
from lit_helpers import make_datamodule_class, make_module_class

from lightning_prism import PRISMMonitor

CONFIG = """
trainer:
  max_epochs: 1
  accelerator: cpu
  enable_progress_bar: false
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args:
      save_dir: {save_dir}
  callbacks:
    - class_path: lightning_prism.PRISMMonitor
      init_args:
        num_images: 4
        every_n_epochs: 1
        basis: fixed
        mean: [0.5, 0.5, 0.5]
        std: [0.5, 0.5, 0.5]
        class_names: [vertical, horizontal]
"""


def test_lightning_cli_yaml_config(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(save_dir=tmp_path))
    cli = LightningCLI(
        make_module_class(pl),
        make_datamodule_class(pl),
        args=["fit", "--config", str(config)],
        save_config_callback=None,
    )
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, PRISMMonitor)]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert (monitor.num_images, monitor.basis, monitor.class_names) == (
        4,
        "fixed",
        ["vertical", "horizontal"],
    )
    assert monitor.state_dict()["probe_indices"] is not None  # it ran during fit


def test_lightning_cli_rejects_a_bad_value(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(save_dir=tmp_path).replace("basis: fixed", "basis: sticky"))
    with pytest.raises((ValueError, SystemExit)):
        LightningCLI(
            make_module_class(pl), make_datamodule_class(pl), args=["fit", "--config", str(config)], run=False
        )
