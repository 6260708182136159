"""Tests for exact EM on the shallow rendering model (DESIGN E10, section 5): `drm.shallow_em`.

Oracles: the model's own exact likelihood (`log_likelihood`, `class_scores`), an independent
computation for the monotonicity checks; brute-force enumeration of every (n, c, g, a) through the
literal `log_joint` / `render` (no convolution) for the E-step and for the M-step, whose templates
are checked against an explicit weighted-least-squares solve with the placement matrices T_g built
by rendering unit templates; autograd (the gradient of Q vanishes at the M-step) and random
perturbations (they never increase Q); planted models for parameter recovery, with tolerances set
from the sample size.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from drm.checkpoint import load_checkpoint, save_checkpoint
from drm.shallow import ShallowRenderingModel
from drm.shallow_em import (
    ShallowEM,
    floored_prior,
    init_from_class_means,
    init_from_kmeans,
    kmeans,
)
from tests.architectures import brute_log_joint, enumerate_latents

DTYPE = torch.float64
IDENTITY_TOL = 1e-10  # float64 identities between two exact computations of the same quantity
MONOTONE_REL_TOL = 1e-9  # an EM step may lower the log-likelihood by at most this (relative)
GRAD_TOL = 1e-8  # |dQ/dtheta| at the M-step's output; Q ~ 1e3, float64 rounding ~ 1e-12
PERTURB = 1e-4  # size of the random perturbations of the M-step's output
NUM_SE = 5.0  # recovered parameters must lie within this many standard errors of the truth

TRANSLATIONS = ("circular", "interior", "none")
MODES = ("unsupervised", "supervised", "semi")


def template_size(translation: str, image: tuple[int, int], interior: tuple[int, int]) -> tuple:
    return interior if translation == "interior" else image


def random_model(
    translation: str,
    switch: float | None,
    seed: int,
    num_classes: int = 3,
    image: tuple[int, int, int] = (1, 5, 6),
    interior: tuple[int, int] = (3, 4),
    scale: float = 1.0,
    sigma2: float = 0.5,
    prior_logits: Tensor | None = None,
) -> ShallowRenderingModel:
    gen = torch.Generator().manual_seed(seed)
    h, w = template_size(translation, image[1:], interior)
    templates = scale * torch.randn(num_classes, image[0], h, w, generator=gen, dtype=DTYPE)
    return ShallowRenderingModel(
        templates,
        image,
        translation=translation,
        prior_logits=prior_logits,
        sigma2=sigma2,
        switch_prior_on=switch,
    )


def labels_for(mode: str, classes: Tensor) -> Tensor | None:
    """Labels for a mode: none, all known, or every third one known (semi-supervised)."""
    if mode == "unsupervised":
        return None
    if mode == "supervised":
        return classes.clone()
    y = torch.full_like(classes, -1)
    y[::3] = classes[::3]
    return y


def objective(model: ShallowRenderingModel, x: Tensor, y: Tensor | None) -> float:
    """sum_n log p(x_n) (unlabelled) or log p(x_n, y_n) (labelled), from the model's own scores."""
    with torch.no_grad():
        log_px = model.log_likelihood(x)  # (N,)
        if y is None:
            return float(log_px.sum())
        log_pxc = model.class_scores(x, "sum") - model.score_constant(x)[:, None]  # (N, C)
        labelled = y >= 0
        picked = log_pxc.gather(1, y.clamp(min=0)[:, None])[:, 0]
        return float(torch.where(labelled, picked, log_px).sum())


def hard_objective(model: ShallowRenderingModel, x: Tensor) -> float:
    """sum_n max_{c, g, a} log p(x_n, c, g, a) (unsupervised)."""
    with torch.no_grad():
        scores = model.class_scores(x, "max") - model.score_constant(x)[:, None]
        return float(scores.amax(dim=1).sum())


def run_epoch(trainer: ShallowEM, x: Tensor, y: Tensor | None, batch: int = 64) -> dict:
    for start in range(0, x.shape[0], batch):
        yb = None if y is None else y[start : start + batch]
        trainer.step(x[start : start + batch], yb)
    return trainer.end_epoch()


