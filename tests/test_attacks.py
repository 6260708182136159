"""Attacks on the CNN and the DRM's view of the attacked images (`cnn_equiv.attacks`,
`cnn_equiv.detection`).

Oracles: autograd through the torch CNN (`to_cnn`) for the FGSM step and the rendering (E6); a
hand computation of the effective weight matrix of a linear model for the template attack and its
minimal alpha; `max_sum` (E1) and least squares (`torch.linalg.lstsq`) for the DRM's view;
brute-force enumeration (`drm.exact_map`) for the inference gap; `sklearn.metrics.roc_auc_score`
for the AUC. A small CNN trained for a few seconds on scikit-learn's 8x8 digits is the real
classifier that the attacks must break.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

import drm
from cnn_equiv import to_cnn, to_drm
from cnn_equiv.attacks import (
    fgsm,
    fool_with_template,
    fooling_images,
    iterative_attack,
    minimal_template_alpha,
    template_direction,
)
from cnn_equiv.detection import (
    DETECTION_STATISTICS,
    default_attacks,
    detection_auc,
    detection_report,
    drm_view,
)
from drm import DenseSpec, FlattenSpec, ModelConfig
from drm.data import Dataset, load_digits
from tests.architectures import ARCHITECTURES, TINY_ARCHITECTURES, build, fit_digits, images

IDENTITY_TOL = 1e-10  # float64 identities
BOX_TOL = 1e-12  # |x_adv - x| <= epsilon up to the rounding of x + epsilon
BISECTION_TOL = 1e-4  # the `tol` handed to minimal_template_alpha
AUC_TOL = 1e-12  # rank formula against sklearn
LSTSQ_SCALE_TOL = 1e-9  # a ratio of two sums of ~800 terms against LAPACK's lstsq, float64


def accuracy(cnn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of images whose CNN logit argmax is the label (the torch network: an oracle
    independent of the DRM and of cnn_equiv.detection)."""
    with torch.no_grad():
        return int((cnn(x).argmax(1) == y).sum()) / max(1, x.shape[0])


