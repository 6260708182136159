"""The lecture's visualisations, each computed the neural-net way and the DRM way.

Oracles: autograd through the torch CNN `to_cnn(model)` (unit activations sliced out with forward
hooks; deconvnet and guided backpropagation as the published backward rules installed as backward
hooks on the torch ReLUs); brute-force enumeration of latent configurations (MAP rendering);
brute-force scans of activations recorded from the torch layers (top patches); explicit feature
matrices built column by column from basis images (rendering inversion); hand computations
(receptive fields, relative errors).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import drm
from cnn_equiv import to_cnn
from cnn_equiv.class_models import default_latents, map_rendering, maximize_class_score
from cnn_equiv.inversion import (
    inversion_report,
    invert_by_optimization,
    invert_by_rendering,
    relative_error,
)
from cnn_equiv.projections import Unit, project, saliency
from cnn_equiv.units import (
    bottom_up_to,
    receptive_field,
    receptive_field_support,
    top_patches,
    unit_template,
)
from drm.levels import SwitchRule
from drm.model import gaussian_log_joint
from drm.reference import configurations
from tests.architectures import (
    ARCHITECTURES,
    TINY_ARCHITECTURES,
    build,
    hooked_gradient,
    images,
)

GRADIENT_TOL = 1e-10  # float64; the rendering and autograd run the same adjoint ops
IDENTITY_TOL = 1e-10  # float64 identities between the two views
MONOTONE_TOL = 1e-10  # a log-joint trace may not decrease by more than rounding
PIXEL_INVERSION_TOL = 1e-3  # Adam on ||x - x0||^2 / ||x0||^2 after 200 steps (measured <= 1e-4)
ROUNDTRIP_TOL = 1e-8  # the same Adam run through the model and through the torch CNN

RULES: tuple[SwitchRule, ...] = ("drm", "deconvnet", "guided")


# --- oracles -------------------------------------------------------------------------------------


def layer_activations(model: drm.DeepRenderingModel, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The output of torch layer `layer` of `to_cnn(model)`, recorded by a forward hook."""
    if layer == -1:
        return x
    cnn = to_cnn(model)
    seen: list[torch.Tensor] = []
    handle = cnn[layer].register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        with torch.no_grad():
            cnn(x)
    finally:
        handle.remove()
    return seen[0]


def num_units(model: drm.DeepRenderingModel, level: int) -> int:
    shape = model.input_shape if level == -1 else model.levels[level].out_shape
    return math.prod(shape)


