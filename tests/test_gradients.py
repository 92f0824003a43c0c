from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import PHOTOS, assert_valid_maps, hook_count, tiny_cnn
from lightning_prism import GradCAMResult, SaliencyResult, grad_cam, gradients, prism, saliency
from lightning_prism.gradients import _grad_cam, _prism_and_grad_cam, normalise_maps, prism_and_grad_cam


# ---------------------------------------------------------------- independent float64 references
def float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max, image by image; a constant map gives zeros."""
    out = torch.zeros_like(maps)
    for i in range(maps.shape[0]):
        lo, hi = maps[i].min(), maps[i].max()
        if hi > lo:
            out[i] = (maps[i] - lo) / (hi - lo)
    return out


def reference_grad_cam(head, activation: torch.Tensor, targets, size):
    """Grad-CAM from a float64 feature map ``activation`` (made a leaf here) and the function ``head``
    from it to the scores: one backward per image, the weighted sum written out channel by channel."""
    a = activation.detach().clone().requires_grad_()
    scores = head(a)
    n, c, h, w = a.shape
    gradient = torch.zeros_like(a)
    for i in range(n):
        (g,) = torch.autograd.grad(scores[i, int(targets[i])], a, retain_graph=True)
        gradient[i] = g[i]
    alpha = gradient.sum(dim=(2, 3)) / (h * w)
    weighted = torch.zeros(n, 1, h, w, dtype=torch.float64)
    for k in range(c):
        weighted[:, 0] += alpha[:, k, None, None] * a[:, k].detach()
    cams = torch.where(weighted > 0, weighted, torch.zeros_like(weighted))
    maps = min_max(F.interpolate(cams, size=size, mode="bilinear", align_corners=False))
    return alpha, cams, maps


def reference_tiny_cnn_grad_cam(model: nn.Sequential, images, targets, split: int):
    """Grad-CAM of ``tiny_cnn`` at the output of ``model[split - 1]``."""
    net = float64_copy(model)
    with torch.no_grad():
        activation = net[:split](images.double())
    return reference_grad_cam(net[split:], activation, targets, images.shape[-2:])


class GuidedReLUReference(nn.Module):
    """ReLU whose output gradient is clamped at zero by a tensor hook before ReLU's own backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(x)
        if out.requires_grad:
            out.register_hook(lambda g: g.clamp(min=0))
        return out


