"""The class prototypes view through a real Trainer: when it is logged, what it shows (against
class_prototypes() on the same model), the strip, and the model left exactly as found."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import decode, events, loaders, make_module_class, trainer

from lightning_prism import PRISMMonitor, class_prototypes
from lightning_prism.render import EvolutionHistory, _decode, caption_grid, denormalize, to_uint8

TinyClassifier = make_module_class(pl)
NAMES = ["vertical", "horizontal"]
STEPS = 8  # prototype steps: enough to test the mechanics quickly


def test_prototypes_every_n_epochs_and_before_training_are_class_prototypes_of_the_model(tmp_path):
    torch.manual_seed(0)
    module, (train, val) = TinyClassifier(lr=0.2), loaders()
    monitor = PRISMMonitor(
        num_images=4, views=["prism", "prototypes"], prototype_every_n_epochs=2, prototype_steps=STEPS,
        class_names=NAMES, knn_k=5,
    )  # fmt: skip
    t = trainer(tmp_path, [monitor], max_epochs=4)
    t.fit(module, train, val)
    acc = events(t.logger.log_dir)
    steps = [e.step for e in acc.Scalars("val_loss")]
    assert [e.step for e in acc.Images("prism/prototypes")] == [0, steps[1], steps[3]]  # before, epochs 1, 3
    # The last picture: class_prototypes() of the fitted model for the probe's classes, captioned with
    # each class's name and the probability the model gives its prototype.
    expected = class_prototypes(module, [0, 1], (32, 32), steps=STEPS)
    captions = [f"{NAMES[c]} {p:.2f}" for c, p in enumerate(expected.probabilities.tolist())]
    picture = caption_grid(expected.display, captions)
    np.testing.assert_allclose(decode(acc.Images("prism/prototypes")[-1]), picture, atol=1)


class Recorder(pl.Callback):
    """After the monitor (list order): every parameter's ``.grad`` and ``requires_grad``, the modules'
    ``training`` flags and the grad mode, as the monitor left them."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def _record(self, pl_module) -> None:
        self.seen.append(
            (
                [p.grad is None for p in pl_module.parameters()],
                [p.requires_grad for p in pl_module.parameters()],
                [m.training for m in pl_module.modules()],
                torch.is_grad_enabled(),
            )
        )

    def on_train_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._record(pl_module)


class FrozenBackbone(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        for layer in list(self.model)[:-1]:
            layer.requires_grad_(False)


def test_the_prototypes_leave_the_model_as_found(tmp_path):
    module, (train, val) = FrozenBackbone(), loaders()
    recorder = Recorder()
    monitor = PRISMMonitor(num_images=4, views=["prototypes"], prototype_steps=STEPS, knn_k=5, strict=True)
    trainer(tmp_path, [monitor, recorder], max_epochs=2, num_sanity_val_steps=0).fit(module, train, val)
    frozen = [p.requires_grad for p in module.parameters()]
    (before, *epochs) = recorder.seen
    assert all(before[0]) and before[1] == frozen and all(before[2]) and before[3]  # training, grads on
    for grads_none, requires_grad, training, grad_enabled in epochs:
        # validation's eval mode and no_grad, as Lightning set them; no .grad beyond training's own
        assert requires_grad == frozen and not any(training) and not grad_enabled
        assert [g for g, r in zip(grads_none, frozen, strict=True) if not r] == [True] * frozen.count(False)


def test_the_strip_can_show_the_prototypes_under_an_example_of_each_class(tmp_path):
    torch.manual_seed(0)
    module, (train, val) = TinyClassifier(), loaders()
    monitor = PRISMMonitor(
        num_images=4,
        views=["prism", "prototypes"],
        evolution_view="prototypes",
        prototype_steps=STEPS,
        knn_k=5,
    )
    trainer(tmp_path, [monitor], max_epochs=2).fit(module, train, val)
    history: EvolutionHistory = monitor._evolution
    assert history.labels == ["before", "epoch 0", "epoch 1"]
    probe = monitor._probe
    first = [int((probe.labels == c).nonzero()[0, 0]) for c in (0, 1)]  # the first probe image of each class
    inputs = history._thumbnails(to_uint8(denormalize(probe.images[first])))
    assert np.abs(_decode(history._inputs, 2).astype(float) - inputs).mean() < 3  # JPEG thumbnails
    last = history._thumbnails(to_uint8(class_prototypes(module, [0, 1], (32, 32), steps=STEPS).display))
    assert np.abs(_decode(history._rows[-1][2], 2).astype(float) - last).mean() < 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prototype_every_n_epochs": 0}, r"prototype_every_n_epochs must be an integer >= 1, got 0"),
        ({"prototype_steps": 0}, r"prototype_steps must be an integer >= 1, got 0"),
        ({"views": ["prism", "prototype"]}, r"views must be distinct entries of .*'prototypes'"),
    ],
)
def test_bad_prototype_options_are_construction_errors(options, message):
    with pytest.raises(ValueError, match=message):
        PRISMMonitor(**options)


def test_grey_probe_images_get_grey_prototypes(tmp_path):
    """Grey images shown as colour ones (every channel alike, as the fine-tuning example's digits): the
    prototypes are grey too, one channel optimised and shown in all three, as the model saw its data."""
    torch.manual_seed(0)
    train, val = loaders()
    for loader in (train, val):
        loader.dataset.images = loader.dataset.images[:, :1].expand(-1, 3, -1, -1).contiguous()
    module = TinyClassifier()
    monitor = PRISMMonitor(num_images=4, views=["prototypes"], prototype_steps=STEPS, knn_k=5, strict=True)
    t = trainer(tmp_path, [monitor], max_epochs=1)
    t.fit(module, train, val)
    picture = decode(events(t.logger.log_dir).Images("prism/prototypes")[-1]).astype(int)
    expected = class_prototypes(module, [0, 1], (32, 32), steps=STEPS, grey=True)
    assert torch.equal(expected.display[:, 0], expected.display[:, 2])
    tiles = picture[2 : 2 + 96]  # the tiles' row, above the captions: grey, every channel alike
    assert np.abs(tiles[..., 0] - tiles[..., 2]).max() <= 1
    np.testing.assert_allclose(
        picture,
        caption_grid(
            expected.display, [f"{c} {p:.2f}" for c, p in enumerate(expected.probabilities.tolist())]
        ),
        atol=1,
    )