def expected_q(model: ShallowRenderingModel, x: Tensor, resp: Tensor) -> Tensor:
    """Q(theta) = sum_{n,c,g,a} r_n(c,g,a) log p(x_n, c, g, a; theta), literal (differentiable)."""
    return (resp * brute_log_joint(model, x)).sum()


# ----------------------------------------------------------------------------------------------
# E10: monotonicity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("switch", [None, 0.6], ids=["noswitch", "switch"])
@pytest.mark.parametrize("translation", TRANSLATIONS)
def test_em_never_decreases_likelihood(translation: str, switch: float | None, mode: str) -> None:
    planted = random_model(translation, switch, seed=0, scale=1.5)
    gen = torch.Generator().manual_seed(1)
    x, classes, _, _ = planted.sample(120, gen)
    y = labels_for(mode, classes)
    # a different random start, broad variance, switch prior away from the truth
    model = random_model(translation, None if switch is None else 0.5, seed=7, sigma2=2.0)
    trainer = ShallowEM(model, supervised=mode != "unsupervised")
    previous = objective(model, x, y)
    first = previous
    for _ in range(15):
        summary = run_epoch(trainer, x, y, batch=50)
        # the epoch's reported log-likelihood is the one of the parameters before the M-step
        assert summary["log_likelihood"] * x.shape[0] == pytest.approx(
            previous, rel=IDENTITY_TOL, abs=IDENTITY_TOL
        )
        current = objective(model, x, y)
        assert current >= previous - MONOTONE_REL_TOL * abs(previous)
        previous = current
    assert previous > first  # EM did something
    assert math.isfinite(previous)


@pytest.mark.parametrize("supervised", [False, True], ids=["unsupervised", "supervised"])
@pytest.mark.parametrize("translation", TRANSLATIONS)
def test_hard_em_is_one_hot_and_monotone(translation: str, supervised: bool) -> None:
    planted = random_model(translation, 0.6, seed=2, scale=1.5)
    x, classes, _, _ = planted.sample(120, torch.Generator().manual_seed(3))
    model = random_model(translation, 0.5, seed=8, sigma2=2.0)
    trainer = ShallowEM(model, hard=True, supervised=supervised)
    y = classes if supervised else None

    resp = trainer.responsibilities(x, y)  # (N, C, G, A)
    flat = resp.flatten(1)
    assert bool(((flat == 0) | (flat == 1)).all())
    assert bool((flat.sum(1) == 1).all())
    if not supervised:
        # the one-hot sits at the model's joint MAP (classes; the placement when the object is on)
        c_map, g_map, a_map = model.map_latents(x)
        c_hat = resp.sum(dim=(2, 3)).argmax(1)
        a_hat = resp.sum(dim=(1, 2)).argmax(1) == 1
        g_hat = resp.sum(dim=(1, 3)).argmax(1)
        assert torch.equal(c_hat, c_map)
        assert torch.equal(a_hat, a_map)
        assert torch.equal(g_hat[a_map], g_map[a_map])
    else:
        assert torch.equal(resp.sum(dim=(2, 3)).argmax(1), classes)

    def hard_value() -> float:
        if not supervised:
            return hard_objective(model, x)
        with torch.no_grad():  # max_{g, a} log p(x, c = y, g, a), from the CNN-view scores
            scores = model.class_scores(x, "max") - model.score_constant(x)[:, None]
            return float(scores.gather(1, classes[:, None]).sum())

    previous = hard_value()
    for _ in range(10):
        summary = run_epoch(trainer, x, y)
        assert summary["map_log_joint"] * x.shape[0] == pytest.approx(previous, rel=IDENTITY_TOL)
        current = hard_value()
        assert current >= previous - MONOTONE_REL_TOL * abs(previous)
        previous = current


# ----------------------------------------------------------------------------------------------
# The E-step and the M-step against brute force
# ----------------------------------------------------------------------------------------------


