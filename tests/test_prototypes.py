from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from conftest import hook_count, tiny_cnn
from lightning_prism import PrototypeResult, class_prototypes
from lightning_prism.prototypes import (
    FourierImage,
    PixelImage,
    affine,
    class_objective,
    compose,
    decorrelated_to_rgb,
    jitter,
    pad,
    random_rotate,
    random_scale,
    render,
    rgb_to_decorrelated,
    spectrum_scale,
    standard_transforms,
    translate,
)

# The square root of ImageNet's colour covariance as Olah et al. (2017) publish it with Lucid.
PUBLISHED_COLOUR_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_scorer(weights: torch.Tensor) -> nn.Module:
    """``s = W x`` on the flattened image, no bias: ``weights`` is ``(K, C·H·W)``."""
    linear = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weights)
    return nn.Sequential(nn.Flatten(), linear)


def bn_cnn(num_classes: int = 3) -> nn.Sequential:
    """A tiny CNN with batch norms (in training mode they would mix the images of a batch)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


# ---------------------------------------------------------------------------- the optimiser loop
class SphereImage:
    """Images on the sphere of radius ``r`` (a norm bound, independent of the library's
    parameterisations): ``x = r · v / ‖v‖``."""

    def __init__(self, v: torch.Tensor, shape: tuple[int, ...], r: float) -> None:
        self.v, self.shape, self.r = v.clone().requires_grad_(), shape, r

    def parameters(self) -> list[torch.Tensor]:
        return [self.v]

    def __call__(self) -> torch.Tensor:
        return (self.r * self.v / self.v.norm(dim=1, keepdim=True)).view(self.shape)


def test_render_reaches_the_closed_form_optimum_of_a_linear_scorer_under_a_norm_bound():
    torch.manual_seed(0)
    w = torch.randn(4, 2 * 3 * 3)
    scorer = linear_scorer(w)
    classes = torch.tensor([2, 0, 3])
    image = SphereImage(torch.randn(3, 18), (3, 2, 3, 3), r=2.0)
    history = render(image, lambda x: class_objective(scorer(x), classes), steps=300, lr=0.05)
    x = image().detach().flatten(1)
    optimum = 2.0 * w[classes] / w[classes].norm(dim=1, keepdim=True)  # max of w_c·x over ‖x‖ = r
    torch.testing.assert_close(x, optimum, atol=2e-3, rtol=0)
    assert history.shape == (300,) and history[-1] > history[0]
    torch.testing.assert_close(history[-1], (2.0 * w[classes].norm(dim=1)).mean(), atol=1e-3, rtol=0)
    assert image.v.grad is None  # render leaves no gradient behind
    assert not any(p.grad is not None for p in scorer.parameters())


def test_render_is_adam_ascent_on_the_parameters_written_out():
    """Ten steps of render() against Adam (Kingma and Ba) written out in float64 on a linear scorer."""
    torch.manual_seed(1)
    w = torch.randn(3, 1 * 2 * 2).double()
    classes = torch.tensor([1, 2])
    start = torch.randn(2, 1, 2, 2)
    image = PixelImage(start)
    render(image, lambda x: class_objective(x.flatten(1).double() @ w.T, classes), steps=10, lr=0.1)

    theta, m, v = start.double().clone(), torch.zeros(2, 1, 2, 2).double(), torch.zeros(2, 1, 2, 2).double()
    beta1, beta2, eps, lr = 0.9, 0.999, 1e-8, 0.1
    for t in range(1, 11):
        s = torch.sigmoid(theta)
        g = w[classes].view(2, 1, 2, 2) * s * (1 - s)  # d (w_c · sigmoid(theta)) / d theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        theta = theta + lr * m_hat / (v_hat.sqrt() + eps)
    torch.testing.assert_close(image.logits.detach().double(), theta, atol=1e-5, rtol=0)


def test_box_bounded_pixel_ascent_of_a_linear_model_drives_every_pixel_to_the_sign_of_its_weight():
    """Through class_prototypes: the maximum of ``w_c · (x - mean) / std`` over ``x`` in ``[0, 1]`` is
    ``x = 1`` where ``w_c > 0`` and ``0`` where ``w_c < 0``."""
    torch.manual_seed(2)
    w = torch.randn(5, 3 * 4 * 4)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    result = class_prototypes(
        linear_scorer(w),
        [4, 1],
        (4, 4),
        mean=mean,
        std=std,
        steps=150,
        lr=0.5,
        parameterisation="pixel",
        transforms=(),
    )
    expected = (w[[4, 1]] > 0).float().view(2, 3, 4, 4)
    assert (result.display - expected).abs().max() < 0.02
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(result.images, (result.display - m) / s)
    scores = result.images.flatten(1) @ w.T
    torch.testing.assert_close(result.scores, scores[[0, 1], [4, 1]])
    torch.testing.assert_close(result.probabilities, scores.softmax(1)[[0, 1], [4, 1]])


def test_grey_prototypes_of_a_linear_model_follow_its_weights_summed_over_the_channels():
    """With ``grey=True`` one channel is optimised and the model sees it in all three: the maximum of
    ``w_c · (g - mean) / std`` over a grey ``g`` in ``[0, 1]`` is ``g = 1`` where ``Σ_ch w_c[ch] / std[ch] > 0``
    and 0 where it is below."""
    torch.manual_seed(3)
    w = torch.randn(4, 3 * 4 * 4)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    result = class_prototypes(
        linear_scorer(w), [2, 0], (4, 4), mean=mean, std=std, steps=150, lr=0.5,
        parameterisation="pixel", transforms=(), grey=True,
    )  # fmt: skip
    assert result.display.shape == (2, 3, 4, 4)
    assert torch.equal(result.display[:, 0], result.display[:, 1]) and torch.equal(
        result.display[:, 0], result.display[:, 2]
    )
    per_channel = w[[2, 0]].view(2, 3, 4, 4) / torch.tensor(std).view(1, 3, 1, 1)
    expected = (per_channel.sum(dim=1) > 0).float()
    assert (result.display[:, 0] - expected).abs().max() < 0.02
    with pytest.raises(TypeError, match=r"grey must be a bool, got 'yes'"):
        class_prototypes(linear_scorer(w), [0], (4, 4), steps=1, grey="yes")


# ------------------------------------------------------------------------------ parameterisation
def numpy_scale(h: int, w: int, decay: float) -> np.ndarray:
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    lowest = 1.0 / max(h, w)
    return (lowest / np.maximum(f, lowest)) ** decay * np.sqrt(h * w)


@pytest.mark.parametrize(
    ("channels", "size", "decay"), [(3, (8, 8), 1.0), (3, (6, 7), 1.5), (1, (5, 4), 0.5)]
)
def test_fourier_image_matches_numpy(channels, size, decay):
    spectrum = torch.randn(2, channels, size[0], size[1] // 2 + 1, 2, generator=generator(3))
    image = FourierImage(spectrum, size, decay)()
    h, w = size
    s = spectrum.double().numpy()
    x = np.fft.irfft2((s[..., 0] + 1j * s[..., 1]) * numpy_scale(h, w, decay), s=(h, w), norm="ortho")
    if channels == 3:
        colour = PUBLISHED_COLOUR_SQRT / np.linalg.norm(PUBLISHED_COLOUR_SQRT, axis=0).max()
        x = np.einsum("ij,njhw->nihw", colour, x)
    expected = 1 / (1 + np.exp(-x))
    assert image.shape == (2, channels, h, w) and image.dtype == torch.float32
    np.testing.assert_allclose(image.detach().double().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(spectrum_scale(size, decay).numpy(), numpy_scale(h, w, decay), rtol=1e-5)


def test_spectrum_scale_makes_a_unit_zero_frequency_a_unit_constant():
    spectrum = torch.zeros(1, 1, 6, 4, 2)
    spectrum[0, 0, 0, 0, 0] = 1.0
    torch.testing.assert_close(
        FourierImage(spectrum, (6, 6))(), torch.full((1, 1, 6, 6), torch.sigmoid(torch.tensor(1.0)))
    )


def test_the_colour_basis_inverts():
    x = torch.randn(2, 3, 4, 5, generator=generator(4))
    torch.testing.assert_close(rgb_to_decorrelated(decorrelated_to_rgb(x)), x, atol=1e-5, rtol=1e-5)
    luminance = decorrelated_to_rgb(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
    assert luminance.norm() == pytest.approx(1.0, abs=1e-6)  # the largest column has norm 1
    grey = torch.randn(1, 1, 3, 3)
    assert torch.equal(decorrelated_to_rgb(grey), grey) and torch.equal(rgb_to_decorrelated(grey), grey)


@pytest.mark.parametrize("kind", [FourierImage, PixelImage])
@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
def test_from_image_reproduces_the_image(kind, size):
    x = torch.rand(2, 3, *size, generator=generator(5)) * 0.98 + 0.01
    torch.testing.assert_close(kind.from_image(x)(), x, atol=1e-5, rtol=0)


def test_random_starts_are_the_same_for_every_image_and_nearly_grey():
    for image in (
        FourierImage.random(3, 3, (8, 8), generator(6)),
        PixelImage.random(3, 3, (8, 8), generator(6)),
    ):
        x = image()
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
        assert (x - 0.5).abs().max() < 0.05 and (x - 0.5).abs().max() > 0
        assert image.parameters()[0].is_leaf and image.parameters()[0].requires_grad


# ------------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize(("dy", "dx"), [(0, 0), (1, 2), (-2, 1), (3, -3), (0, -9)])
def test_translate_moves_every_pixel_and_fills_the_rest(dy, dx):
    x = torch.rand(2, 3, 4, 5, generator=generator(7))
    out = translate(x, dy, dx, fill=0.25)
    for y in range(4):
        for xx in range(5):
            sy, sx = y - dy, xx - dx
            want = x[..., sy, sx] if 0 <= sy < 4 and 0 <= sx < 5 else torch.full((2, 3), 0.25)
            assert torch.equal(out[..., y, xx], want)


def test_jitter_shifts_by_a_whole_number_of_pixels_drawn_in_range():
    x = torch.rand(1, 1, 6, 6, generator=generator(8)) + 1.0  # no pixel equals the fill
    g, seen = generator(9), set()
    for _ in range(120):
        out = jitter(2, fill=0.0)(x, g)
        matches = [
            (dy, dx)
            for dy in range(-3, 4)
            for dx in range(-3, 4)
            if torch.equal(out, translate(x, dy, dx, 0.0))
        ]
        assert len(matches) == 1 and max(map(abs, matches[0])) <= 2
        seen.add(matches[0])
    assert len(seen) == 25  # every shift of -2 … 2 in both directions is drawn


@pytest.mark.parametrize(("angle", "scale"), [(10.0, 1.0), (-25.0, 1.1), (0.0, 0.9), (90.0, 1.0)])
def test_affine_agrees_with_torchvision(angle, scale):
    """torchvision rotates anticlockwise in ``rotate`` and clockwise in ``affine``."""
    x = torch.rand(2, 3, 9, 13, generator=generator(10))
    ours = affine(x, angle=angle, scale=scale, fill=0.0)
    theirs = TF.affine(
        x, angle=-angle, translate=[0, 0], scale=scale, shear=[0.0], interpolation=InterpolationMode.BILINEAR
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    if scale == 1:
        torch.testing.assert_close(
            ours, TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR), atol=1e-5, rtol=0
        )


def test_a_quarter_turn_of_a_square_image_is_rot90_and_the_fill_comes_in_from_outside():
    x = torch.rand(1, 2, 5, 5, generator=generator(11))
    torch.testing.assert_close(affine(x, angle=90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6, rtol=0)
    small = affine(torch.ones(1, 1, 9, 9), scale=0.5, fill=0.3)  # shrunk to the middle, grey around
    assert small[0, 0, 4, 4] == pytest.approx(1.0) and small[0, 0, 0, 0] == pytest.approx(0.3)


def dot_position(x: torch.Tensor) -> tuple[float, float]:
    """The centre of mass of an image's brightness, (row, column), relative to the image centre."""
    h, w = x.shape[-2:]
    weights = x[0, 0]
    rows, cols = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    return float((weights * rows).sum() / weights.sum()), float((weights * cols).sum() / weights.sum())


