"""PRISMMonitor's gradient views (Grad-CAM, saliency, guided saliency) in real Trainer runs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import Stripes, decode, events, loaders, make_module_class, trainer
from torch.utils.data import DataLoader

from lightning_prism import PRISMMonitor, grad_cam, gradients, prism, saliency
from lightning_prism.render import (
    _decode,
    caption_grid,
    denormalize,
    heat_overlay,
    overlay,
    to_uint8,
    views_grid,
)

TinyClassifier = make_module_class(pl)
ALL_VIEWS = ["prism", "grad_cam", "saliency", "guided_saliency"]


def test_every_view_is_logged_every_epoch_at_the_validation_step(tmp_path):
    train, val = loaders()
    module = TinyClassifier()
    monitor = PRISMMonitor(num_images=4, views=ALL_VIEWS, target="label", strict=True)
    fitted = trainer(tmp_path, [monitor], max_epochs=2)
    fitted.fit(module, train, val)

    acc = events(fitted.logger.log_dir)
    steps = [e.step for e in acc.Scalars("val_loss")]
    assert len(steps) == 2
    for view in ["maps", "overlay", "grad_cam", "saliency", "guided_saliency", "views"]:
        assert [e.step for e in acc.Images(f"prism/{view}")] == [0, *steps], view  # 0: before training

    # The last epoch's pictures are those of the fitted model on the probe, computed here independently
    # of the monitor's code path (grad_cam() and saliency() on the probe, with the labels as targets).
    probe = monitor._probe
    labels = probe.labels.tolist()
    with torch.no_grad():
        predicted = module(probe.images).argmax(1).tolist()
    captions = [f"{['0', '1'][y]} → {p}" for y, p in zip(labels, predicted, strict=True)]
    wrong = [y != p for y, p in zip(labels, predicted, strict=True)]
    inputs = denormalize(probe.images)
    expected = {
        "grad_cam": grad_cam(module, probe.images, targets=labels).maps,
        "saliency": saliency(module, probe.images, targets=labels).maps,
        "guided_saliency": saliency(module, probe.images, targets=labels, guided=True).maps,
    }
    shown_views = {
        view: heat_overlay(inputs, maps, 0.5, clip=None if view == "grad_cam" else 0.99)
        for view, maps in expected.items()
    }
    for view, tiles in shown_views.items():
        picture = caption_grid(tiles, captions, wrong)
        np.testing.assert_allclose(decode(acc.Images(f"prism/{view}")[-1]), picture, atol=2)
    # The side-by-side grid: the input, PRISM's colours, then each gradient view over the input.
    prism_maps = prism(module, probe.images, basis="aligned", reference=monitor._reference).maps
    shown = [("PRISM", prism_maps)] + [
        (name, shown_views[view])
        for view, name in [
            ("grad_cam", "Grad-CAM"),
            ("saliency", "saliency"),
            ("guided_saliency", "guided saliency"),
        ]
    ]
    side_by_side = decode(acc.Images("prism/views")[-1])
    assert side_by_side.shape == views_grid(inputs, shown, captions, wrong).shape
    np.testing.assert_allclose(side_by_side, views_grid(inputs, shown, captions, wrong), atol=2)


def test_the_grad_cam_view_explains_the_predicted_class_by_default(tmp_path):
    train, val = loaders()
    module = TinyClassifier()
    monitor = PRISMMonitor(num_images=4, views=["grad_cam"], strict=True, evolution_strip=False)
    fitted = trainer(tmp_path, [monitor], max_epochs=1)
    fitted.fit(module, train, val)
    acc = events(fitted.logger.log_dir)
    tags = acc.Tags()["images"]
    assert "prism/grad_cam" in tags and "prism/maps" not in tags and "prism/views" not in tags
    # PRISM's numbers need PRISM; the validation set's need only its final layer
    assert {t for t in acc.Tags()["scalars"] if t.startswith("prism/")} == {
        "prism/val/class_separation",
        "prism/val/effective_rank",
    }
    probe = monitor._probe
    maps = grad_cam(module, probe.images).maps  # targets: the model's predictions
    with torch.no_grad():
        predicted = module(probe.images).argmax(1).tolist()
    captions = [f"{y} → {p}" for y, p in zip(probe.labels.tolist(), predicted, strict=True)]
    wrong = [y != p for y, p in zip(probe.labels.tolist(), predicted, strict=True)]
    picture = caption_grid(heat_overlay(denormalize(probe.images), maps, 0.5), captions, wrong)
    np.testing.assert_allclose(decode(acc.Images("prism/grad_cam")[-1]), picture, atol=2)


@pytest.mark.parametrize(
    ("views", "forward"), [(["prism", "grad_cam"], "shared"), (["grad_cam"], "grad_cam")]
)
def test_from_the_second_epoch_grad_cams_forward_records_nothing_before_its_last_cut(
    tmp_path, monkeypatch, views, forward
):
    """Each epoch the monitor passes on where the previous epoch's last graph cut fell (the first
    epoch has none); the pictures stay those of the fitted model (the test above)."""
    told: list[int] = []

    class Spy(gradients._GraphCuts):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            told.append(self.cut_from)

    monkeypatch.setattr(gradients, "_GraphCuts", Spy)
    train, val = loaders()
    monitor = PRISMMonitor(num_images=4, views=views, strict=True, evolution_strip=False)
    trainer(tmp_path, [monitor], max_epochs=3).fit(TinyClassifier(), train, val)
    cut = monitor._probe_views.cut_from[forward]
    assert cut > 0 and told == [0, cut, cut, cut]  # before training, then three epochs
    trainer(tmp_path / "again", [monitor], max_epochs=1).fit(TinyClassifier(), train, val)
    assert told[4] == 0  # a new fit: nothing carried over


class Recorder(pl.Callback):
    """Records, around the monitor's work at the end of validation, every parameter's ``.grad`` and
    ``requires_grad`` and the grad mode (the monitor runs first: callbacks run in list order)."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor | None]] = []
        self.after: list[list[torch.Tensor | None]] = []
        self.requires_grad: list[list[bool]] = []
        self.modes: list[tuple[bool, bool]] = []

    @staticmethod
    def grads(module):
        return [None if p.grad is None else p.grad.clone() for p in module.parameters()]

    def on_validation_epoch_start(self, trainer, pl_module):
        self.before.append(self.grads(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.after.append(self.grads(pl_module))
        self.requires_grad.append([p.requires_grad for p in pl_module.parameters()])
        self.modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))