def placement_matrices(model: ShallowRenderingModel) -> Tensor:
    """T_g as explicit (G, D, d) matrices, by rendering each unit template (no convolution)."""
    c0, h, w = model.template_shape
    d = c0 * h * w
    basis = ShallowRenderingModel(
        torch.eye(d, dtype=DTYPE).view(d, c0, h, w),
        model.image_shape,
        translation=model.translation,
    )
    mats = []
    for g in range(model.num_translations):
        cols = basis.render(torch.arange(d), torch.full((d,), g, dtype=torch.long))  # (d, C0,H,W)
        mats.append(cols.flatten(1).T)  # (D, d)
    return torch.stack(mats)


@pytest.mark.parametrize("mode", ["unsupervised", "semi"])
@pytest.mark.parametrize("translation", TRANSLATIONS)
def test_m_step_is_weighted_least_squares(translation: str, mode: str) -> None:
    """The E-step equals enumeration; the M-step equals the explicit closed-form maximiser."""
    model = random_model(translation, 0.4, seed=4, num_classes=2, image=(2, 3, 4), interior=(2, 3))
    # images from the model itself, so that every component carries some weight
    x, classes, _, _ = model.sample(7, torch.Generator().manual_seed(5))
    y = labels_for(mode, classes)
    trainer = ShallowEM(model, supervised=True)

    # E-step: enumeration of (c, g, a) through the literal log_joint, labels masking classes
    with torch.no_grad():
        table = brute_log_joint(model, x)  # (N, C, G, A)
        if y is not None:
            off = (y[:, None] >= 0) & (torch.arange(2)[None, :] != y[:, None])
            table = table.masked_fill(off[:, :, None, None], -math.inf)
        resp = torch.softmax(table.flatten(1), dim=1).view_as(table)
    torch.testing.assert_close(
        trainer.responsibilities(x, y), resp, rtol=IDENTITY_TOL, atol=IDENTITY_TOL
    )

    old_templates = model.templates.detach().clone()
    trainer.step(x, y)
    trainer.end_epoch()

    # templates: argmin sum rho ||x - T_g mu_c||^2, solved with explicit matrices
    mats = placement_matrices(model)  # (G, D, d)
    rho = resp[..., 1]  # (N, C, G)
    xf = x.flatten(1)  # (N, D)
    for c in range(2):
        lhs = torch.einsum("ng,gDd,gDe->de", rho[:, c], mats, mats)
        rhs = torch.einsum("ng,gDd,nD->d", rho[:, c], mats, xf)
        want = torch.linalg.solve(lhs, rhs)
        got = model.templates.detach()[c].flatten()
        torch.testing.assert_close(got, want, rtol=IDENTITY_TOL, atol=IDENTITY_TOL)
    assert not torch.equal(model.templates.detach(), old_templates)

    # priors: expected frequencies
    torch.testing.assert_close(
        model.log_prior.detach().exp(), resp.sum(dim=(2, 3)).mean(0), rtol=IDENTITY_TOL, atol=0
    )
    assert model.switch_prior_on == pytest.approx(float(resp[..., 1].sum() / 7), rel=IDENTITY_TOL)

    # sigma^2: mean expected squared residual per pixel, with the new templates, by rendering
    residual = x.new_zeros(())
    n = x.shape[0]
    for c, g, a in enumerate_latents(model):
        mu = model.render(
            torch.full((n,), c, dtype=torch.long),
            torch.full((n,), g, dtype=torch.long),
            torch.full((n,), a, dtype=torch.bool),
        ).detach()
        residual = residual + (resp[:, c, g, int(a)] * (x - mu).pow(2).flatten(1).sum(1)).sum()
    assert float(model.sigma2) == pytest.approx(float(residual) / (n * 24), rel=IDENTITY_TOL)


