from __future__ import annotations

import importlib

import pytest
from lit_helpers import make_datamodule_class, make_module_class

from lightning_prism import PRISMMonitor

CONFIG = """
trainer:
  max_epochs: 1
  accelerator: cpu
  enable_progress_bar: false
  logger:
    class_path: {package}.loggers.TensorBoardLogger
    init_args:
      save_dir: {save_dir}
  callbacks:
    - class_path: {monitor}
      init_args:
        num_images: 4
        every_n_epochs: 1
        basis: fixed
        mean: [0.5, 0.5, 0.5]
        std: [0.5, 0.5, 0.5]
        class_names: [vertical, horizontal]
"""


FLAVOURS = {
    "pytorch_lightning": ("pytorch_lightning", "lightning_prism.PRISMMonitor"),
    "lightning": ("lightning.pytorch", "lightning_prism.lightning.PRISMMonitor"),
}


def flavour(name: str, tmp_path, **replace: str):
    package_name, monitor = FLAVOURS[name]
    package = pytest.importorskip(package_name)
    cli_module = importlib.import_module(f"{package_name}.cli")
    text = CONFIG.format(save_dir=tmp_path, package=package_name, monitor=monitor)
    for old, new in replace.items():
        text = text.replace(old, new)
    config = tmp_path / "config.yaml"
    config.write_text(text)
    return package, cli_module.LightningCLI, config, importlib.import_module(monitor.rsplit(".", 1)[0])


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_lightning_cli_yaml_config(name, tmp_path):
    package, lightning_cli, config, monitor_module = flavour(name, tmp_path)
    cli = lightning_cli(
        make_module_class(package),
        make_datamodule_class(package),
        args=["fit", "--config", str(config)],
        save_config_callback=None,
    )
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, monitor_module.PRISMMonitor)]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert isinstance(monitor, package.Callback)
    assert (monitor.num_images, monitor.basis, monitor.class_names) == (
        4,
        "fixed",
        ["vertical", "horizontal"],
    )
    assert monitor.state_dict()["probe_indices"] is not None  # it ran during fit
    assert monitor.evolution_path is not None


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_lightning_cli_rejects_a_bad_value(name, tmp_path):
    package, lightning_cli, config, _ = flavour(name, tmp_path, **{"basis: fixed": "basis: sticky"})
    with pytest.raises(
        ValueError, match=r"basis must be one of \('refit', 'aligned', 'fixed'\), got 'sticky'"
    ):
        lightning_cli(
            make_module_class(package),
            make_datamodule_class(package),
            args=["--config", str(config)],
            run=False,
        )


def test_the_pytorch_lightning_monitor_is_not_a_lightning_package_callback():
    # Why lightning_prism.lightning exists: LightningCLI of `lightning` checks for its own Callback.
    lightning = pytest.importorskip("lightning.pytorch")
    assert not isinstance(PRISMMonitor(), lightning.Callback)
