from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from conftest import PHOTOS, assert_valid_maps, hook_count, tiny_cnn
from lightning_prism import prism
from lightning_prism.extrapolation import gradual_extrapolation, to_rgb
from lightning_prism.recording import record


def reference_prism(model: nn.Sequential, images: torch.Tensor, extrapolate: bool = True):
    """Independent float64 PRISM for `tiny_cnn`: explicit layers, full SVD, explicit loops."""
    net = copy.deepcopy(model).double().eval()
    x = images.double()
    activations = []
    with torch.no_grad():
        for layer in net:
            x = layer(x)
            activations.append(x)
    stages, final = [activations[1], activations[4]], activations[7]  # inputs of the two max-pools
    n, c, h, w = final.shape
    rows = final.permute(0, 2, 3, 1).reshape(-1, c)
    centred = rows - rows.mean(0)
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    scores = u[:, :3] * s[:3]
    for j in range(3):  # sign: largest-magnitude loading positive
        if vh[j, vh[j].abs().argmax()] < 0:
            scores[:, j] = -scores[:, j]
    features = scores.reshape(n, h, w, 3).permute(0, 3, 1, 2)
    maps = features
    if extrapolate:
        for stage in reversed(stages):
            mean_abs = torch.zeros(n, 1, *stage.shape[-2:], dtype=torch.float64)
            for channel in range(stage.shape[1]):
                mean_abs += stage[:, channel : channel + 1].abs()
            mean_abs /= stage.shape[1]
            maps = F.interpolate(maps, size=stage.shape[-2:], mode="bilinear", align_corners=False) * mean_abs
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    z = maps.numpy()
    z = np.clip((z - z.mean()) / z.std(ddof=1), -1, 1)
    rgb = (z - z.min()) / (z.max() - z.min())
    return features, (s**2) / (s**2).sum(), torch.from_numpy(rgb)


@pytest.mark.parametrize("width", [32, 160])  # exact eigendecomposition; subspace iteration
@pytest.mark.parametrize("extrapolate", [True, False])
def test_matches_independent_float64_computation(extrapolate, width, seeded):
    model, images = tiny_cnn(width=width), torch.rand(3, 3, 32, 32)
    features, explained, rgb = reference_prism(model, images, extrapolate)
    result = prism(model, images, extrapolate=extrapolate)
    assert (result.features.double() - features).norm() / features.norm() < 1e-4
    torch.testing.assert_close(result.explained_variance.double(), explained, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.maps.double(), rgb, atol=1e-4, rtol=0)
    assert_valid_maps(result.maps, (3, 3, 32, 32) if extrapolate else (3, 3, 8, 8))
    assert result.final_layer == "7" and result.stage_layers == ["1", "4"]
    assert result.components.shape == (width, 3)
    assert result.output.shape == (3, 3)