@pytest.mark.parametrize("translation", TRANSLATIONS)
def test_m_step_maximises_q(translation: str) -> None:
    """At the M-step's output the gradient of Q vanishes and random perturbations lower Q."""
    model = random_model(translation, 0.3, seed=9, num_classes=3)
    x, _, _, _ = random_model(translation, 0.7, seed=10, scale=2.0).sample(
        40, torch.Generator().manual_seed(11)
    )
    trainer = ShallowEM(model, supervised=False)
    resp = trainer.responsibilities(x)
    trainer.step(x)
    trainer.end_epoch()

    q_star = expected_q(model, x, resp)
    q_star.backward()
    assert model.templates.grad is not None and model.prior_logits.grad is not None
    assert float(model.templates.grad.abs().max()) < GRAD_TOL
    assert float(model.prior_logits.grad.abs().max()) < GRAD_TOL

    gen = torch.Generator().manual_seed(12)
    q_value = float(q_star.detach())
    for _ in range(5):
        for name in ("templates", "prior_logits", "sigma2", "switch"):
            for sign in (1.0, -1.0):
                moved = ShallowRenderingModel(
                    model.templates.detach().clone(),
                    model.image_shape,
                    translation=translation,
                    prior_logits=model.prior_logits.detach().clone(),
                    sigma2=float(model.sigma2),
                    switch_prior_on=model.switch_prior_on,
                )
                with torch.no_grad():
                    if name == "templates":
                        step = torch.randn(moved.templates.shape, generator=gen, dtype=DTYPE)
                        moved.templates.add_(sign * PERTURB * step)
                    elif name == "prior_logits":
                        step = torch.randn(3, generator=gen, dtype=DTYPE)
                        moved.prior_logits.add_(sign * PERTURB * (step - step.mean()))
                    elif name == "sigma2":
                        moved.sigma2.mul_(1.0 + sign * PERTURB)
                if name == "switch":
                    assert moved.switch_prior_on is not None
                    moved.switch_prior_on += sign * PERTURB
                with torch.no_grad():
                    assert float(expected_q(moved, x, resp)) < q_value


def test_step_returns_the_negative_log_likelihood() -> None:
    model = random_model("interior", 0.5, seed=13)
    x, classes, _, _ = model.sample(30, torch.Generator().manual_seed(14))
    trainer = ShallowEM(model, supervised=True)
    unlabelled = torch.full_like(classes, -1)
    want = -float(model.log_likelihood(x).detach().mean())
    assert trainer.step(x, unlabelled) == pytest.approx(want, rel=IDENTITY_TOL)
    assert trainer.step(x) == pytest.approx(want, rel=IDENTITY_TOL)
    want_joint = -objective(model, x, classes) / 30
    assert trainer.step(x, classes) == pytest.approx(want_joint, rel=IDENTITY_TOL)


def test_result_does_not_depend_on_batching() -> None:
    planted = random_model("circular", 0.6, seed=15)
    x, classes, _, _ = planted.sample(90, torch.Generator().manual_seed(16))
    y = labels_for("semi", classes)
    results = []
    for batch in (90, 7):
        model = random_model("circular", 0.5, seed=17)
        trainer = ShallowEM(model)
        for _ in range(3):
            summary = run_epoch(trainer, x, y, batch=batch)
        results.append((model, summary))
    (m1, s1), (m2, s2) = results
    torch.testing.assert_close(m1.templates, m2.templates, rtol=IDENTITY_TOL, atol=IDENTITY_TOL)
    torch.testing.assert_close(m1.prior_logits, m2.prior_logits, rtol=IDENTITY_TOL, atol=0)
    assert float(m1.sigma2) == pytest.approx(float(m2.sigma2), rel=IDENTITY_TOL)
    assert m1.switch_prior_on == pytest.approx(m2.switch_prior_on, rel=IDENTITY_TOL)
    assert s1["log_likelihood"] == pytest.approx(s2["log_likelihood"], rel=IDENTITY_TOL)


# ----------------------------------------------------------------------------------------------
# E10: parameter recovery
# ----------------------------------------------------------------------------------------------

RECOVERY_N = 4000  # samples from the planted model
RECOVERY_SIGMA2 = 0.25
RECOVERY_PRIOR = (0.5, 0.3, 0.2)
RECOVERY_ON = 0.7


def planted_model(translation: str, switch: float | None) -> ShallowRenderingModel:
    """Well-separated planted templates: ||mu_c||^2 / sigma^2 ~ 100 and distinct shifts."""
    return random_model(
        translation,
        switch,
        seed=21,
        image=(1, 7, 7),
        interior=(5, 5),
        sigma2=RECOVERY_SIGMA2,
        prior_logits=torch.tensor(RECOVERY_PRIOR, dtype=DTYPE).log(),
    )