def test_random_rotate_and_scale_draw_within_their_ranges():
    x = torch.zeros(1, 1, 65, 65)
    x[0, 0, 31:34, 51:54] = 1.0  # a dot 20 pixels right of the centre
    g, angles, factors = generator(12), [], []
    for _ in range(40):
        y, c = dot_position(random_rotate(15.0, fill=0.0)(x, g))
        angles.append(math.degrees(math.atan2(-y, c)))  # anticlockwise as displayed: the dot moves up
        y, c = dot_position(random_scale(0.8, 1.2, fill=0.0)(x, g))
        factors.append(math.hypot(y, c) / 20.0)
    assert -15.2 <= min(angles) < -8 and 8 < max(angles) <= 15.2
    assert 0.79 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.21


def test_pad_compose_and_the_standard_transforms():
    x = torch.rand(2, 3, 8, 8, generator=generator(13))
    padded = pad(2, fill=0.7)(x, generator())
    assert padded.shape == (2, 3, 12, 12) and torch.equal(padded[..., 2:-2, 2:-2], x)
    assert bool((padded[..., :2, :] == 0.7).all())
    shifted = compose([jitter(0), pad(1, fill=0.0), lambda t, g: translate(t, 1, 0, fill=5.0)])(
        x, generator()
    )
    assert shifted.shape == (2, 3, 10, 10) and bool((shifted[..., 0, :] == 5.0).all())
    assert torch.equal(shifted[..., 2:-1, 1:-1], x[..., :-1, :])  # padded first, then moved down
    assert torch.equal(compose([])(x, generator()), x)
    out = compose(standard_transforms())(x, generator())
    assert out.shape == x.shape and not torch.equal(out, x)
    again = compose(standard_transforms())(x, generator())
    assert torch.equal(out, again)  # the draws come from the generator only


