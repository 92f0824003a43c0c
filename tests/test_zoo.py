"""A representative zoo: vision transformers, channels-last models and CNNs from timm, torchvision and
Hugging Face, each the smallest variant (or a shallow version of it) at a small input, with random
weights. The final map is compared to an independent reference (timm's ``forward_features``, the
tensor entering torchvision's global pooling, the patch grid of the final tokens) and the stages to
timm's ``feature_info``, with the reference code of ``benchmarks/zoo.py``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from conftest import assert_valid_maps, hook_count
from lightning_prism import prism
from lightning_prism.recording import FeatureLayout, declared_stages, record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo  # the sweep's reference code

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@dataclass
class Case:
    build: Callable[[], nn.Module]
    size: tuple[int, int]
    layout: FeatureLayout  # of the final layer's output, as the model's authors describe it
    source: str = "timm"  # whose reference: timm, torchvision or tokens (the final tokens' patch grid)
    final_layer: str | None = None
    stages: list[tuple[int, int]] | None = None  # stage resolutions, where no feature_info says
    # Whether the discovery rules find feature_info's stage maps too (declared, they are taken as they
    # are). Sequencer2d's `stages` container downsamples once, in its second stage, so it reads as a
    # block around that downsampling, whose input (the stem's output) is taken for the stage.
    stage_maps: bool = True


def timm_model(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def hf_vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=(64, 96),
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


def tv_swin() -> nn.Module:
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[4, 4]
    )


def tokens(grid: tuple[int, int], prefix: int) -> FeatureLayout:
    return FeatureLayout("tokens", grid, prefix)


ZOO: dict[str, Case] = {
    # Vision transformers: class, distillation and register tokens; non-square inputs.
    "vit": Case(timm_model("vit_tiny_patch16_224", img_size=(64, 96), depth=2), (64, 96), tokens((4, 6), 1)),
    "vit_reg4": Case(
        timm_model("vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=4), (64, 64), tokens((4, 4), 5)
    ),
    "deit_distilled": Case(
        timm_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2), (64, 64), tokens((4, 4), 2)
    ),
    "eva02": Case(timm_model("eva02_tiny_patch14_224", img_size=56, depth=2), (56, 56), tokens((4, 4), 1)),
    "beit": Case(
        timm_model("beit_base_patch16_224", img_size=64, depth=2, embed_dim=64, num_heads=2),
        (64, 64),
        tokens((4, 4), 1),
    ),
    "cait": Case(timm_model("cait_xxs24_224", img_size=64, depth=2), (64, 64), tokens((4, 4), 1)),
    "levit": Case(timm_model("levit_128s", img_size=128), (128, 128), tokens((2, 2), 0)),
    "tv_vit": Case(
        lambda: torchvision.models.VisionTransformer(64, 16, 2, 2, 32, 64),
        (64, 64),
        tokens((4, 4), 1),
        "tokens",
    ),
    "hf_vit": Case(hf_vit, (64, 96), tokens((4, 6), 1), "tokens", final_layer="vit.layernorm"),
    # Channels-last models.
    "swin": Case(
        timm_model(
            "swin_tiny_patch4_window7_224",
            img_size=64,
            depths=(1, 1, 1, 1),
            embed_dim=32,
            num_heads=(1, 2, 4, 8),
        ),
        (64, 64),
        FeatureLayout("nhwc", (2, 2)),
    ),
    "tv_swin": Case(
        tv_swin, (64, 64), FeatureLayout("nchw", (2, 2)), "torchvision", stages=[(16, 16), (8, 8), (4, 4)]
    ),
    "mambaout": Case(timm_model("mambaout_femto"), (64, 64), FeatureLayout("nhwc", (2, 2))),
    "sequencer": Case(
        timm_model("sequencer2d_s", img_size=64, layers=(1, 1, 1, 1)),
        (64, 64),
        FeatureLayout("nhwc", (4, 4)),
        stage_maps=False,
    ),
    "maxvit": Case(timm_model("maxvit_nano_rw_256", img_size=64), (64, 64), FeatureLayout("nchw", (2, 2))),
    # Side branches that downsample: spatial-reduction attention, global context, attention downsampling.
    "pvt_v2": Case(timm_model("pvt_v2_b0"), (64, 64), FeatureLayout("nchw", (2, 2))),
    "gcvit": Case(timm_model("gcvit_xxtiny", img_size=64), (64, 64), FeatureLayout("nchw", (2, 2))),
    "efficientformerv2": Case(
        timm_model("efficientformerv2_s0", img_size=64), (64, 64), FeatureLayout("nchw", (2, 2))
    ),
    # CNNs: one container holds all stages; a ResNet; the grey-map and class-score cases of torchvision.
    "convnext": Case(timm_model("convnext_atto"), (64, 64), FeatureLayout("nchw", (2, 2))),
    "efficientnet": Case(timm_model("efficientnet_b0"), (64, 64), FeatureLayout("nchw", (2, 2))),
    "resnet": Case(timm_model("resnet18"), (64, 64), FeatureLayout("nchw", (2, 2))),
    "tv_efficientnet": Case(
        lambda: torchvision.models.efficientnet_b0(),
        (128, 128),
        FeatureLayout("nchw", (4, 4)),
        "torchvision",
        stages=[(64, 64), (32, 32), (16, 16), (8, 8)],
    ),
    "tv_squeezenet": Case(
        lambda: torchvision.models.squeezenet1_1(),
        (64, 64),
        FeatureLayout("nchw", (3, 3)),
        "torchvision",
        final_layer="features",
        stages=[(31, 31), (15, 15), (7, 7)],
    ),
}


@pytest.fixture(scope="session")
def zoo_models() -> dict[str, nn.Module]:
    """Built once per session, on first use."""
    return {}


def model_for(name: str, cache: dict[str, nn.Module]) -> nn.Module:
    if name not in cache:
        torch.manual_seed(0)
        cache[name] = ZOO[name].build().eval()
    return cache[name]


@pytest.mark.parametrize("name", list(ZOO))
def test_final_map_and_stages_match_the_references(name, zoo_models):
    case = ZOO[name]
    model = model_for(name, zoo_models)
    images = torch.rand(2, 3, *case.size)
    rec = record(model, images)
    assert rec.final_layout == case.layout
    if case.final_layer is not None:
        assert rec.final_layer == case.final_layer
    if case.source == "timm":
        features, stage_maps = zoo.timm_references(model, images)
        assert zoo.final_matches(rec.final, features, zoo._timm_grid(model, images))[1] == "yes"
        assert stage_maps is not None
        # The stages timm's feature_info declares ...
        assert rec.stage_layers == [n for n, _ in declared_stages(model)][: len(rec.stage_layers)]
        assert zoo.stages_match(rec, stage_maps)[:2] == ("yes", "yes")
        # ... and the discovery rules, for models that declare none, find the same resolutions.
        with zoo.undeclared(model):
            discovered = record(model, images)
        grids, maps, note = zoo.stages_match(discovered, stage_maps)
        assert (grids, maps) == ("yes", "yes" if case.stage_maps else "no"), note
    else:
        if case.source == "torchvision" or name == "tv_vit":  # tv_vit: the encoder's final tokens
            reference = zoo.torchvision_reference(model, images)
        else:  # Hugging Face's last_hidden_state
            with torch.no_grad():
                reference = model.vit(images).last_hidden_state
        assert zoo.final_matches(rec.final, reference)[1] == "yes"
        expected = case.stages if case.stages is not None else []
        assert [tuple(m.shape[-2:]) for m in rec.stage_maps] == expected


@pytest.mark.parametrize("name", ["vit", "swin", "tv_vit", "hf_vit", "tv_efficientnet", "mambaout", "levit"])
def test_prism_maps_on_the_zoo(name, zoo_models):
    case = ZOO[name]
    model = model_for(name, zoo_models).train()
    images = torch.rand(3, 3, *case.size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # informative maps: no warning
        result = prism(model, images)
    assert_valid_maps(result.maps, (3, 3, *case.size))
    assert result.maps.std() > 0.05  # not grey
    assert result.final_layout == case.layout
    assert model.training and all(m.training for m in model.modules())
    assert hook_count(model) == 0
    model.eval()