def assert_recovered(
    fitted: ShallowRenderingModel, planted: ShallowRenderingModel, n: int, permute: bool
) -> None:
    """Compare up to a label permutation (Hungarian on template distances when `permute`)."""
    fit_t = fitted.templates.detach()
    true_t = planted.templates.detach()
    if permute:
        cost = torch.cdist(true_t.flatten(1), fit_t.flatten(1)).numpy()
        rows, cols = linear_sum_assignment(cost)
        order = torch.as_tensor(cols[rows.argsort()])
    else:
        order = torch.arange(planted.num_classes)
    on = planted.switch_prior_on if planted.switch_prior_on is not None else 1.0
    prior = planted.log_prior.detach().exp()
    # each template pixel is the mean of ~ n pi_c pi_on noisy observations: SE sigma / sqrt(that)
    template_tol = NUM_SE * math.sqrt(RECOVERY_SIGMA2 / (n * float(prior.min()) * on))
    assert float((fit_t[order] - true_t).abs().max()) < template_tol
    # frequencies: binomial standard error sqrt(p (1 - p) / n)
    prior_tol = NUM_SE * math.sqrt(0.25 / n)
    fit_prior = fitted.log_prior.detach().exp()[order]
    assert float((fit_prior - prior).abs().max()) < prior_tol
    if planted.switch_prior_on is not None:
        assert fitted.switch_prior_on is not None
        assert abs(fitted.switch_prior_on - planted.switch_prior_on) < prior_tol
    # variance of a mean of n D squared Gaussians: SE sigma^2 sqrt(2 / (n D))
    sigma2_tol = NUM_SE * RECOVERY_SIGMA2 * math.sqrt(2.0 / (n * planted.num_pixels))
    assert abs(float(fitted.sigma2) - RECOVERY_SIGMA2) < sigma2_tol


@pytest.mark.parametrize("translation", TRANSLATIONS)
def test_unsupervised_recovery_from_perturbed_start(translation: str) -> None:
    planted = planted_model(translation, RECOVERY_ON)
    x, _, _, _ = planted.sample(RECOVERY_N, torch.Generator().manual_seed(22))
    gen = torch.Generator().manual_seed(23)
    true_t = planted.templates.detach()
    start = true_t[torch.tensor([2, 0, 1])] + 0.3 * torch.randn(
        true_t.shape, generator=gen, dtype=DTYPE
    )  # permuted and perturbed
    model = ShallowRenderingModel(
        start, planted.image_shape, translation=translation, sigma2=1.0, switch_prior_on=0.5
    )
    trainer = ShallowEM(model, supervised=False)
    for _ in range(20):
        run_epoch(trainer, x, None, batch=RECOVERY_N)
    assert_recovered(model, planted, RECOVERY_N, permute=True)


def test_unsupervised_recovery_from_kmeans() -> None:
    planted = planted_model("none", None)
    x, _, _, _ = planted.sample(RECOVERY_N, torch.Generator().manual_seed(24))
    model = init_from_kmeans(x, 3, translation="none", generator=torch.Generator().manual_seed(25))
    trainer = ShallowEM(model, supervised=False)
    for _ in range(10):
        run_epoch(trainer, x, None, batch=RECOVERY_N)
    assert_recovered(model, planted, RECOVERY_N, permute=True)


def test_supervised_recovery_from_perturbed_start() -> None:
    # Not from the class means: with "interior" placements the centre crop of a mean blurred over
    # placements leads EM to a local optimum, the true template shifted by one pixel with an edge
    # row cut off (it explains every placement but one). Translations make the likelihood
    # multimodal; a start near the truth is what a recovery test can promise.
    planted = planted_model("interior", RECOVERY_ON)
    x, classes, _, _ = planted.sample(RECOVERY_N, torch.Generator().manual_seed(26))
    gen = torch.Generator().manual_seed(27)
    true_t = planted.templates.detach()
    start = true_t + 0.3 * torch.randn(true_t.shape, generator=gen, dtype=DTYPE)
    model = ShallowRenderingModel(
        start, planted.image_shape, translation="interior", sigma2=1.0, switch_prior_on=0.5
    )
    trainer = ShallowEM(model, supervised=True)
    for _ in range(20):
        run_epoch(trainer, x, classes, batch=1000)
    assert_recovered(model, planted, RECOVERY_N, permute=False)