def reference_saliency(model: nn.Module, images, targets, guided: bool = False):
    """d y_c / d x per image in float64 (with every nn.ReLU module replaced for guided backprop)."""
    net = float64_copy(model)
    if guided:
        for parent in list(net.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(parent, name, GuidedReLUReference())
    x = images.double().clone().requires_grad_()
    scores = net(x)
    gradients = torch.zeros_like(x)
    for i in range(x.shape[0]):
        (g,) = torch.autograd.grad(scores[i, int(targets[i])], x, retain_graph=True)
        gradients[i] = g[i]
    return gradients, min_max(gradients.abs().amax(dim=1, keepdim=True))


# -------------------------------------------------------------------------------- grad-cam maths
@pytest.mark.parametrize(
    ("layer", "split"), [(None, 8), ("7", 8), ("4", 5), ("5", 6)]
)  # discovered final map; named: the same, an earlier ReLU, a max-pool
@pytest.mark.parametrize("targets", [None, 2, [0, 2, 1]])
def test_grad_cam_matches_independent_float64_computation(layer, split, targets, seeded):
    model, images = tiny_cnn(), torch.rand(3, 3, 32, 32)
    result = grad_cam(model, images, targets=targets, layer=layer)
    with torch.no_grad():
        predicted = float64_copy(model)(images.double()).argmax(1)
    expected_targets = predicted if targets is None else torch.tensor(targets).expand(3)
    alpha, cams, maps = reference_tiny_cnn_grad_cam(model, images, expected_targets, split)
    assert isinstance(result, GradCAMResult)
    assert result.targets.dtype == torch.long and result.targets.tolist() == expected_targets.tolist()
    assert result.layer == (layer or "7")
    torch.testing.assert_close(result.alpha.double(), alpha, rtol=1e-4, atol=1e-7)
    assert result.cams.dtype == torch.float32 and result.cams.shape == cams.shape
    torch.testing.assert_close(result.cams.double(), cams, rtol=1e-4, atol=1e-6)
    assert_valid_maps(result.maps, (3, 1, 32, 32))
    torch.testing.assert_close(result.maps.double(), maps, rtol=0, atol=1e-4)
    assert result.output.shape == (3, 3) and not result.output.requires_grad


class GapLinear(nn.Module):
    """A CAM network (Zhou et al.): convolutions, global average pooling, one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_cam_equals_grad_cam_up_to_a_positive_factor_for_gap_and_linear(seeded):
    model, images, targets = GapLinear().eval(), torch.rand(4, 3, 24, 20), [0, 1, 4, 4]
    result = grad_cam(model, images, targets=targets)
    with torch.no_grad():
        a = model.features(images)  # (4, 16, 12, 10)
    # CAM: the class's fc weights on the channels of the last convolutional map, no gradient at all.
    cam = torch.einsum("nk,nkhw->nhw", model.fc.weight[targets], a).unsqueeze(1)
    h, w = a.shape[-2:]
    assert result.layer == "features"
    torch.testing.assert_close(result.cams * (h * w), cam.clamp(min=0), rtol=1e-5, atol=1e-5)
    upsampled = F.interpolate(cam.clamp(min=0), size=(24, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(result.maps, min_max(upsampled), rtol=0, atol=1e-5)
    # A class that every channel votes against: ReLU leaves a constant map, which gives zeros.
    with torch.no_grad():
        model.fc.weight[3] = -model.fc.weight[3].abs()
    against = grad_cam(model, images, targets=3)
    assert torch.equal(against.cams, torch.zeros_like(against.cams))
    assert torch.equal(against.maps, torch.zeros_like(against.maps))


def test_normalise_maps_resizes_then_scales_each_map_and_zeros_constant_ones():
    maps = torch.rand(3, 1, 5, 4)
    maps[1] = 0.1
    maps[2] = 0.3
    maps[2, 0, 0, 0] = float(np.nextafter(np.float32(0.3), np.float32(1)))  # constant but for one step
    out = normalise_maps(maps, (10, 7))
    upsampled = F.interpolate(maps.double(), size=(10, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[0].double(), min_max(upsampled[:1])[0], rtol=0, atol=1e-6)
    assert out.dtype == torch.float32 and torch.equal(out[1:], torch.zeros(2, 1, 10, 7))


class InplaceTail(nn.Module):
    """Like DenseNet: the last module's output is modified by a functional in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
        self.features[4].running_mean.normal_()
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


def test_a_map_modified_in_place_after_the_layer_is_taken_as_it_is_after_the_forward(seeded):
    model, images = InplaceTail().eval(), torch.rand(3, 3, 16, 16)
    result = grad_cam(model, images, targets=[0, 1, 2])
    net = float64_copy(model)
    with torch.no_grad():
        a = torch.relu(net.features(images.double()))  # the map after the in-place ReLU

    def head(a: torch.Tensor) -> torch.Tensor:
        return net.classifier(a.mean(dim=(2, 3)))

    alpha, cams, maps = reference_grad_cam(head, a, [0, 1, 2], (16, 16))
    assert result.layer == "features"
    torch.testing.assert_close(result.alpha.double(), alpha, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.cams.double(), cams, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.maps.double(), maps, rtol=0, atol=1e-4)


class Twice(nn.Module):
    """`body` runs twice; its second output is the final feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.body(self.pool(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("layer", [None, "body", "body.0"])
def test_a_layer_that_runs_twice_gives_its_last_output(layer, seeded):
    model, images = Twice().eval(), torch.rand(2, 3, 16, 16)
    result = grad_cam(model, images, targets=[1, 2], layer=layer)
    net = float64_copy(model)
    with torch.no_grad():
        once = net.body(net.pool(net.stem(images.double())))
        a = net.body(once) if layer != "body.0" else net.body[0](once)

    def head(a: torch.Tensor) -> torch.Tensor:
        return net.fc((a if layer != "body.0" else torch.relu(a)).mean(dim=(2, 3)))

    alpha, cams, maps = reference_grad_cam(head, a, [1, 2], (16, 16))
    assert result.layer == (layer or "body")
    torch.testing.assert_close(result.alpha.double(), alpha, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.cams.double(), cams, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.maps.double(), maps, rtol=0, atol=1e-4)


class SavedTensors:
    """Counts, with weak references, the tensors autograd has saved and still holds."""

    def __init__(self) -> None:
        self.alive: weakref.WeakSet[SavedTensors.Saved] = weakref.WeakSet()

    class Saved:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t.detach()  # no reference to its grad_fn, which holds this object

    def pack(self, t: torch.Tensor) -> SavedTensors.Saved:
        saved = SavedTensors.Saved(t)
        self.alive.add(saved)
        return saved

    @staticmethod
    def unpack(saved: SavedTensors.Saved) -> torch.Tensor:
        return saved.t

    def spatial_sizes(self) -> set[tuple[int, ...]]:
        return {tuple(s.t.shape[-2:]) for s in self.alive if s.t.ndim == 4}


@pytest.mark.parametrize("layer", [None, "7", "6"])
def test_the_forward_keeps_no_graph_of_the_layers_before_the_feature_map(layer, seeded):
    """When the last convolution and the head run, autograd holds no tensor of the 32×32 and 16×16
    layers (the map is 8×8); a forward with gradients on would hold them all."""
    model, images = tiny_cnn(), torch.rand(2, 3, 32, 32)
    saved = SavedTensors()
    at_head: list[set[tuple[int, ...]]] = []  # as the last convolution and as the linear layer start
    handles = [
        model[i].register_forward_pre_hook(lambda m, args: at_head.append(saved.spatial_sizes()))
        for i in (6, 10)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            grad_cam(model, images, layer=layer)
            with torch.enable_grad():
                model(images)  # the positive control
    finally:
        for handle in handles:
            handle.remove()
    assert at_head[0] <= {(8, 8), (1, 1)} and at_head[1] <= {(8, 8), (1, 1)}
    assert {(32, 32), (16, 16)} <= at_head[2] and {(32, 32), (16, 16)} <= at_head[3]


class AvgPoolHead(nn.Module):
    """Its head pools the 8×8 map to 1×1 with an nn.AvgPool2d."""

    def __init__(self) -> None:
        super().__init__()
        self.features = tiny_cnn()[:8]
        self.pool = nn.AvgPool2d(8)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class PooledGate(nn.Module):
    """Before its final map, a gate pools a map to 1×1 with an nn.AvgPool2d."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.AvgPool2d(16)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.body(x * torch.sigmoid(self.gate(x)))
        return self.fc(x.mean(dim=(2, 3)))


def forwards_of(model: nn.Module, images: torch.Tensor, **kwargs):
    """``grad_cam(model, images, **kwargs)`` and how many forwards of ``model`` it ran."""
    return counted(model, lambda: grad_cam(model, images, **kwargs))


def counted(model: nn.Module, run):
    """``run()``'s result and how many forwards of ``model`` it ran."""
    forwards: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: forwards.append(1))
    try:
        return run(), len(forwards)
    finally:
        handle.remove()


def test_one_forward_whatever_pools_the_map(seeded):
    assert forwards_of(PooledGate().eval(), torch.rand(2, 3, 16, 16))[1] == 1  # a 1×1 pooling before the map
    model, images = AvgPoolHead().eval(), torch.rand(2, 3, 32, 32)
    result, forwards = forwards_of(model, images, targets=[0, 2])
    net = float64_copy(model)
    with torch.no_grad():
        a = net.features(images.double())
    alpha, cams, _ = reference_grad_cam(lambda a: net.fc(net.pool(a).flatten(1)), a, [0, 2], (32, 32))
    assert result.layer == "features" and forwards == 1
    torch.testing.assert_close(result.alpha.double(), alpha, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.cams.double(), cams, rtol=1e-4, atol=1e-6)
    assert hook_count(model) == 0


