from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from conftest import hook_count, tiny_cnn
from lightning_prism.recording import FeatureRecorder, resolve_module


def record(model: nn.Module, x: torch.Tensor, **kwargs):
    with torch.no_grad(), FeatureRecorder(model, **kwargs) as recorder:
        model(x)
    return recorder.recording(input_shape=x.shape)


def test_tiny_cnn_stages_and_final():
    rec = record(tiny_cnn(), torch.rand(2, 3, 32, 32))
    assert rec.final_layer == "7"
    assert rec.stage_layers == ["1", "4"]
    assert [tuple(m.shape) for m in rec.stage_maps] == [(2, 1, 32, 32), (2, 1, 16, 16)]
    assert rec.final.shape == (2, 32, 8, 8)


def test_torchvision_vgg16_and_resnet50_stage_discovery():
    rec = record(torchvision.models.vgg16(), torch.rand(1, 3, 224, 224))
    assert rec.final_layer == "avgpool"
    assert rec.stage_layers == ["features.3", "features.8", "features.15", "features.22", "features.29"]
    rec = record(torchvision.models.resnet50(), torch.rand(1, 3, 96, 96))
    assert rec.final_layer == "layer4"
    assert rec.stage_layers == ["relu", "layer1", "layer2", "layer3"]


def test_identity_placeholders_are_transparent():
    # `Identity` hands on the tensor it gets: names go to the modules that produced the tensors.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Identity(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Identity(),
    )
    x = torch.rand(2, 3, 16, 16)
    rec = record(model, x)
    assert rec.final_layer == "3"
    assert rec.stage_layers == ["0"]
    with torch.no_grad():
        features = model[0](x)
        assert torch.equal(rec.final, model[3](model[2](features)))
        assert torch.allclose(rec.stage_maps[0], features.abs().mean(1, keepdim=True))
    # Named explicitly, an Identity is still used.
    assert record(model, x, final_layer="4").final_layer == "4"


class FunctionalTail(nn.Module):
    """Like DenseNet: a functional in-place ReLU after the last module, and a functional stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.pad = nn.ZeroPad2d(1)  # enlarges the map: neither downsampling nor a new resolution
        self.body = nn.Conv2d(4, 4, 3)  # valid conv: 10×10 back to 8×8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x) * 2)  # the tensor entering `pool` comes from a functional op
        x = self.body(self.pad(x))
        out = self.body(self.pad(x))  # body runs twice; its last output is the final map
        F.relu(out, inplace=True)
        return out.mean((2, 3))


def test_final_map_is_read_after_the_forward_and_functional_stages_are_named():
    model = FunctionalTail()
    rec = record(model, torch.randn(2, 3, 16, 16))
    assert rec.final_layer == "body"
    assert rec.final.min() >= 0  # the functional in-place ReLU applied after `body` is included
    assert rec.stage_layers == ["pool:input"]  # no stage at the padded 10×10
    named = record(model, torch.randn(2, 3, 16, 16), stage_layers=["pool:input"])
    assert named.stage_layers == ["pool:input"]
    assert named.stage_maps[0].shape == (2, 1, 16, 16)


class DownUp(nn.Module):
    """Downsamples inside and upsamples back: it encloses a downsampling module without being one."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 8, 1)
        self.down = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.up(self.down(self.expand(x))))


def down_up_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), DownUp(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1)
    )


def test_nested_downsampling_defers_its_stage_map_to_the_enclosing_module(seeded):
    # resnet50's layer2 contains the strided conv of layer2.0: only the outer stage map is needed.
    model, x = torchvision.models.resnet50().eval(), torch.rand(1, 3, 64, 64)
    deferred, eager = record(model, x), record(model, x, defer_nested=False)
    assert deferred.complete and deferred.stage_layers == eager.stage_layers
    for a, b in zip(deferred.stage_maps, eager.stage_maps, strict=True):
        torch.testing.assert_close(a, b)


def test_a_deferred_stage_that_nobody_took_over_asks_for_a_second_recording(seeded):
    model, x = down_up_net().eval(), torch.rand(2, 3, 16, 16)
    rec = record(model, x)
    assert not rec.complete  # `1.down`'s input was skipped for `1`, which did not downsample
    eager = record(model, x, defer_nested=False)
    assert eager.complete and eager.stage_layers == ["1.expand"]
    with torch.no_grad():
        expected = model[1].expand(model[0](x)).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(eager.stage_maps[0], expected)