# ----------------------------------------------------------------------------------------------
# Semi-supervised responsibilities
# ----------------------------------------------------------------------------------------------


def test_labels_pin_the_class() -> None:
    model = random_model("interior", 0.5, seed=30)
    x, classes, _, _ = model.sample(20, torch.Generator().manual_seed(31))
    y = labels_for("semi", classes)
    assert y is not None
    posterior = model.latent_posterior(x).detach()
    resp = ShallowEM(model, supervised=True).responsibilities(x, y)
    labelled = y >= 0
    per_class = resp.sum(dim=(2, 3))  # (N, C)
    torch.testing.assert_close(
        per_class[labelled],
        torch.nn.functional.one_hot(y[labelled], 3).to(DTYPE),
        rtol=0,
        atol=IDENTITY_TOL,
    )
    # within the label, the (g, a) posterior is p(g, a | x, c = y)
    cond = posterior[labelled, y[labelled]]
    cond = cond / cond.sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(
        resp[labelled, y[labelled]], cond, rtol=IDENTITY_TOL, atol=IDENTITY_TOL
    )
    torch.testing.assert_close(
        resp[~labelled], posterior[~labelled], rtol=IDENTITY_TOL, atol=IDENTITY_TOL
    )
    # unsupervised: every label is ignored
    ignored = ShallowEM(model, supervised=False).responsibilities(x, classes)
    torch.testing.assert_close(ignored, posterior, rtol=IDENTITY_TOL, atol=IDENTITY_TOL)


# ----------------------------------------------------------------------------------------------
# Robustness
# ----------------------------------------------------------------------------------------------


def assert_finite_model(model: ShallowRenderingModel) -> None:
    assert bool(torch.isfinite(model.templates).all())
    assert bool(torch.isfinite(model.prior_logits).all())
    assert math.isfinite(float(model.sigma2))


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_far_template_is_an_empty_component(hard: bool) -> None:
    planted = random_model("interior", None, seed=32)
    x, _, _, _ = planted.sample(50, torch.Generator().manual_seed(33))
    templates = planted.templates.detach().clone()
    templates[1] = 1e3  # explains no image: its responsibilities underflow to exactly zero
    model = ShallowRenderingModel(templates, planted.image_shape, translation="interior")
    floor = 1e-6
    trainer = ShallowEM(model, hard=hard, supervised=False, prior_floor=floor)
    for _ in range(5):
        summary = run_epoch(trainer, x, None)
        assert summary["empty_components"] == 1.0
        assert all(math.isfinite(v) for k, v in summary.items() if k != "switch_prior_on")
    assert_finite_model(model)
    assert torch.equal(model.templates.detach()[1], templates[1])  # kept, not NaN
    assert float(model.log_prior.detach().exp()[1]) == pytest.approx(floor, rel=1e-9)


@pytest.mark.parametrize("translation", TRANSLATIONS)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_zero_variance_data(translation: str, hard: bool) -> None:
    image = torch.randn(1, 1, 5, 6, generator=torch.Generator().manual_seed(34), dtype=DTYPE)
    x = image.expand(40, 1, 5, 6).clone()  # all images equal
    model = random_model(translation, 0.5, seed=35)
    min_variance = 1e-5
    trainer = ShallowEM(model, hard=hard, supervised=False, min_variance=min_variance)
    for _ in range(6):
        summary = run_epoch(trainer, x, None)
        assert summary["sigma2"] >= min_variance
        assert all(math.isfinite(v) for v in summary.values())
    assert_finite_model(model)
    assert float(model.sigma2) >= min_variance
    assert math.isfinite(float(model.log_likelihood(x).detach().sum()))
    # image-sized templates can reproduce x exactly (hard EM may instead settle on "object
    # absent", a = 0 for every image, a fixed point of its objective with sigma^2 = ||x||^2 / D)
    if translation != "interior" and not hard:
        assert float(model.sigma2) == min_variance