# -------------------------------------------------------------------------------- saliency maths
class MixedActivations(nn.Module):
    """An in-place nn.ReLU used twice, a functional ReLU and a ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act6 = nn.ReLU6()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.act6(4 * F.relu(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("make", [tiny_cnn, MixedActivations])
def test_saliency_matches_independent_float64_computation(make, guided, seeded):
    model, images, targets = make().eval(), torch.rand(3, 3, 16, 16), [2, 0, 1]
    result = saliency(model, images, targets=targets, guided=guided)
    gradients, maps = reference_saliency(model, images, targets, guided=guided)
    assert isinstance(result, SaliencyResult)
    assert result.gradients.dtype == torch.float32 and result.gradients.is_contiguous()
    torch.testing.assert_close(result.gradients.double(), gradients, rtol=1e-4, atol=1e-8)
    assert_valid_maps(result.maps, (3, 1, 16, 16))
    torch.testing.assert_close(result.maps.double(), maps, rtol=0, atol=1e-4)
    assert result.targets.tolist() == targets


def test_guided_backpropagation_differs_from_the_gradient_only_through_relu_modules(seeded):
    model, images = MixedActivations().eval(), torch.rand(2, 3, 16, 16)
    plain, guided = saliency(model, images, targets=1), saliency(model, images, targets=1, guided=True)
    assert not torch.allclose(plain.gradients, guided.gradients)
    model.relu = nn.LeakyReLU(0.0, inplace=True)  # the same function, but not an nn.ReLU: not guided
    with pytest.warns(UserWarning, match=r"MixedActivations has no nn.ReLU module"):
        unguided = saliency(model, images, targets=1, guided=True)
    torch.testing.assert_close(unguided.gradients, plain.gradients)


class Flattening(nn.Module):
    """Views its input as rows: a channels-last input cannot be viewed so."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.shape[0], -1))


@pytest.mark.parametrize(
    ("make", "memory_format"),
    [
        (tiny_cnn, torch.contiguous_format),
        (tiny_cnn, torch.channels_last),
        (Flattening, torch.contiguous_format),
    ],
)
def test_saliency_in_either_input_layout_and_for_a_model_that_views_its_input(make, memory_format, seeded):
    model, images = make().eval(), torch.rand(2, 3, 8, 8)
    result = saliency(model, images.contiguous(memory_format=memory_format), targets=[0, 1])
    torch.testing.assert_close(
        result.gradients.double(), reference_saliency(model, images, [0, 1])[0], rtol=1e-4, atol=1e-8
    )


# ---------------------------------------------------------------------- any model, any caller
METHODS = {
    "grad_cam": grad_cam,
    "saliency": saliency,
    "guided": lambda model, images, **kwargs: saliency(model, images, guided=True, **kwargs),
}


def values(result) -> torch.Tensor:
    return result.cams if isinstance(result, GradCAMResult) else result.gradients


ARCHITECTURES = {
    "resnet18": {},
    "vgg11": {},
    "googlenet": {"aux_logits": False, "init_weights": False},
    "densenet121": {},
    "mobilenet_v3_small": {},
    "efficientnet_b0": {},
    "convnext_tiny": {},
}


def test_identity_placeholders_are_never_the_layer(seeded):
    model = nn.Sequential(*tiny_cnn()[:8], nn.Identity(), *tiny_cnn()[8:])  # as `model.head = Identity()`
    images = torch.rand(2, 3, 32, 32)
    assert grad_cam(model, images).layer == prism(model, images).final_layer == "7"
    assert grad_cam(model, images, layer="8").layer == "8"  # named, it is used


def test_a_named_identity_layer_keeps_its_path_to_the_score(seeded):
    """An nn.Identity named as the layer (a placeholder that ends a container): its output is the
    container's too, which must not be cut off again behind it."""
    model = nn.Sequential(nn.Sequential(*tiny_cnn()[:8], nn.Identity()), *tiny_cnn()[8:]).eval()
    images = torch.rand(2, 3, 32, 32)
    named = grad_cam(model, images, targets=[0, 1], layer="0.8")
    assert named.layer == "0.8"
    torch.testing.assert_close(named.cams, grad_cam(model, images, targets=[0, 1], layer="0.7").cams)
    assert hook_count(model) == 0


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_torchvision_architectures_default_to_prisms_final_feature_map(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=7, **ARCHITECTURES[name]).train()
    images = torch.rand(2, 3, 64, 80)
    result = grad_cam(model, images)
    assert result.layer == prism(model, images).final_layer
    assert_valid_maps(result.maps, (2, 1, 64, 80))
    assert result.cams.min() >= 0 and result.alpha.shape[0] == 2
    assert saliency(model, images).gradients.abs().sum() > 0
    assert all(m.training for m in model.modules()) and hook_count(model) == 0


def test_state_is_left_exactly_as_found():
    model = tiny_cnn().train()
    model[3].eval()
    model[0].requires_grad_(False)
    sentinel = torch.full_like(model[6].weight, 7.0)
    model[6].weight.grad = sentinel
    flags = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    copy_of_images = images.detach().clone()
    for method in METHODS.values():
        method(model, images)
        assert [m.training for m in model.modules()] == flags
        assert [p.requires_grad for p in model.parameters()] == requires
        assert model[6].weight.grad is sentinel and torch.equal(sentinel, torch.full_like(sentinel, 7.0))
        assert all(p.grad is None for n, p in model.named_parameters() if n != "6.weight")
        assert images.requires_grad and images.grad is None and torch.equal(images, copy_of_images)
        assert hook_count(model) == 0 and torch.is_grad_enabled()
        assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training  # the forward runs in eval mode
        self.relu(self.conv(x))
        raise RuntimeError("boom")