ARCHITECTURES = {
    "vgg16": {},
    "resnet50": {},
    "googlenet": {"aux_logits": False, "init_weights": False},
    "densenet121": {},
    "mobilenet_v3_small": {},
    "efficientnet_b0": {},
    "convnext_tiny": {},
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_torchvision_architectures(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(**ARCHITECTURES[name])
    model.train()
    result = prism(model, torch.rand(2, 3, 64, 80))
    assert_valid_maps(result.maps, (2, 3, 64, 80))
    assert result.features.shape[:2] == (2, 3) and torch.isfinite(result.features).all()
    assert result.explained_variance.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert len(result.stage_layers) >= 2
    assert model.training and all(m.training for m in model.modules())
    assert hook_count(model) == 0


def test_features_survive_when_there_is_nothing_to_extrapolate(seeded):
    # No downsampling: the maps are the features' own size, and must not overwrite them.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    images = torch.rand(2, 3, 6, 6)
    result = prism(model, images)
    with torch.no_grad():
        final = model(images)
    rows = final.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = ((rows - rows.mean(0)) @ result.components).reshape(2, 6, 6, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(result.features, expected)
    assert result.stage_layers == [] and result.maps.shape == (2, 3, 6, 6)


def test_one_forward_also_when_a_nested_reduction_is_no_stage(seeded):
    from test_recording import down_up_net

    for model in (tiny_cnn(), down_up_net()):
        calls: list[int] = []
        handle = model.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        try:
            result = prism(model, torch.rand(2, 3, 16, 16))
        finally:
            handle.remove()
        assert len(calls) == 1
        assert_valid_maps(result.maps, (2, 3, 16, 16))
    assert result.stage_layers == ["1"]


def test_maps_of_a_freshly_initialised_deep_network_are_not_grey(seeded):
    # torchvision's EfficientNet-B0 at initialisation: the final map's |A| is about 1e-14 and the
    # product of its four stage maps about 1e-20, so the raw extrapolation underflows float32.
    model = torchvision.models.efficientnet_b0()
    images = torch.rand(4, 3, 128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about uniform maps
        result = prism(model, images)
    assert_valid_maps(result.maps, (4, 3, 128, 128))
    assert result.maps.std() > 0.1
    assert result.final.abs().mean() < 1e-10  # the case the test is about
    # The same picture as extrapolating the unit-scaled stage maps in float64.
    recording = record(model, images)
    expected = gradual_extrapolation(
        result.features.double() / result.features.abs().max(),
        [m.double() / m.max() for m in recording.stage_maps],
        (128, 128),
    )
    torch.testing.assert_close(result.maps, to_rgb(expected), atol=1e-4, rtol=0)


def test_uniform_maps_warn(seeded):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 1))
    nn.init.zeros_(model[2].weight)
    nn.init.constant_(model[2].bias, 1.0)  # the final map is 1 everywhere
    with pytest.warns(
        UserWarning, match=r"PRISM maps of this batch are uniform: the final feature map '2' has the same"
    ):
        result = prism(model, torch.rand(2, 3, 8, 8))
    assert result.maps.abs().max() == 0  # no component: black
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prism(tiny_cnn(), torch.rand(2, 3, 32, 32))  # informative maps: no warning


def test_training_flags_and_grad_mode_restored_exactly():
    model = tiny_cnn().train()
    model[3].eval()  # a mixed state must come back as it was, not as model.train()
    flags = [m.training for m in model.modules()]
    assert torch.is_grad_enabled()
    prism(model, torch.rand(2, 3, 32, 32))
    assert [m.training for m in model.modules()] == flags
    assert torch.is_grad_enabled()


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training  # prism() runs the forward in eval mode
        self.drop(self.conv(x))
        raise RuntimeError("boom")


def test_hooks_removed_and_flags_restored_after_an_exception():
    model = Exploding().train()
    with pytest.raises(RuntimeError, match=r"boom"):
        prism(model, torch.rand(1, 3, 8, 8))
    assert hook_count(model) == 0
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


def test_nothing_is_kept_between_calls(seeded):
    model, images = tiny_cnn(), torch.rand(2, 3, 32, 32)
    first = prism(model, images)
    prism(model, torch.rand(4, 3, 48, 48))
    assert torch.equal(prism(model, images).maps, first.maps)
    assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())


def test_under_inference_mode_and_autocast(seeded):
    model, images = tiny_cnn(), torch.rand(2, 3, 32, 32)
    expected = prism(model, images)
    with torch.inference_mode():
        torch.testing.assert_close(prism(model, images).maps, expected.maps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = prism(model, images)
    assert low.features.dtype == torch.float32 and low.components.dtype == torch.float32
    assert_valid_maps(low.maps, (2, 3, 32, 32))
    correlation = torch.corrcoef(torch.stack([low.maps.flatten(), expected.maps.flatten()]))[0, 1]
    assert correlation > 0.95


class GradModes(nn.Module):
    """Passes its input on and notes the grad mode it ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return x


def test_forward_under_inference_mode_unless_asked_for_no_grad(seeded):
    model, images = nn.Sequential(tiny_cnn(), GradModes()), torch.rand(2, 3, 32, 32)
    fast = prism(model, images)
    assert model[1].seen == [(True, False)] and fast.output.is_inference() and fast.final.is_inference()
    assert not fast.maps.is_inference() and not fast.features.is_inference()
    plain = prism(model, images, inference_mode=False)
    assert model[1].seen[1:] == [(False, False)] and not plain.output.is_inference()
    torch.testing.assert_close(plain.maps, fast.maps, rtol=0, atol=0)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_lazy_modules_are_created_outside_inference_mode_and_train_afterwards():
    model = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.LazyConv2d(8, 3))
    prism(model, torch.rand(2, 3, 16, 16))  # the first forward creates the parameters
    assert not any(p.is_inference() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.rand(2, 3, 16, 16)).square().mean().backward()
    optimizer.step()
    assert all(p.grad is not None for p in model.parameters())


def test_fewer_than_three_components_fall_back_to_zero_channels():
    # One image whose final map is 2×1: two pixels, so only one principal component exists.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.MaxPool2d((4, 8)))
    result = prism(model, torch.rand(1, 3, 8, 8) + 0.1)
    assert result.features.shape == (1, 3, 2, 1)
    assert result.maps[:, 1:].abs().max() == 0
    assert result.maps[:, 0].max() == 1 and result.maps[:, 0].min() == 0


def test_bases(seeded):
    model, images = tiny_cnn(), torch.rand(3, 3, 32, 32)
    own = prism(model, images)
    scrambled = own.components[:, [2, 0, 1]] * torch.tensor([-1.0, 1.0, -1.0])
    aligned = prism(model, images, basis="aligned", reference=scrambled)
    torch.testing.assert_close(aligned.components, scrambled)
    torch.testing.assert_close(
        aligned.features, own.features[:, [2, 0, 1]] * torch.tensor([-1.0, 1, -1]).view(1, 3, 1, 1)
    )
    other = torch.linalg.qr(torch.randn(32, 3)).Q
    fixed = prism(model, images, basis="fixed", reference=other)
    torch.testing.assert_close(fixed.components, other)
    rows = fixed.final.permute(0, 2, 3, 1).reshape(-1, 32)
    expected = ((rows - rows.mean(0)) @ other).reshape(3, *fixed.final.shape[-2:], 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(fixed.features, expected, rtol=1e-4, atol=1e-5)
    # The share of variance along each colour's axis, in the colours' order.
    torch.testing.assert_close(own.colour_variance, own.explained_variance[:3], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(aligned.colour_variance, own.colour_variance[[2, 0, 1]])
    captured = expected.square().sum(dim=(0, 2, 3)) / (rows - rows.mean(0)).square().sum()
    torch.testing.assert_close(fixed.colour_variance, captured, rtol=1e-4, atol=1e-7)
    refit = prism(model, images, basis="refit", reference=other)
    torch.testing.assert_close(refit.components, own.components)
    with pytest.raises(ValueError, match=r"reference basis has shape \(8, 3\), expected \(32, 3\)"):
        prism(model, images, basis="fixed", reference=torch.rand(8, 3))


def test_bad_input_is_a_clear_error():
    model = tiny_cnn()
    with pytest.raises(
        ValueError, match=r"images must be a non-empty \(N, C, H, W\) batch, got shape \(3, 32, 32\)"
    ):
        prism(model, torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match=r"images must be a floating-point tensor, got a torch.uint8 tensor"):
        prism(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function"):
        prism(lambda x: x, torch.rand(1, 3, 32, 32))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"basis must be one of \('refit', 'aligned', 'fixed'\), got 'sticky'"
    ):
        prism(model, torch.rand(1, 3, 32, 32), basis="sticky")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'8 ' is not a module of Sequential; nearest valid names: '8'"):
        prism(model, torch.rand(1, 3, 32, 32), final_layer="8 ")
    model[0].bias.data[0] = float("nan")
    with pytest.raises(ValueError, match=r"final feature map \('7'\) contains NaN"):
        prism(model, torch.rand(1, 3, 32, 32))


def test_real_model_on_real_photos(lite0, photos):
    """ImageNet-pretrained EfficientNet-Lite0: maps follow the objects, not the pixels' positions."""
    images = (photos - 0.5) / 0.5
    result = prism(lite0, torch.cat([images, images.flip(-1)]))
    assert result.output.argmax(1)[:2].tolist() == [285, 967]  # Egyptian cat, espresso: the model is real
    for i, name in enumerate(PHOTOS):
        mirrored_back = result.maps[len(PHOTOS) + i].flip(-1).flatten()
        correlation = torch.corrcoef(torch.stack([result.maps[i].flatten(), mirrored_back]))[0, 1]
        assert correlation > 0.9, name
    # Cat, espresso and rocket each get a different dominant colour.
    dominant = result.maps[:4].mean(dim=(2, 3)).argmax(dim=1)
    assert len({dominant[0].item(), dominant[1].item(), dominant[3].item()}) == 3
