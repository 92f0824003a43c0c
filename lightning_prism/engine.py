"""``prism()``: one forward pass recorded, principal components, gradual extrapolation, RGB."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .extrapolation import gradual_extrapolation, rgb_and_informative, unit_scale
from .layout import FeatureLayout
from .pca import align_components, explained_variance, principal_components, project
from .recording import Recording, record

__all__ = ["BASES", "BasisMismatchError", "PRISMResult", "check_inputs", "from_recording", "prism"]

Basis = Literal["refit", "aligned", "fixed"]
BASES: tuple[str, ...] = ("refit", "aligned", "fixed")
NUM_COMPONENTS = 3


class BasisMismatchError(ValueError):
    """The ``reference`` basis given to :func:`prism` does not fit the final feature map's channels."""


@dataclass(frozen=True)
class PRISMResult:
    """PRISM maps of one batch and the numbers behind them.

    Attributes:
        maps: ``(N, 3, H, W)`` float32 RGB in ``[0, 1]`` on the images' device (``h×w`` of the final
            feature map when ``extrapolate=False``). Red, green and blue are the first, second and
            third principal component.
        features: ``(N, 3, h, w)`` principal-component scores on the final feature map.
        explained_variance: ``(K,)`` share of the variance of every component of the batch PCA,
            decreasing, summing to 1 (``K = min(N·h·w, c)``). Computed on first access (an
            exact eigendecomposition, the one costly part of PCA, which ``prism()`` itself avoids
            by iterating on the top three axes only).
        colour_variance: ``(3,)`` share of the batch's variance along the axis of each colour
            (red, green, blue). With ``basis="refit"`` these are the first three entries of
            ``explained_variance``, already known without the full spectrum; with ``"aligned"``
            the same shares in the colours' order; with ``"fixed"`` what the reference axes capture
            of this batch.
        final: ``(N, c, h, w)`` the final feature map as recorded (kept for ``explained_variance``);
            like ``output``, an inference tensor when the forward ran under inference mode.
        components: ``(c, 3)`` principal axes (channel loadings) behind the three colours.
        mean: ``(c,)`` channel mean used for centring.
        final_layer: name of the module whose output is the final feature map (or
            ``"<module>:input"``, the tensor entering that module).
        final_layout: how that tensor reads as ``final`` (channels-last maps are permuted, token
            sequences lose their prefix tokens and are laid out on the patch grid).
        stage_layers: names of the stages used for gradual extrapolation, in execution order.
        output: the model's own output for the batch (for example logits).
    """

    maps: Tensor
    features: Tensor
    colour_variance: Tensor
    final: Tensor
    components: Tensor
    mean: Tensor
    final_layer: str
    stage_layers: list[str]
    output: Any
    final_layout: FeatureLayout

    @cached_property
    def explained_variance(self) -> Tensor:
        """``(K,)`` share of the variance of every principal component (see the attributes)."""
        with torch.no_grad(), torch.autocast(self.final.device.type, enabled=False):
            return explained_variance(self.final)


