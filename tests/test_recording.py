from __future__ import annotations

import gc
import weakref
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from conftest import hook_count, tiny_cnn
from lightning_prism.recording import FeatureLayout, FeatureRecorder, output_tensor, resolve_module


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
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x) * 2)  # the tensor entering `pool` comes from a functional op
        x = self.body(self.pad(x))
        out = self.body(self.pad(x))  # body runs twice; its last output is the final map
        F.relu(out, inplace=True)
        return self.fc(out.mean((2, 3)))


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


def test_a_reduction_undone_inside_its_module_is_a_side_branch(seeded):
    # DownUp pools inside and upsamples back: the map it hands on is 16×16, so its inner 16 → 8 is
    # no stage; the 16×16 stage is the tensor entering the real downsampling, `2`.
    model, x = down_up_net().eval(), torch.rand(2, 3, 16, 16)
    rec = record(model, x)
    assert rec.stage_layers == ["1"]
    with torch.no_grad():
        expected = model[1](model[0](x)).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(rec.stage_maps[0], expected)


DEFERRAL_MODELS = {
    "resnet50": lambda: torchvision.models.resnet50(),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "down_up": lambda: down_up_net(),
}


@pytest.mark.parametrize("name", list(DEFERRAL_MODELS))
def test_deferred_stage_maps_equal_eager_ones(name, seeded):
    # A strided convolution inside a block defers its map to the block, which takes the stage
    # over with its own input; computing every candidate's map at once gives the same recording.
    model, x = DEFERRAL_MODELS[name]().eval(), torch.rand(2, 3, 64, 64)
    deferred, eager = record(model, x), record(model, x, defer_nested=False)
    assert deferred.stage_layers == eager.stage_layers and len(deferred.stage_layers) >= 1
    for a, b in zip(deferred.stage_maps, eager.stage_maps, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class Tracked(nn.Module):
    """Runs a module and keeps a weak reference to every output (what is still alive later)."""

    def __init__(self, inner: nn.Module, outputs: list) -> None:
        super().__init__()
        self.inner, self.outputs = inner, outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        self.outputs.append(weakref.ref(out))
        return out


def test_nothing_but_the_final_map_outlives_the_recording(seeded):
    # Deferred stage maps keep their input alive until the enclosing module decides: after the
    # forward nothing of that may remain.
    outputs: list = []
    blocks = [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)),
        nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1)),
    ]
    model = nn.Sequential(*(Tracked(b, outputs) for b in blocks), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    rec = record(model, torch.rand(2, 3, 16, 16))
    assert rec.stage_layers == ["0", "1"] and rec.final_layer == "2"
    gc.collect()
    alive = [ref() for ref in outputs if ref() is not None]
    assert len(alive) == 1 and alive[0] is rec.final  # the final map, nothing else
    assert all(m.shape[1] == 1 for m in rec.stage_maps)


class VGGLike(nn.Module):
    """As torchvision's VGG: an AdaptiveAvgPool2d(7) that enlarges a map smaller than 7×7."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Linear(8 * 49, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def test_a_map_enlarged_by_pooling_is_never_the_final_map():
    model, x = VGGLike(), torch.rand(2, 3, 16, 16)
    rec = record(model, x)
    assert rec.final_layer == "features" and rec.final.shape == (2, 8, 4, 4)
    assert record(model, torch.rand(2, 3, 28, 28)).final_layer == "avgpool"  # 7×7 → 7×7 enlarges nothing


class SplitHeads(nn.Module):
    """Attention-like: (N, C, h, w) → (N·heads, C / heads, h, w), a batch that is not the images'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n * 2, c // 2, h, w)


class HeadsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.split = SplitHeads()
        self.mix = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mix(self.split(self.body(x)))  # (2N, 4, h, w)
        return mixed.reshape(x.shape[0], -1).mean(1, keepdim=True)


def test_only_maps_with_the_batch_size_count():
    rec = record(HeadsNet(), torch.rand(3, 3, 16, 16))
    assert rec.final_layer == "body" and rec.final.shape == (3, 8, 8, 8)


class AttentionPool(nn.Module):
    """An attention-pooling head: a learned query attends over the map's pixels as tokens."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, channels))
        self.kv = nn.Linear(channels, 2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (N, h·w, C)
        key, value = self.kv(tokens).chunk(2, dim=-1)  # kv's output is a token map on the grid
        weights = (self.query @ key.transpose(1, 2)).softmax(-1)  # (N, 1, h·w)
        return (weights @ value).squeeze(1)  # (N, C)


class PooledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.pool = AttentionPool(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)))


def test_maps_inside_a_pooling_head_are_not_the_final_map():
    model, x = PooledNet(), torch.rand(2, 3, 16, 16)
    rec = record(model, x)
    assert rec.final_layer == "body" and rec.final_layout == FeatureLayout("nchw", (8, 8))
    named = record(model, x, final_layer="pool.kv")  # what discovery skipped: a token map
    assert named.final_layout == FeatureLayout("tokens", (8, 8)) and named.final.shape == (2, 16, 8, 8)


class Segmenter(nn.Module):
    """A segmentation model: a class-score convolution, then its scores resized to the input."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.classifier(self.backbone(x))
        return {"out": F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def test_the_map_entering_a_class_score_convolution_is_the_final_map():
    model, x = Segmenter(), torch.rand(2, 3, 16, 16)
    rec = record(model, x)
    assert rec.final_layer == "backbone" and rec.final.shape == (2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rec.final, model.backbone(x))
    # A backbone that returns its last convolution's map has no class-score layer.
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 5, 1))
    assert record(backbone, x).final_layer == "2"