def test_floored_prior_is_the_constrained_maximiser() -> None:
    counts = torch.tensor([100.0, 1e-12, 0.0, 3.0], dtype=DTYPE)
    floor = 0.01
    prior = floored_prior(counts, floor)
    assert float(prior.sum()) == pytest.approx(1.0, abs=IDENTITY_TOL)
    assert float(prior.min()) >= floor
    # brute force over a grid of feasible priors: none has a larger objective
    best = float((counts * prior.log()).sum())
    gen = torch.Generator().manual_seed(36)
    # uniform draws from the floored simplex: floor + (1 - 4 floor) * Dirichlet(1, 1, 1, 1)
    spacings = -torch.rand(2000, 4, generator=gen, dtype=DTYPE).log()  # Exp(1) draws
    cand = floor + (1 - 4 * floor) * spacings / spacings.sum(1, keepdim=True)  # (2000, 4)
    assert float((counts * cand.log()).sum(1).max()) <= best + IDENTITY_TOL
    # and the analytic cases: the floor binds for the tiny counts, the rest share 1 - 2 floor
    torch.testing.assert_close(
        prior,
        torch.tensor([100 / 103, 0.0, 0.0, 3 / 103], dtype=DTYPE) * (1 - 2 * floor)
        + torch.tensor([0.0, floor, floor, 0.0], dtype=DTYPE),
        rtol=IDENTITY_TOL,
        atol=0,
    )
    torch.testing.assert_close(
        floored_prior(torch.tensor([3.0, 1.0], dtype=DTYPE), 1e-3),
        torch.tensor([0.75, 0.25], dtype=DTYPE),
    )


def test_float32_model_trains_with_float64_statistics() -> None:
    planted = random_model("interior", 0.6, seed=37)
    x, classes, _, _ = planted.sample(60, torch.Generator().manual_seed(38))
    model = random_model("interior", 0.5, seed=39).to(torch.float32)
    trainer = ShallowEM(model)
    summary = run_epoch(trainer, x.float(), classes)
    assert model.templates.dtype == torch.float32
    assert math.isfinite(summary["log_likelihood"])
    assert trainer.state_dict()["stats"]["sums"].dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# State and checkpoints
# ----------------------------------------------------------------------------------------------


def test_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    planted = random_model("circular", 0.6, seed=40)
    x, classes, _, _ = planted.sample(40, torch.Generator().manual_seed(41))
    model = random_model("circular", 0.5, seed=42)
    trainer = ShallowEM(model, hard=False, supervised=True, min_variance=1e-4, prior_floor=1e-5)
    run_epoch(trainer, x, classes)
    trainer.step(x[:20], classes[:20])  # a partial epoch: its statistics travel too
    path = tmp_path / "em.safetensors"
    save_checkpoint(path, trainer.current_model(), trainer.state_dict())

    loaded = load_checkpoint(path)
    assert isinstance(loaded.model, ShallowRenderingModel)
    resumed = ShallowEM(loaded.model)
    resumed.load_state_dict(loaded.trainer_state)
    assert (resumed.min_variance, resumed.prior_floor, resumed.epochs) == (1e-4, 1e-5, 1)
    for t in (trainer, resumed):
        t.step(x[20:], classes[20:])
        t.end_epoch()
    torch.testing.assert_close(loaded.model.templates, model.templates, rtol=0, atol=0)
    assert loaded.model.switch_prior_on == model.switch_prior_on
    assert float(loaded.model.sigma2) == float(model.sigma2)