def clip(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    limits = torch.tensor([height, width, height, width])
    return torch.minimum(boxes.clamp_min(0), limits)


def level_states(level: drm.Level) -> torch.Tensor:
    """Every latent of one level, enumerated: (N, ...) for N = product of the unit counts."""
    counts = level.latent_counts()
    total = math.prod(counts.tolist())
    places = torch.cumprod(torch.cat([counts.new_ones(1), counts[:-1]]), 0)
    digits = (torch.arange(total)[:, None] // places[None, :]) % counts[None, :]
    return level.latent_from_digits(digits)


def prior_energy(
    model: drm.DeepRenderingModel, classes: torch.Tensor, latents: drm.Latents
) -> torch.Tensor:
    """log p(mu(c, z), c, z) + log Z for every (c, z): the MAP rendering's objective."""
    mu, log_prior = drm.rendering_terms(model, classes, latents)
    return gaussian_log_joint(model, mu, mu, log_prior).detach()


# --- 1. projections ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("rule", RULES)
def test_projection_of_any_unit_is_its_hooked_input_gradient(name: str, rule: SwitchRule) -> None:
    """E6 at every level: the top-down pass from a one-hot unit is the unit's input gradient
    (rule "drm"), Zeiler's deconvnet or guided backprop (autograd with the published hooks)."""
    model = build(ARCHITECTURES[name], seed=31)
    x = images(model, 3, seed=32)
    cnn = to_cnn(model)
    generator = torch.Generator().manual_seed(33)
    for level in range(-1, len(model.levels)):
        units = torch.randint(num_units(model, level), (3,), generator=generator)
        got = project(model, x, Unit(level, units), rule=rule)
        expected = hooked_gradient(cnn, x, level, units, rule)
        torch.testing.assert_close(got, expected, atol=GRADIENT_TOL, rtol=0)
        if rule == "drm":  # the neural-net way, through the library
            torch.testing.assert_close(
                saliency(cnn, x, Unit(level, units)), expected, atol=GRADIENT_TOL, rtol=0
            )
    classes = torch.randint(model.num_classes, (3,), generator=generator)
    top = len(model.levels) - 1
    expected = hooked_gradient(cnn, x, top, classes, rule)
    torch.testing.assert_close(
        project(model, x, classes, rule), expected, atol=GRADIENT_TOL, rtol=0
    )
    if rule == "drm":
        torch.testing.assert_close(saliency(cnn, x, classes), expected, atol=GRADIENT_TOL, rtol=0)


def test_class_projection_is_the_rendering_over_sigma2() -> None:
    model = build(ARCHITECTURES["leaky"], seed=34, sigma2=0.37)
    x = images(model, 4, seed=35)
    scores, latents = drm.max_sum(model, x)
    best = scores.argmax(1)
    rendered = drm.render(model, best, latents).detach()
    torch.testing.assert_close(project(model, x, best) * 0.37, rendered, atol=IDENTITY_TOL, rtol=0)
    # an int class is broadcast over the batch
    torch.testing.assert_close(project(model, x, 1), project(model, x, torch.ones(4).long()))


def test_projection_rules_differ_on_units() -> None:
    """The three rules are different functions at a hidden unit (else the test could not tell)."""
    model = build(ARCHITECTURES["lenet"], seed=36)
    x = images(model, 2, seed=37)
    target = Unit(5, torch.tensor([3, 70]))
    maps = {rule: project(model, x, target, rule=rule) for rule in RULES}
    assert not torch.allclose(maps["drm"], maps["deconvnet"])
    assert not torch.allclose(maps["drm"], maps["guided"])
    assert not torch.allclose(maps["deconvnet"], maps["guided"])


# --- 2. class-score maximisation and the MAP rendering -------------------------------------------


def test_simonyan_objective_is_the_log_joint_at_the_cnn_latents() -> None:
    """With l2 = 1/(2 sigma^2), S_c(x) - l2 ||x||^2 = log p(x, c, z_CNN(x)) + log Z + (D/2) log
    (2 pi sigma^2): Simonyan's objective is the DRM log-joint at the CNN's latents (eq. 4-5)."""
    sigma2 = 0.37
    model = build(ARCHITECTURES["padding-stride"], seed=41, sigma2=sigma2)
    x = images(model, 3, seed=42)
    classes = torch.tensor([0, 2, 3])
    result = maximize_class_score(
        to_cnn(model), classes, steps=4, lr=0.01, l2=1 / (2 * sigma2), start=x
    )
    constant = 0.5 * math.prod(model.input_shape) * math.log(2 * math.pi * sigma2)
    for image, value in ((x, result.trace[0]), (result.image, result.trace[-1])):
        latents = drm.max_sum(model, image)[1]
        log_joint = drm.log_joint(model, image, classes, latents).detach()
        torch.testing.assert_close(value, log_joint + constant, atol=IDENTITY_TOL, rtol=0)


@pytest.mark.parametrize("name", ["lenet", "leaky", "avgpool", "pool-before-switch"])
def test_one_simonyan_step_is_the_rendering_at_the_cnn_latents(name: str) -> None:
    """lr = sigma^2, l2 = 1/(2 sigma^2): x + lr (dS_c/dx - 2 l2 x) = sigma^2 h^(0) =
    mu(c, z_CNN(x)): one ascent step renders the class with the latents the CNN reads off x."""
    sigma2 = 0.37
    model = build(ARCHITECTURES[name], seed=43, sigma2=sigma2)
    x = images(model, 3, seed=44)
    classes = torch.tensor([0, 1, 1])
    step = maximize_class_score(
        to_cnn(model), classes, steps=1, lr=sigma2, l2=1 / (2 * sigma2), start=x
    )
    rendered = drm.render(model, classes, drm.max_sum(model, x)[1]).detach()
    torch.testing.assert_close(step.image, rendered, atol=IDENTITY_TOL, rtol=0)


def test_class_score_maximization_raises_the_penalised_score() -> None:
    model = build(ARCHITECTURES["leaky"], seed=45)
    cnn = to_cnn(model)
    result = maximize_class_score(
        cnn, torch.arange(3), steps=60, lr=0.2, l2=0.5, generator=torch.Generator().manual_seed(46)
    )
    assert result.trace.shape == (61, 3)
    assert result.image.shape == (3, *model.input_shape)
    # overall only: on this random model single steps chatter across ReLU boundaries
    assert bool((result.trace[-1] > result.trace[0]).all())
    # sigma^2 = 1 and l2 = 1/(2 sigma^2): the MAP rendering started at the ascent's image climbs
    # the same objective further (its first x-step already can only raise it)
    climbed = map_rendering(model, torch.arange(3), start=result.image)
    constant = 0.5 * math.prod(model.input_shape) * math.log(2 * math.pi)
    assert bool((climbed.trace[0] + constant >= result.trace[-1] - MONOTONE_TOL).all())
    assert bool((climbed.trace[-1] >= climbed.trace[0] - MONOTONE_TOL).all())
    # the trace is the objective of the image returned
    score = cnn(result.image).detach()[torch.arange(3), torch.arange(3)]
    penalised = score - 0.5 * (result.image**2).flatten(1).sum(1)
    torch.testing.assert_close(result.trace[-1], penalised, atol=IDENTITY_TOL, rtol=0)
    assert all(p.grad is None for p in cnn.parameters())


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_map_rendering_climbs_to_a_fixed_point_that_is_a_local_maximum(name: str) -> None:
    """Monotone trace; fixed point; no single level's latent improves it (brute force per level);
    below the global maximum over z (brute force), and that maximum is itself a fixed point."""
    model = build(TINY_ARCHITECTURES[name], seed=47)
    num_classes = model.num_classes
    classes = torch.arange(num_classes)
    result = map_rendering(model, classes, steps=50)
    assert result.converged
    assert bool((result.trace[1:] - result.trace[:-1] >= -MONOTONE_TOL).all())
    assert result.trace.shape == (result.steps + 1, num_classes)
    # the image is the rendering of the latents, and the trace ends at their log-joint
    mu = drm.render(model, classes, result.latents).detach()
    torch.testing.assert_close(result.image, mu, atol=IDENTITY_TOL, rtol=0)
    final = drm.log_joint(model, mu, classes, result.latents).detach()
    torch.testing.assert_close(result.trace[-1], final, atol=IDENTITY_TOL, rtol=0)
    # fixed point: restarting from the result changes nothing
    again = map_rendering(model, classes, steps=5, start=result.latents)
    assert again.converged and again.steps == 0
    # local maximum at x = mu: every state of every single level's latent, the others fixed
    for index in model.latent_levels:
        states = level_states(model.levels[index])  # (N, ...)
        n = states.shape[0]
        for c in range(num_classes):
            latents = tuple(
                None if z is None else z[c : c + 1].expand(n, *z.shape[1:]) for z in result.latents
            )
            latents = latents[:index] + (states,) + latents[index + 1 :]
            x = mu[c : c + 1].expand(n, *mu.shape[1:])
            scores = drm.log_joint(model, x, torch.full((n,), c), latents).detach()
            assert float(scores.max()) <= float(final[c]) + MONOTONE_TOL
    # global maximum over z of log p(mu(c, z), c, z) by enumeration
    total = drm.num_configurations(model)
    every = configurations(model, torch.arange(total))
    for c in range(num_classes):
        energy = prior_energy(model, torch.full((total,), c), every)
        best = int(energy.argmax())
        assert float(final[c]) <= float(energy[best]) + MONOTONE_TOL
        start = tuple(None if z is None else z[best : best + 1] for z in every)
        at_max = map_rendering(model, c, steps=5, start=start)
        assert at_max.converged and at_max.steps == 0
        torch.testing.assert_close(
            at_max.trace[0], energy[best : best + 1], atol=IDENTITY_TOL, rtol=0
        )


def test_map_rendering_reaches_the_global_maximum_often_on_tiny_models() -> None:
    """Measured: from the all-ON start it ends within 1e-10 of the brute-force maximum in most
    (architecture, class) cases; it is a local method, so not in all."""
    hits, cases = 0, 0
    for name in sorted(TINY_ARCHITECTURES):
        model = build(TINY_ARCHITECTURES[name], seed=48)
        total = drm.num_configurations(model)
        every = configurations(model, torch.arange(total))
        result = map_rendering(model, torch.arange(model.num_classes))
        for c in range(model.num_classes):
            best = float(prior_energy(model, torch.full((total,), c), every).max())
            hits += int(abs(float(result.trace[-1, c]) - best) <= MONOTONE_TOL)
            cases += 1
    assert hits / cases > 0.5


def test_map_rendering_starts() -> None:
    model = build(ARCHITECTURES["overlapping-ceil-pool"], seed=49)
    start = default_latents(model, 2)
    for level, latent in zip(model.levels, start, strict=True):
        if isinstance(level, drm.Switch):
            assert latent is not None and bool(latent.all())
        elif isinstance(level, drm.MaxPool):
            assert latent is not None
            expected = level.window_cells[:, 0].view(1, 1, *level.out_shape[1:])
            assert torch.equal(latent, expected.expand_as(latent))
    from_default = map_rendering(model, torch.tensor([0, 3]), steps=0)
    rendered = drm.render(model, torch.tensor([0, 3]), start).detach()
    torch.testing.assert_close(from_default.image, rendered, atol=IDENTITY_TOL, rtol=0)
    x = images(model, 2, seed=50)
    from_images = map_rendering(model, torch.tensor([0, 3]), steps=0, start=x)
    rendered = drm.render(model, torch.tensor([0, 3]), drm.max_sum(model, x)[1]).detach()
    torch.testing.assert_close(from_images.image, rendered, atol=IDENTITY_TOL, rtol=0)
    climbed = map_rendering(model, 2, steps=30, start=x)
    assert climbed.image.shape == (2, *model.input_shape)
    assert bool((climbed.trace[1:] - climbed.trace[:-1] >= -MONOTONE_TOL).all())


# --- 3. individual units --------------------------------------------------------------------------


def test_receptive_field_windows_by_hand() -> None:
    """LeNet (conv5, pool2, conv5, pool2): windows of 6 and 16 pixels at strides 2 and 4."""
    model = build(ARCHITECTURES["lenet"], seed=51)
    pooled = model.levels[2].out_shape  # (6, 12, 12)
    unit = torch.tensor([1 * 144 + 3 * 12 + 5])  # channel 1, row 3, column 5
    assert receptive_field(model, 2, unit).tolist() == [[6, 10, 12, 16]]
    second = model.levels[5].out_shape  # (16, 4, 4)
    assert pooled == (6, 12, 12) and second == (16, 4, 4)
    unit = torch.tensor([7 * 16 + 2 * 4 + 1])  # channel 7, row 2, column 1
    assert receptive_field(model, 5, unit).tolist() == [[8, 4, 24, 20]]
    assert receptive_field(model, 8, torch.tensor([0])).tolist() == [[0, 0, 28, 28]]
    assert receptive_field(model, -1, torch.tensor([2 * 28 + 3])).tolist() == [[2, 3, 3, 4]]


def test_exact_box_drops_what_strided_pools_never_read() -> None:
    """padding-stride: conv (k3, s2, p1) on 9 columns gives 5 columns; the 2-pool reads 4 of them,
    so pixel column 8 (seen only by conv column 4) reaches no unit above the pool."""
    model = build(ARCHITECTURES["padding-stride"], seed=52)
    dense = 4
    assert model.levels[dense].out_shape == (7,)
    assert receptive_field(model, dense, torch.tensor([0])).tolist() == [[0, 0, 11, 9]]
    assert receptive_field(model, dense, torch.tensor([0]), exact=True).tolist() == [[0, 0, 11, 8]]


# architectures whose nominal windows, clipped, are exactly the support's bounding box
TILING = ["avgpool", "avgpool-divisor", "dense-only", "leaky", "lenet", "overlapping-ceil-pool"]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_receptive_field_contains_the_rendering_support(name: str) -> None:
    """Oracle: the support of a one-hot rendered with every switch ON, every pool cell and
    all-ones templates. It lies in the nominal window; the exact box is its bounding box."""
    model = build(ARCHITECTURES[name], seed=53)
    _, height, width = model.input_shape
    for level in range(-1, len(model.levels)):
        count = num_units(model, level)
        units = torch.arange(0, count, max(1, count // 500))  # every unit of the small levels
        nominal = receptive_field(model, level, units)
        exact = receptive_field(model, level, units, exact=True)
        support = receptive_field_support(model, level, units).any(1)  # (K, H, W)
        rows, cols = torch.arange(height), torch.arange(width)
        inside = (
            (rows[None, :, None] >= nominal[:, 0, None, None])
            & (rows[None, :, None] < nominal[:, 2, None, None])
            & (cols[None, None, :] >= nominal[:, 1, None, None])
            & (cols[None, None, :] < nominal[:, 3, None, None])
        )
        assert not bool((support & ~inside).any())
        for k in range(0, units.shape[0], max(1, units.shape[0] // 7)):
            top, left, bottom, right = exact[k].tolist()
            assert bool(support[k, top:bottom, left:right].any())
            outside = support[k].clone()
            outside[top:bottom, left:right] = False
            assert not bool(outside.any())
        clipped = clip(nominal, height, width)
        assert bool((exact[:, :2] >= clipped[:, :2]).all())
        assert bool((exact[:, 2:] <= clipped[:, 2:]).all())
        if name in TILING:
            assert torch.equal(exact, clipped)


@pytest.mark.parametrize(
    ("name", "level", "channel"),
    [("lenet", 0, 2), ("lenet", 5, 9), ("lenet", 8, 4), ("padding-stride", 2, 3), ("leaky", -1, 0)],
)
def test_top_patches_match_a_brute_force_scan(name: str, level: int, channel: int) -> None:
    model = build(ARCHITECTURES[name], seed=54)
    data = images(model, 12, seed=55)
    k = 5
    result = top_patches(model, data, level, channel, k)
    # brute force over every (image, position), from the torch layers' outputs
    activations = layer_activations(model, data, level)[:, channel].reshape(data.shape[0], -1)
    ranked = activations.flatten().sort(descending=True).values
    torch.testing.assert_close(result.values, ranked[:k], atol=0, rtol=0)
    per_image = activations.shape[1]
    positions = result.units - channel * per_image
    assert bool(((positions >= 0) & (positions < per_image)).all())
    torch.testing.assert_close(activations[result.image_index, positions], result.values)
    assert torch.equal(result.boxes, receptive_field(model, level, result.units))
    # each patch is the image sliced at its window, zero where the window leaves the image
    _, height, width = model.input_shape
    for j in range(k):
        top, left, bottom, right = result.boxes[j].tolist()
        patch = result.patches[j]
        assert patch.shape == (model.input_shape[0], bottom - top, right - left)
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(bottom, height), min(right, width)
        image = data[result.image_index[j]]
        window = patch[:, r0 - top : r1 - top, c0 - left : c1 - left]
        assert torch.equal(window, image[:, r0:r1, c0:c1])
        outside = patch.clone()
        outside[:, r0 - top : r1 - top, c0 - left : c1 - left] = 0
        assert not bool(outside.any())
    expected = drm.max_sum(model, data[result.image_index])[1]
    for got, want in zip(result.latents, expected, strict=True):
        assert (got is None and want is None) or torch.equal(got, want)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "level"), [("lenet", 2), ("lenet", 5), ("dilation-groups", 2)])
def test_unit_template_is_the_scaled_projection_inside_the_receptive_field(
    name: str, level: int
) -> None:
    model = build(ARCHITECTURES[name], seed=56, sigma2=0.37)
    data = images(model, 10, seed=57)
    best = top_patches(model, data, level, channel=1, k=4)
    template = unit_template(model, level, best.units, best.latents)
    projection = project(model, data[best.image_index], Unit(level, best.units))
    torch.testing.assert_close(template, 0.37 * projection, atol=IDENTITY_TOL, rtol=0)
    support = receptive_field_support(model, level, best.units)
    assert bool((template != 0).any())
    assert not bool(((template != 0) & ~support).any())
    # at the class level the template is the rendering mu(c, z)
    classes = torch.tensor([0, 1, 2, 0])
    top = len(model.levels) - 1
    rendered = drm.render(model, classes, best.latents).detach()
    got = unit_template(model, top, classes, best.latents)
    torch.testing.assert_close(got, rendered, atol=IDENTITY_TOL, rtol=0)


# --- 4. feature inversion ------------------------------------------------------------------------


def explicit_matrix(
    model: drm.DeepRenderingModel, level: int, latents: drm.Latents
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen-latent feature map of one image as (M, beta): phi(x) = M x + beta, column by
    column from the D basis images (latents: those of one image)."""
    pixels = math.prod(model.input_shape)
    basis = torch.cat([torch.zeros(1, pixels), torch.eye(pixels)]).to(torch.float64)
    y = basis.view(pixels + 1, *model.input_shape)
    with torch.no_grad():
        for j in range(level + 1):
            latent = latents[j]
            if latent is not None:
                latent = latent.expand(pixels + 1, *latent.shape[1:])
            y = model.levels[j].bottom_up_frozen(y, latent)
    flat = y.flatten(1)
    return (flat[1:] - flat[:1]).T, flat[0]


LINEAR = drm.ModelConfig(
    (2, 6, 6),
    3,
    (
        drm.ConvSpec(3, 3, padding=1),
        drm.AvgPoolSpec(2),
        drm.ConvSpec(2, 2, stride=1),
        drm.FlattenSpec(),
        drm.DenseSpec(5),
    ),
)


@pytest.mark.parametrize("name", ["linear", "leaky", "pool-before-switch"])
def test_rendering_inversion_is_the_adjoint_of_the_explicit_feature_matrix(name: str) -> None:
    """invert_by_rendering = sigma^2 M^T y with M the explicit matrix of the frozen feature map
    (for the linear model M does not depend on the image); also with all-ON latents."""
    config = LINEAR if name == "linear" else ARCHITECTURES[name]
    model = build(config, seed=61, sigma2=0.37)
    x0 = images(model, 2, seed=62)
    inferred = drm.max_sum(model, x0)[1]
    for level in range(-1, len(model.levels)):
        for latents in (inferred, default_latents(model, 2)):
            got = invert_by_rendering(model, x0, level, latents=latents)
            features = bottom_up_to(model, x0, level).detach().flatten(1)
            for b in range(2):
                one = tuple(None if z is None else z[b : b + 1] for z in latents)
                matrix, _ = explicit_matrix(model, level, one)
                expected = 0.37 * (matrix.T @ features[b])
                torch.testing.assert_close(
                    got[b].flatten(), expected, atol=IDENTITY_TOL, rtol=IDENTITY_TOL
                )
        # with the image's own latents, y is the frozen map of x0: M x0 + beta
        one = tuple(None if z is None else z[:1] for z in inferred)
        matrix, beta = explicit_matrix(model, level, one)
        features = bottom_up_to(model, x0[:1], level).detach().flatten(1)[0]
        torch.testing.assert_close(matrix @ x0[0].flatten() + beta, features)


def test_pixel_level_inversion_errors() -> None:
    """At the image itself: the rendering is sigma^2 x0 (relative error |1 - sigma^2|, zero up to
    scale) and the optimisation recovers x0."""
    model = build(ARCHITECTURES["leaky"], seed=63)
    x0 = images(model, 3, seed=64)
    rendered = invert_by_rendering(model, x0, -1)
    torch.testing.assert_close(rendered, x0, atol=0, rtol=0)
    assert float(relative_error(rendered, x0).max()) == 0.0
    with torch.no_grad():
        model.sigma2.fill_(0.37)
    rendered = invert_by_rendering(model, x0, -1)
    torch.testing.assert_close(
        relative_error(rendered, x0), torch.full((3,), 0.63, dtype=torch.float64)
    )
    assert float(relative_error(rendered, x0, scale_invariant=True).max()) < IDENTITY_TOL
    result = invert_by_optimization(
        model, x0, -1, steps=200, lr=0.05, generator=torch.Generator().manual_seed(65)
    )
    assert float(relative_error(result.image, x0).max()) < PIXEL_INVERSION_TOL


def test_inversion_by_optimization_lowers_its_objective_in_both_views() -> None:
    """The same Adam run through the model's bottom-up messages and the torch CNN's layers."""
    model = build(ARCHITECTURES["leaky"], seed=66)
    x0 = images(model, 2, seed=67)
    level = 4  # the second switch
    target = bottom_up_to(model, x0, level).detach()
    runs = [
        invert_by_optimization(
            net,
            target,
            level,
            steps=80,
            tv_weight=1e-3,
            lr=0.05,
            generator=torch.Generator().manual_seed(68),
        )
        for net in (model, to_cnn(model))
    ]
    trace = runs[0].trace
    assert trace.shape == (81, 2)
    assert bool((trace[-1] < 0.2 * trace[0]).all())
    torch.testing.assert_close(runs[1].trace, trace, atol=ROUNDTRIP_TOL, rtol=0)
    torch.testing.assert_close(runs[1].image, runs[0].image, atol=ROUNDTRIP_TOL, rtol=0)


def test_relative_error_by_hand() -> None:
    x0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[6.0, 8.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(relative_error(x, x0), torch.tensor([1.0, math.sqrt(5.0)]).double())
    # [6, 8] is 2 x0 (error 0 up to scale); [0, 2] is orthogonal to [1, 0] (error 1)
    torch.testing.assert_close(
        relative_error(x, x0, scale_invariant=True), torch.tensor([0.0, 1.0]).double()
    )
    torch.testing.assert_close(
        relative_error(torch.zeros_like(x0), x0, scale_invariant=True), torch.ones(2).double()
    )


def test_inversion_report_table() -> None:
    model = build(ARCHITECTURES["dense-only"], seed=69)
    x0 = images(model, 2, seed=70)
    table = inversion_report(model, x0, steps=150, generator=torch.Generator().manual_seed(71))
    assert table["level"] == list(range(-1, len(model.levels) - 1))
    assert table["kind"][:3] == ["Image", "Flatten", "Dense"]
    assert table["features"][:3] == [20, 20, 8]
    lengths = {len(column) for column in table.values()}
    assert lengths == {len(model.levels)}
    assert table["rendering_error"][0] == 0.0  # sigma^2 = 1: the pixels render to themselves
    assert table["rendering_error"][1] == 0.0  # and a Flatten changes nothing
    assert table["optimization_error"][0] < PIXEL_INVERSION_TOL
    # every switch of the first hidden level OFF: its features are all zero, they render to a
    # zero image (error 1) and the normalised optimisation loss is undefined (NaN columns)
    with torch.no_grad():
        model.levels[1].bias.fill_(-100.0)
    table = inversion_report(model, x0, [2], steps=5)
    assert table["kind"] == ["Switch"] and table["rendering_error"] == [1.0]
    assert math.isnan(table["optimization_error"][0])


# --- argument checks ---------------------------------------------------------------------------


def test_clear_errors() -> None:
    model = build(ARCHITECTURES["leaky"], seed=72)
    x = images(model, 2, seed=73)
    units = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="rule must be one of"):
        project(model, x, 0, rule="saliency")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level_index must lie in"):
        project(model, x, Unit(len(model.levels), units))
    with pytest.raises(TypeError, match="level_index must be an int"):
        project(model, x, Unit(True, units))
    with pytest.raises(ValueError, match="unit index out of range"):
        project(model, x, Unit(0, torch.tensor([0, 10**6])))
    with pytest.raises(ValueError, match="must have shape"):
        project(model, x, Unit(0, torch.tensor([0, 1, 2])))
    with pytest.raises(TypeError, match="target must be"):
        project(model, x, "cat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class index out of range"):
        project(model, x, torch.tensor([0, 9]))
    with pytest.raises(TypeError, match="drm.DeepRenderingModel"):
        project(to_cnn(model), x, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k=1000 exceeds"):
        top_patches(model, x, 0, 0, 1000)
    with pytest.raises(ValueError, match="channel must lie in"):
        top_patches(model, x, 0, 4, 1)
    with pytest.raises(ValueError, match="steps must be"):
        map_rendering(model, 0, steps=-1)
    with pytest.raises(TypeError, match="k must be an int"):
        top_patches(model, x, 0, 0, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be"):
        maximize_class_score(to_cnn(model), 0, lr=0.0)
    with pytest.raises(ValueError, match="shape="):
        maximize_class_score(nn.Sequential(*to_cnn(model)), 0)
    with pytest.raises(ValueError, match="all-zero"):
        relative_error(x, torch.zeros_like(x))
    with pytest.raises(ValueError, match="features_target has shape"):
        invert_by_optimization(model, torch.ones(2, 3), 0, steps=1)
    with pytest.raises(ValueError, match="unit index out of range"):
        receptive_field(model, 0, torch.tensor([-1]))


@pytest.mark.gpu
def test_visualisations_on_cuda_match_the_cpu() -> None:
    model = build(ARCHITECTURES["lenet"], seed=74)
    x = images(model, 4, seed=75)
    gpu = build(ARCHITECTURES["lenet"], seed=74).cuda()
    xg = x.cuda()
    target = Unit(5, torch.tensor([3, 70, 5, 9]))
    for rule in RULES:
        torch.testing.assert_close(
            project(gpu, xg, target, rule).cpu(), project(model, x, target, rule)
        )
    best_cpu, best_gpu = top_patches(model, x, 2, 1, 3), top_patches(gpu, xg, 2, 1, 3)
    torch.testing.assert_close(best_gpu.patches.cpu(), best_cpu.patches)
    torch.testing.assert_close(
        map_rendering(gpu, torch.arange(3).cuda()).trace.cpu(),
        map_rendering(model, torch.arange(3)).trace,
    )
    torch.testing.assert_close(
        invert_by_rendering(gpu, xg, 5).cpu(), invert_by_rendering(model, x, 5)
    )
