"""Tests for the shallow rendering model (DESIGN statement E7): `drm.shallow`.

Oracles: brute-force enumeration of (c, g, a) through the literal `log_joint` (no convolution),
`torch.roll` and slice assignment for the renderings, a direct linear / ReLU / softplus /
max-pool computation for the CNN view, and Pyro's exact enumeration (`TraceEnum_ELBO`,
`infer_discrete`) for the likelihood and the MAP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, infer_discrete
from torch import Tensor

from cnn_equiv.mapping import to_linear_classifier
from drm.shallow import ShallowConfig, ShallowLatents, ShallowRenderingModel, ShallowSample
from tests.architectures import brute_log_joint

DTYPE = torch.float64
IDENTITY_TOL = 1e-10  # float64 identities between two exact computations of the same quantity
CONSTRUCTED_TOL = 1e-9  # inputs built to hit given pre-activations ~20: float64 rounding ~1e-14
PYRO_TOL = 1e-9  # Pyro's summed -ELBO over a batch: values ~ 1e2, float64 rounding ~ 1e-13
FREQ_NUM_SE = 5.0  # sampled frequencies must lie within this many binomial standard errors

NUM_CLASSES, C0, H, W = 3, 2, 4, 5
INTERIOR_TEMPLATE = (2, 3)  # (h, w) of the interior templates: G = 3 * 3 = 9
SIGMA2 = 0.7
PRIOR_ON = 0.3

CASES = [
    pytest.param(translation, prior_on, id=f"{translation}-{'switch' if prior_on else 'noswitch'}")
    for translation in ("circular", "interior", "none")
    for prior_on in (None, PRIOR_ON)
]


def make_model(
    translation: str, switch_prior_on: float | None, seed: int = 0
) -> ShallowRenderingModel:
    gen = torch.Generator().manual_seed(seed)
    h, w = INTERIOR_TEMPLATE if translation == "interior" else (H, W)
    templates = torch.randn(NUM_CLASSES, C0, h, w, generator=gen, dtype=DTYPE)
    prior_logits = torch.randn(NUM_CLASSES, generator=gen, dtype=DTYPE)
    return ShallowRenderingModel(
        templates,
        (C0, H, W),
        translation=translation,
        prior_logits=prior_logits,
        sigma2=SIGMA2,
        switch_prior_on=switch_prior_on,
    )


def make_images(model: ShallowRenderingModel, seed: int = 1) -> Tensor:
    """Images from the model (object present and absent) plus pure noise and a scaled image."""
    gen = torch.Generator().manual_seed(seed)
    x, _, _, _ = model.sample(6, generator=gen)
    noise = torch.randn(2, C0, H, W, generator=gen, dtype=DTYPE)
    return torch.cat([x, noise, 0.3 * x[:1]])  # (9, C0, H, W)


def oracle_constant(x: Tensor) -> Tensor:
    """K(x) = ||x||^2 / (2 sigma^2) + (D/2) log(2 pi sigma^2), computed here independently."""
    d = x[0].numel()
    return x.pow(2).flatten(1).sum(1) / (2 * SIGMA2) + 0.5 * d * math.log(2 * math.pi * SIGMA2)


# ----------------------------------------------------------------------------------------------
# The literal generative pieces
# ----------------------------------------------------------------------------------------------


def test_render_circular_is_roll() -> None:
    model = make_model("circular", None)
    num_g = model.num_translations
    assert num_g == H * W
    g = torch.arange(num_g)
    c = g % NUM_CLASSES
    rendered = model.render(c, g).detach()
    for k in range(num_g):
        i, j = divmod(k, W)
        expected = torch.roll(model.templates[c[k]].detach(), shifts=(i, j), dims=(-2, -1))
        torch.testing.assert_close(rendered[k], expected, rtol=0, atol=0)


def test_render_interior_places_template_and_switch_zeroes_it() -> None:
    model = make_model("interior", PRIOR_ON)
    h, w = INTERIOR_TEMPLATE
    wg = W - w + 1
    assert model.translation_grid == (H - h + 1, wg)
    num_g = model.num_translations
    g = torch.arange(num_g)
    c = g % NUM_CLASSES
    switches = g % 2 == 0
    rendered = model.render(c, g, switches).detach()
    for k in range(num_g):
        i, j = divmod(k, wg)
        expected = torch.zeros(C0, H, W, dtype=DTYPE)
        if switches[k]:
            expected[:, i : i + h, j : j + w] = model.templates[c[k]].detach()
        torch.testing.assert_close(rendered[k], expected, rtol=0, atol=0)


@pytest.mark.parametrize(("translation", "prior_on"), CASES)
def test_match_scores_are_inner_products_with_renderings(
    translation: str, prior_on: float | None
) -> None:
    model = make_model(translation, prior_on)
    x = make_images(model)
    num_g = model.num_translations
    cc, gg = torch.meshgrid(torch.arange(NUM_CLASSES), torch.arange(num_g), indexing="ij")
    with torch.no_grad():
        renders = model.render(cc.flatten(), gg.flatten()).view(NUM_CLASSES, num_g, -1)
        expected = torch.einsum("bd,cgd->bcg", x.flatten(1), renders) / SIGMA2
        got = model.match_scores(x)
    assert got.shape == (x.shape[0], NUM_CLASSES, num_g)
    torch.testing.assert_close(got, expected, rtol=0, atol=IDENTITY_TOL)


# ----------------------------------------------------------------------------------------------
# The CNN view against brute-force enumeration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("translation", "prior_on"), CASES)
def test_class_scores_max_is_brute_force_max(translation: str, prior_on: float | None) -> None:
    model = make_model(translation, prior_on)
    x = make_images(model)
    expected = brute_log_joint(model, x).amax(dim=(2, 3)) + oracle_constant(x)[:, None]
    with torch.no_grad():
        got = model.class_scores(x, "max")
    torch.testing.assert_close(got, expected, rtol=0, atol=IDENTITY_TOL)


@pytest.mark.parametrize(("translation", "prior_on"), CASES)
def test_class_scores_sum_is_brute_force_logsumexp(
    translation: str, prior_on: float | None
) -> None:
    model = make_model(translation, prior_on)
    x = make_images(model)
    lj = brute_log_joint(model, x)
    expected = lj.flatten(2).logsumexp(dim=-1) + oracle_constant(x)[:, None]
    with torch.no_grad():
        got = model.class_scores(x, "sum")
        joint = model.joint_scores(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=IDENTITY_TOL)
    expected_joint = lj + oracle_constant(x)[:, None, None, None]
    torch.testing.assert_close(joint, expected_joint, rtol=0, atol=IDENTITY_TOL)


@pytest.mark.parametrize(("translation", "prior_on"), CASES)
def test_posterior_and_log_likelihood_are_brute_force(
    translation: str, prior_on: float | None
) -> None:
    model = make_model(translation, prior_on)
    x = make_images(model)
    lj = brute_log_joint(model, x)  # (B, C, G, A)
    log_px = lj.flatten(1).logsumexp(dim=-1)  # (B,)
    expected_post = (lj.flatten(2).logsumexp(dim=-1) - log_px[:, None]).exp()
    expected_latent = (lj - log_px[:, None, None, None]).exp()
    with torch.no_grad():
        torch.testing.assert_close(model.log_likelihood(x), log_px, rtol=0, atol=IDENTITY_TOL)
        torch.testing.assert_close(model.posterior(x), expected_post, rtol=0, atol=IDENTITY_TOL)
        torch.testing.assert_close(
            model.latent_posterior(x), expected_latent, rtol=0, atol=IDENTITY_TOL
        )
        torch.testing.assert_close(
            model.map_classes(x, "sum"), expected_post.argmax(dim=-1), rtol=0, atol=0
        )


@pytest.mark.parametrize(("translation", "prior_on"), CASES)
def test_map_latents_achieve_brute_force_max(translation: str, prior_on: float | None) -> None:
    model = make_model(translation, prior_on)
    x = make_images(model)
    lj = brute_log_joint(model, x)
    with torch.no_grad():
        classes, translations, switches = model.map_latents(x)
        at_map = model.log_joint(x, classes, translations, switches if prior_on else None)
    torch.testing.assert_close(at_map, lj.flatten(1).amax(dim=-1), rtol=0, atol=IDENTITY_TOL)
    torch.testing.assert_close(model.map_classes(x), classes, rtol=0, atol=0)
    if prior_on is None:
        assert bool(switches.all())
    else:
        # the test images include both present and absent objects; both MAP answers must occur
        assert bool(switches.any()) and not bool(switches.all())


# ----------------------------------------------------------------------------------------------
# MAP classification is template matching (E7)
# ----------------------------------------------------------------------------------------------


def test_no_translation_no_switch_is_a_linear_layer() -> None:
    model = make_model("none", None)
    x = make_images(model)
    weight, bias = to_linear_classifier(model)
    mu = model.templates.detach().flatten(1)
    torch.testing.assert_close(weight, mu / SIGMA2, rtol=0, atol=IDENTITY_TOL)
    log_pi = torch.log_softmax(model.prior_logits.detach(), dim=-1)
    expected_bias = log_pi - mu.pow(2).sum(1) / (2 * SIGMA2)
    torch.testing.assert_close(bias, expected_bias, rtol=0, atol=IDENTITY_TOL)
    logits = x.flatten(1) @ weight.T + bias
    with torch.no_grad():
        for mode in ("max", "sum"):
            got = model.class_scores(x, mode)
            torch.testing.assert_close(got, logits, rtol=0, atol=IDENTITY_TOL)
        torch.testing.assert_close(
            model.posterior(x), torch.softmax(logits, dim=-1), rtol=0, atol=IDENTITY_TOL
        )


@pytest.mark.parametrize("mode", ["max", "sum"])
def test_switch_is_relu_or_softplus(mode: str) -> None:
    model = make_model("none", PRIOR_ON)
    x = make_images(model)
    mu = model.templates.detach().flatten(1)
    log_pi = torch.log_softmax(model.prior_logits.detach(), dim=-1)
    z = (
        x.flatten(1) @ mu.T / SIGMA2
        - mu.pow(2).sum(1) / (2 * SIGMA2)
        + math.log(PRIOR_ON / (1 - PRIOR_ON))
    )  # (B, C): the linear layer with the switch bias
    # exp(z) stays finite here, so the textbook log(1 + exp(z)) is an exact oracle
    assert float(z.max()) < 200
    unit = torch.relu(z) if mode == "max" else torch.log(1 + torch.exp(z))
    expected = log_pi + math.log(1 - PRIOR_ON) + unit
    with torch.no_grad():
        got = model.class_scores(x, mode)
    torch.testing.assert_close(got, expected, rtol=0, atol=IDENTITY_TOL)
    # the objects and the noise images must exercise both sides of the ReLU
    assert bool((z > 0).any()) and bool((z < 0).any())


def test_softplus_is_exact_beyond_torch_threshold() -> None:
    # F.softplus returns z itself for z > 20, off by log1p(exp(-z)) ~ 2e-9 > IDENTITY_TOL; put the
    # switch pre-activation of class 0 at z in [19, 23] and check the sum scores by brute force
    model = make_model("none", PRIOR_ON)
    mu = model.templates.detach()[0]
    energy = float(mu.pow(2).sum()) / (2 * SIGMA2)
    log_odds = math.log(PRIOR_ON / (1 - PRIOR_ON))
    targets = torch.tensor([19.0, 20.5, 21.0, 22.0, 23.0], dtype=DTYPE)
    scale = 0.5 + (targets - log_odds) / (2 * energy)  # z = (2 scale - 1) energy + log_odds
    x = scale[:, None, None, None] * mu
    with torch.no_grad():
        torch.testing.assert_close(
            model.preactivation(x)[:, 0, 0], targets, rtol=0, atol=CONSTRUCTED_TOL
        )
        got = model.class_scores(x, "sum")
    expected = brute_log_joint(model, x).flatten(2).logsumexp(dim=-1)
    torch.testing.assert_close(
        got, expected + oracle_constant(x)[:, None], rtol=0, atol=IDENTITY_TOL
    )


@pytest.mark.parametrize("translation", ["circular", "interior"])
@pytest.mark.parametrize("prior_on", [None, PRIOR_ON])
def test_max_over_translations_is_max_pooling(translation: str, prior_on: float | None) -> None:
    model = make_model(translation, prior_on)
    x = make_images(model)
    mu = model.templates.detach()
    log_pi = torch.log_softmax(model.prior_logits.detach(), dim=-1)
    with torch.no_grad():
        conv_map = model.match_map(x)  # (B, C, Hg, Wg)
        got = model.class_scores(x, "max")
    assert conv_map.shape[2:] == model.translation_grid
    z = conv_map - (mu.pow(2).flatten(1).sum(1) / (2 * SIGMA2))[:, None, None]
    bias = log_pi - math.log(model.num_translations)
    if prior_on is not None:
        z = torch.relu(z + math.log(prior_on / (1 - prior_on)))
        bias = bias + math.log(1 - prior_on)
    pooled = F.max_pool2d(z, kernel_size=model.translation_grid).flatten(1)  # (B, C)
    torch.testing.assert_close(got, pooled + bias, rtol=0, atol=IDENTITY_TOL)
    torch.testing.assert_close(pooled, z.amax(dim=(2, 3)), rtol=0, atol=0)


def test_class_scores_are_differentiable_in_the_parameters() -> None:
    model = make_model("interior", PRIOR_ON)
    x = make_images(model)
    model.log_likelihood(x).sum().backward()
    assert model.templates.grad is not None and bool(torch.isfinite(model.templates.grad).all())
    assert model.prior_logits.grad is not None


# ----------------------------------------------------------------------------------------------
# Pyro oracle
# ----------------------------------------------------------------------------------------------


def pyro_program(model: ShallowRenderingModel) -> Callable[[Tensor], None]:
    """The shallow model as a Pyro program with c, g, a enumerated exactly."""
    num_g = model.num_translations
    cc, gg = torch.meshgrid(torch.arange(NUM_CLASSES), torch.arange(num_g), indexing="ij")
    with torch.no_grad():
        renders = model.render(cc.flatten(), gg.flatten()).view(NUM_CLASSES, num_g, C0, H, W)
        log_pi = model.log_prior.detach()
    sigma = math.sqrt(SIGMA2)
    prior_on = model.switch_prior_on

    def program(x: Tensor) -> None:
        with pyro.plate("images", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=log_pi), infer={"enumerate": "parallel"})
            g = pyro.sample(
                "g",
                dist.Categorical(logits=torch.zeros(num_g, dtype=DTYPE)),
                infer={"enumerate": "parallel"},
            )
            mu = renders[c, g]  # (..., C0, H, W), enumeration dims on the left
            if prior_on is not None:
                on = torch.tensor(prior_on, dtype=DTYPE)
                a = pyro.sample("a", dist.Bernoulli(probs=on), infer={"enumerate": "parallel"})
                mu = mu * a[..., None, None, None]
            pyro.sample("x", dist.Normal(mu, sigma).to_event(3), obs=x)

    return program


def empty_guide(x: Tensor) -> None:
    """Every latent is enumerated in the model, so the -ELBO is exactly -log p(x)."""


@pytest.mark.parametrize(("translation", "prior_on"), CASES)
def test_pyro_enumeration_gives_the_log_likelihood(
    translation: str, prior_on: float | None
) -> None:
    model = make_model(translation, prior_on)
    x = make_images(model)
    pyro.clear_param_store()
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(pyro_program(model), empty_guide, x)
    with torch.no_grad():
        expected = -float(model.log_likelihood(x).sum())
    assert abs(loss - expected) < PYRO_TOL


@pytest.mark.parametrize(("translation", "prior_on"), CASES)
def test_pyro_map_matches_map_latents(translation: str, prior_on: float | None) -> None:
    model = make_model(translation, prior_on)
    x = make_images(model)
    batch = x.shape[0]
    decoder = infer_discrete(pyro_program(model), first_available_dim=-2, temperature=0)
    trace = poutine.trace(decoder).get_trace(x)

    def site(name: str) -> Tensor:
        # a site with a single value (G = 1) comes back unexpanded, e.g. shape (1, 1, 1)
        value = trace.nodes[name]["value"]
        return value.reshape(-1).expand(batch) if value.numel() == 1 else value

    switches = site("a").bool() if prior_on is not None else None
    with torch.no_grad():
        at_pyro = model.log_joint(x, site("c"), site("g"), switches)
        at_ours = model.log_joint(x, *model.map_latents(x))
    torch.testing.assert_close(at_ours, at_pyro, rtol=0, atol=IDENTITY_TOL)
    torch.testing.assert_close(model.map_classes(x), site("c"), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def within_binomial_error(counts: Tensor, probs: Tensor, n: int) -> bool:
    freq = counts.to(DTYPE) / n
    se = (probs * (1 - probs) / n).sqrt()
    return bool(((freq - probs).abs() <= FREQ_NUM_SE * se).all())


def test_sample_shapes_and_frequencies() -> None:
    model = make_model("interior", PRIOR_ON)
    n = 20_000
    x, classes, translations, switches = model.sample(n, generator=torch.Generator().manual_seed(3))
    assert x.shape == (n, C0, H, W) and x.dtype == DTYPE
    assert classes.shape == translations.shape == switches.shape == (n,)
    assert classes.dtype == translations.dtype == torch.long and switches.dtype == torch.bool
    pi = model.log_prior.detach().exp()
    assert within_binomial_error(torch.bincount(classes, minlength=NUM_CLASSES), pi, n)
    num_g = model.num_translations
    uniform = torch.full((num_g,), 1 / num_g, dtype=DTYPE)
    assert within_binomial_error(torch.bincount(translations, minlength=num_g), uniform, n)
    on = torch.tensor([PRIOR_ON], dtype=DTYPE)
    assert within_binomial_error(switches.sum().view(1), on, n)
    # the residual is the noise: its variance estimate from N = n * D draws has SE sigma^2 sqrt(2/N)
    residual = x - model.render(classes, translations, switches).detach()
    num_draws = residual.numel()
    assert abs(float(residual.pow(2).mean()) - SIGMA2) <= FREQ_NUM_SE * SIGMA2 * math.sqrt(
        2 / num_draws
    )
    with torch.no_grad():
        lj = model.log_joint(x[:5], classes[:5], translations[:5], switches[:5])
    assert bool(torch.isfinite(lj).all())


def test_sample_is_reproducible_and_all_on_without_switch() -> None:
    model = make_model("circular", None)
    first = model.sample(7, generator=torch.Generator().manual_seed(5))
    second = model.sample(7, generator=torch.Generator().manual_seed(5))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bool(first[3].all())
    assert not first[0].requires_grad


def test_results_are_named_and_the_config_rebuilds_the_architecture() -> None:
    model = make_model("interior", PRIOR_ON)
    draw = model.sample(3, generator=torch.Generator().manual_seed(8))
    assert isinstance(draw, ShallowSample) and draw.switches is draw[3]
    with torch.no_grad():
        latents = model.map_latents(draw.x)
    assert isinstance(latents, ShallowLatents) and latents.classes is latents[0]
    config = model.config
    assert config == ShallowConfig(NUM_CLASSES, (C0, *INTERIOR_TEMPLATE), (C0, H, W),
                                   "interior", PRIOR_ON)  # fmt: skip
    assert ShallowConfig.from_dict(config.to_dict()) == config == model.config
    assert model.config_dict() == config.to_dict()
    rebuilt = ShallowRenderingModel.from_config(config, dtype=DTYPE)
    assert rebuilt.config == config and not bool(rebuilt.templates.any())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.translation = "none"  # type: ignore[misc]
    with pytest.raises(ValueError, match="malformed shallow model config"):
        ShallowConfig.from_dict({"template_shape": [2, 1, 3, 3]})
    with pytest.raises(ValueError, match="larger than the image"):
        ShallowConfig(2, (1, 9, 9), (1, 4, 4), "interior")
    with pytest.raises(TypeError, match="config must be a ShallowConfig"):
        ShallowRenderingModel.from_config(config.to_dict())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------

GOOD_TEMPLATES = torch.zeros(NUM_CLASSES, C0, H, W, dtype=DTYPE)
NAN_TEMPLATES = torch.full((NUM_CLASSES, C0, H, W), math.nan, dtype=DTYPE)
LONG_TEMPLATES = torch.zeros(NUM_CLASSES, C0, H, W, dtype=torch.long)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"templates": [[1.0]]}, TypeError, "templates must be a torch.Tensor"),
        ({"templates": LONG_TEMPLATES}, TypeError, "templates.*floating"),
        (
            {"templates": torch.zeros(3, 4, 5, dtype=DTYPE)},
            ValueError,
            r"templates.*\(C, C0, h, w\)",
        ),
        ({"templates": NAN_TEMPLATES}, ValueError, "templates.*NaN"),
        ({"translation": "rotation"}, ValueError, "translation must be one of"),
        ({"translation": 3}, TypeError, "translation must be a str"),
        ({"image_shape": (2, 4)}, TypeError, "image_shape"),
        ({"image_shape": (3, 4, 5)}, ValueError, "C0 = 2 channels but image_shape has C0 = 3"),
        ({"image_shape": (2, 6, 5)}, ValueError, "translation='circular' needs image-sized"),
        ({"image_shape": (2, 6, 5), "translation": "none"}, ValueError, "translation='none' needs"),
        (
            {"image_shape": (2, 3, 5), "translation": "interior"},
            ValueError,
            "larger than the image",
        ),
        ({"sigma2": 0.0}, ValueError, "sigma2 must be a finite positive number"),
        ({"sigma2": -1.0}, ValueError, "sigma2 must be a finite positive number"),
        ({"sigma2": math.inf}, ValueError, "sigma2 must be a finite positive number"),
        ({"sigma2": "1"}, TypeError, "sigma2 must be a real number"),
        ({"switch_prior_on": 1.0}, ValueError, r"switch_prior_on must lie in the open interval"),
        ({"switch_prior_on": 0.0}, ValueError, r"switch_prior_on must lie in the open interval"),
        ({"switch_prior_on": True}, TypeError, "switch_prior_on must be a real number"),
        ({"prior_logits": torch.zeros(4, dtype=DTYPE)}, ValueError, r"prior_logits.*\(3,\)"),
        ({"prior_logits": torch.zeros(3)}, TypeError, "prior_logits has dtype torch.float32"),
        (
            {"prior_logits": torch.tensor([0.0, math.inf, 0.0], dtype=DTYPE)},
            ValueError,
            "prior_logits.*infinite",
        ),
    ],
)
def test_constructor_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"templates": GOOD_TEMPLATES, "image_shape": (C0, H, W)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ShallowRenderingModel(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.zeros(C0, H, W, dtype=DTYPE), ValueError, r"x must have shape \(B, C0, H, W\)"),
        (torch.zeros(2, 3, H, W, dtype=DTYPE), ValueError, "x has 3 channels, expected C0 = 2"),
        (torch.zeros(2, C0, H, W + 1, dtype=DTYPE), ValueError, r"x has spatial size \(4, 6\)"),
        (torch.full((2, C0, H, W), math.nan, dtype=DTYPE), ValueError, "x contains NaN"),
        (torch.zeros(2, C0, H, W), TypeError, "x has dtype torch.float32, expected.*float64"),
        (torch.zeros(2, C0, H, W, dtype=torch.long), TypeError, "x must be a floating tensor"),
        ([[0.0]], TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_images_are_rejected(x: object, error: type[Exception], match: str) -> None:
    model = make_model("circular", PRIOR_ON)
    with pytest.raises(error, match=match):
        model.class_scores(x)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        model.log_likelihood(x)  # type: ignore[arg-type]


def test_bad_latents_are_rejected() -> None:
    model = make_model("interior", PRIOR_ON)
    x = torch.zeros(2, C0, H, W, dtype=DTYPE)
    c, g, a = torch.tensor([0, 1]), torch.tensor([0, 8]), torch.tensor([True, False])
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 3\), got values in \[0, 3\]"):
        model.log_joint(x, torch.tensor([0, 3]), g, a)
    with pytest.raises(ValueError, match=r"translations must lie in \[0, 9\)"):
        model.log_joint(x, c, torch.tensor([0, 9]), a)
    with pytest.raises(TypeError, match="classes must have dtype torch.int64"):
        model.log_joint(x, c.to(DTYPE), g, a)
    with pytest.raises(ValueError, match="classes has batch size 3, expected B = 2"):
        model.log_joint(x, torch.tensor([0, 1, 2]), g, a)
    with pytest.raises(ValueError, match="switches is required"):
        model.log_joint(x, c, g, None)
    with pytest.raises(TypeError, match="switches must have dtype torch.bool"):
        model.log_joint(x, c, g, a.long())
    with pytest.raises(ValueError, match="mode must be one of"):
        model.class_scores(x, "mean")
    with pytest.raises(ValueError, match="n must be >= 1"):
        model.sample(0)
    no_switch = make_model("interior", None)
    with pytest.raises(ValueError, match="this model has no switch"):
        no_switch.log_joint(x, c, g, a)
    with pytest.raises(ValueError, match="to_linear_classifier needs translation='none'"):
        to_linear_classifier(no_switch)
    with pytest.raises(ValueError, match="to_linear_classifier needs a model without a switch"):
        to_linear_classifier(make_model("none", PRIOR_ON))
    with pytest.raises(TypeError, match="expects a ShallowRenderingModel, got Linear"):
        to_linear_classifier(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