# ------------------------------------------------------------------------------------- objective
def test_class_objective_is_the_logit_and_the_signed_single_logit():
    scores = torch.tensor([[1.0, 5.0, -2.0], [0.5, 0.0, 3.0]])
    assert class_objective(scores, torch.tensor([2, 0])).tolist() == [-2.0, 0.5]
    z = torch.tensor([[1.5], [-0.5]])
    assert class_objective(z, torch.tensor([0, 1])).tolist() == [-1.5, -0.5]
    assert class_objective(z[:, 0], torch.tensor([1, 0])).tolist() == [1.5, 0.5]


class SingleLogit(nn.Module):
    """A linear single-logit scorer of 3×16×16 images, returning ``(N, 1)`` or ``(N,)``."""

    def __init__(self, flat: bool) -> None:
        super().__init__()
        self.net, self.flat = linear_scorer(torch.randn(1, 3 * 16 * 16, generator=generator(16)) / 16), flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return z[:, 0] if self.flat else z


@pytest.mark.parametrize("flat", [False, True])
def test_a_single_logit_model_lowers_its_logit_for_class_0_and_raises_it_for_class_1(flat):
    model = SingleLogit(flat)
    result = class_prototypes(model, [0, 1], (16, 16), steps=15, parameterisation="pixel", transforms=())
    with torch.no_grad():
        start = model(torch.full((1, 3, 16, 16), 0.5)).reshape(-1)[0]
        logits = model(result.images).reshape(-1)
    assert logits[0] < start - 1 and logits[1] > start + 1
    torch.testing.assert_close(result.scores, torch.stack([-logits[0], logits[1]]))
    torch.testing.assert_close(result.probabilities, torch.sigmoid(result.scores))


