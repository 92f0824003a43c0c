"""lightning_prism.capture: the hook's lifecycle, what it keeps, and gathering across simulated ranks."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from conftest import hook_count, tiny_cnn
from lightning_prism.capture import FeatureCapture, gather
from lightning_prism.layout import FeatureLayout

CNN_FINAL = FeatureLayout("nchw", (8, 8))  # tiny_cnn's module '7' on 32×32 images


class TinyTokens(nn.Module):
    """A class token and 4×4 patch tokens ``(N, 1 + 16, C)``, a block, the class token's head."""

    def __init__(self, width: int = 12, num_classes: int = 3) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, width, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.block = nn.Sequential(nn.Linear(width, width), nn.GELU())
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.norm(self.block(tokens))[:, 0])


class SharedActivation(nn.Module):
    """One ReLU module run three times per forward: after the stem (16×16), after a middle convolution
    (8×8) and after the last convolution (8×8); only the last is the final feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.middle = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.last = nn.Conv2d(6, 10, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.act(self.middle(x))
        x = self.act(self.last(x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return tiny_cnn(num_classes=3).eval()


def batches(count: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 3, 32, 32, generator=generator) for _ in range(count)]


def validate(model: nn.Module, capture: FeatureCapture | None, data: list[torch.Tensor], labels=None):
    """A validation loop as Lightning runs it: eval, inference mode, ``take`` after each batch."""
    outputs = []
    with torch.inference_mode():
        for i, x in enumerate(data):
            outputs.append(model(x))
            if capture is not None:
                capture.take(None if labels is None else labels[i])
    return outputs


# ---------------------------------------------------------------------- the hook's lifecycle
def test_one_hook_while_attached_none_after(cnn):
    capture = FeatureCapture(cnn[7], CNN_FINAL)
    assert hook_count(cnn) == 0 and not capture.attached
    capture.attach()
    capture.attach()  # once only
    assert len(cnn[7]._forward_hooks) == 1 and hook_count(cnn) == 1 and capture.attached
    capture.remove()
    capture.remove()  # idempotent
    assert hook_count(cnn) == 0 and not capture.attached
    with FeatureCapture(cnn[8], CNN_FINAL, is_input=True) as pre:
        assert len(cnn[8]._forward_pre_hooks) == 1 and hook_count(cnn) == 1
        assert pre.attached
    assert hook_count(cnn) == 0


def test_exceptions_remove_the_hook(cnn):
    capture = FeatureCapture(cnn[7], CNN_FINAL)
    with pytest.raises(RuntimeError), capture:
        cnn(torch.rand(2, 5, 32, 32))  # the wrong number of channels: the forward raises
    assert hook_count(cnn) == 0
    with pytest.raises(KeyboardInterrupt), FeatureCapture(cnn[8], CNN_FINAL, is_input=True):
        raise KeyboardInterrupt
    assert hook_count(cnn) == 0
    capture.attach()
    validate(cnn, capture, batches(1, 2))
    capture.remove()
    assert capture._latest is None and hook_count(cnn) == 0  # no tensor kept beyond the epoch


# ---------------------------------------------------------------------- what it keeps
def test_pooled_features_and_labels_of_every_batch(cnn):
    data = batches(3, 4)
    labels = [torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 2, 2]), torch.tensor([0, 0, 1, 2])]
    capture = FeatureCapture(cnn[7], CNN_FINAL)
    with capture:
        validate(cnn, capture, data, labels)
    with torch.no_grad():
        expected = torch.cat([cnn[:8](x).mean(dim=(2, 3)) for x in data])
    assert capture.features.dtype == torch.float32 and capture.features.shape == (12, 32)
    torch.testing.assert_close(capture.features, expected, rtol=0, atol=1e-6)
    assert torch.equal(capture.labels, torch.cat(labels))
    assert len(capture) == 12 and not capture.full
    pre = FeatureCapture(cnn[8], CNN_FINAL, is_input=True)  # the same map, as the pooling's input
    with pre:
        validate(cnn, pre, data, labels)
    assert torch.equal(pre.features, capture.features)


def test_the_cap_keeps_the_first_samples_in_loader_order(cnn):
    data = batches(4, 4)
    capture = FeatureCapture(cnn[7], CNN_FINAL, max_samples=10)
    kept = []
    with capture, torch.inference_mode():
        for i, x in enumerate(data):
            cnn(x)
            kept.append(capture.take(torch.arange(4) + 4 * i))
            if i == 3:
                assert capture._latest is None  # a full capture keeps no reference
    assert kept == [4, 4, 2, 0] and capture.full
    assert capture.labels.tolist() == list(range(10))
    with torch.no_grad():
        expected = torch.cat([cnn[:8](x).mean(dim=(2, 3)) for x in data])[:10]
    torch.testing.assert_close(capture.features, expected, rtol=0, atol=1e-6)
    capture.reset()
    assert len(capture) == 0 and capture.features is None and capture.labels is None
    with capture:
        validate(cnn, capture, data[:1], [torch.arange(4)])  # the next epoch starts afresh
    assert capture.features.shape == (4, 32)


def test_labels_none_and_multi_hot(cnn):
    data = batches(2, 3)
    without = FeatureCapture(cnn[7], CNN_FINAL)
    with without:
        validate(cnn, without, data)
    assert without.labels is None and without.features.shape == (6, 32)
    mixed = FeatureCapture(cnn[7], CNN_FINAL)
    with mixed:
        validate(cnn, mixed, data, [torch.arange(3), None])
    assert mixed.labels is None and mixed.features.shape == (6, 32)  # one batch without: none
    hot = [
        torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]]),
        torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 0, 0]]),
    ]
    multi = FeatureCapture(cnn[7], CNN_FINAL)
    with multi:
        validate(cnn, multi, data, hot)
    assert torch.equal(multi.labels, torch.cat(hot))


def test_bad_labels_are_refused(cnn):
    capture = FeatureCapture(cnn[7], CNN_FINAL)
    with capture, torch.inference_mode():
        cnn(torch.rand(3, 3, 32, 32))
        with pytest.raises(ValueError, match=r"got labels of shape \(2,\) for a batch of 3 samples"):
            capture.take(torch.arange(2))
        cnn(torch.rand(3, 3, 32, 32))
        capture.take(torch.arange(3))
        cnn(torch.rand(3, 3, 32, 32))
        with pytest.raises(ValueError, match=r"labels of shape \(3, 2\) after labels of shape \(n, \)"):
            capture.take(torch.zeros(3, 2))
        with pytest.raises(TypeError, match="labels must be a tensor or None, got list"):
            capture.take([0, 1, 2])


def test_a_module_run_several_times_is_read_at_its_last_fitting_call():
    torch.manual_seed(0)
    model = SharedActivation().eval()
    data = batches(2, 3)
    capture = FeatureCapture(model.act, FeatureLayout("nchw", (8, 8)))
    with capture:
        validate(model, capture, data)
    with torch.no_grad():
        expected = torch.cat(
            [
                model.act(model.last(model.act(model.middle(model.act(model.stem(x)))))).mean(dim=(2, 3))
                for x in data
            ]
        )
    assert capture.features.shape == (6, 10)  # the last call (10 channels), not the middle one (6)
    torch.testing.assert_close(capture.features, expected, rtol=0, atol=1e-6)
    nothing = FeatureCapture(model.act, FeatureLayout("nchw", (5, 5)))  # no call fits
    with nothing, torch.inference_mode():
        model(data[0])
        assert nothing.take(torch.arange(3)) == 0
    assert nothing.features is None and nothing.labels is None


def test_tokens_are_pooled_without_the_prefix_tokens():
    torch.manual_seed(0)
    model = TinyTokens().eval()
    data = batches(2, 5)
    capture = FeatureCapture(model.norm, FeatureLayout("tokens", (4, 4), prefix=1))
    with capture:
        validate(model, capture, data)
    with torch.no_grad():
        expected = []
        for x in data:
            tokens = model.patches(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
            expected.append(model.norm(model.block(tokens))[:, 1:].mean(dim=1))
    torch.testing.assert_close(capture.features, torch.cat(expected), rtol=0, atol=1e-6)


def test_channels_last_maps_are_pooled_over_their_positions():
    model = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.Flatten(2))  # then (N, h, w, C) by hand

    class ChannelsLast(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 3, 1) * 2

    last = ChannelsLast()
    net = nn.Sequential(model[0], last)
    capture = FeatureCapture(last, FeatureLayout("nhwc", (6, 6)))
    x = torch.rand(3, 3, 6, 6)
    with capture, torch.inference_mode():
        net(x)
        capture.take()
    torch.testing.assert_close(
        capture.features, (model[0](x) * 2).mean(dim=(2, 3)).detach(), rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------------- the model is untouched
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "autocast"])
def test_outputs_are_bit_identical_with_and_without_the_capture(cnn, mode):
    data = batches(3, 4, seed=1)
    labels = [torch.arange(4) % 3] * 3

    def run(capture: FeatureCapture | None) -> list[torch.Tensor]:
        outputs = []
        context = {
            "inference_mode": torch.inference_mode,
            "no_grad": torch.no_grad,
            "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        }[mode]
        with context(), torch.no_grad():
            for x, y in zip(data, labels, strict=True):
                outputs.append(cnn(x))
                if capture is not None:
                    capture.take(y)
        return outputs

    plain = run(None)
    capture = FeatureCapture(cnn[7], CNN_FINAL)
    with capture:
        captured = run(capture)
    again = run(None)
    for a, b, c in zip(plain, captured, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert capture.features.dtype == torch.float32 and torch.isfinite(capture.features).all()
    if mode == "autocast":  # pooled in float32 from the bfloat16 map
        with torch.no_grad():
            reference = torch.cat([cnn[:8](x).mean(dim=(2, 3)) for x in data])
        torch.testing.assert_close(capture.features, reference, rtol=0.02, atol=0.02)


def test_refuses_what_it_cannot_use(cnn):
    with pytest.raises(TypeError, match=r"module must be an nn\.Module, got str"):
        FeatureCapture("7", CNN_FINAL)
    with pytest.raises(TypeError, match="layout must be a FeatureLayout, got tuple"):
        FeatureCapture(cnn[7], ("nchw", (8, 8)))
    with pytest.raises(ValueError, match="max_samples must be a positive integer, got 0"):
        FeatureCapture(cnn[7], CNN_FINAL, max_samples=0)


# ---------------------------------------------------------------------- gathering across ranks
def simulate(per_rank: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> list:
    """Run :func:`gather` on one thread per rank with a collective all_gather (every rank blocks until all
    have contributed; shapes must agree, as with torch.distributed), and return each rank's answer."""
    world = len(per_rank)
    barrier = threading.Barrier(world, timeout=10)  # a rank left waiting breaks it: no test hangs
    slots: list[torch.Tensor | None] = [None] * world
    answers: list = [None] * world

    def run(rank: int) -> None:
        def all_gather(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            shapes = {tuple(s.shape) for s in slots}
            assert len(shapes) == 1, f"all_gather of different shapes: {shapes}"
            out = torch.stack(list(slots))
            barrier.wait()
            return out

        try:
            answers[rank] = gather(*per_rank[rank], all_gather)
        except Exception as error:  # every rank must agree, also on errors (no rank left waiting)
            answers[rank] = error

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return answers


def test_gather_concatenates_unequal_counts_in_rank_order():
    features = [torch.randn(3, 4), torch.zeros(0, 4), torch.randn(5, 4)]
    labels = [torch.tensor([0, 1, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([3, 4, 5, 6, 7])]
    answers = simulate(list(zip(features, labels, strict=True)))
    for got_features, got_labels in answers:
        assert torch.equal(got_features, torch.cat(features))
        assert torch.equal(got_labels, torch.arange(8)) and got_labels.dtype == torch.long
    two = simulate([(features[0], None), (features[2], labels[2])])  # a rank without labels: none
    for got_features, got_labels in two:
        assert torch.equal(got_features, torch.cat([features[0], features[2]])) and got_labels is None


def test_gather_multi_hot_float_labels_and_a_rank_that_kept_nothing():
    hot = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]
    features = [torch.randn(2, 3), torch.randn(1, 3)]
    answers = simulate([(features[0], hot[0]), (None, None), (features[1], hot[1])])
    for got_features, got_labels in answers:
        assert torch.equal(got_features, torch.cat(features))
        assert torch.equal(got_labels, torch.cat(hot)) and got_labels.dtype == torch.float32
    assert simulate([(None, None), (None, None)]) == [(None, None), (None, None)]


def test_gather_refuses_ranks_that_disagree():
    answers = simulate([(torch.randn(2, 3), torch.tensor([0, 1])), (torch.randn(2, 3), torch.zeros(2, 4))])
    for answer in answers:
        assert isinstance(answer, ValueError) and "labels of different shapes per sample: [0, 4]" in str(
            answer
        )
    answers = simulate([(torch.randn(2, 3), None), (torch.randn(2, 5), None)])
    assert all(isinstance(a, ValueError) and "different widths: [3, 5]" in str(a) for a in answers)
    with pytest.raises(ValueError, match=r"got labels of shape \(3,\) for 2 samples"):
        gather(torch.randn(2, 3), torch.arange(3), lambda t: t[None])


def test_gather_with_one_process_as_lightning_hands_it():
    features, labels = torch.randn(4, 3), torch.arange(4)
    got_features, got_labels = gather(features, labels, lambda t: t)  # single device: t unchanged
    assert torch.equal(got_features, features) and torch.equal(got_labels, labels)
    with torch.inference_mode():
        inner = gather(features, labels, lambda t: t)
    assert torch.equal(inner[0], features)