def test_gradient_views_leave_training_exactly_as_without_them(tmp_path):
    """Validation in the middle of an accumulation of gradients (val_check_interval=3 with
    accumulate_grad_batches=2): had the views touched a parameter's .grad, the optimiser step after
    validation would differ."""

    def fit(callbacks, name):
        pl.seed_everything(5)
        train = DataLoader(Stripes(32, seed=1), batch_size=4, shuffle=True)
        val = DataLoader(Stripes(16, seed=2), batch_size=4)
        module = TinyClassifier()
        trainer(
            tmp_path / name, callbacks, max_epochs=2, accumulate_grad_batches=2, val_check_interval=3
        ).fit(module, train, val)
        return module

    recorder = Recorder()
    with_views = fit([PRISMMonitor(num_images=4, views=ALL_VIEWS, strict=True), recorder], "with")
    without = fit([], "without")
    for (name, a), b in zip(with_views.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert len(recorder.after) >= 4
    assert any(g is not None for grads in recorder.before for g in grads)  # mid-accumulation indeed
    for before, after in zip(recorder.before, recorder.after, strict=True):
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(all(flags) for flags in recorder.requires_grad)
    assert set(recorder.modes) == {(False, False)}  # the loop's no_grad, as found


class FrozenBackbone(TinyClassifier):
    """Transfer learning: the backbone frozen (and its batch norm in eval mode), the head trained."""

    def __init__(self) -> None:
        super().__init__()
        self.model[6] = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32))
        for layer in list(self.model)[:-1]:
            layer.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        self.model[6][1].eval()


@pytest.mark.parametrize(
    ("case", "precision"),
    [("fit", "32-true"), ("validate", "32-true"), ("fit", "bf16-mixed"), ("frozen", "32-true")],
)
def test_views_in_validate_under_bf16_and_with_a_frozen_backbone(tmp_path, case, precision):
    train, val = loaders()
    module = FrozenBackbone() if case == "frozen" else TinyClassifier()
    requires_grad = [p.requires_grad for p in module.parameters()]
    recorder = Recorder()
    monitor = PRISMMonitor(num_images=4, views=ALL_VIEWS, strict=True, knn_k=5)  # 16 validation samples
    run = trainer(tmp_path, [monitor, recorder], max_epochs=1, precision=precision, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*PRISM.*")
        if case == "validate":
            run.validate(module, val)
        else:
            run.fit(module, train, val)
    acc = events(run.logger.log_dir)
    for view in ["maps", "grad_cam", "saliency", "guided_saliency", "views"]:
        assert len(acc.Images(f"prism/{view}")) == (1 if case == "validate" else 2), view  # and before fit
        assert decode(acc.Images(f"prism/{view}")[-1]).std() > 10  # a picture, not a blank grid
    assert [p.requires_grad for p in module.parameters()] == requires_grad
    assert recorder.before == [[None] * len(requires_grad)] or case != "validate"
    assert all(
        (a is None and b is None) or torch.equal(a, b)
        for before, after in zip(recorder.before, recorder.after, strict=True)
        for a, b in zip(before, after, strict=True)
    )
    # validate() runs its hooks in inference mode, fit in no_grad: the views ran in both and left them.
    assert recorder.modes == [(False, case == "validate")]


def test_target_label_without_labels_warns_once_and_explains_predictions(tmp_path):
    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return Stripes(8, seed=2)[i][0]

    class NoLabels(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self(batch).logsumexp(1).mean())

    train, _ = loaders()
    monitor = PRISMMonitor(num_images=4, views=["prism", "grad_cam"], target="label")
    run = trainer(tmp_path, [monitor], max_epochs=2, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match=r"target='label'\): the probe has no labels") as caught:
        run.fit(NoLabels(), train, DataLoader(Unlabelled(), batch_size=4))
    assert sum("target='label'" in str(w.message) for w in caught) == 1
    assert len(events(run.logger.log_dir).Images("prism/grad_cam")) == 3


@pytest.mark.parametrize("view", ["saliency", "grad_cam"])
def test_a_view_that_fails_is_one_warning_and_the_others_go_on(tmp_path, view):
    class NoScores(TinyClassifier):
        """A forward whose output is a feature map, not class scores: PRISM works, gradients do not."""

        def forward(self, x):
            return self.model[:8](x) if not self.training else self.model(x)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.model(batch[0]).logsumexp(1).mean())

    train, val = loaders()
    monitor = PRISMMonitor(num_images=4, views=["prism", view])
    run = trainer(tmp_path, [monitor], max_epochs=2, num_sanity_val_steps=0)
    with pytest.warns(
        UserWarning, match=rf"could not compute the '{view}' view: ValueError: the model must"
    ) as caught:
        run.fit(NoScores(), train, val)
    assert sum(f"'{view}' view" in str(w.message) for w in caught) == 1
    acc = events(run.logger.log_dir)
    assert len(acc.Images("prism/maps")) == 3 and f"prism/{view}" not in acc.Tags()["images"]