def check_inputs(model: Any, images: Any, basis: Any = "refit") -> None:
    """Raise ``TypeError``/``ValueError`` for a model that is no module, images that are not a non-empty
    floating ``(N, C, H, W)`` batch, or an unknown ``basis``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(images, Tensor) or not images.is_floating_point():
        kind = f"a {images.dtype} tensor" if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"images must be a floating-point tensor, got {kind}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")


def prism(
    model: nn.Module,
    images: Tensor,
    *,
    extrapolate: bool = True,
    final_layer: str | None = None,
    stage_layers: Sequence[str] | None = None,
    basis: Basis = "refit",
    reference: Tensor | None = None,
    inference_mode: bool = True,
) -> PRISMResult:
    """Principal Image Sections Mapping of a batch.

    Runs one forward pass of ``model`` on ``images`` in eval mode without gradients, recording only
    the final feature map and one small map per stage (:func:`~lightning_prism.recording.record`:
    forward wrappers or hooks exist only during the call and are removed on every path); then
    computes the batch PCA of the final feature map on its device, in at least float32, and
    upsamples the top three components through the stages. Every module's ``training`` flag is
    restored exactly as found; nothing is kept between calls. Works under ``torch.inference_mode()``
    and autocast (the maths runs with autocast disabled). Warns when the maps come out uniform.

    Args:
        model: a CNN, vision transformer or other image model: any ``nn.Module`` whose forward
            produces feature maps ``(N, C, h, w)``, channels-last maps ``(N, h, w, C)`` or patch
            tokens ``(N, prefix + h·w, C)`` (see :mod:`lightning_prism.recording`).
        images: ``(N, C, H, W)`` floating batch on the model's device.
        extrapolate: upsample through the stages to ``H×W``; ``False`` returns the maps at the
            final feature map's ``h×w``.
        final_layer: module name to use as the final feature map instead of the discovered one.
        stage_layers: module names (or ``"<name>:input"``) to use as stages instead of the
            discovered ones.
        basis: ``"refit"`` uses this batch's own PCA; ``"aligned"`` reorders and re-signs its axes to
            match ``reference`` (a feature keeps its colour); ``"fixed"`` projects onto
            ``reference`` itself. Without ``reference`` all three are ``"refit"``.
        reference: ``(c, 3)`` loadings of the reference basis (``components`` of an earlier result).
        inference_mode: run the forward under ``torch.inference_mode()``, as Lightning's validation
            loop does (a little faster than ``torch.no_grad()``); ``output`` and ``final`` are then
            inference tensors. ``False`` runs it under ``torch.no_grad()``, for a model that keeps
            tensors from its forward and trains with them later, or where Lightning avoids inference
            mode (FSDP, XLA, gloo). A model with uninitialised lazy modules always gets
            ``torch.no_grad()``, so that its parameters are not created as inference tensors.

    Returns:
        :class:`PRISMResult`.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``images`` not a floating tensor.
        ValueError: for images that are not 4-D or empty, an unknown basis or layer name, a
            model without a usable feature map (no spatial or token map of the batch), or a final
            feature map that is not finite.
        BasisMismatchError: (a ``ValueError``) for a ``reference`` of the wrong shape.

    Example::

        >>> import torchvision
        >>> result = prism(torchvision.models.resnet18(), torch.rand(4, 3, 64, 64))
        >>> result.maps.shape, result.final_layer, result.stage_layers
        (torch.Size([4, 3, 64, 64]), 'layer4', ['relu', 'layer1', 'layer2', 'layer3'])
    """
    check_inputs(model, images, basis)

    recording = record(
        model, images, final_layer=final_layer, stage_layers=stage_layers, inference_mode=inference_mode
    )
    return from_recording(
        recording, tuple(images.shape[-2:]), extrapolate=extrapolate, basis=basis, reference=reference
    )


def from_recording(
    recording: Recording,
    image_size: tuple[int, int],
    *,
    extrapolate: bool = True,
    basis: Basis = "aligned",
    reference: Tensor | None = None,
) -> PRISMResult:
    """PRISM's maths on a recorded forward: what :func:`prism` does after its forward pass.

    Args:
        recording: a forward's :class:`~lightning_prism.recording.Recording`.
        image_size: ``(H, W)`` of the images, the size of the extrapolated maps.
        extrapolate, basis, reference: as for :func:`prism`.

    Returns:
        :class:`PRISMResult` (its ``final`` detached from any autograd graph).

    Raises:
        ValueError: for a final feature map that is not finite.
        BasisMismatchError: (a ``ValueError``) for a ``reference`` of the wrong shape.
    """
    with torch.no_grad(), torch.autocast(recording.final.device.type, enabled=False):
        final = recording.final.detach()
        try:
            pcs = principal_components(final, NUM_COMPONENTS)
        except ValueError as error:  # a 4-D map and three components: only a map that is not finite
            raise ValueError(
                f"the final feature map ({recording.final_layer!r}) contains NaN or infinite values"
            ) from error
        components, features = pcs.components, pcs.scores
        if reference is not None and basis != "refit":
            if reference.shape != components.shape:
                raise BasisMismatchError(
                    f"reference basis has shape {tuple(reference.shape)}, expected {tuple(components.shape)} "
                    f"for the {final.shape[1]}-channel final feature map of {recording.final_layer!r}"
                )
            reference = reference.to(device=components.device, dtype=components.dtype)
            if basis == "aligned":
                components, order, signs = align_components(components, reference)
                features = features[:, order] * signs.view(1, -1, 1, 1)
            else:
                components, features = reference, project(final, reference, pcs.mean)
        # ‖X a‖² / Σ‖x − mean‖² for each colour's axis a (with the refit basis: the top three shares)
        total = pcs.total_variance.clamp_min(torch.finfo(pcs.total_variance.dtype).tiny)
        colour_variance = features.square().sum(dim=(0, 2, 3)) / total
        usable = components.norm(dim=0) > 0
        if extrapolate:
            maps = gradual_extrapolation(features, recording.stage_maps, image_size)
        else:
            maps = unit_scale(features)
        rgb, informative = rgb_and_informative(maps, usable, inplace=True)  # a fresh tensor: reuse it
    if not informative:
        reason = (
            "has the same value at every pixel of the batch"
            if not bool(usable.any())
            else f"gives uniform maps through the stages {recording.stage_layers}"
        )
        warnings.warn(
            f"PRISM maps of this batch are uniform: the final feature map {recording.final_layer!r} {reason}. "
            "Check that the images differ and the model is not degenerate, or pass final_layer= to choose "
            "another layer.",
            UserWarning,
            stacklevel=3,
        )
    return PRISMResult(
        maps=rgb,
        features=features.to(torch.float32),
        colour_variance=colour_variance.to(torch.float32),
        final=final,
        components=components,
        mean=pcs.mean,
        final_layer=recording.final_layer,
        stage_layers=recording.stage_layers,
        output=recording.output,
        final_layout=recording.final_layout,
    )