# ------------------------------------------------------------------------------------ the result
class Templates(nn.Module):
    """A nearest-template classifier: ``score_k(x) = -20 · mean((x - t_k)²)``, whose class-``k``
    prototype is known in closed form: ``x = t_k``, where class ``k`` wins."""

    def __init__(self, templates: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("templates", templates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -20 * (x[:, None] - self.templates[None]).square().flatten(2).mean(2)


def smooth_templates(k: int = 4, size: int = 24) -> torch.Tensor:
    coarse = torch.randn(k, 3, 3, 3, generator=generator(17))
    return torch.sigmoid(2 * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False))


def test_prototypes_of_a_template_classifier_are_its_templates():
    templates = smooth_templates()
    model = Templates(templates)
    result = class_prototypes(model, [3, 0, 2], 24, steps=60)
    assert isinstance(result, PrototypeResult)
    assert result.images.shape == result.display.shape == (3, 3, 24, 24)
    assert result.display.min() >= 0 and result.display.max() <= 1 and result.display.dtype == torch.float32
    assert torch.equal(result.images, result.display)  # no mean/std: the model takes the [0, 1] image
    assert result.classes.dtype == torch.long and result.classes.tolist() == [3, 0, 2]
    assert result.steps == 60 and result.history.shape == (60,)
    assert result.history[-5:].mean() > result.history[:5].mean()
    with torch.no_grad():
        scores = model(result.images)
    assert scores.argmax(1).tolist() == [3, 0, 2]
    torch.testing.assert_close(result.scores, scores[[0, 1, 2], [3, 0, 2]])
    torch.testing.assert_close(result.probabilities, scores.softmax(1)[[0, 1, 2], [3, 0, 2]])
    assert not any(
        t.requires_grad for t in (result.images, result.display, result.scores, result.probabilities)
    )
    # the transforms fill the border with grey, so the border is not the template's; the middle is near it
    middle = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    error, start = (result.display - templates[[3, 0, 2]]).abs(), (0.5 - templates[[3, 0, 2]]).abs()
    assert error[middle].mean() < 0.65 * start[middle].mean()
    plain = class_prototypes(model, [3, 0, 2], 24, steps=60, parameterisation="pixel", transforms=())
    assert (plain.display - templates[[3, 0, 2]]).abs().max() < 0.1  # no transforms: the template itself


def test_the_same_seed_gives_the_same_prototypes_and_the_global_random_state_is_untouched():
    model = tiny_cnn()
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = class_prototypes(model, [0, 1], 16, steps=5, seed=7)
    second = class_prototypes(model, [0, 1], 16, steps=5, seed=7)
    other = class_prototypes(model, [0, 1], 16, steps=5, seed=8)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert torch.equal(first.display, second.display) and torch.equal(first.history, second.history)
    assert not torch.equal(first.display, other.display)


def test_a_prototype_does_not_depend_on_the_other_classes_in_the_batch():
    torch.manual_seed(6)
    model = bn_cnn(num_classes=4).train()  # batch norms in training mode would mix the batch
    with torch.no_grad():
        model(torch.rand(8, 3, 16, 16))  # running statistics that are not the defaults
    alone = class_prototypes(model, [2], 16, steps=8, lr=0.1)
    among = class_prototypes(model, [1, 2, 3, 0], 16, steps=8, lr=0.1)
    again = class_prototypes(model, [2, 2], 16, steps=8, lr=0.1)
    torch.testing.assert_close(among.display[1:2], alone.display, atol=1e-4, rtol=0)
    torch.testing.assert_close(again.display, alone.display.expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("parameterisation", ["fourier", "pixel"])
def test_steps_0_returns_init_and_init_is_in_the_models_input_space(parameterisation):
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    x01 = torch.rand(2, 3, 12, 10, generator=generator(14)) * 0.9 + 0.05
    init = (x01 - mean) / std
    model = tiny_cnn()
    kwargs = {"mean": mean.flatten().tolist(), "std": std.flatten(), "parameterisation": parameterisation}
    result = class_prototypes(model, [1, 2], init=init, steps=0, **kwargs)
    torch.testing.assert_close(result.display, x01, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.images, init, atol=1e-4, rtol=0)
    assert result.history.shape == (0,)
    one = class_prototypes(model, [1, 2, 0], init=init[:1], steps=0, **kwargs)  # one image for every class
    torch.testing.assert_close(one.display, x01[:1].expand(3, -1, -1, -1), atol=1e-5, rtol=0)
    moved = class_prototypes(model, [1, 2], init=init, steps=10, lr=0.1, transforms=(), **kwargs)
    with torch.no_grad():
        before, after = model(init)[[0, 1], [1, 2]], model(moved.images)[[0, 1], [1, 2]]
    assert bool((after > before).all())  # "what would this image need to become that class"
    assert (moved.display - x01).abs().mean() < 0.2  # and it is still near where it started


def test_a_grey_model_takes_a_one_channel_init():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    result = class_prototypes(
        model, [0, 2], init=torch.full((1, 1, 10, 10), 0.5), mean=0.5, std=0.25, steps=3
    )
    assert result.display.shape == (2, 1, 10, 10)
    torch.testing.assert_close(result.images, (result.display - 0.5) / 0.25)


def test_a_float64_model_gets_float64_input_and_float32_results():
    model = tiny_cnn()
    expected = class_prototypes(model, [0, 1], 16, steps=4)
    result = class_prototypes(model.double(), [0, 1], 16, steps=4)
    assert result.display.dtype == result.scores.dtype == torch.float32
    torch.testing.assert_close(result.display, expected.display, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------- state
def test_state_is_left_exactly_as_found():
    model = bn_cnn().train()
    model[1].eval()
    model[0].requires_grad_(False)
    sentinel = torch.full_like(model[4].weight, 7.0)
    model[4].weight.grad = sentinel
    flags = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    class_prototypes(model, [0, 2], 16, steps=3)
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == requires
    assert model[4].weight.grad is sentinel and torch.equal(sentinel, torch.full_like(sentinel, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "4.weight")
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))  # eval: no BN update
    assert hook_count(model) == 0 and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())


def test_frozen_parameters_stay_frozen_and_give_the_same_prototypes():
    model = tiny_cnn()
    expected = class_prototypes(model, [0, 1], 16, steps=4)
    model.requires_grad_(False)
    frozen = class_prototypes(model, [0, 1], 16, steps=4)
    torch.testing.assert_close(frozen.display, expected.display)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


def test_under_no_grad_inference_mode_and_autocast():
    model = tiny_cnn()
    init = torch.rand(1, 3, 16, 16, generator=generator(15))
    expected = class_prototypes(model, [0, 1], init=init, steps=4)
    with torch.no_grad():
        result = class_prototypes(model, [0, 1], init=init, steps=4)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(result.display, expected.display)
    with torch.inference_mode():
        inference_init = init.clone()  # an inference tensor, as Lightning's validation hands out
        result = class_prototypes(model, torch.tensor([0, 1]), init=inference_init, steps=4)
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    torch.testing.assert_close(result.display, expected.display)
    assert not any(t.is_inference() for t in (result.display, result.images, result.scores, result.classes))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = class_prototypes(model, [0, 1], init=init, steps=4)
        assert torch.is_autocast_enabled("cpu")
    assert low.display.dtype == low.scores.dtype == low.probabilities.dtype == torch.float32
    change, low_change = (expected.display - init).flatten(), (low.display - init).flatten()
    assert torch.corrcoef(torch.stack([change, low_change]))[0, 1] > 0.5  # bfloat16 gradients, same direction


class Exploding(nn.Module):
    """Raises in its ``calls``-th forward (the first is class_prototypes' look at the output)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.net, self.calls = tiny_cnn(), calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training  # the forward runs in eval mode
        self.calls -= 1
        if self.calls <= 0:
            raise RuntimeError("boom")
        return self.net(x)


@pytest.mark.parametrize("calls", [1, 3])
def test_state_restored_after_an_exception_in_the_forward(calls):
    model = Exploding(calls).train()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"boom"):
        class_prototypes(model, [0, 1], 16, steps=5)
    assert hook_count(model) == 0 and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


class BackboneUnderNoGrad(nn.Module):
    """A frozen feature extractor run under torch.no_grad() in the forward (Lightning's transfer
    learning guide)."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        self.backbone, self.head = model[:9], model[9:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features)


def test_a_backbone_run_under_no_grad_and_a_data_parallel_wrapper():
    model = tiny_cnn()
    expected = class_prototypes(model, [0, 2], 16, steps=4)
    for wrapped in (BackboneUnderNoGrad(model), nn.DataParallel(model)):
        result = class_prototypes(wrapped, [0, 2], 16, steps=4)
        torch.testing.assert_close(result.display, expected.display)
        assert hook_count(wrapped) == 0


# --------------------------------------------------------------------------------------- errors
class Returns(nn.Module):
    def __init__(self, output) -> None:
        super().__init__()
        self.output = output
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor):
        return self.output(self.conv(x))