def test_load_state_dict_rejects_malformed_state() -> None:
    trainer = ShallowEM(random_model("none", None, seed=43))
    state = trainer.state_dict()
    with pytest.raises(ValueError, match="keys"):
        trainer.load_state_dict({k: v for k, v in state.items() if k != "hard"})
    bad = dict(state, stats=dict(state["stats"], sums=torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="shape"):
        trainer.load_state_dict(bad)
    with pytest.raises(TypeError, match="hard"):
        trainer.load_state_dict(dict(state, hard="yes"))
    with pytest.raises(TypeError, match="dict"):
        trainer.load_state_dict([])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# k-means and initialisation
# ----------------------------------------------------------------------------------------------


def test_kmeans_finds_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(44)
    centers = 10.0 * torch.randn(4, 1, 3, 3, generator=gen, dtype=DTYPE)
    assign = torch.arange(400) % 4
    x = centers[assign] + 0.1 * torch.randn(400, 1, 3, 3, generator=gen, dtype=DTYPE)
    found = kmeans(x, 4, 20, torch.Generator().manual_seed(45))
    assert found.shape == (4, 1, 3, 3)
    cost = torch.cdist(centers.flatten(1), found.flatten(1)).numpy()
    rows, cols = linear_sum_assignment(cost)
    # each centre is a mean of 100 points with noise 0.1 per coordinate: SE 0.01
    assert float(cost[rows, cols].max()) < NUM_SE * 0.01 * 3


def test_kmeans_degenerate_data_has_no_nan() -> None:
    x = torch.ones(6, 1, 2, 2, dtype=DTYPE)  # every point equal: clusters are necessarily empty
    found = kmeans(x, 3, 5, torch.Generator().manual_seed(46))
    assert bool(torch.isfinite(found).all())
    assert torch.equal(found, torch.ones(3, 1, 2, 2, dtype=DTYPE))
    model = init_from_kmeans(x, 3, translation="none", min_variance=1e-3)
    assert float(model.sigma2) == 1e-3


def test_init_from_class_means_crops_the_means() -> None:
    gen = torch.Generator().manual_seed(47)
    x = torch.randn(30, 1, 6, 6, generator=gen, dtype=DTYPE)
    y = torch.arange(30) % 3
    model = init_from_class_means(x, y, 4, translation="interior", template_size=(4, 4))
    means = torch.stack([x[y == c].mean(0) for c in range(3)])[:, :, 1:5, 1:5]
    torch.testing.assert_close(model.templates.detach()[:3], means, rtol=IDENTITY_TOL, atol=0)
    assert model.num_translations == 9
    assert float(model.log_prior.detach().exp()[3]) == pytest.approx(1 / 34)  # add-one smoothing


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    model = random_model("interior", 0.5, seed=48)
    x, classes, _, _ = model.sample(4, torch.Generator().manual_seed(49))
    trainer = ShallowEM(model)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        trainer.step(x, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="labels must lie"):
        trainer.step(x, torch.tensor([0, 1, -2, 0]))
    with pytest.raises(ValueError, match="shape"):
        trainer.step(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="int64"):
        trainer.step(x, classes.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        trainer.step(x, [0, 1, 2, 0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spatial size"):
        trainer.step(x[:, :, :4], classes)
    with pytest.raises(TypeError, match="dtype"):
        trainer.step(x.float(), classes)
    with pytest.raises(ValueError, match="empty batch"):
        trainer.step(x[:0], classes[:0])
    with pytest.raises(RuntimeError, match="at least one step"):
        trainer.end_epoch()
    with pytest.raises(TypeError, match="ShallowRenderingModel"):
        ShallowEM(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hard"):
        ShallowEM(model, hard=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_variance"):
        ShallowEM(model, min_variance=0.0)
    with pytest.raises(ValueError, match="prior_floor"):
        ShallowEM(model, prior_floor=0.5)
    with pytest.raises(ValueError, match="empty_weight"):
        ShallowEM(model, empty_weight=-1.0)
    with pytest.raises(ValueError, match="at least k points"):
        kmeans(x, 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((3, 1, 2, 2), math.nan, dtype=DTYPE), 2)
    with pytest.raises(ValueError, match="template_size"):
        init_from_kmeans(x, 2, translation="interior", template_size=(9, 9))
    with pytest.raises(ValueError, match="image-sized"):
        init_from_kmeans(x, 2, translation="circular", template_size=(3, 3))
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\)"):
        init_from_class_means(x, torch.tensor([0, 1, 2, 3]), 3)