@pytest.mark.parametrize("method", list(METHODS))
def test_hooks_removed_and_state_restored_after_an_exception(method):
    model = Exploding().train()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"boom"):
        METHODS[method](model, torch.rand(1, 3, 8, 8))
    assert hook_count(model) == 0 and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("method", list(METHODS))
def test_under_no_grad_inference_mode_and_autocast(method, seeded):
    model, images, run = tiny_cnn(), torch.rand(2, 3, 32, 32), METHODS[method]
    first = run(model, images)
    expected = values(first)
    with torch.no_grad():
        torch.testing.assert_close(values(run(model, images)), expected)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        inference_images = images.clone()  # inference tensors, as Lightning's validate() hands out
        result = run(model, inference_images, targets=first.targets.clone())
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    torch.testing.assert_close(values(result), expected)
    assert not any(t.is_inference() for t in (values(result), result.maps, result.targets, result.output))
    assert_valid_maps(result.maps, (2, 1, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run(model, images)
        assert torch.is_autocast_enabled("cpu")
    assert values(low).dtype == torch.float32 and low.maps.dtype == torch.float32
    assert_valid_maps(low.maps, (2, 1, 32, 32))
    correlation = torch.corrcoef(torch.stack([low.maps.flatten(), run(model, images).maps.flatten()]))[0, 1]
    assert correlation > 0.9


@pytest.mark.parametrize("method", list(METHODS))
def test_frozen_parameters(method, seeded):
    model, images = tiny_cnn(), torch.rand(2, 3, 32, 32)
    expected = METHODS[method](model, images, targets=[0, 1])
    model.requires_grad_(False)
    frozen = METHODS[method](model, images, targets=[0, 1])
    torch.testing.assert_close(values(frozen), values(expected))
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


class BackboneUnderNoGrad(nn.Module):
    """A frozen feature extractor run under torch.no_grad() in the forward, as in Lightning's
    transfer-learning guide."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        self.backbone, self.head = model[:9], model[9:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_backbone_run_under_no_grad_in_the_forward(method, seeded):
    model, images = tiny_cnn(), torch.rand(2, 3, 32, 32)
    expected = METHODS[method](model, images, targets=[2, 0])
    result = METHODS[method](BackboneUnderNoGrad(model), images, targets=[2, 0])
    torch.testing.assert_close(values(result), values(expected))
    if method == "grad_cam":
        assert result.layer == "backbone.7"


@pytest.mark.parametrize(
    "as_given", [1, [1, 1], (1, 1), np.array([1, 1]), torch.tensor(1), torch.tensor([1, 1])]
)
def test_targets_in_every_form(as_given, seeded):
    model, images = tiny_cnn(), torch.rand(2, 3, 32, 32)
    for method in METHODS.values():
        result = method(model, images, targets=as_given)
        assert result.targets.dtype == torch.long and result.targets.tolist() == [1, 1]


def test_user_hooks_wrappers_and_data_parallel(seeded):
    model, images = tiny_cnn(), torch.rand(2, 3, 32, 32)
    plain = grad_cam(model, images, targets=[0, 1])
    own = model[6].forward
    model[6].forward = own  # a forward already set on the instance is put back
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)  # hooks everywhere
    try:
        torch.testing.assert_close(grad_cam(model, images, targets=[0, 1]).cams, plain.cams)
        torch.testing.assert_close(saliency(model, images).gradients, saliency(model, images).gradients)
    finally:
        handle.remove()
    assert vars(model[6])["forward"] is own
    # The module's own hook shifts what flows on: Grad-CAM sees the shifted map.
    net = float64_copy(model)
    with torch.no_grad():
        shifted = net[:8](images.double()) + 1
    shifting = model[7].register_forward_hook(lambda module, args, output: output + 1)
    _, cams, _ = reference_grad_cam(net[8:], shifted, [0, 1], (32, 32))
    torch.testing.assert_close(grad_cam(model, images, targets=[0, 1]).cams.double(), cams)
    shifting.remove()
    parallel = nn.DataParallel(model)  # run without the wrapper; names as the wrapper's
    result = grad_cam(parallel, images, targets=[0, 1])
    assert result.layer == "module.7"
    torch.testing.assert_close(result.cams, plain.cams)
    assert grad_cam(parallel, images, layer="module.4").layer == "module.4"
    assert hook_count(model) == 1  # the instance forward set above, nothing of ours


# ----------------------------------------------------------------------------------- bad input
class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()
        self.spare = nn.Conv2d(3, 3, 1)  # never runs
        self.side = nn.Conv2d(3, 3, 1)  # runs, but the scores do not depend on it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.side(x)
        return self.net(x)


@pytest.mark.filterwarnings("ignore:Conv2d has no nn.ReLU module")
def test_bad_arguments_are_clear_errors():
    model, images = tiny_cnn(), torch.rand(2, 3, 32, 32)
    for method in METHODS.values():
        with pytest.raises(
            ValueError, match=r"targets must hold one class per image \(2\), got shape \(3,\)"
        ):
            method(model, images, targets=[0, 1, 2])
        with pytest.raises(ValueError, match=r"targets must be class indices below 3 .*got \[1, 3\]"):
            method(model, images, targets=[1, 3])
        with pytest.raises(ValueError, match=r"targets must be class indices >= 0, got \[-1, -1\]"):
            method(model, images, targets=-1)
        with pytest.raises(TypeError, match=r"targets must be integer class indices, got a torch.float32"):
            method(model, images, targets=torch.tensor([0.0, 1.0]))
        with pytest.raises(TypeError, match=r"targets must be class indices .*got True"):
            method(model, images, targets=True)
        with pytest.raises(TypeError, match=r"targets must be class indices .*got 'cat'"):
            method(model, images, targets="cat")
        with pytest.raises(ValueError, match=r"images must be a non-empty \(N, C, H, W\) batch, got shape"):
            method(model, images[0])
        with pytest.raises(TypeError, match=r"images must be a floating-point tensor, got a torch.uint8"):
            method(model, images.to(torch.uint8))
        with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function"):
            method(lambda x: x, images)
        with pytest.raises(
            ValueError,
            match=r"must return class scores .*\(N, num_classes\) or a single logit .*\(2, 3, 32, 32\)",
        ):
            method(nn.Conv2d(3, 3, 1), images)
    with pytest.raises(TypeError, match=r"guided must be a bool, got 'yes'"):
        saliency(model, images, guided="yes")
    with pytest.raises(ValueError, match=r"'6.weight' is not a module of Sequential; nearest valid names"):
        grad_cam(model, images, layer="6.weight")
    with pytest.raises(TypeError, match=r"layer must be a module name \(str\), got Conv2d"):
        grad_cam(model, images, layer=model[6])
    with pytest.raises(
        ValueError, match=r"layer '10' produced shape \(2, 3\), which is no feature map larger than 1×1"
    ):
        grad_cam(model, images, layer="10")
    with pytest.raises(ValueError, match=r"layer 'spare' did not run"):
        grad_cam(Unused(), images, layer="spare")
    with pytest.raises(
        ValueError, match=r"the class scores do not depend on the final feature map of layer 'side'"
    ):
        grad_cam(Unused(), images, layer="side")
    with pytest.raises(ValueError, match=r"no module of Sequential produced a feature map larger than 1×1"):
        grad_cam(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), images)
    model[0].bias.data[0] = float("nan")
    for method in METHODS.values():
        with pytest.raises(
            ValueError, match=r"the model's scores of the target classes are not finite \(images \[0, 1\]\)"
        ):
            method(model, images, targets=0)
    assert hook_count(model) == 0


class Corner(nn.Module):
    """Scores from the top-left pixel of the feature map only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x)[:, :, 0, 0])


