"""The validation set's discrimination through a real Trainer: what the monitor logs from the validation
pass itself (and before training) against an independent computation on the same samples, the
capture's lifecycle, and bad input."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
import urllib.parse
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import (
    Stripes,
    events,
    http_get,
    loaders,
    make_module_class,
    tensorboard_server,
    trainer,
)
from PIL import Image
from test_discrimination import reference_eta_squared, reference_knn, reference_rankme
from torch.utils.data import DataLoader, Dataset

from conftest import hook_count, readme_tensorboard_flags
from lightning_prism import PRISMMonitor
from lightning_prism.recording import record

TinyClassifier = make_module_class(pl)
K = 5  # the k-NN's k for these small validation sets


def pooled(module: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """Each image's final feature map (PRISM's final layer), averaged over its positions, in float64."""
    return record(module, images).final.double().mean(dim=(2, 3)).numpy()


def expected_metrics(module: torch.nn.Module, images: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    features = pooled(module, images)
    return {
        "prism/val/knn_accuracy": reference_knn(features, labels, K, 0.07),
        "prism/val/class_separation": reference_eta_squared(features, labels),
        "prism/val/effective_rank": reference_rankme(features),
    }


def logged(acc, name: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(name)]


class Validating(TinyClassifier):
    """Keeps the validation outputs (to compare runs bit for bit) and the hooks seen in validation."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.outputs: list[torch.Tensor] = []

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, _ = batch
        self.outputs.append(self(x).detach().clone())
        return super().validation_step(batch, batch_idx, dataloader_idx)


def test_the_validation_sets_metrics_from_before_training_on_are_those_of_every_sample(tmp_path):
    torch.manual_seed(0)
    module, (train, val) = TinyClassifier(), loaders()
    pretrained = copy.deepcopy(module)
    monitor = PRISMMonitor(num_images=4, knn_k=K)
    t = trainer(tmp_path, [monitor], max_epochs=2)
    t.fit(module, train, val)
    acc = events(t.logger.log_dir)
    steps = [e.step for e in acc.Scalars("val_loss")]
    dataset = val.dataset
    labels = dataset.targets.numpy()
    for name, value in expected_metrics(pretrained, dataset.images, labels).items():
        assert logged(acc, name)[0] == (0, pytest.approx(value, abs=1e-5)), name  # before training
    for name, value in expected_metrics(module, dataset.images, labels).items():
        assert [s for s, _ in logged(acc, name)] == [0, *steps], name
        assert logged(acc, name)[-1][1] == pytest.approx(value, abs=1e-5), name  # the last epoch
        assert float(t.callback_metrics[name]) == pytest.approx(value, abs=1e-5), name
    # The embedding picture, every time: a dot for each sample of each class, in two colours.
    pictures = acc.Images("prism/embedding")
    assert [e.step for e in pictures] == [0, *steps]
    picture = np.asarray(Image.open(io.BytesIO(pictures[-1].encoded_image_string)).convert("RGB"))
    for colour in ((31, 119, 180), (255, 127, 14)):  # the palette's first two classes
        assert (np.abs(picture.astype(int) - colour).sum(axis=2) < 30).sum() > 50, colour


def test_a_spread_subset_of_the_validation_set_the_same_every_epoch(tmp_path):
    """With val_samples below the validation set, the samples kept are spread over the whole set (a
    class-sorted set still gives every class its share), the same every epoch."""
    torch.manual_seed(0)
    order = torch.argsort(Stripes(24, seed=2).targets, stable=True)  # sorted by class: 12 of 0, then 12 of 1
    dataset = Stripes(24, seed=2)
    dataset.images, dataset.targets = dataset.images[order], dataset.targets[order]
    module = TinyClassifier()
    monitor = PRISMMonitor(num_images=4, knn_k=K, val_samples=12)
    t = trainer(tmp_path, [monitor], max_epochs=2)
    t.fit(module, loaders()[0], DataLoader(dataset, batch_size=5))
    kept = list(range(1, 24, 2))  # positions p with ⌊(p + 1)·12/24⌋ > ⌊p·12/24⌋
    labels = dataset.targets[kept].numpy()
    assert sorted(set(labels.tolist())) == [0, 1]
    acc = events(t.logger.log_dir)
    for name, value in expected_metrics(module, dataset.images[kept], labels).items():
        assert logged(acc, name)[-1][1] == pytest.approx(value, abs=1e-5), name