def _segmentation_head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What enters the last class-score convolution of a torchvision segmentation model, computed
    from its parts (independently of the recorder)."""
    features = model.backbone(x)
    head = model.classifier
    if hasattr(head, "high_classifier"):  # LRASPP: the deep branch gated by its scale branch, upsampled
        high, low = features["high"], features["low"]
        gated = head.cbr(high) * head.scale(high)
        return F.interpolate(gated, size=low.shape[-2:], mode="bilinear", align_corners=False)
    return nn.Sequential(*list(head)[:-1])(features["out"])  # FCN, DeepLabV3: the head but its last layer


@pytest.mark.parametrize(
    "name",
    ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"],
)
def test_torchvision_segmentation_models_take_the_map_entering_their_class_scores(name):
    # The class-score convolution's output reaches the returned scores through a container that hands
    # it on (FCN, DeepLabV3) or a sum of two score maps (LRASPP): still a class-score layer.
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    rec = record(model, x)
    assert rec.final.shape[1] != 5 and rec.final_layout.spatial
    with torch.no_grad():
        torch.testing.assert_close(rec.final, _segmentation_head_input(model, x))


def multi_stage_net(stem_stride: int = 1) -> nn.Sequential:
    """A stem, then one container that runs three stages (as timm's `stages` or EfficientNet's `blocks`)."""
    conv = partial(nn.Conv2d, kernel_size=3, padding=1)
    stem = nn.Sequential(conv(3, 8, stride=stem_stride), nn.ReLU())
    if stem_stride == 2:
        stem.append(conv(8, 8, stride=2))  # a stem that downsamples twice
    stages = nn.Sequential(
        nn.Sequential(conv(8, 8), nn.ReLU()),
        nn.Sequential(nn.MaxPool2d(2), conv(8, 16)),
        nn.Sequential(nn.MaxPool2d(2), conv(16, 16)),
    )
    return nn.Sequential(OrderedDict(stem=stem, stages=stages, pool=nn.AdaptiveAvgPool2d(1)))


def test_a_container_of_several_stages_is_not_a_stage_its_first_stage_is(seeded):
    model, x = multi_stage_net(), torch.rand(2, 3, 16, 16)
    rec = record(model, x)
    assert rec.stage_layers == ["stages.0", "stages.1"]  # not the stem's output entering `stages`
    with torch.no_grad():
        first = model.stages[0](model.stem(x))
    torch.testing.assert_close(rec.stage_maps[0], first.abs().mean(1, keepdim=True))


def test_no_stage_inside_a_stem_that_downsamples_twice_by_convolution(seeded):
    # The stem takes the image to 1/4 in two strided convolutions; timm's feature_info starts after
    # such stems (MambaOut, LeViT, GC ViT). A stem that max-pools keeps the map before the pool, as
    # ResNet does.
    model = multi_stage_net(stem_stride=2)
    rec = record(model, torch.rand(2, 3, 32, 32))
    assert rec.stage_layers == ["stages.0", "stages.1"]
    assert [tuple(m.shape[-2:]) for m in rec.stage_maps] == [(8, 8), (4, 4)]
    model.stem[2] = nn.MaxPool2d(2)
    rec = record(model, torch.rand(2, 3, 32, 32))
    assert rec.stage_layers == ["stem.1", "stages.0", "stages.1"]
    assert [tuple(m.shape[-2:]) for m in rec.stage_maps] == [(16, 16), (8, 8), (4, 4)]


class PatchMerging(nn.Module):
    """Swin's downsampling in (N, h, w, C): 2×2 neighbours concatenated, then a linear map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * channels, 2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(n, h // 2, w // 2, 4 * c)
        return self.reduction(x)