def test_a_feature_map_that_is_not_finite_where_the_scores_do_not_look():
    images = torch.rand(2, 3, 8, 8)
    images[:, :, -1, -1] = float("nan")
    with pytest.raises(ValueError, match=r"the feature map of layer 'conv' or its gradient is not finite"):
        grad_cam(Corner(), images)
    assert torch.isfinite(saliency(Corner(), images).gradients).all()  # a gradient that is finite is fine


# ----------------------------------------------------------------------------- the real thing
def test_lite0_grad_cam_of_the_predicted_class_lies_on_the_object(lite0, photos):
    """ImageNet-pretrained EfficientNet-Lite0 on the cat and rocket photos: the map is on the object
    and follows it when the photo is mirrored."""
    images = (photos - 0.5) / 0.5
    result = grad_cam(lite0, torch.cat([images, images.flip(-1)]))
    assert result.layer == "_swish"  # runs twice, after the stem and after the head: the 7×7 map
    assert result.cams.shape[-2:] == (7, 7)
    assert result.targets[:4].tolist() == [285, 967, 450, 657]  # Egyptian cat, espresso, bobsled, missile
    maps = result.maps[:, 0]
    # (x0, x1, y0, y1) of 224×224: the cat's face (eyes, nose, cheeks); the rocket on its pad.
    boxes = {"chelsea": (30, 210, 40, 210), "rocket": (70, 160, 20, 224)}
    for name, (x0, x1, y0, y1) in boxes.items():
        i = PHOTOS.index(name)
        inside = torch.zeros(224, 224, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert maps[i][inside].mean() > 2 * maps[i][~inside].mean(), name
        assert inside.flatten()[maps[i].argmax()], name
        mirrored_back = maps[len(PHOTOS) + i].flip(-1)
        assert torch.corrcoef(torch.stack([maps[i].flatten(), mirrored_back.flatten()]))[0, 1] > 0.9, name


# ------------------------------------------------------------- cross-checks with other libraries
@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
def test_agrees_with_pytorch_grad_cam_and_captum(seeded):
    """The optional ``bench`` extra's libraries, where installed, compute the same gradients."""
    captum_attr = pytest.importorskip("captum.attr")
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    model, images, targets = tiny_cnn().eval(), torch.rand(2, 3, 32, 32), [1, 2]
    ours = saliency(model, images, targets=targets)
    theirs = captum_attr.Saliency(model).attribute(images.clone().requires_grad_(), target=targets, abs=False)
    torch.testing.assert_close(ours.gradients, theirs)
    guided = captum_attr.GuidedBackprop(model).attribute(images.clone().requires_grad_(), target=targets)
    torch.testing.assert_close(saliency(model, images, targets=targets, guided=True).gradients, guided)

    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with pytorch_grad_cam.GradCAM(model, target_layers=[model[7]]) as method:
        reference = method(images, targets=[ClassifierOutputTarget(t) for t in targets])
    # Their maps: ReLU(cam), resized with OpenCV, then (cam - min) / (1e-7 + max).
    result = grad_cam(model, images, targets=targets)
    correlation = np.corrcoef(result.maps[:, 0].flatten().numpy(), reference.flatten())[0, 1]
    assert correlation > 0.99


# ------------------------------------------------------------ token and channels-last feature maps
class TinyViT(nn.Module):
    """Patch embedding, a class token, two encoder blocks, a final norm, the class token's head."""

    def __init__(self, dim: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(
            *[nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch(x).flatten(2).transpose(1, 2)
        return self.blocks(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.tokens(x))[:, 0])


class ChannelsLastNet(nn.Module):
    """A Swin-like network whose maps are (N, h, w, C): patchify, an MLP block, a norm, mean pooling."""

    def __init__(self, dim: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.block = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).permute(0, 2, 3, 1)
        return x + self.block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)).mean(dim=(1, 2)))