def _autograd_direction(cnn: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The oracle: d CE(cnn(x), labels) / dx, summed over the batch, by autograd."""
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(cnn(xg), labels, reduction="sum"), xg)
    return grad


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Sequential, drm.DeepRenderingModel, Dataset]:
    """A small CNN trained on the 8x8 digits (~1.5 s), and its rendering model."""
    data = load_digits().to(torch.float64)
    torch.manual_seed(301)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).double()
    fit_digits(cnn, data, steps=200, seed=302)
    cnn.eval()
    for parameter in cnn.parameters():
        parameter.requires_grad_(False)
    return cnn, to_drm(cnn, sigma2=0.1, input_shape=(1, 8, 8)), data


def _linear_model(seed: int) -> drm.DeepRenderingModel:
    """A model without switches or translations: its logits are affine in x."""
    config = ModelConfig((1, 4, 5), 4, (FlattenSpec(), DenseSpec(8), DenseSpec(6)))
    return build(config, seed=seed)


def _effective_weights(model: drm.DeepRenderingModel) -> torch.Tensor:
    """The hand computation: logits = mu W2 W1 x + const, so W_eff = mu W2 W1: (C, D)."""
    _, first, second, classes = model.levels
    weights = classes.weight @ second.weight @ first.weight  # type: ignore[operator]
    return weights.detach()


# --- FGSM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["padding-stride", "leaky", "lenet"])
def test_fgsm_step_is_epsilon_times_the_sign_of_the_autograd_gradient(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=311)
    x = images(model, 4, seed=312)
    generator = torch.Generator().manual_seed(313)
    y = torch.randint(0, model.num_classes, (4,), generator=generator)
    target = (y + 1) % model.num_classes
    cnn = to_cnn(model)
    epsilon = 0.05
    up = _autograd_direction(cnn, x, y).sign()
    down = -_autograd_direction(cnn, x, target).sign()
    for classifier in (model, cnn):  # through max_sum, and through the torch CNN itself
        assert torch.equal(fgsm(classifier, x, y, epsilon, clamp=None), x + epsilon * up)
        targeted = fgsm(classifier, x, y, epsilon, target=target, clamp=None)
        assert torch.equal(targeted, x + epsilon * down)
        assert torch.equal(fgsm(classifier, x, None, epsilon, target=target, clamp=None), targeted)


def test_fgsm_stays_in_the_box_and_the_pixel_range(
    digits: tuple[nn.Sequential, drm.DeepRenderingModel, Dataset],
) -> None:
    cnn, model, data = digits
    x, y = data.x_test[:100], data.y_test[:100]
    for epsilon in (0.0, 0.1, 0.3):
        adversarial = fgsm(model, x, y, epsilon)
        assert float((adversarial - x).abs().max()) <= epsilon + BOX_TOL
        assert float(adversarial.min()) >= 0.0 and float(adversarial.max()) <= 1.0
    assert torch.equal(fgsm(model, x, y, 0.0), x)


def test_fgsm_breaks_the_trained_digits_cnn(
    digits: tuple[nn.Sequential, drm.DeepRenderingModel, Dataset],
) -> None:
    cnn, model, data = digits
    x, y = data.x_test, data.y_test
    clean = accuracy(cnn, x, y)
    assert clean > 0.9  # a real classifier (observed 0.978)
    on_model = fgsm(model, x, y, 0.2)
    on_cnn = fgsm(cnn, x, y, 0.2)
    # the DRM's scores are the CNN's logits minus a constant (eq. 12): the same attack
    assert float((on_model - on_cnn).abs().max()) <= IDENTITY_TOL
    assert accuracy(cnn, on_model, y) < 0.5 * clean  # observed 0.036
    # targeted: most images go where they are sent
    target = (y + 1) % 10
    sent = fgsm(model, x, y, 0.3, target=target)
    assert accuracy(cnn, sent, target) > 0.3  # observed 0.60


# --- the iterative attack -------------------------------------------------------------------------


@pytest.mark.parametrize("random_start", [False, True])
def test_iterative_attack_stays_in_the_ball_and_the_pixel_range(
    digits: tuple[nn.Sequential, drm.DeepRenderingModel, Dataset], random_start: bool
) -> None:
    cnn, model, data = digits
    x, y = data.x_test[:100], data.y_test[:100]
    epsilon = 0.1
    adversarial = iterative_attack(
        model,
        x,
        y,
        epsilon,
        0.04,
        6,
        random_start=random_start,
        generator=torch.Generator().manual_seed(321),
    )
    assert float((adversarial - x).abs().max()) <= epsilon + BOX_TOL
    assert float(adversarial.min()) >= 0.0 and float(adversarial.max()) <= 1.0
    # pixels at 0 that the attack wants darker stay at 0: the range binds, not only the ball
    assert float((adversarial - x).abs().max()) >= epsilon - BOX_TOL


def test_iterative_attack_is_at_least_as_strong_as_fgsm(
    digits: tuple[nn.Sequential, drm.DeepRenderingModel, Dataset],
) -> None:
    cnn, model, data = digits
    x, y = data.x_test, data.y_test
    for epsilon in (0.05, 0.1, 0.2):
        one_step = fgsm(cnn, x, y, epsilon)
        iterated = iterative_attack(cnn, x, y, epsilon, epsilon / 4, 10)
        with torch.no_grad():
            loss_fgsm = F.cross_entropy(cnn(one_step), y)
            loss_iterated = F.cross_entropy(cnn(iterated), y)
        assert float(loss_iterated) >= float(loss_fgsm)
        assert accuracy(cnn, iterated, y) <= accuracy(cnn, one_step, y)
    # one step of size epsilon from the clean image is FGSM (clamped to the ball: no change)
    assert torch.equal(iterative_attack(cnn, x, y, 0.1, 0.1, 1), fgsm(cnn, x, y, 0.1))


# --- fooling with a rendered template -------------------------------------------------------------


def test_template_attack_on_a_linear_model_changes_logits_by_alpha_times_inner_products() -> None:
    model = _linear_model(seed=331)
    x = images(model, 5, seed=332)
    target = torch.tensor([0, 1, 2, 3, 1])
    weights = _effective_weights(model)  # (C, D)
    # hand computation: the rendering of the target is sigma^2 times its weight row
    w_target = weights[target]  # (B, D)
    unit = w_target / w_target.norm(dim=1, keepdim=True)
    direction = template_direction(model, x, target)
    torch.testing.assert_close(direction.flatten(1), unit, atol=IDENTITY_TOL, rtol=0)
    for alpha in (0.0, 0.3, 2.5):
        moved = fool_with_template(model, x, target, alpha)
        change = drm.max_sum(model, moved)[0] - drm.max_sum(model, x)[0]
        expected = alpha * unit @ weights.T  # (B, C): alpha <w_c, w_target> / ||w_target||
        torch.testing.assert_close(change.detach(), expected, atol=IDENTITY_TOL, rtol=0)
    # a (B,) alpha moves each image by its own amount
    alphas = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    moved = fool_with_template(model, x, target, alphas)
    torch.testing.assert_close(
        (moved - x).flatten(1).norm(dim=1), alphas, atol=IDENTITY_TOL, rtol=0
    )


def test_template_attack_with_frozen_latents_is_linear_on_any_model() -> None:
    """With the CNN's latents frozen the logits are affine in x, with gradient render / sigma^2
    (E6): the logit change is alpha times the autograd gradient against the unit template."""
    model = build(ARCHITECTURES["padding-stride"], seed=333)
    x = images(model, 3, seed=334)
    target = torch.tensor([1, 2, 3])
    _, latents = drm.max_sum(model, x)
    alpha = 0.7
    moved = fool_with_template(model, x, target, alpha, latents=latents)
    change = drm.frozen_scores(model, moved, latents) - drm.frozen_scores(model, x, latents)
    direction = template_direction(model, x, target)
    cnn = to_cnn(model)
    for c in range(model.num_classes):
        xg = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(cnn(xg)[:, c].sum(), xg)
        expected = alpha * (grad * direction).flatten(1).sum(1)
        torch.testing.assert_close(change[:, c].detach(), expected, atol=IDENTITY_TOL, rtol=0)


def test_minimal_alpha_on_a_linear_model_is_the_hand_computed_threshold() -> None:
    model = _linear_model(seed=335)
    x = images(model, 40, seed=336)
    generator = torch.Generator().manual_seed(337)
    target = torch.randint(0, model.num_classes, (40,), generator=generator)
    weights = _effective_weights(model)
    with torch.no_grad():
        logits = drm.max_sum(model, x)[0]  # (B, C)
    unit = weights[target] / weights[target].norm(dim=1, keepdim=True)
    slope = unit @ weights.T  # (B, C): d logit_c / d alpha
    # target beats c once alpha (slope_t - slope_c) > logit_c - logit_t
    lead = logits - logits.gather(1, target[:, None])
    rate = slope.gather(1, target[:, None]) - slope
    bound = torch.where(rate > 0, lead / rate, torch.where(lead < 0, -math.inf, math.inf))
    bound[torch.arange(40), target] = -math.inf  # no constraint from the target itself
    expected = bound.max(1).values.clamp_min(0.0)  # (B,)
    alpha_max = 50.0
    alpha = minimal_template_alpha(model, x, target, alpha_max=alpha_max, tol=BISECTION_TOL)
    reachable = expected <= alpha_max
    assert bool(reachable.any()) and bool((~reachable).any())  # both cases are exercised
    assert torch.equal(torch.isinf(alpha), ~reachable)
    gap = alpha[reachable] - expected[reachable]
    assert float(gap.min()) >= -IDENTITY_TOL and float(gap.max()) <= BISECTION_TOL
    already = logits.argmax(1) == target
    assert bool(already.any()) and bool((alpha[already] == 0).all())


def test_minimal_alpha_on_the_digits_cnn_is_a_crossing_point(
    digits: tuple[nn.Sequential, drm.DeepRenderingModel, Dataset],
) -> None:
    cnn, model, data = digits
    x = data.x_test[:60]
    with torch.no_grad():
        runner_up = drm.max_sum(model, x)[0].topk(2, dim=1).indices[:, 1]
    alpha = minimal_template_alpha(model, x, runner_up, tol=BISECTION_TOL, clamp=(0.0, 1.0))
    found = torch.isfinite(alpha) & (alpha > 0)
    assert float(found.double().mean()) > 0.5  # observed 0.97
    moved = fool_with_template(model, x, runner_up, alpha.where(found, 0), clamp=(0.0, 1.0))
    before = fool_with_template(
        model, x, runner_up, (alpha - BISECTION_TOL).clamp_min(0).where(found, 0), clamp=(0, 1)
    )
    with torch.no_grad():
        assert bool((cnn(moved).argmax(1) == runner_up)[found].all())
        assert not bool((cnn(before).argmax(1) == runner_up)[found].any())


# --- fooling images -------------------------------------------------------------------------------


def test_fooling_images_are_classified_with_high_confidence(
    digits: tuple[nn.Sequential, drm.DeepRenderingModel, Dataset],
) -> None:
    cnn, model, _ = digits
    target = torch.arange(10).repeat(2)
    generator = torch.Generator().manual_seed(341)
    made = fooling_images(model, target, 60, l2=1e-3, generator=generator)
    assert made.shape == (20, 1, 8, 8)
    assert float(made.min()) >= 0.0 and float(made.max()) <= 1.0
    with torch.no_grad():
        confidence = torch.softmax(cnn(made), 1).gather(1, target[:, None])
        start = torch.rand((20, 1, 8, 8), generator=torch.Generator().manual_seed(341))
        before = torch.softmax(cnn(start.double()), 1).gather(1, target[:, None])
    assert float(confidence.min()) > 0.99  # observed 0.9993
    assert float(before.mean()) < 0.5  # the noise they grew from is no such thing
    # the torch CNN itself is a classifier too (input_shape given: nn.Sequential has none)
    again = fooling_images(
        cnn,
        target,
        60,
        l2=1e-3,
        input_shape=(1, 8, 8),
        generator=torch.Generator().manual_seed(341),
    )
    assert float((again - made).abs().max()) <= IDENTITY_TOL


# --- the DRM's view -------------------------------------------------------------------------------


def test_drm_view_agrees_with_max_sum_autograd_and_least_squares(
    digits: tuple[nn.Sequential, drm.DeepRenderingModel, Dataset],
) -> None:
    cnn, model, data = digits
    x = data.x_test[:50]
    view = drm_view(model, x)
    scores, latents = drm.max_sum(model, x)
    classes = scores.argmax(1)
    assert torch.equal(view.predicted, classes) and torch.equal(view.classes, classes)
    torch.testing.assert_close(
        view.max_softmax, torch.softmax(cnn(x), 1).max(1).values, atol=IDENTITY_TOL, rtol=0
    )
    # E1: the log-joint at the CNN's latents is the score minus the offset, and drm.log_joint
    score = scores.gather(1, classes[:, None])[:, 0].detach()
    torch.testing.assert_close(
        view.log_joint + drm.logit_offset(model, x), score, atol=IDENTITY_TOL, rtol=0
    )
    torch.testing.assert_close(
        view.log_joint, drm.log_joint(model, x, classes, latents).detach(), atol=0, rtol=0
    )
    # E6: the rendering is sigma^2 times the input gradient of the torch CNN's logit
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(cnn(xg).gather(1, classes[:, None]).sum(), xg)
    mu = 0.1 * grad
    torch.testing.assert_close(view.rendering, mu, atol=IDENTITY_TOL, rtol=0)
    error = ((x - mu) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(view.reconstruction_error, error, atol=IDENTITY_TOL, rtol=0)
    # least squares, one image at a time
    for i in range(x.shape[0]):
        solution = torch.linalg.lstsq(mu[i].reshape(-1, 1), x[i].reshape(-1, 1)).solution
        residual = ((x[i] - solution[0, 0] * mu[i]) ** 2).sum()
        torch.testing.assert_close(
            view.render_scale[i], solution[0, 0], atol=LSTSQ_SCALE_TOL, rtol=0
        )
        torch.testing.assert_close(
            view.scaled_reconstruction_error[i], residual, atol=IDENTITY_TOL, rtol=0
        )
    assert bool((view.scaled_reconstruction_error <= view.reconstruction_error).all())
    # the trained model's latents are not the MAP: refinement finds better ones (E4)
    assert float(view.gap_lower_bound.min()) >= -IDENTITY_TOL
    assert float(view.gap_lower_bound.max()) > 0
    assert view.exact_gap is None  # far too many configurations to enumerate


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_gap_lower_bound_lies_between_zero_and_the_exact_gap(name: str) -> None:
    model = build(TINY_ARCHITECTURES[name], seed=351)
    x = images(model, 6, seed=352)
    view = drm_view(model, x)
    assert view.exact_gap is not None
    # the oracle, recomputed: brute force for the predicted class
    exact, _ = drm.exact_map(model, x)
    best = exact.gather(1, view.predicted[:, None])[:, 0] + drm.logit_offset(model, x)
    score = view.scores.gather(1, view.predicted[:, None])[:, 0]
    torch.testing.assert_close(view.exact_gap, best - score, atol=IDENTITY_TOL, rtol=0)
    assert float(view.gap_lower_bound.min()) >= -IDENTITY_TOL
    assert bool((view.gap_lower_bound <= view.exact_gap + IDENTITY_TOL).all())
    # another class than the prediction: the same bounds
    other = (view.predicted + 1) % model.num_classes
    other_view = drm_view(model, x, other)
    assert other_view.exact_gap is not None
    assert float(other_view.gap_lower_bound.min()) >= -IDENTITY_TOL
    assert bool((other_view.gap_lower_bound <= other_view.exact_gap + IDENTITY_TOL).all())


def test_gaps_vanish_when_max_sum_is_exact_and_are_positive_otherwise() -> None:
    signed, exact_total = 0.0, 0.0
    for name in sorted(TINY_ARCHITECTURES):
        exact_model = build(TINY_ARCHITECTURES[name], seed=353, nonnegative=True)
        view = drm_view(exact_model, images(exact_model, 4, seed=354))
        assert view.exact_gap is not None
        assert float(view.exact_gap.abs().max()) <= IDENTITY_TOL  # E3
        assert float(view.gap_lower_bound.abs().max()) <= IDENTITY_TOL
        model = build(TINY_ARCHITECTURES[name], seed=353)
        view = drm_view(model, images(model, 4, seed=354))
        assert view.exact_gap is not None
        signed += float(view.gap_lower_bound.sum())
        exact_total += float(view.exact_gap.sum())
    assert exact_total > 0 and signed > 0  # the bound is not vacuous


# --- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n0", "n1", "levels"), [(1, 1, 0), (7, 13, 5), (50, 30, 0), (40, 40, 3)])
def test_detection_auc_is_sklearns_roc_auc(n0: int, n1: int, levels: int) -> None:
    generator = torch.Generator().manual_seed(361 + n0 + n1)
    clean = torch.randn(n0, generator=generator, dtype=torch.float64)
    adversarial = torch.randn(n1, generator=generator, dtype=torch.float64) + 0.5
    if levels:  # few distinct values: many ties
        clean, adversarial = clean.round() % levels, adversarial.round() % levels
    labels = [0] * n0 + [1] * n1
    oracle = roc_auc_score(labels, torch.cat([clean, adversarial]).numpy())
    assert abs(detection_auc(clean, adversarial) - oracle) <= AUC_TOL


def test_detection_auc_on_identical_and_separable_distributions() -> None:
    values = torch.randn(100, generator=torch.Generator().manual_seed(362), dtype=torch.float64)
    assert detection_auc(values, values) == 0.5
    assert detection_auc(values, values.flip(0)) == 0.5
    assert detection_auc(torch.zeros(10), torch.zeros(20)) == 0.5  # all tied
    assert detection_auc(values, values + 100) == 1.0
    assert detection_auc(values + 100, values) == 0.0
    assert detection_auc(torch.arange(5), torch.arange(5, 12)) == 1.0  # integer statistics


def test_detection_report_on_the_digits_cnn(
    digits: tuple[nn.Sequential, drm.DeepRenderingModel, Dataset],
) -> None:
    cnn, model, data = digits
    x, y = data.x_test[:80], data.y_test[:80]
    report = detection_report(model, x, y, default_attacks(epsilon=0.2, steps=5))
    assert set(report.auc) == {"fgsm", "iterative", "template"}
    assert set(report.views) == {"clean", "fgsm", "iterative", "template"}
    for attack, aucs in report.auc.items():
        assert set(aucs) == set(DETECTION_STATISTICS)
        assert report.accuracy[attack] < report.accuracy["clean"]
        assert 0 < report.counts[attack] <= report.counts["clean"]
        assert all(0.0 <= value <= 1.0 for value in aucs.values())
    # the recorded AUC is detection_auc of the signed statistic on the recorded sets
    correct = report.views["clean"].predicted == y
    fooled = correct & (report.views["fgsm"].predicted != y)
    clean_lj = -report.views["clean"].log_joint[correct]
    attacked_lj = -report.views["fgsm"].log_joint[fooled]
    assert report.auc["fgsm"]["log_joint"] == detection_auc(clean_lj, attacked_lj)
    assert report.accuracy["clean"] == accuracy(cnn, x, y)
    text = report.to_text()
    assert text.splitlines()[0].split()[:3] == ["attack", "accuracy", "n"]
    assert len(text.splitlines()) == 5
    # every clean image against every attacked one
    only_fgsm = {"fgsm": default_attacks(epsilon=0.2)["fgsm"]}
    everything = detection_report(model, x, y, only_fgsm, only_successful=False)
    assert everything.counts == {"clean": 80, "fgsm": 80}
    assert everything.auc["fgsm"]["max_softmax"] == detection_auc(
        -everything.views["clean"].max_softmax, -everything.views["fgsm"].max_softmax
    )


# --- argument checks ------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors(
    digits: tuple[nn.Sequential, drm.DeepRenderingModel, Dataset],
) -> None:
    cnn, model, data = digits
    x, y = data.x_test[:4], data.y_test[:4]
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError, match="y must have shape"):
        fgsm(model, x, y[:3], 0.1)
    with pytest.raises(TypeError, match="y must be an int64"):
        fgsm(model, x, y.double(), 0.1)
    with pytest.raises(ValueError, match="labels must lie in"):
        fgsm(cnn, x, y + 10, 0.1)
    with pytest.raises(ValueError, match="give the true labels y"):
        fgsm(model, x, None, 0.1)
    with pytest.raises(ValueError, match="outside clamp"):
        fgsm(model, x * 2 - 1, y, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        fgsm(model, x.float(), y, 0.1)
    with pytest.raises(TypeError, match="DeepRenderingModel or a torch nn.Module"):
        fgsm(lambda v: v, x, y, 0.1)  # type: ignore[arg-type]
    training = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout()).double()
    with pytest.raises(ValueError, match=r"layer 2 \(Dropout\) is in training mode"):
        fgsm(training, x, y, 0.1)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        iterative_attack(model, x, y, 0.1, 0.02, 0)
    with pytest.raises(ValueError, match="step must be > 0"):
        iterative_attack(model, x, y, 0.1, 0.0, 3)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        fool_with_template(model, x, y, -1.0)
    with pytest.raises(ValueError, match="class index out of range"):
        minimal_template_alpha(model, x, y + 10)
    with pytest.raises(ValueError, match="input_shape is required"):
        fooling_images(cnn, y, 1)
    with pytest.raises(ValueError, match="must be a non-empty 1-D"):
        detection_auc(torch.zeros(0), torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        detection_auc(torch.tensor([math.nan]), torch.ones(3))
    with pytest.raises(ValueError, match="clamp must be finite with low < high"):
        fgsm(model, x, y, 0.1, clamp=(1.0, 0.0))
