"""Class prototypes: the input that a classifier scores highest for a class (activation maximisation).

A class prototype is the image ``x`` that maximises the score ``y_c(x)`` of class ``c`` (Simonyan et
al. 2013, "Deep Inside Convolutional Networks": class model visualisation). Plain gradient ascent on the
pixels finds high-frequency patterns that score high and show nothing a person can read, and that a
shift of a few pixels undoes. What the feature-visualisation literature found works is followed here
(Olah et al. 2017, "Feature Visualization"; Mordvintsev et al. 2018, "Differentiable Image
Parameterizations"), in three small pieces kept apart, as the Lucent library arranges them:

- a *parameterisation* of the image: :class:`FourierImage`, a spectrum scaled by ``1/f^decay`` toward
  low frequencies (:func:`spectrum_scale`), in a decorrelated colour basis (:data:`COLOUR_CORRELATION`),
  through a sigmoid into ``[0, 1]``; and :class:`PixelImage`, the pixels themselves (plain ascent);
- *transforms* applied at every step, so that the image must score high whatever small shift, scaling
  and rotation the network sees it under (transformation robustness): :func:`pad`, :func:`jitter`,
  :func:`random_scale`, :func:`random_rotate`, :func:`compose`, and :func:`standard_transforms`;
- an *objective*: :func:`class_objective`, the class logit;

and :func:`render`, the loop (Adam on the image's parameters for a fixed number of steps).
:func:`class_prototypes` puts them together for a model and returns a :class:`PrototypeResult`.

Randomness comes from one ``torch.Generator`` per call, seeded from ``seed``: the same seed gives the
same prototypes, and the global random state of torch, NumPy and Python is not touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gradients import _differentiable_eval, _grad_on, _unwrap
from .hooks import ModuleTaps, wrappers_allowed
from .recording import observed_modules
from .scores import class_score, class_scores

__all__ = [
    "COLOUR_CORRELATION",
    "DEFAULT_DECAY",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "FourierImage",
    "ImageParameterisation",
    "PixelImage",
    "PrototypeResult",
    "Transform",
    "affine",
    "class_objective",
    "class_prototypes",
    "compose",
    "decorrelated_to_rgb",
    "jitter",
    "pad",
    "random_rotate",
    "random_scale",
    "render",
    "rgb_to_decorrelated",
    "spectrum_scale",
    "standard_transforms",
    "translate",
]

#: Adam steps of :func:`class_prototypes` (see ``benchmarks/README.md`` for how they were chosen).
DEFAULT_STEPS = 64
#: Adam's learning rate on the spectrum (or pixel logit) parameters.
DEFAULT_LR = 0.1
#: Exponent of the ``1/f`` scaling of the spectrum (1: a natural image's amplitude falls as ``1/f``).
DEFAULT_DECAY = 1.5
#: The grey that transforms fill uncovered pixels with, in the ``[0, 1]`` image.
GREY = 0.5
#: Values of an ``init`` image are clamped to ``[EPS, 1 - EPS]`` before the sigmoid is inverted.
EPS = 1e-3

#: The square root of ImageNet's RGB colour covariance (Olah et al. 2017; the matrix published with
#: Lucid, also used by Lucent), columns scaled so that the largest has norm 1: decorrelated
#: ``(luminance, colour, colour)`` to RGB. Its first column, luminance, has norm 1; the two colour
#: directions are weaker, so the optimiser changes brightness more readily than hue, as in photos.
COLOUR_CORRELATION = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64
)
COLOUR_CORRELATION = COLOUR_CORRELATION / COLOUR_CORRELATION.norm(dim=0).max()

#: ``transform(image, generator) -> image``: ``(N, C, H, W)`` in, the same batch transformed out,
#: every random amount drawn from ``generator`` (one draw for the whole batch).
Transform = Callable[[Tensor, torch.Generator], Tensor]


# ------------------------------------------------------------------------------ parameterisation
def spectrum_scale(size: tuple[int, int], decay: float = DEFAULT_DECAY, device: Any = None) -> Tensor:
    """The factor of every coefficient of an ``rfft2`` spectrum of an ``H×W`` image: ``(f0 / max(f,
    f0))^decay · sqrt(H·W)``, with ``f`` the frequency in cycles per pixel and ``f0 = 1 / max(H, W)``
    the lowest one (Mordvintsev et al. 2018).

    With an orthonormal inverse FFT, a parameter of 1 at the zero frequency is a constant 1 in the
    image, and a parameter at frequency ``f`` counts ``(f0 / f)^decay`` as much: the optimiser moves
    low frequencies (shapes) more readily than high ones (noise), as a natural image's ``1/f``
    spectrum has them.

    Args:
        size: ``(H, W)``.
        decay: the exponent; 0 weighs every frequency alike.
        device: where the result lives.

    Returns:
        ``(H, W // 2 + 1)`` float32.

    Example::

        >>> spectrum_scale((4, 4), decay=1.0)
        tensor([[4.0000, 4.0000, 2.0000],
                [4.0000, 2.8284, 1.7889],
                [2.0000, 1.7889, 1.4142],
                [4.0000, 2.8284, 1.7889]])
    """
    h, w = size
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float32)[:, None]
    fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float32)[None, :]
    lowest = 1.0 / max(h, w)
    f = (fy.square() + fx.square()).sqrt().clamp(min=lowest)
    return (lowest / f).pow(decay) * math.sqrt(h * w)


def decorrelated_to_rgb(x: Tensor) -> Tensor:
    """Map ``(N, 3, H, W)`` decorrelated colour to RGB with :data:`COLOUR_CORRELATION`; other channel
    counts (a grey model's 1) pass unchanged."""
    if x.shape[1] != 3:
        return x
    return torch.einsum("ij,njhw->nihw", COLOUR_CORRELATION.to(x.device, x.dtype), x)


def rgb_to_decorrelated(x: Tensor) -> Tensor:
    """The inverse of :func:`decorrelated_to_rgb`."""
    if x.shape[1] != 3:
        return x
    inverse = torch.linalg.inv(COLOUR_CORRELATION).to(x.device, x.dtype)
    return torch.einsum("ij,njhw->nihw", inverse, x)


class ImageParameterisation(Protocol):
    """An image batch as a function of parameters: ``image()`` is ``(N, C, H, W)`` in ``[0, 1]``,
    differentiable in ``parameters()``."""

    def parameters(self) -> list[Tensor]: ...

    def __call__(self) -> Tensor: ...


class FourierImage:
    """Images as scaled Fourier spectra in a decorrelated colour basis, through a sigmoid (Olah et al.
    2017; Mordvintsev et al. 2018).

    ``image = sigmoid(decorrelated_to_rgb(irfft2(spectrum · spectrum_scale(size, decay))))``, the
    inverse FFT orthonormal. Adam's steps on the spectrum are steps of about the same size for every
    coefficient, so the scaling makes an image change mostly in its low frequencies, and the colour
    basis makes it change mostly in brightness; the sigmoid keeps every pixel in ``(0, 1)``.

    Args:
        spectrum: ``(N, C, H, W // 2 + 1, 2)`` real and imaginary parts; the instance optimises this
            tensor in place (a leaf that requires grad).
        size: ``(H, W)``.
        decay: the exponent of :func:`spectrum_scale`.

    Example::

        >>> image = FourierImage.random(2, 3, (8, 8), torch.Generator().manual_seed(0))
        >>> x = image()
        >>> x.shape, bool((x - 0.5).abs().max() < 0.05)
        (torch.Size([2, 3, 8, 8]), True)
    """

    def __init__(self, spectrum: Tensor, size: tuple[int, int], decay: float = DEFAULT_DECAY) -> None:
        h, w = size
        if spectrum.ndim != 5 or tuple(spectrum.shape[2:]) != (h, w // 2 + 1, 2):
            raise ValueError(
                f"spectrum must be (N, C, {h}, {w // 2 + 1}, 2) for size {size}, got {tuple(spectrum.shape)}"
            )
        self.spectrum = (
            spectrum.detach().to(torch.float32).clone(memory_format=torch.contiguous_format).requires_grad_()
        )
        self.size = (h, w)
        self.scale = spectrum_scale(self.size, decay, spectrum.device)

    @classmethod
    def random(
        cls,
        n: int,
        channels: int,
        size: tuple[int, int],
        generator: torch.Generator,
        decay: float = DEFAULT_DECAY,
        std: float = 0.01,
        device: Any = None,
    ) -> FourierImage:
        """``n`` images that all start from the same random spectrum (normal, ``std``), drawn from
        ``generator`` on its device and moved to ``device``: nearly uniform grey."""
        h, w = size
        draw = torch.randn((1, channels, h, w // 2 + 1, 2), generator=generator, device=generator.device)
        return cls((draw * std).to(device).expand(n, -1, -1, -1, -1), size, decay)

    @classmethod
    def from_image(cls, image: Tensor, decay: float = DEFAULT_DECAY, eps: float = EPS) -> FourierImage:
        """The parameters whose image is ``image`` (``(N, C, H, W)`` in ``[0, 1]``, clamped to ``[eps,
        1 - eps]``): the sigmoid, the colour basis and the scaled FFT inverted."""
        size = (image.shape[-2], image.shape[-1])
        logits = torch.logit(image.to(torch.float32).clamp(eps, 1 - eps))
        spectrum = torch.fft.rfft2(rgb_to_decorrelated(logits), norm="ortho")
        spectrum = spectrum / spectrum_scale(size, decay, image.device)
        return cls(torch.view_as_real(spectrum), size, decay)

    def parameters(self) -> list[Tensor]:
        return [self.spectrum]

    def __call__(self) -> Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        x = torch.fft.irfft2(spectrum, s=self.size, norm="ortho")
        return torch.sigmoid(decorrelated_to_rgb(x))


class PixelImage:
    """Images as their own pixels, through a sigmoid: ``image = sigmoid(logits)`` (plain pixel ascent).

    Args:
        logits: ``(N, C, H, W)``; optimised in place (a leaf that requires grad).

    Example::

        >>> PixelImage(torch.tensor([[[[0.0, 2.0]]]]))().flatten().tolist()
        [0.5, 0.8807970285415649]
    """

    def __init__(self, logits: Tensor) -> None:
        self.logits = (
            logits.detach().to(torch.float32).clone(memory_format=torch.contiguous_format).requires_grad_()
        )

    @classmethod
    def random(
        cls,
        n: int,
        channels: int,
        size: tuple[int, int],
        generator: torch.Generator,
        std: float = 0.01,
        device: Any = None,
    ) -> PixelImage:
        """``n`` images that all start from the same random logits (normal, ``std``): nearly grey."""
        draw = torch.randn((1, channels, *size), generator=generator, device=generator.device)
        return cls((draw * std).to(device).expand(n, -1, -1, -1))

    @classmethod
    def from_image(cls, image: Tensor, eps: float = EPS) -> PixelImage:
        """The logits of ``image`` (``(N, C, H, W)`` in ``[0, 1]``, clamped to ``[eps, 1 - eps]``)."""
        return cls(torch.logit(image.to(torch.float32).clamp(eps, 1 - eps)))

    def parameters(self) -> list[Tensor]:
        return [self.logits]

    def __call__(self) -> Tensor:
        return torch.sigmoid(self.logits)


# ------------------------------------------------------------------------------------ transforms
def translate(image: Tensor, dy: int, dx: int, fill: float = GREY) -> Tensor:
    """Shift a batch down by ``dy`` and right by ``dx`` whole pixels (negative: up, left), filling the
    pixels uncovered with ``fill``: ``out[..., y, x] = image[..., y - dy, x - dx]``.

    Example::

        >>> translate(torch.tensor([[[[1.0, 2.0, 3.0]]]]), 0, 1, fill=0.0)
        tensor([[[[0., 1., 2.]]]])
    """
    if dy == 0 and dx == 0:
        return image
    h, w = image.shape[-2:]
    padded = F.pad(image, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), value=fill)
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def affine(image: Tensor, angle: float = 0.0, scale: float = 1.0, fill: float = GREY) -> Tensor:
    """Rotate a batch by ``angle`` degrees (anticlockwise as displayed, rows downward) and scale it by
    ``scale`` about the image centre, sampling bilinearly (``align_corners=False``) and filling what
    comes from outside the image with ``fill``. The size stays ``H×W``.

    Example::

        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> affine(x, angle=90.0)  # the top-right pixel comes to the top left
        tensor([[[[1., 3.],
                  [0., 2.]]]])
    """
    if angle == 0 and scale == 1:
        return image
    n, _, h, w = image.shape
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # output position (u, v), normalised to [-1, 1] per axis -> where it is sampled from in the input:
    # the inverse rotation and scaling, computed in pixel units (the axes differ for H != W)
    theta = torch.tensor(
        [[c / scale, -s * h / (w * scale), 0.0], [s * w / (h * scale), c / scale, 0.0]],
        dtype=image.dtype,
        device=image.device,
    ).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    moved = F.grid_sample(image - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved + fill


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def pad(width: int, fill: float = GREY) -> Transform:
    """A transform that adds a ``width``-pixel border of ``fill`` (``H×W`` becomes ``(H + 2w)×(W + 2w)``;
    for a model that takes any size, as Lucent's standard transforms start)."""

    def transform(image: Tensor, generator: torch.Generator) -> Tensor:
        return F.pad(image, (width,) * 4, value=fill)

    return transform


def jitter(pixels: int, fill: float = GREY) -> Transform:
    """A transform that shifts the batch by whole pixels ``(dy, dx)``, each drawn uniformly from
    ``-pixels … pixels`` (:func:`translate`)."""

    def transform(image: Tensor, generator: torch.Generator) -> Tensor:
        dy, dx = torch.randint(
            -pixels, pixels + 1, (2,), generator=generator, device=generator.device
        ).tolist()
        return translate(image, dy, dx, fill)

    return transform


def random_scale(low: float, high: float, fill: float = GREY) -> Transform:
    """A transform that scales the batch about its centre by a factor drawn uniformly from ``[low,
    high]`` (:func:`affine`)."""

    def transform(image: Tensor, generator: torch.Generator) -> Tensor:
        return affine(image, scale=_uniform(generator, low, high), fill=fill)

    return transform


def random_rotate(degrees: float, fill: float = GREY) -> Transform:
    """A transform that rotates the batch about its centre by an angle drawn uniformly from
    ``[-degrees, degrees]`` (:func:`affine`)."""

    def transform(image: Tensor, generator: torch.Generator) -> Tensor:
        return affine(image, angle=_uniform(generator, -degrees, degrees), fill=fill)

    return transform


def compose(transforms: Sequence[Transform]) -> Transform:
    """One transform that applies ``transforms`` in order (none: the identity)."""
    chain = list(transforms)

    def transform(image: Tensor, generator: torch.Generator) -> Tensor:
        for t in chain:
            image = t(image, generator)
        return image

    return transform


def standard_transforms() -> list[Transform]:
    """The transforms :func:`class_prototypes` applies at every step by default: a shift of up to 8
    pixels, a scaling by 0.9-1.1, a rotation by up to 10 degrees and a further shift of up to 4
    pixels, uncovered pixels grey. The size stays ``H×W``, so models with one input size work too.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> compose(standard_transforms())(torch.rand(2, 3, 32, 32), g).shape
        torch.Size([2, 3, 32, 32])
    """
    return [jitter(8), random_scale(0.9, 1.1), random_rotate(10.0), jitter(4)]


# ------------------------------------------------------------------------------------- objective
def class_objective(scores: Tensor, classes: Tensor) -> Tensor:
    """Each image's score of its class: the logit, not the softmax probability.

    The softmax probability of class ``c`` can be raised by lowering the other classes' scores,
    which makes the image less like them rather than more like ``c``; the logit can only be raised by
    what speaks for ``c`` (Simonyan et al. 2013). A single-logit model (scores ``(N, 1)`` or ``(N,)``,
    ``sigmoid(z)`` the probability of class 1) scores class 1 by ``+z`` and class 0 by ``-z``.

    Args:
        scores: ``(N, K)`` logits, or ``(N, 1)`` / ``(N,)`` for a single-logit model.
        classes: ``(N,)`` long, the class of every image.

    Returns:
        ``(N,)`` float32.

    Example::

        >>> class_objective(torch.tensor([[1.0, 5.0], [2.0, 0.5]]), torch.tensor([1, 0]))
        tensor([5., 2.])
        >>> class_objective(torch.tensor([3.0, 3.0]), torch.tensor([1, 0]))
        tensor([ 3., -3.])
    """
    scores = scores.to(torch.float32)
    return class_score(scores[:, None] if scores.ndim == 1 else scores, classes)


# ------------------------------------------------------------------------------------------ loop
def render(
    image: ImageParameterisation,
    objective: Callable[[Tensor], Tensor],
    *,
    steps: int,
    lr: float = DEFAULT_LR,
    transforms: Sequence[Transform] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Maximise ``objective`` of a parameterised image batch with Adam.

    Every step draws one transform of the batch (``transforms`` in order, from ``generator``; the
    image and its transforms computed in float32 with autocast off), scores the transformed images and takes one Adam step (learning rate ``lr``) up the gradient of the sum
    of their objectives with respect to ``image.parameters()`` only (``torch.autograd.grad``: nothing
    else gets a ``.grad``). Adam works element by element, so an image's path does not depend on
    the others in the batch when their objectives do not.

    Args:
        image: the parameterisation; its parameters are updated in place.
        objective: ``(N, C, H, W)`` images in ``[0, 1]`` → ``(N,)`` values to maximise.
        steps: number of Adam steps.
        lr: Adam's learning rate.
        transforms: applied to the images before the objective at every step.
        generator: source of the transforms' random amounts (needed when there are transforms).

    Returns:
        ``(steps,)`` float32: the mean objective of the transformed batch at each step, before its
        update.

    Raises:
        ValueError: if the objective does not depend on the image's parameters.

    Example::

        >>> w = torch.tensor([1.0, -1.0])
        >>> x = PixelImage(torch.zeros(1, 2, 1, 1))
        >>> history = render(x, lambda i: (i.flatten(1) * w).sum(1), steps=50, lr=0.1)
        >>> bool(history[-1] > history[0]), x().flatten().tolist() > [0.9, 0.0]
        (True, True)
    """
    parameters = image.parameters()
    transform = compose(transforms)
    if transforms and generator is None:
        raise ValueError("render needs a generator for random transforms")
    optimiser = torch.optim.Adam(parameters, lr=lr, maximize=True)
    device_type = parameters[0].device.type
    history = []
    for _ in range(steps):
        with torch.autocast(device_type, enabled=False):  # the image and its transforms in float32
            x = transform(image(), generator)  # type: ignore[arg-type]
        value = objective(x)
        total = value.sum()
        if not total.requires_grad:
            raise ValueError("the class scores do not depend on the input image through autograd")
        gradients = torch.autograd.grad(total, parameters)
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = gradient
        optimiser.step()
        history.append(value.detach().mean())
    for parameter in parameters:
        parameter.grad = None
    return torch.stack(history).to("cpu", torch.float32) if history else torch.zeros(0)


# ---------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class PrototypeResult:
    """Class prototypes of a model (:func:`class_prototypes`).

    Attributes:
        images: ``(K, C, H, W)`` float32, the optimised inputs in the model's input space (what its
            forward takes: ``(display - mean) / std``).
        display: ``(K, C, H, W)`` float32 in ``[0, 1]``, the same images for a person to look at.
        scores: ``(K,)`` float32, each prototype's score of its class (the logit; a single-logit
            model's class 0: the negated logit), without transforms.
        probabilities: ``(K,)`` float32, each prototype's probability of its class: the softmax over
            the model's classes; ``sigmoid(scores)`` for a single-logit model.
        classes: ``(K,)`` long, the class of each prototype.
        history: ``(steps,)`` float32, the mean objective of the transformed batch at every step.
        steps: number of optimisation steps taken.
    """

    images: Tensor
    display: Tensor
    scores: Tensor
    probabilities: Tensor
    classes: Tensor
    history: Tensor
    steps: int


# ----------------------------------------------------------------------------------- arguments
def _check_classes(classes: Any) -> Tensor:
    kind = "classes must be class indices (an int, a sequence of ints or an integer tensor)"
    if isinstance(classes, bool) or (isinstance(classes, Tensor) and classes.dtype == torch.bool):
        raise TypeError(f"{kind}, got {classes!r}")
    try:
        value = classes.detach().cpu() if isinstance(classes, Tensor) else torch.as_tensor(classes)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{kind}, got {classes!r}") from error
    value = value.reshape(-1) if value.ndim == 0 else value
    if value.ndim != 1 or value.numel() == 0:
        raise ValueError(f"classes must be a non-empty list of class indices, got shape {tuple(value.shape)}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{kind}, got a {value.dtype} value: {classes!r}")
    if bool((value < 0).any()):
        raise ValueError(f"classes must be class indices >= 0, got {value.tolist()}")
    return value.to(torch.long)


def _check_positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_size(size: Any, init: Tensor | None) -> tuple[int, int]:
    if size is None:
        if init is None:
            raise ValueError("size=(H, W) is required when no init image is given")
        return (init.shape[-2], init.shape[-1])
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
    ):
        raise ValueError(f"size must be (H, W), two positive ints (or one int), got {size!r}")
    if init is not None and tuple(pair) != tuple(init.shape[-2:]):
        raise ValueError(f"size {tuple(pair)} differs from the init images' {tuple(init.shape[-2:])}")
    return (pair[0], pair[1])


def _check_init(init: Any, k: int) -> Tensor | None:
    if init is None:
        return None
    if not isinstance(init, Tensor) or not init.is_floating_point():
        kind = f"a {init.dtype} tensor" if isinstance(init, Tensor) else type(init).__name__
        raise TypeError(f"init must be a floating-point tensor, got {kind}")
    if init.ndim != 4 or init.shape[0] not in (1, k):
        raise ValueError(
            f"init must be a (1, C, H, W) or (K, C, H, W) batch with K = {k} classes, got shape {tuple(init.shape)}"
        )
    if not bool(torch.isfinite(init).all()):
        raise ValueError("init must be finite")
    return init


def _check_statistic(name: str, value: Any, channels: int, device: torch.device) -> Tensor | None:
    """``mean``/``std`` as a ``(1, C, 1, 1)`` float32 tensor (one value is broadcast)."""
    if value is None:
        return None
    try:
        t = torch.as_tensor(value.detach().cpu() if isinstance(value, Tensor) else value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a number or one number per channel, got {value!r}") from error
    t = t.reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {t.numel()}: {value!r}")
    if not bool(torch.isfinite(t).all()) or (name == "std" and bool((t <= 0).any())):
        raise ValueError(f"{name} must be finite{' and positive' if name == 'std' else ''}, got {value!r}")
    return t.view(1, channels, 1, 1).to(device)


def _check_number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (value <= 0) if positive else (value < 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _class_scores(output: Any) -> Tensor:
    """The class scores in a model's output (:func:`~lightning_prism.scores.class_scores`), floating
    point: ``(N, K)``, or ``(N, 1)`` for a single logit (also returned as ``(N,)``)."""
    scores = class_scores(output)
    if scores is None or not scores.is_floating_point():
        if isinstance(output, Tensor):
            found = f"a {output.dtype} tensor of shape {tuple(output.shape)}"
        else:
            found = type(output).__name__
        raise ValueError(
            f"the model must return class scores (logits) of shape (N, K), (N, 1) or (N,), got {found}"
        )
    return scores


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's first floating parameter (or buffer) lives and its dtype: the input's."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    tensor = next(iter((*model.parameters(), *model.buffers())), None)
    return (tensor.device if tensor is not None else torch.device("cpu")), torch.float32


def _no_autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, enabled=False)


def _num_classes(
    forward: Callable[[Tensor], Any], channels: int, size: tuple[int, int], device: torch.device
) -> tuple[int, bool]:
    """How many classes the model scores, and whether it has a single logit (2 classes then), from one
    forward of a grey ``(1, C, H, W)`` image; a failing forward gets a note about the input size."""
    try:
        with torch.no_grad():
            output = forward(torch.full((1, channels, *size), GREY, device=device))
    except Exception as error:
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(
                f"class_prototypes ran the model on a (1, {channels}, {size[0]}, {size[1]}) batch; if the model "
                "takes one input size only (a vision transformer with a fixed image size), pass size= that size"
            )
        raise
    scores = _class_scores(output)
    single = scores.ndim == 1 or scores.shape[1] == 1
    return (2 if single else scores.shape[1]), single


# ------------------------------------------------------------------------------------ prototypes
def class_prototypes(
    model: nn.Module,
    classes: Any,
    size: int | tuple[int, int] | None = None,
    *,
    mean: Any = None,
    std: Any = None,
    steps: int = DEFAULT_STEPS,
    init: Tensor | None = None,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    decay: float = DEFAULT_DECAY,
    transforms: Sequence[Transform] | None = None,
    parameterisation: str = "fourier",
    grey: bool = False,
) -> PrototypeResult:
    """Class prototypes: for each class, the input that maximises its score (Simonyan et al. 2013),
    made readable as Olah et al. 2017 describe.

    Each prototype is an image in ``[0, 1]`` parameterised as a :class:`FourierImage` (a spectrum
    scaled toward low frequencies in a decorrelated colour basis, through a sigmoid; Mordvintsev et al.
    2018); at every step it is shifted, scaled and rotated by a random small amount
    (:func:`standard_transforms`), normalised as the model expects (``(x - mean) / std``), and Adam
    takes one step up the gradient of its class's logit (:func:`class_objective`: the logit rather
    than the softmax probability, which can be raised by lowering the other classes). The objective
    must hold under the transforms, which is what keeps high-frequency adversarial patterns out:
    what remains survives a shift or a rotation, as the object would.

    All ``K`` prototypes are optimised as one batch, one forward and one backward (to the images
    only) per step. They start from the same random image (or ``init``), see the same transform at
    each step, and the model runs in eval mode, where its batch norms do not mix images, so each
    prototype is the same whichever other classes are in the batch.

    The model runs in eval mode; every module's ``training`` flag, the grad mode, the inference mode,
    the autocast state, every parameter's ``requires_grad`` and ``.grad`` are left as found (no
    parameter ever gets a gradient; frozen ones stay frozen); the wrappers that switch gradients back
    on in a model that switches them off inside its forward exist only during the call. Works under
    ``torch.no_grad()``, ``torch.inference_mode()`` and autocast (the forward runs in the caller's
    precision; the image and the scores in float32). The images live on the model's device. A model
    inside ``nn.DataParallel`` or ``DistributedDataParallel`` runs without the wrapper, so no
    collective runs. Randomness comes from one ``torch.Generator`` seeded with ``seed`` (the global
    random state is not used): the same arguments give the same prototypes (on a GPU, up to its
    nondeterministic kernels).

    Args:
        model: a classifier returning ``(N, K)`` class scores (logits; a tensor, or an output with
            ``logits``), or ``(N, 1)`` / ``(N,)`` for a single-logit (binary) model.
        classes: the class of each prototype: an int, a sequence or an integer tensor of ``K``
            indices below the model's number of classes (0 and 1 for a single logit).
        size: ``(H, W)`` (or one int) of the images; from ``init`` if omitted there.
        mean: the normalisation the model expects, one value per channel (or one for all): the model
            sees ``(image - mean) / std``; ``None``: no shift.
        std: as ``mean``; ``None``: no scaling.
        steps: number of Adam steps (0 returns the starting images).
        init: ``(K, C, H, W)`` or ``(1, C, H, W)`` images in the model's input space to start from
            (normalised as the model expects): "what would this image need to become that class".
            Their ``[0, 1]`` values are clamped to ``[0.001, 0.999]`` (where the sigmoid is invertible).
        seed: seeds the one generator of the call (start image, transforms).
        lr: Adam's learning rate.
        decay: the exponent of the ``1/f`` scaling of the spectrum (:func:`spectrum_scale`).
        transforms: the transforms of every step; ``None``: :func:`standard_transforms`; ``()``: none.
        parameterisation: ``"fourier"`` (:class:`FourierImage`) or ``"pixel"`` (:class:`PixelImage`,
            for comparison: plain pixel ascent, with ``transforms=()``).
        grey: optimise one grey channel, repeated over the model's ``C`` input channels: for a model
            trained on grey images shown as colour ones (as the fine-tuning example's digits), whose
            prototypes would otherwise fill the colour directions it never saw.

    Returns:
        :class:`PrototypeResult`. ``C`` is ``init``'s channels, else 3 (a grey model: pass a
        one-channel ``init``; colour decorrelation applies to 3 channels only).

    Raises:
        TypeError: if ``model`` is not a module, ``classes`` not class indices, ``init`` not a floating
            tensor, ``steps`` or ``seed`` not an int.
        ValueError: for ``classes`` outside the model's outputs (naming how many it has), a model whose
            output holds no ``(N, K)``, ``(N, 1)`` or ``(N,)`` class scores (naming what it returned),
            negative ``steps``, a bad ``size``, ``mean``/``std`` of the wrong length, an ``init`` of
            the wrong shape, an unknown ``parameterisation``, scores that do not depend on the input
            or are not finite.
        Exception: the model's own error when its forward fails on a ``(1, C, H, W)`` batch of
            ``size``, with a note that says to pass the input size the model takes (a vision
            transformer with a fixed image size).

    Example::

        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=4)
        >>> p = class_prototypes(net, [0, 3], size=(32, 32), steps=2)
        >>> p.images.shape, p.display.shape, p.scores.shape, p.classes.tolist()
        (torch.Size([2, 3, 32, 32]), torch.Size([2, 3, 32, 32]), torch.Size([2]), [0, 3])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = _check_classes(classes)
    k = targets.numel()
    steps = _check_positive_int("steps", steps, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    lr = _check_number("lr", lr, positive=True)
    decay = _check_number("decay", decay, positive=False)
    if parameterisation not in ("fourier", "pixel"):
        raise ValueError(f"parameterisation must be 'fourier' or 'pixel', got {parameterisation!r}")
    init = _check_init(init, k)
    hw = _check_size(size, init)
    channels = init.shape[1] if init is not None else 3
    if not isinstance(grey, bool):
        raise TypeError(f"grey must be a bool, got {grey!r}")
    shade = 1 if grey else channels  # the optimised image's channels
    chain = standard_transforms() if transforms is None else list(transforms)

    inner, _ = _unwrap(model)
    device, dtype = _device_and_dtype(inner)
    modules = observed_modules(inner)
    wrap = wrappers_allowed(m for _, m in modules)
    with _differentiable_eval(inner), ModuleTaps() as taps:
        # tensors made here are normal ones even under the caller's inference mode
        mean_t = _check_statistic("mean", mean, channels, device)
        std_t = _check_statistic("std", std, channels, device)
        targets = targets.to(device).clone()  # not an inference tensor: the objective's gather saves it

        def normalise(x: Tensor) -> Tensor:
            if mean_t is not None:
                x = x - mean_t
            return x / std_t if std_t is not None else x

        # on the CPU the forward and the backward to the input run faster in channels-last layout
        layout: dict[str, torch.memory_format | None] = {
            "format": torch.channels_last if device.type == "cpu" else None
        }

        def forward(x: Tensor) -> Any:
            with _no_autocast(device):
                if x.shape[1] != channels:  # one grey channel, as the model's C
                    x = x.expand(-1, channels, -1, -1)
                x = normalise(x)
                x = x.to(dtype)
                if layout["format"] is not None:
                    x = x.contiguous(memory_format=layout["format"])
            return inner(x)

        def scores_of(x: Tensor) -> Tensor:
            return _class_scores(forward(x)).to(torch.float32)

        for _, module in modules:  # a model that switches gradients off inside its forward
            taps.around(module, _grad_on, _grad_on, wrap=wrap)
        try:
            num_classes, single = _num_classes(forward, channels, hw, device)
        except RuntimeError:
            if layout["format"] is None:
                raise
            layout["format"] = None  # a model that rejects channels-last input (a view of it, say)
            num_classes, single = _num_classes(forward, channels, hw, device)
        if bool((targets >= num_classes).any()):
            found = "a single logit: classes 0 and 1" if single else f"{num_classes} classes"
            raise ValueError(
                f"classes must be indices of the model's outputs ({found}), got {targets.tolist()}"
            )

        generator = torch.Generator().manual_seed(seed)
        with _no_autocast(device):
            if init is None and parameterisation == "fourier":
                image: ImageParameterisation = FourierImage.random(
                    k, shade, hw, generator, decay=decay, device=device
                )
            elif init is None:
                image = PixelImage.random(k, shade, hw, generator, device=device)
            else:
                x01 = init.detach().to(device=device, dtype=torch.float32)
                if std_t is not None:
                    x01 = x01 * std_t
                if mean_t is not None:
                    x01 = x01 + mean_t
                x01 = x01.expand(k, -1, -1, -1)
                if grey:
                    x01 = x01.mean(dim=1, keepdim=True)
                image = (
                    FourierImage.from_image(x01, decay)
                    if parameterisation == "fourier"
                    else PixelImage.from_image(x01)
                )

        def objective(x: Tensor) -> Tensor:
            return class_objective(scores_of(x), targets)

        history = render(image, objective, steps=steps, lr=lr, transforms=chain, generator=generator)
        with torch.no_grad():
            with _no_autocast(device):
                display = image().detach().expand(-1, channels, -1, -1).contiguous()
            scores = scores_of(display)
        with torch.no_grad(), _no_autocast(device):
            chosen = class_objective(scores, targets)
            if not bool(torch.isfinite(chosen).all()):
                raise ValueError(f"the model's scores of the prototypes are not finite: {chosen.tolist()}")
            if single:
                probabilities = torch.sigmoid(chosen)
            else:
                probabilities = scores.softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
            images = normalise(display)
    return PrototypeResult(
        images=images,
        display=display,
        scores=chosen,
        probabilities=probabilities,
        classes=targets,
        history=history,
        steps=steps,
    )