def test_a_last_stage_that_ends_at_1x1_leaves_the_stage_before_it_as_the_final_map(seeded):
    # On a 4×4 input the last stage pools the last spatial map (2×2) to 1×1: the final map is the map
    # entering it, the stage before's output; not the stem's output entering the container, which
    # returns no spatial map either but took a larger map.
    model, x = multi_stage_net(), torch.rand(2, 3, 4, 4)
    rec = record(model, x)
    assert rec.final_layer == "stages.1" and rec.final.shape == (2, 16, 2, 2)


class ChannelsLast(nn.Module):
    """A Swin-like network in (N, h, w, C): patch embedding, a block, patch merging, a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
        self.merge = PatchMerging(8)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)
        x = self.norm(self.merge(x + self.block(x)))
        return self.head(x.mean((1, 2)))


def test_channels_last_maps_are_feature_maps_and_stages(seeded):
    model, x = ChannelsLast(), torch.rand(2, 3, 32, 48)
    rec = record(model, x)
    assert rec.final_layer == "norm" and rec.final_layout == FeatureLayout("nhwc", (4, 6))
    assert rec.stage_layers == ["merge:input"]  # the tensor entering the merge (a functional sum)
    with torch.no_grad():
        embedded = model.embed(x).permute(0, 2, 3, 1)
        blocks = embedded + model.block(embedded)
        torch.testing.assert_close(rec.stage_maps[0], blocks.abs().mean(-1).unsqueeze(1))
    assert rec.final.shape == (2, 16, 4, 6)


class TinyViT(nn.Module):
    """A vision transformer: patch tokens after a class and a distillation token (timm's attribute)."""

    num_prefix_tokens = 2

    def __init__(self, width: int = 16, patch: int = 8) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.dist_token = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        prefix = torch.cat([self.cls_token, self.dist_token], dim=1).expand(x.shape[0], -1, -1)
        tokens = torch.cat([prefix, tokens], dim=1)
        tokens = self.norm(tokens + self.blocks(tokens))
        return self.head(tokens[:, 0])


def test_token_models_give_the_patch_grid_of_the_normalised_tokens(seeded):
    model, x = TinyViT(), torch.rand(2, 3, 32, 48)
    rec = record(model, x)
    assert rec.final_layer == "norm" and rec.final_layout == FeatureLayout("tokens", (4, 6), prefix=2)
    assert rec.stage_layers == []  # one resolution: nothing to extrapolate through
    with torch.no_grad():
        patches = model.patch_embed(x).flatten(2).transpose(1, 2)
        prefix = torch.cat([model.cls_token, model.dist_token], dim=1).expand(2, -1, -1)
        tokens = torch.cat([prefix, patches], dim=1)
        normalised = model.norm(tokens + model.blocks(tokens))
    expected = torch.stack([normalised[:, 2 + i * 6 + j] for i in range(4) for j in range(6)], -1)
    torch.testing.assert_close(rec.final, expected.reshape(2, 16, 4, 6))
    # Named, also as a module's input: the same layout is read.
    named = record(model, x, final_layer="norm:input", stage_layers=["patch_embed"])
    assert named.final_layer == "norm:input" and named.final_layout == rec.final_layout
    assert named.stage_layers == ["patch_embed"] and named.stage_maps[0].shape == (2, 1, 4, 6)


def test_overrides_are_used_in_execution_order():
    rec = record(tiny_cnn(), torch.rand(2, 3, 32, 32), final_layer="6", stage_layers=["4", "0"])
    assert rec.final_layer == "6"
    assert rec.final.shape == (2, 32, 8, 8)
    assert rec.stage_layers == ["0", "4"]


def test_recorder_detaches_after_success_and_after_an_exception():
    model = tiny_cnn()
    model[3].register_forward_hook(lambda *args: None)  # the user's own hook stays
    before = hook_count(model)
    record(model, torch.rand(1, 3, 32, 32))
    assert hook_count(model) == before
    with pytest.raises(RuntimeError), FeatureRecorder(model) as recorder:
        assert hook_count(model) > before
        model(torch.rand(1, 5, 32, 32))  # wrong channel count: conv raises mid-forward
    assert hook_count(model) == before and not recorder._stack


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


def test_no_usable_feature_map_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(
        ValueError,
        match=r"no module of Sequential produced a feature map larger than 1×1; PRISM needs a feature map: "
        r"\(N, C, h, w\), channels-last \(N, h, w, C\) or tokens",
    ):
        record(model, torch.rand(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"final_layer '1' produced shape \(2, 2\), which is no feature map"):
        record(model, torch.rand(2, 3, 2, 2), final_layer="1")
    with pytest.raises(ValueError, match=r"stage layers \['9'\] did not run or produced no feature map"):
        record(tiny_cnn(), torch.rand(2, 3, 32, 32), stage_layers=["1", "9"])


def test_the_final_layer_and_layout_serve_a_gradient_method(seeded):
    # The README's recipe for Grad-CAM-like code: hook the recorded layer with gradients on, and
    # read its output and the gradient with the recorded layout.
    vit, images, target = TinyViT(), torch.rand(2, 3, 32, 48), 1
    rec = record(vit, images)
    module, _ = resolve_module(vit, rec.final_layer, allow_input=True)
    saved = {}

    def keep(module, args, output):
        saved["a"] = output_tensor(output)
        saved["a"].retain_grad()

    handle = module.register_forward_hook(keep)
    vit(images)[:, target].sum().backward()
    handle.remove()
    activation = rec.final_layout.to_nchw(saved["a"])
    gradient = rec.final_layout.to_nchw(saved["a"].grad)
    torch.testing.assert_close(activation.detach(), rec.final)  # the recorded map, now with gradients
    assert gradient.shape == rec.final.shape == (2, 16, 4, 6)
    # TinyViT classifies from its class token, so the patch tokens' gradient is 0 and the class token's
    # is not: the layout drops exactly the prefix.
    assert gradient.abs().max() == 0 and saved["a"].grad[:, 0].abs().max() > 0


class AuxTokenHead(nn.Module):
    """VOLO's head: the class token's scores plus the best per-token class scores of an auxiliary
    linear head on the patch tokens (registered before the final norm and the main head)."""

    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.aux_head = nn.Linear(dim, classes)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = self.norm(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1))
        return self.head(tokens[:, 0]) + 0.5 * self.aux_head(tokens[:, 1:]).amax(dim=1)


def test_per_token_class_scores_are_no_final_map(seeded):
    model, x = AuxTokenHead(), torch.rand(2, 3, 16, 24)
    rec = record(model, x)
    with torch.no_grad():
        norm = model.norm(
            torch.cat([model.cls_token.expand(2, -1, -1), model.patch(x).flatten(2).transpose(1, 2)], 1)
        )
    assert rec.final_layer == "aux_head:input" and rec.final_layout == FeatureLayout("tokens", (4, 6), 0)
    torch.testing.assert_close(rec.final, norm[:, 1:].transpose(1, 2).reshape(2, 16, 4, 6))
    # With other than class scores (a linear layer of as many channels as there are classes), it stays.
    wide = AuxTokenHead(classes=16)
    wide.head = nn.Linear(16, 7)
    wide.forward = lambda x: wide.head(wide.aux_head(wide.patch(x).flatten(2).transpose(1, 2)).mean(1))
    assert record(wide, x).final_layer == "aux_head"


class Wrapper(nn.Module):
    """A LightningModule-like wrapper around a timm-like model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_stages_a_model_declares_in_feature_info_are_taken_as_declared(seeded):
    model, x = multi_stage_net(), torch.rand(2, 3, 16, 16)
    # timm's declaration: the stem's output counts (discovery would take stages.0 at 16×16 instead),
    # two modules at 8×8 (the last one is the stage), and the final resolution (no stage).
    model.feature_info = [
        {"module": "stem", "num_chs": 8, "reduction": 1},
        {"module": "stages.1.0", "num_chs": 8, "reduction": 2},
        {"module": "stages.1", "num_chs": 16, "reduction": 2},
        {"module": "stages.2", "num_chs": 16, "reduction": 4},
    ]
    with torch.no_grad():
        stem = model.stem(x)
        second = model.stages[1](model.stages[0](stem))
    for net, prefix in [(model, ""), (Wrapper(model), "model.")]:
        rec = record(net, x)
        assert rec.stage_layers == [prefix + "stem", prefix + "stages.1"]
        torch.testing.assert_close(rec.stage_maps[0], stem.abs().mean(1, keepdim=True))
        torch.testing.assert_close(rec.stage_maps[1], second.abs().mean(1, keepdim=True))
    # A declaration that names no module of the model, or no stage above the final resolution (a
    # hybrid ViT's blocks), leaves the stages to discovery.
    discovered = ["stages.0", "stages.1"]
    model.feature_info = [{"module": "stages.9", "num_chs": 16, "reduction": 4}]
    assert record(model, x).stage_layers == discovered
    model.feature_info = [{"module": "stages.2", "num_chs": 16, "reduction": 4}]
    assert record(model, x).stage_layers == discovered