def test_training_and_the_validation_outputs_are_bit_identical_with_and_without_the_capture(tmp_path):
    def fit(val_samples: int, name: str) -> Validating:
        pl.seed_everything(7)
        module, (train, val) = Validating(), loaders()
        monitor = PRISMMonitor(num_images=4, knn_k=K, val_samples=val_samples, baseline=False)
        trainer(tmp_path / name, [monitor], max_epochs=3).fit(module, train, val)
        return module

    with_capture, without = fit(10_000, "with"), fit(0, "without")
    assert len(with_capture.outputs) == len(without.outputs) > 0
    for a, b in zip(with_capture.outputs, without.outputs, strict=True):
        assert torch.equal(a, b)
    for (name, a), b in zip(with_capture.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # The capture was there in validation steps only: never in a training step, nor in the sanity check.
    assert max(with_capture.hook_counts) == 0 and max(without.hook_counts) == 0
    assert with_capture.val_hook_counts[0] == 0 and set(with_capture.val_hook_counts[1:]) == {2}
    assert set(without.val_hook_counts) == {0}
    # Without the projectors (which show each sample's prediction): the one hook on PRISM's final layer.
    module, (train, val) = Validating(), loaders()
    monitor = PRISMMonitor(num_images=4, knn_k=K, embedding_samples=0, baseline=False)
    trainer(tmp_path / "features only", [monitor], max_epochs=1).fit(module, train, val)
    assert set(module.val_hook_counts[1:]) == {1}


class FailsInValidation(TinyClassifier):
    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        if self.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("the validation step failed")
        return super().validation_step(batch, batch_idx, dataloader_idx)


def test_the_capture_comes_off_when_validation_raises(tmp_path):
    module, (train, val) = FailsInValidation(), loaders()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4, knn_k=K)], max_epochs=3)
    with pytest.raises(RuntimeError, match="the validation step failed"):
        t.fit(module, train, val)
    assert module.val_hook_counts[-1] == 2  # it was on when the step raised
    assert hook_count(module) == 0


def validation_warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if "validation-set metrics" in str(w.message)]


class Unlabelled(Dataset):
    def __init__(self) -> None:
        self.images = Stripes(16, seed=2).images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class NoLabels(TinyClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(batch).logsumexp(1).mean())


def test_without_labels_only_the_effective_rank_and_one_warning(tmp_path):
    train, _ = loaders()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4, knn_k=K)], max_epochs=2)
    messages = validation_warnings(lambda: t.fit(NoLabels(), train, DataLoader(Unlabelled(), batch_size=4)))
    assert messages == [
        "PRISMMonitor's validation-set metrics (16 samples): no knn_accuracy or class_separation: no labels."
    ]
    tags = events(t.logger.log_dir).Tags()["scalars"]
    assert "prism/val/effective_rank" in tags
    assert "prism/val/knn_accuracy" not in tags and "prism/val/class_separation" not in tags


def test_a_single_class_or_too_few_samples_log_no_knn_and_say_so_once(tmp_path):
    train, _ = loaders()
    single = Stripes(16, seed=2)
    single.targets[:] = 1
    t = trainer(tmp_path / "single", [PRISMMonitor(num_images=4, knn_k=K)], max_epochs=2)
    messages = validation_warnings(lambda: t.fit(TinyClassifier(), train, DataLoader(single, batch_size=4)))
    assert messages == [
        "PRISMMonitor's validation-set metrics (16 samples): no knn_accuracy or class_separation: a single class."
    ]
    t = trainer(tmp_path / "few", [PRISMMonitor(num_images=4)], max_epochs=2)  # k=20 > 15 neighbours
    messages = validation_warnings(lambda: t.fit(TinyClassifier(), train, loaders()[1]))
    assert messages == [
        "PRISMMonitor's validation-set metrics (16 samples): no knn_accuracy: too few samples for k=20 (16)."
    ]
    acc = events(t.logger.log_dir)
    assert "prism/val/knn_accuracy" not in acc.Tags()["scalars"]
    assert all(np.isfinite(e.value) for e in acc.Scalars("prism/val/class_separation"))