def test_scores_read_out_beside_the_final_map_name_grad_cam_layer(tmp_path):
    """PiT's way: the class scores come from something computed beside the final map, not from it, so
    Grad-CAM at the final map has no gradient; the warning names the monitor's option."""

    class ReadsAside(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.aside = torch.nn.Linear(16, 2)

        def forward(self, x):
            mid = self.model[:5](x)
            self.model[5:8](mid)  # the final map (32 channels, 8×8), which the scores do not use
            return self.aside(mid.mean(dim=(2, 3)))

    train, val = loaders()
    monitor = PRISMMonitor(num_images=4, views=["prism", "grad_cam"])
    run = trainer(tmp_path, [monitor], max_epochs=1, num_sanity_val_steps=0)
    with pytest.warns(
        UserWarning, match=r"do not depend on the final feature map of layer 'model.7'.*grad_cam_layer="
    ):
        run.fit(ReadsAside(), train, val)
    assert "prism/maps" in events(run.logger.log_dir).Tags()["images"]


def test_the_evolution_strip_shows_the_chosen_view(tmp_path):
    train, val = loaders()
    module = TinyClassifier()
    monitor = PRISMMonitor(num_images=4, views=["prism", "grad_cam"], evolution_view="grad_cam", strict=True)
    run = trainer(tmp_path, [monitor], max_epochs=1, num_sanity_val_steps=0)
    run.fit(module, train, val)
    history, probe = monitor._evolution, monitor._probe
    inputs = denormalize(probe.images)
    as_cam = history._thumbnails(to_uint8(heat_overlay(inputs, grad_cam(module, probe.images).maps, 0.5)))
    as_prism = history._thumbnails(to_uint8(overlay(inputs, prism(module, probe.images).maps)))
    assert history.labels == ["before", "epoch 0"]
    row = _decode(history._rows[-1][2], 4).astype(float)  # a JPEG thumbnail
    assert np.abs(row - as_cam).mean() < 4 < np.abs(row - as_prism).mean()


def test_bad_view_options_are_clear_errors():
    with pytest.raises(
        ValueError, match=r"views must be a non-empty list of 'prism', 'grad_cam'.*got 'grad_cam'"
    ):
        PRISMMonitor(views="grad_cam")
    with pytest.raises(ValueError, match=r"views must be distinct entries of .*got \['prism', 'gradcam'\]"):
        PRISMMonitor(views=["prism", "gradcam"])
    with pytest.raises(ValueError, match=r"views must be distinct entries of .*got \['prism', 'prism'\]"):
        PRISMMonitor(views=["prism", "prism"])
    with pytest.raises(ValueError, match=r"views must be a non-empty list"):
        PRISMMonitor(views=[])
    with pytest.raises(ValueError, match=r"target must be one of \('prediction', 'label'\), got 'labels'"):
        PRISMMonitor(target="labels")
    with pytest.raises(ValueError, match=r"evolution_view must be one of views \['prism'\], got 'saliency'"):
        PRISMMonitor(evolution_view="saliency")
    with pytest.raises(ValueError, match=r"grad_cam_layer must be a module name, with 'grad_cam' in views"):
        PRISMMonitor(grad_cam_layer="model.6")


def test_an_unknown_grad_cam_layer_fails_at_setup(tmp_path):
    train, val = loaders()
    monitor = PRISMMonitor(views=["grad_cam"], grad_cam_layer="model.66")
    with pytest.raises(
        ValueError, match=r"'model.66' is not a module of TinyClassifier; nearest valid names"
    ):
        trainer(tmp_path, [monitor], max_epochs=1).fit(TinyClassifier(), train, val)