def test_grad_cam_of_a_vision_transformer_is_on_the_patch_grid_of_its_final_tokens(seeded):
    model, images = TinyViT().eval(), torch.rand(3, 3, 32, 48)  # a 4×6 patch grid, non-square
    with pytest.warns(
        UserWarning, match=r"Grad-CAM of layer 'norm' is zero for every image.*blocks.<last>.norm1"
    ):
        result = grad_cam(model, images, targets=[0, 1, 3])
    net = float64_copy(model)
    with torch.no_grad():
        tokens = net.norm(net.tokens(images.double()))

    def head(patches: torch.Tensor) -> torch.Tensor:  # the patch grid back to tokens, then the head
        sequence = torch.cat([tokens[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)
        return net.head(sequence[:, 0])

    # The class token alone reaches the head: the patch tokens' gradient is zero, and so is Grad-CAM.
    grid = tokens[:, 1:].transpose(1, 2).reshape(3, 16, 4, 6)
    alpha, cams, _ = reference_grad_cam(head, grid, [0, 1, 3], (32, 48))
    assert result.layer == "norm" and result.cams.shape == (3, 1, 4, 6)
    torch.testing.assert_close(result.alpha.double(), alpha, atol=1e-7, rtol=0)
    torch.testing.assert_close(result.cams.double(), cams, atol=1e-7, rtol=0)


def test_grad_cam_through_attention_to_the_patch_tokens_matches_float64(seeded):
    """Taken at the last block's output, the class token's score depends on every patch token through
    the final norm and the class token's attention: an independent float64 backward per image."""
    model, images = TinyViT().eval(), torch.rand(2, 3, 32, 32)
    result = grad_cam(model, images, layer="blocks.0")
    net = float64_copy(model)
    x = images.double()
    with torch.no_grad():
        patches = net.patch(x).flatten(2).transpose(1, 2)
        first = net.blocks[0](torch.cat([net.cls_token.expand(2, -1, -1), patches], dim=1))

    def head(grid: torch.Tensor) -> torch.Tensor:
        sequence = torch.cat([first[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        return net.head(net.norm(net.blocks[1](sequence))[:, 0])

    predicted = net(x).argmax(1)
    alpha, cams, maps = reference_grad_cam(
        head, first[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4), predicted, (32, 32)
    )
    assert result.layer == "blocks.0" and result.targets.tolist() == predicted.tolist()
    torch.testing.assert_close(result.alpha.double(), alpha, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.cams.double(), cams, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.maps.double(), maps, rtol=0, atol=1e-4)


def test_grad_cam_of_a_channels_last_map_matches_float64(seeded):
    model, images = ChannelsLastNet().eval(), torch.rand(2, 3, 32, 32)
    result = grad_cam(model, images, targets=[2, 0])
    net = float64_copy(model)
    with torch.no_grad():
        final = net.norm(net.features(images.double())).permute(0, 3, 1, 2)  # (N, C, 8, 8)
    alpha, cams, maps = reference_grad_cam(
        lambda a: net.head(a.permute(0, 2, 3, 1).mean(dim=(1, 2))), final, [2, 0], (32, 32)
    )
    assert result.layer == "norm" and result.cams.shape == (2, 1, 8, 8)
    torch.testing.assert_close(result.alpha.double(), alpha, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.cams.double(), cams, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.maps.double(), maps, rtol=0, atol=1e-4)


class ClassScoreConv(nn.Module):
    """SqueezeNet's head: the final map goes through a 1×1 class-score convolution, a ReLU and global
    pooling; PRISM's final map is the one entering that convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Conv2d(8, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_a_final_map_followed_by_more_maps_in_the_head_keeps_its_path_to_the_score(seeded):
    model, images = ClassScoreConv().eval(), torch.rand(3, 3, 16, 16)
    images[:, 0] += 0.5  # positive class scores, so the ReLU of the scores passes gradient
    result = grad_cam(model, images)
    assert result.layer == prism(model, images).final_layer == "features"
    net = float64_copy(model)
    with torch.no_grad():
        activation = net.features(images.double())
        predicted = net(images.double()).argmax(1)
    alpha, cams, _ = reference_grad_cam(net.classifier, activation, predicted, (16, 16))
    assert alpha.abs().sum() > 0  # the check has something to compare
    torch.testing.assert_close(result.alpha.double(), alpha, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.cams.double(), cams, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_cnn, TinyViT, ChannelsLastNet, ClassScoreConv])
def test_prism_and_grad_cam_from_one_forward_equal_the_two_functions(make, seeded):
    model, images = make().eval(), torch.rand(4, 3, 32, 32)
    reference = prism(model, images).components.flip(1)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        p, g = prism_and_grad_cam(model, images, targets=[0, 1, 2, 0], basis="aligned", reference=reference)
    finally:
        handle.remove()
    # One forward; a second only where maps are made after the final one (the class-score convolution).
    assert len(calls) == (2 if make is ClassScoreConv else 1)
    expected_p = prism(model, images, basis="aligned", reference=reference)
    expected_g = grad_cam(model, images, targets=[0, 1, 2, 0])
    assert p.final_layer == expected_p.final_layer == g.layer == expected_g.layer
    assert p.stage_layers == expected_p.stage_layers
    torch.testing.assert_close(p.maps, expected_p.maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(p.components, expected_p.components)
    torch.testing.assert_close(g.cams, expected_g.cams)
    torch.testing.assert_close(g.maps, expected_g.maps)
    assert not p.final.requires_grad and not p.maps.requires_grad and not g.maps.requires_grad
    assert hook_count(model) == 0


def test_grad_cam_holds_no_more_activations_than_prism_while_the_head_runs(seeded):
    """Every graph root keeps its activation alive through its autograd node: the forward must not hold
    on to the roots it made, only to the last one (a list of them kept ResNet-50's whole forward)."""
    model = torchvision.models.resnet18(num_classes=4).eval()
    images = torch.rand(2, 3, 64, 64)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), images]}

    def alive_bytes() -> int:  # activations reachable from Python while the classifier starts
        storages = {}
        for o in gc.get_objects():
            # plain tensors only (not a FakeTensor that torch.compile left behind in another test)
            if type(o) is torch.Tensor and o.device.type == "cpu" and o.ndim == 4 and o.shape[1] > 1:
                storage = o.untyped_storage()
                if storage.data_ptr() not in skip:
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    at_head: list[int] = []
    handle = model.fc.register_forward_pre_hook(lambda m, args: at_head.append(alive_bytes()))
    try:
        prism(model, images)
        grad_cam(model, images)
    finally:
        handle.remove()
    final_map = 2 * 512 * 2 * 2 * 4
    assert at_head[1] <= at_head[0] + final_map, at_head


# ------------------------------------------------------------ a later forward, told where to cut
def tensors_in(value) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else [v for v in value if isinstance(v, torch.Tensor)]


def requires_grad_of_outputs(model: nn.Module, run):
    """``run()``'s result and, per module call in order, (name, whether its output requires grad), as
    the model's own code sees it (user forward hooks run before the library's)."""
    seen: list[tuple[str, bool]] = []
    handles = [
        m.register_forward_hook(
            lambda m, args, out, name=name: seen.append((name, any(t.requires_grad for t in tensors_in(out))))
        )
        for name, m in model.named_modules()
        if m is not model
    ]
    try:
        return run(), seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(
    ("make", "layer"),
    [
        (tiny_cnn, None),
        (tiny_cnn, "4"),
        (Twice, "body"),
        (TinyViT, "blocks.0"),
        (ChannelsLastNet, None),
        (lambda: BackboneUnderNoGrad(tiny_cnn()), None),
    ],
)
def test_a_forward_told_where_the_last_cut_fell_records_nothing_before_it(make, layer, seeded):
    """The monitor passes the previous epoch's ``cut_from``: the same Grad-CAM, and not one module
    output before the final map takes part in autograd (without it, every one after the first map
    does: the positive control)."""
    model, images = make().eval(), torch.rand(2, 3, 32, 32)
    first, cut = _grad_cam(model, images, [0, 1], layer)
    assert cut > 0
    (again, cut_again), seen = requires_grad_of_outputs(
        model, lambda: _grad_cam(model, images, [0, 1], layer, cut_from=cut)
    )
    assert cut_again == cut and again.layer == first.layer
    # (equal up to rounding: before the cut a transformer layer may take PyTorch's fused inference path)
    torch.testing.assert_close(again.cams, first.cams, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.maps, first.maps, rtol=0, atol=1e-5)
    final = max(i for i, (name, _) in enumerate(seen) if name == first.layer)  # its last call
    assert not any(requires for _, requires in seen[: final + 1])
    assert any(requires for _, requires in seen[final + 1 :])  # the head is differentiated
    _, control = requires_grad_of_outputs(model, lambda: _grad_cam(model, images, [0, 1], layer))
    assert any(requires for _, requires in control[:final])
    assert all(p.requires_grad for p in model.parameters()) and hook_count(model) == 0


class GlueAfterNoGrad(BackboneUnderNoGrad):
    """Pools the map after its no-grad block with a function, not a module: a forward that starts with
    gradients off (told where to cut) cannot switch them back on for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone[:8](x)
        return self.head(features.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("make", "cut_from", "forwards", "returned"),
    [
        (tiny_cnn, 1, 1, "the same"),  # too early: more is recorded
        (tiny_cnn, 10_000, 2, -1),  # too late: the model now runs fewer modules
        (Twice, 10_000, 2, -1),
        (ClassScoreConv, 1, 3, -1),  # maps after the final one: then the named layer's forward
        (lambda: GlueAfterNoGrad(tiny_cnn()), "the same", 2, -1),  # gradients off for the pooling
        (lambda: GlueAfterNoGrad(tiny_cnn()), -1, 1, -1),  # told not to try again
    ],
)
def test_a_wrong_cut_from_costs_time_never_the_result(make, cut_from, forwards, returned, seeded):
    """A cut_from that does not fit the forward is seen after it (the final map or the scores do not
    follow the last cut) and costs a second forward without it; the one returned (-1) says not to try
    again."""
    model, images = make().eval(), torch.rand(3, 3, 16, 16)
    expected, right = _grad_cam(model, images)
    cut_from = right if cut_from == "the same" else cut_from
    (result, cut), ran = counted(model, lambda: _grad_cam(model, images, cut_from=cut_from))
    assert result.layer == expected.layer and ran == forwards
    assert cut == (right if returned == "the same" else returned)
    torch.testing.assert_close(result.cams, expected.cams, rtol=0, atol=0)


def test_a_cut_inside_a_checkpointed_segment(seeded):
    """Activation checkpointing (timm's and Hugging Face's ``set_grad_checkpointing``): the backward
    recomputes a segment from its saved input. Grad-CAM at a layer inside the last segment, told or
    not where to cut, equals Grad-CAM without checkpointing."""

    class Checkpointed(Twice):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = checkpoint(self.body, self.pool(self.stem(x)), use_reentrant=False)
            x = checkpoint(self.body, x, use_reentrant=False)
            return self.fc(x.mean(dim=(2, 3)))

    plain_model = Twice().eval()
    model, images = Checkpointed().eval(), torch.rand(2, 3, 16, 16)
    model.load_state_dict(plain_model.state_dict())
    expected, _ = _grad_cam(plain_model, images, [1, 2], "body.0")
    first, cut = _grad_cam(model, images, [1, 2], "body.0")
    again, cut_again = _grad_cam(model, images, [1, 2], "body.0", cut_from=cut)
    assert cut > 0 and cut_again == cut
    for result in (first, again):
        torch.testing.assert_close(result.cams, expected.cams, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [tiny_cnn, ChannelsLastNet, ClassScoreConv])
def test_prism_and_grad_cam_told_where_to_cut_give_the_same_results(make, seeded):
    model, images = make().eval(), torch.rand(4, 3, 32, 32)
    p, g, cut = _prism_and_grad_cam(model, images)
    assert (cut == 0) == (make is ClassScoreConv)  # there the chosen map is found by a second forward
    p2, g2, cut2 = _prism_and_grad_cam(model, images, cut_from=cut, basis="aligned", reference=p.components)
    assert cut2 == cut and p2.stage_layers == p.stage_layers and g2.layer == g.layer
    torch.testing.assert_close(g2.cams, g.cams, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p2.final, p.final, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p2.maps, p.maps, rtol=0, atol=1e-6)


# -------------------------------------------------------------- where a class-token model's attention is
def test_attention_input_is_the_last_attention_and_grad_cam_there_is_not_zero(seeded):
    """TinyViT reads out its class token: Grad-CAM at its final norm is zero; at the input of the
    encoder layer that holds its last attention (an nn.MultiheadAttention, given that tensor as
    queries, keys and values) it is not."""
    model, images = TinyViT().eval(), torch.rand(2, 3, 32, 32)
    assert gradients.attention_input(model) == "blocks.1:input"
    with pytest.warns(UserWarning, match=r"is zero for every image"):
        assert not grad_cam(model, images).alpha.any()
    at_attention = grad_cam(model, images, layer="blocks.1:input")
    assert at_attention.alpha.abs().sum() > 0 and at_attention.cams.shape == (2, 1, 4, 4)
    assert gradients.attention_input(tiny_cnn()) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit_tiny_patch16_224", "blocks.11:input"),
        ("cait_xxs24_224", "blocks_token_only.1:input"),  # the last class-attention block
        ("xcit_nano_12_p16_224", "cls_attn_blocks.1:input"),
    ],
)
def test_attention_input_of_timm_class_token_models(name, expected):
    timm = pytest.importorskip("timm")
    assert gradients.attention_input(timm.create_model(name, pretrained=False)) == expected


# ------------------------------------------------------------- single-logit and multi-label models
def single_logit_cnn(flatten: bool) -> nn.Sequential:
    """``tiny_cnn`` with one logit (``(N, 1)``, or ``(N,)`` with ``flatten``), its bias set so that
    the three test images fall on both sides of 0."""
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=1)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)[:, 0].sort().values
        model[10].bias -= (logits[0] + logits[1]) / 2  # one image below 0, two above
    if flatten:
        model.append(nn.Flatten(0))
    return model, images


class BothSigns(nn.Module):
    """A single-logit model read as two classes: column 0 the negated logit, column 1 the logit."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.model(x).reshape(-1, 1)
        return torch.cat([-logit, logit], dim=1)


@pytest.mark.parametrize("flatten", [False, True])  # (N, 1) and (N,) logits
@pytest.mark.parametrize("targets", [None, 0, [1, 0, 0]])
def test_a_single_logit_model_class_one_is_the_logit_class_zero_its_negation(flatten, targets):
    model, images = single_logit_cnn(flatten)
    net = float64_copy(model)
    with torch.no_grad():
        logit = net(images.double()).reshape(-1)
    assert sorted((logit > 0).tolist()) == [False, True, True]
    expected = (logit > 0).long() if targets is None else torch.tensor(targets).expand(3)
    # Independently: a two-column model whose column c is the score of class c, in float64.
    activation = net[:8](images.double()).detach()
    head = BothSigns(net[8:])
    alpha, cams, maps = reference_grad_cam(head, activation, expected, (32, 32))
    result = grad_cam(model, images, targets)
    assert result.targets.tolist() == expected.tolist() and result.output.shape == (3, 1)
    torch.testing.assert_close(result.alpha.double(), alpha, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.cams.double(), cams, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.maps.double(), maps, rtol=0, atol=1e-4)
    gradients_, sal_maps = reference_saliency(BothSigns(model), images, expected)
    sal = saliency(model, images, targets)
    assert sal.targets.tolist() == expected.tolist()
    torch.testing.assert_close(sal.gradients.double(), gradients_, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(sal.maps.double(), sal_maps, rtol=0, atol=1e-4)


def test_a_mask_of_allowed_classes_explains_each_images_highest_scoring_allowed_class(seeded):
    model, images = tiny_cnn(num_classes=4), torch.rand(3, 3, 32, 32)
    allowed = torch.tensor(
        [[True, False, True, False], [False, False, False, False], [False, True, True, True]]
    )
    with torch.no_grad():
        scores = model(images).numpy()
    # Each image's best allowed class, in numpy; an image that allows none takes its prediction.
    expected = [
        int(np.argmax(np.where(row, s, -np.inf))) if row.any() else int(np.argmax(s))
        for s, row in zip(scores, allowed.numpy(), strict=True)
    ]
    for method in METHODS.values():
        masked, indexed = method(model, images, targets=allowed), method(model, images, targets=expected)
        assert masked.targets.tolist() == expected
        torch.testing.assert_close(masked.maps, indexed.maps)


def test_bad_targets_of_single_logit_and_multi_label_models_are_clear_errors(seeded):
    model, images = single_logit_cnn(flatten=False)
    for method in METHODS.values():
        with pytest.raises(
            ValueError, match=r"targets of a single-logit \(binary\) model must be 0 or 1.*\[2, 2, 2\]"
        ):
            method(model, images, targets=2)
        with pytest.raises(
            ValueError, match=r"a targets mask must have one column per class of the model's \(N, 1\)"
        ):
            method(model, images, targets=torch.ones(3, 1, dtype=torch.bool))
        with pytest.raises(
            ValueError, match=r"a targets mask must have one row per image \(3\), got shape \(2, 4\)"
        ):
            method(tiny_cnn(num_classes=4), images, targets=torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(TypeError, match=r"targets must be class indices .* or an \(N, K\) bool mask"):
            method(model, images, targets=torch.ones(3, dtype=torch.bool))