def test_non_finite_features_are_left_out_and_named_once(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    val.dataset.images[5, 0, 3, 3] = float("nan")
    module = TinyClassifier()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4, knn_k=K)], max_epochs=2)
    messages = validation_warnings(lambda: t.fit(module, train, val))
    assert messages == [
        "PRISMMonitor's validation-set metrics (15 samples): 1 of 16 samples left out for NaN or infinite "
        "features (position 5)."
    ]
    kept = [i for i in range(16) if i != 5]
    acc = events(t.logger.log_dir)
    expected = expected_metrics(module, val.dataset.images[kept], val.dataset.targets[kept].numpy())
    for name, value in expected.items():
        values = [v for _, v in logged(acc, name)]
        assert all(np.isfinite(values)) and values[-1] == pytest.approx(value, abs=1e-5), name


class FeatureMapOutput(TinyClassifier):
    """A forward that returns a feature map, not class scores (a backbone): the feature metrics remain."""

    def forward(self, x):
        return self.model[:8](x) if not self.training else self.model(x)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(batch[0]).logsumexp(1).mean())


def test_an_output_without_class_scores_still_gets_the_feature_metrics(tmp_path):
    train, val = loaders()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4, knn_k=K)], max_epochs=2)
    t.fit(FeatureMapOutput(), train, val)
    tags = events(t.logger.log_dir).Tags()["scalars"]
    assert {"prism/val/knn_accuracy", "prism/val/class_separation", "prism/val/effective_rank"} <= set(tags)


def test_the_projector_through_the_real_tensorboard_server(tmp_path):
    """TensorBoard's Projector serves each pass's features (t-SNE, UMAP) with the class and the
    model's prediction of every sample, and its thumbnails."""
    torch.manual_seed(0)
    module, (train, val) = TinyClassifier(), loaders()
    monitor = PRISMMonitor(num_images=4, knn_k=K, class_names=["vertical", "horizontal"], embedding_samples=8)
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(module, train, val)
    steps = [0, *(e.step for e in events(t.logger.log_dir).Scalars("val_loss"))]
    picked = [round(i * 15 / 7) for i in range(8)]  # 8 of 16, evenly spread (the first and the last)
    features = pooled(module, val.dataset.images)[picked]
    with torch.no_grad():
        predicted = module.eval()(val.dataset.images).argmax(1)[picked].tolist()
    names = ["vertical", "horizontal"]
    with tensorboard_server(tmp_path, readme_tensorboard_flags()) as base:
        projector = f"{base}/data/plugin/projector"
        run = "tb/version_0"
        info: dict = {}
        for _ in range(180):  # the server loads the logs in the background
            with contextlib.suppress(OSError):
                info = json.loads(http_get(f"{projector}/info?" + urllib.parse.urlencode({"run": run})))
            if len(info.get("embeddings", [])) == len(steps):
                break
            time.sleep(0.5)
        names_served = sorted(e["tensorName"] for e in info["embeddings"])
        assert names_served == [f"prism/embedding:{s:05d}" for s in steps]
        last = f"prism/embedding:{steps[-1]:05d}"
        query = urllib.parse.urlencode({"run": run, "name": last})
        served = np.frombuffer(http_get(f"{projector}/tensor?{query}"), dtype=np.float32).reshape(8, -1)
        np.testing.assert_allclose(served, features, rtol=1e-4, atol=1e-5)
        rows = http_get(f"{projector}/metadata?{query}").decode().splitlines()
        assert rows[0] == "class\tprediction"
        assert rows[1:] == [
            f"{names[int(val.dataset.targets[i])]}\t{names[p]}"
            for i, p in zip(picked, predicted, strict=True)
        ]
        sprite = Image.open(io.BytesIO(http_get(f"{projector}/sprite_image?{query}")))
        assert sprite.size[0] == sprite.size[1] > 0


class SkipsTheModel(TinyClassifier):
    """A validation step that does not run the model (it logs a constant): the capture sees nothing."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(0.0))


def test_validation_steps_that_do_not_run_the_model_are_said_once(tmp_path):
    train, val = loaders()
    t = trainer(tmp_path, [PRISMMonitor(num_images=4, knn_k=K, baseline=False)], max_epochs=2)
    messages = validation_warnings(lambda: t.fit(SkipsTheModel(), train, val))
    assert len(messages) == 1 and "went by without a feature map of PRISM's final layer" in messages[0]
    assert "prism/val/effective_rank" not in events(t.logger.log_dir).Tags()["scalars"]