def test_bad_arguments_are_clear_errors():
    model = tiny_cnn(num_classes=10)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function"):
        class_prototypes(lambda x: x, [0], 8)
    with pytest.raises(ValueError, match=r"indices of the model's outputs \(10 classes\), got \[3, 10\]"):
        class_prototypes(model, [3, 10], 8)
    with pytest.raises(ValueError, match=r"single logit: classes 0 and 1\), got \[2\]"):
        class_prototypes(SingleLogit(flat=True), [2], 16)
    with pytest.raises(ValueError, match=r"class indices >= 0, got \[-1\]"):
        class_prototypes(model, [-1], 8)
    with pytest.raises(ValueError, match=r"non-empty"):
        class_prototypes(model, [], 8)
    with pytest.raises(TypeError, match=r"classes must be class indices"):
        class_prototypes(model, [0.5], 8)
    with pytest.raises(TypeError, match=r"classes must be class indices"):
        class_prototypes(model, True, 8)
    with pytest.raises(
        ValueError,
        match=r"shape \(N, K\), \(N, 1\) or \(N,\), got a torch.float32 tensor of shape \(1, 4, 8, 8\)",
    ):
        class_prototypes(Returns(lambda a: a), [0], 8)
    with pytest.raises(ValueError, match=r"got str"):
        class_prototypes(Returns(lambda a: "scores"), [0], 8)
    with pytest.raises(ValueError, match=r"steps must be >= 0, got -1"):
        class_prototypes(model, [0], 8, steps=-1)
    with pytest.raises(TypeError, match=r"steps must be an int, got 2.5"):
        class_prototypes(model, [0], 8, steps=2.5)
    with pytest.raises(ValueError, match=r"size must be \(H, W\), two positive ints"):
        class_prototypes(model, [0], (0, 8))
    with pytest.raises(ValueError, match=r"size must be \(H, W\)"):
        class_prototypes(model, [0], (8, 8, 3))
    with pytest.raises(ValueError, match=r"size=\(H, W\) is required"):
        class_prototypes(model, [0])
    with pytest.raises(ValueError, match=r"size \(8, 8\) differs from the init images' \(6, 6\)"):
        class_prototypes(model, [0], 8, init=torch.zeros(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"init must be a \(1, C, H, W\) or \(K, C, H, W\) batch with K = 2"):
        class_prototypes(model, [0, 1], init=torch.zeros(3, 3, 6, 6))
    with pytest.raises(TypeError, match=r"init must be a floating-point tensor, got a torch.int64 tensor"):
        class_prototypes(model, [0], init=torch.zeros(1, 3, 6, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"init must be finite"):
        class_prototypes(model, [0], init=torch.full((1, 3, 6, 6), math.nan))
    with pytest.raises(ValueError, match=r"mean must have one value per channel \(3\), got 2"):
        class_prototypes(model, [0], 8, mean=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"std must be finite and positive"):
        class_prototypes(model, [0], 8, std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match=r"lr must be > 0"):
        class_prototypes(model, [0], 8, lr=0)
    with pytest.raises(ValueError, match=r"parameterisation must be 'fourier' or 'pixel', got 'rgb'"):
        class_prototypes(model, [0], 8, parameterisation="rgb")


def test_a_model_without_a_path_from_the_input_to_the_scores_or_with_scores_that_are_not_finite():
    with pytest.raises(ValueError, match=r"do not depend on the input image"):
        class_prototypes(Returns(lambda a: torch.zeros(a.shape[0], 3)), [0], 8, steps=1)
    with pytest.raises(ValueError, match=r"scores of the prototypes are not finite: \[nan\]"):
        class_prototypes(Returns(lambda a: a.mean(dim=(2, 3)) * math.nan), [1], 8, steps=1)


def test_an_init_that_requires_grad_is_left_alone():
    init = torch.rand(1, 3, 16, 16, generator=generator(18)).requires_grad_()
    result = class_prototypes(tiny_cnn(), [0], init=init, steps=2)
    assert init.grad is None and not result.display.requires_grad


def test_classes_in_every_form():
    model = tiny_cnn(num_classes=4)
    expected = class_prototypes(model, [2, 2], 16, steps=2).display
    for classes in (
        [2, 2],
        (2, 2),
        np.array([2, 2]),
        torch.tensor([2, 2]),
        torch.tensor([2, 2], dtype=torch.int32),
    ):
        result = class_prototypes(model, classes, 16, steps=2)
        assert result.classes.dtype == torch.long and result.classes.tolist() == [2, 2]
        torch.testing.assert_close(result.display, expected)
    one = class_prototypes(model, 2, 16, steps=2)
    assert one.classes.tolist() == [2]
    torch.testing.assert_close(one.display, expected[:1])  # batch of one: up to float error


class HuggingFaceLike(nn.Module):
    """Returns a mapping with ``logits``, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


def test_scores_in_a_mapping_with_logits():
    model = HuggingFaceLike()
    expected = class_prototypes(model.net, [1], 16, steps=2)
    torch.testing.assert_close(class_prototypes(model, [1], 16, steps=2).display, expected.display)


def test_a_vision_transformer_of_another_size_fails_with_its_own_error_and_a_hint():
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3
    )
    with pytest.raises(AssertionError, match=r"Input height \(16\) doesn't match model \(32\)") as caught:
        class_prototypes(vit, [0], 16, steps=1)
    assert any("pass size= that size" in note for note in getattr(caught.value, "__notes__", []))
    with pytest.raises(AssertionError, match=r"pass size= that size"):  # pytest reads the note too
        class_prototypes(vit, [0], 16, steps=1)
    assert hook_count(vit) == 0
    assert class_prototypes(vit, [0, 2], 32, steps=1).display.shape == (2, 3, 32, 32)


# ------------------------------------------------------------------------------ the real model
def test_lite0_prototypes_of_imagenet_classes_reach_their_classes(lite0):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    classes = [340, 985]  # zebra, daisy: at half the default steps and a reduced size, to stay fast
    result = class_prototypes(lite0, classes, (128, 128), mean=mean, std=std, steps=32)
    with torch.no_grad():
        probabilities = lite0(result.images).softmax(1)
    assert probabilities.argmax(1).tolist() == classes
    torch.testing.assert_close(result.probabilities, probabilities[[0, 1], classes], atol=1e-4, rtol=0)
    assert bool((result.probabilities > 0.5).all())
    assert not any(p.grad is not None for p in lite0.parameters()) and hook_count(lite0) == 0
