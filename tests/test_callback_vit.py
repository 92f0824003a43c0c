"""PRISMMonitor on vision-transformer fine-tunes (timm and Hugging Face), with zero configuration."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import loaders
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_prism import PRISMMonitor, grad_cam, prism
from lightning_prism.layout import FeatureLayout

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def timm_vit() -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=2
    )


class HFLogits(torch.nn.Module):
    """A Hugging Face classifier as a LightningModule uses it: images in, logits out."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
        self.vit = transformers.ViTForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x).logits


class ViTClassifier(pl.LightningModule):
    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.model = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(
    ("build", "final_layer"), [(timm_vit, "model.norm"), (HFLogits, "model.vit.vit.layernorm")]
)
def test_vit_fine_tune_logs_patch_token_maps_with_zero_configuration(tmp_path, build, final_layer):
    torch.manual_seed(0)
    module, (train, val) = ViTClassifier(build()), loaders()
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[PRISMMonitor()],
        logger=logger,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*PRISM.*")  # neither a failure nor uniform maps
        warnings.filterwarnings("ignore", message=r".*validation-set metrics.*too few samples for k=20")
        trainer.fit(module, train, val)

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    logged = events.Images("prism/maps")
    validation_steps = [e.step for e in events.Scalars("val_loss")]
    assert len(validation_steps) == 2 and [e.step for e in logged] == [0, *validation_steps]  # every epoch
    picture = np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string)).convert("RGB"))
    assert picture.std() > 10  # colours, not a grey grid
    assert all(np.isfinite(e.value) for e in events.Scalars("prism/explained_variance/pc1"))

    # What the monitor ran: the last block's normalised patch tokens on their 4×4 grid.
    result = prism(module, torch.stack([val.dataset[i][0] for i in range(4)]))
    assert result.final_layer == final_layer
    assert result.final_layout == FeatureLayout("tokens", (4, 4), prefix=1)
    assert result.stage_layers == [] and result.maps.shape == (4, 3, 32, 32)


class KeepingMonitor(PRISMMonitor):
    """Keeps the gradient views' maps of the last epoch, as the monitor computed them."""

    def _views(self, *args):
        out = super()._views(*args)
        self.kept = out.maps
        return out


def last_module_of_class(model: torch.nn.Module, class_name: str) -> str:
    return [name for name, m in model.named_modules() if type(m).__name__ == class_name][-1]


def fit_vit(tmp_path, monitor, build, name):
    torch.manual_seed(0)
    module, (train, val) = ViTClassifier(build()), loaders()
    logger = TensorBoardLogger(str(tmp_path), name=name, version=0)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[monitor], logger=logger, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, train, val)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    return module, events.Images("prism/grad_cam")


@pytest.mark.parametrize(("build", "block_class"), [(timm_vit, "Block"), (HFLogits, "ViTLayer")])
def test_vit_grad_cam_view_moves_to_the_last_attention_with_one_warning(tmp_path, build, block_class):
    """A class-token ViT: at the final norm (PRISM's final map) Grad-CAM's gradient is zero, so with no
    grad_cam_layer the view shows Grad-CAM at the input of the last block (its attention's queries,
    keys and values), and says so once."""
    monitor = KeepingMonitor(num_images=4, views=["prism", "grad_cam"])
    with pytest.warns(UserWarning, match=r"Grad-CAM at PRISM's final feature map 'model\.") as caught:
        module, logged = fit_vit(tmp_path, monitor, build, "default")
    layer = "model." + last_module_of_class(module.model, block_class) + ":input"
    said = [str(w.message) for w in caught if "PRISM's final feature map" in str(w.message)]
    assert len(said) == 1 and f"shows Grad-CAM at {layer!r}" in said[0]
    assert not any("Grad-CAM of layer" in str(w.message) for w in caught)  # the plain zero warning
    assert len(logged) == 3  # before training, two epochs
    expected = grad_cam(module, monitor._probe.images, layer=layer).maps  # the fitted model, its predictions
    torch.testing.assert_close(monitor.kept["grad_cam"], expected, rtol=0, atol=1e-5)
    spread = expected.flatten(1)
    assert bool((spread.amax(1) - spread.amin(1) > 0.5).all())  # every image's map has a hot and a cold part


def test_vit_grad_cam_layer_given_is_used_without_a_warning(tmp_path):
    monitor = KeepingMonitor(num_images=4, views=["prism", "grad_cam"], grad_cam_layer="model.blocks.1.norm1")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*(PRISM|Grad-CAM).*")
        warnings.filterwarnings("ignore", message=r".*validation-set metrics.*too few samples for k=20")
        module, logged = fit_vit(tmp_path, monitor, timm_vit, "given")
    assert len(logged) == 3  # before training, two epochs
    expected = grad_cam(module, monitor._probe.images, layer="model.blocks.1.norm1").maps
    torch.testing.assert_close(monitor.kept["grad_cam"], expected, rtol=0, atol=1e-5)