def test_overrides_are_used_in_execution_order():
    rec = record(tiny_cnn(), torch.rand(2, 3, 32, 32), final_layer="6", stage_layers=["4", "0"])
    assert rec.final_layer == "6"
    assert rec.final.shape == (2, 32, 8, 8)
    assert rec.stage_layers == ["0", "4"]


def test_hooks_are_removed_after_success_and_after_an_exception():
    model = tiny_cnn()
    model[3].register_forward_hook(lambda *args: None)  # the user's own hook stays
    before = hook_count(model)
    record(model, torch.rand(1, 3, 32, 32))
    assert hook_count(model) == before
    with pytest.raises(RuntimeError), FeatureRecorder(model):
        assert hook_count(model) > before
        model(torch.rand(1, 5, 32, 32))  # wrong channel count: conv raises mid-forward
    assert hook_count(model) == before


def test_an_instance_forward_is_put_back_exactly():
    model = tiny_cnn()
    own = model[6].forward
    model[6].forward = own  # a forward set on the instance, as some libraries do
    record(model, torch.rand(1, 3, 32, 32))
    assert vars(model[6])["forward"] is own
    assert not any("forward" in vars(m) for i, m in enumerate(model) if i != 6)
    with pytest.raises(RuntimeError), FeatureRecorder(model):
        assert vars(model[6])["forward"] is not own  # wrapped while recording
        model(torch.rand(1, 5, 32, 32))
    assert vars(model[6])["forward"] is own


def wrapped_modules(model: nn.Module) -> int:
    return sum("forward" in vars(m) for m in model.modules())


def test_hooks_instead_of_wrappers_where_a_hook_may_change_what_flows_on():
    model, x = torchvision.models.resnet18().eval(), torch.rand(2, 3, 64, 64)
    with FeatureRecorder(model):
        assert wrapped_modules(model) == len(list(model.modules())) - 1  # all but the model itself
    wrapped = record(model, x)

    # While a global forward hook is registered: hooks everywhere, the same recording.
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with FeatureRecorder(model):
            assert wrapped_modules(model) == 0
        hooked = record(model, x)
    finally:
        handle.remove()
    assert (hooked.final_layer, hooked.stage_layers) == (wrapped.final_layer, wrapped.stage_layers)
    torch.testing.assert_close(hooked.final, wrapped.final, rtol=0, atol=0)
    for a, b in zip(hooked.stage_maps, wrapped.stage_maps, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # A module's own hook that replaces its output: the recorder sees what flows on.
    model.layer4.register_forward_hook(lambda module, args, output: output + 1)
    replaced = record(model, x)
    assert replaced.final_layer == "layer4"
    torch.testing.assert_close(replaced.final, wrapped.final + 1)

    # nn.DataParallel replicas copy module attributes, wrappers included: hooks.
    parallel = nn.DataParallel(model)
    with FeatureRecorder(parallel):
        assert wrapped_modules(parallel) == 0
    assert record(parallel, x).final_layer == "module.layer4"


def test_recorder_cannot_be_entered_twice():
    recorder = FeatureRecorder(tiny_cnn())
    with recorder, pytest.raises(RuntimeError, match=r"already active"), recorder:
        pass


def test_unknown_names_list_the_nearest_valid_ones():
    model = torchvision.models.resnet18()
    with pytest.raises(
        ValueError, match=r"'layer5' is not a module of ResNet; nearest valid names: 'layer4', 'layer3'"
    ):
        FeatureRecorder(model, final_layer="layer5")
    with pytest.raises(ValueError, match=r"'layer2.0.conv9:input' is not a module"):
        FeatureRecorder(model, stage_layers=["layer2.0.conv9:input"])
    with pytest.raises(TypeError, match=r"stage_layers must be a list of module names"):
        FeatureRecorder(model, stage_layers="layer1")
    with pytest.raises(TypeError, match=r"layer names must be strings, got int"):
        resolve_module(model, 3)  # type: ignore[arg-type]


def test_no_spatial_feature_map_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(
        ValueError, match=r"no module of Sequential produced a 4-D feature map larger than 1×1"
    ):
        record(model, torch.rand(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"final_layer '1' produced shape \(2, 2\)"):
        record(model, torch.rand(2, 3, 2, 2), final_layer="1")
    with pytest.raises(ValueError, match=r"stage layers \['9'\] did not run or produced no 4-D tensor"):
        record(tiny_cnn(), torch.rand(2, 3, 32, 32), stage_layers=["1", "9"])
