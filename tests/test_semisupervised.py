"""Semi-supervised learning through the rendering path: each term against an independent oracle.

Oracles:
* the reconstruction term against `drm.log_joint` (the CNN-prior log-joint, from which the pixel
  part is recovered) and `drm.model.factorized_log_joint`; its parameter gradient against autograd
  of an explicit formula that renders by the input gradient of the frozen-latent CNN (E6), not by
  the top-down pass;
* cross-entropy, entropy and class balance against hand-written float64 formulas (scipy's KL);
* the non-negativity penalty against the top-down signals, and 0 exactly when E3's condition
  holds;
* the trainer with every term but the cross-entropy switched off against discriminative EM (=
  SGD, E9) on the labelled images alone: the same trajectory;
* the factorized prior against enumeration (it sums to 1 over every configuration);
* the generative classifier against `factorized_log_joint`, class by class;
* the certified inference-gap bound between 0 and the exact gap (`drm.exact_map`).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F

import drm
from cnn_equiv import to_cnn
from drm.inference import generative_scores, min_sum
from drm.model import factorized_log_joint, factorized_log_prior, propagate_down
from drm.reference import configurations, num_configurations
from drm.refine import inference_gap_lower_bound
from drm.semisupervised import (
    TERMS,
    UNLABELLED,
    LossWeights,
    SemiSupervisedEM,
    class_balance_term,
    content_shifts,
    cross_entropy_term,
    entropy_term,
    nonnegativity_term,
    path_normalization_term,
    reconstruction_term,
    translate,
)
from tests.architectures import ARCHITECTURES, TINY_ARCHITECTURES, build, images

IDENTITY_TOL = 1e-10  # float64 identities (sums of a few thousand terms)
TRAJECTORY_TOL = 1e-12  # float64: the same arithmetic on different batch layouts
PARAMETER_NAMES = ["lenet", "leaky", "avgpool", "pool-before-switch"]


def only(**weights: float) -> LossWeights:
    """These weights, every other term 0."""
    return LossWeights(**{**{name: 0.0 for name, _ in LossWeights().items()}, **weights})


def labels_with_unlabelled(model: drm.DeepRenderingModel, n: int, seed: int) -> torch.Tensor:
    """(n,) labels, every third one UNLABELLED."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, model.num_classes, (n,), generator=generator)
    y[::3] = UNLABELLED
    return y


@pytest.mark.parametrize("name", PARAMETER_NAMES)
def test_reconstruction_is_the_pixel_part_of_the_log_joint(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=1, sigma2=0.7)
    x = images(model, 5, seed=2)
    with torch.no_grad():
        scores, latents = drm.max_sum(model, x)
        classes = scores.argmax(1)
        mu, cnn_log_prior = drm.rendering_terms(model, classes, latents)
        # oracle 1: the CNN-prior log-joint minus its prior terms ||mu||^2 / (2 sigma^2) + ...
        energy = (mu**2).flatten(1).sum(1) / (2 * model.sigma2)
        pixel_part = drm.log_joint(model, x, classes, latents) - energy - cnn_log_prior
        # oracle 2: the factorized-prior log-joint minus its (normalised) prior
        factorized = factorized_log_joint(model, x, classes, latents) - factorized_log_prior(
            model, classes, latents
        )
        term = reconstruction_term(model, x, mu)
    torch.testing.assert_close(term, -pixel_part.mean(), atol=IDENTITY_TOL, rtol=0)
    torch.testing.assert_close(term, -factorized.mean(), atol=IDENTITY_TOL, rtol=0)
    # and by hand
    d = math.prod(model.input_shape)
    by_hand = ((x - mu) ** 2).flatten(1).sum(1) / 1.4 + 0.5 * d * math.log(2 * math.pi * 0.7)
    torch.testing.assert_close(term, by_hand.mean(), atol=IDENTITY_TOL, rtol=0)


@pytest.mark.parametrize("name", PARAMETER_NAMES)
def test_reconstruction_gradient_matches_rendering_by_the_input_gradient(name: str) -> None:
    """Autograd through the top-down pass = double backward through d logit_c / dx (E6)."""
    model = build(ARCHITECTURES[name], seed=3, sigma2=0.5)
    x = images(model, 4, seed=4)
    scores, latents = drm.max_sum(model, x)
    classes = scores.detach().argmax(1)
    parameters = [p for p in model.parameters() if p.requires_grad]

    mu = model.sigma2 * propagate_down(model, classes, latents)[0]
    ours = torch.autograd.grad(reconstruction_term(model, x, mu), parameters, allow_unused=True)

    # explicit formula: mu = sigma^2 d/dx logit_c(x; z*) with the latents frozen, and
    # NLL = ||x - mu||^2 / (2 sigma^2) + (D/2) log(2 pi sigma^2), averaged over images
    xg = x.clone().requires_grad_()
    chosen = drm.frozen_scores(model, xg, latents).gather(1, classes[:, None]).sum()
    (gradient,) = torch.autograd.grad(chosen, xg, create_graph=True)
    rendered = model.sigma2 * gradient
    d = math.prod(model.input_shape)
    nll = ((x - rendered) ** 2).flatten(1).sum(1) / (2 * model.sigma2) + 0.5 * d * torch.log(
        2 * math.pi * model.sigma2
    )
    theirs = torch.autograd.grad(nll.mean(), parameters, allow_unused=True)
    compared = 0
    for p, a, b in zip(parameters, ours, theirs, strict=True):
        # biases do not enter the rendering: no gradient, or a zero one
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, atol=IDENTITY_TOL, rtol=0)
        compared += int(float(b.abs().max()) > 0)
    assert compared >= 2


def test_cross_entropy_entropy_and_balance_against_float64_formulas() -> None:
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(7, 4, generator=generator, dtype=torch.float64) * 3
    labels = torch.tensor([2, UNLABELLED, 0, 3, UNLABELLED, 1, UNLABELLED])
    s = scores.numpy()
    log_q = s - scipy.special.logsumexp(s, axis=1, keepdims=True)
    known = labels.numpy() >= 0
    expected_ce = -np.mean(log_q[known, labels.numpy()[known]])
    assert float(cross_entropy_term(scores, labels)) == pytest.approx(expected_ce, abs=1e-12)
    q = np.exp(log_q)
    expected_entropy = np.mean(scipy.stats.entropy(q, axis=1))
    assert float(entropy_term(scores)) == pytest.approx(expected_entropy, abs=1e-12)
    # the DRMM code's "KL" term is the entropy minus log C
    drmm_kl = -np.mean(np.sum(q * np.log(4 * q), axis=1))
    assert float(entropy_term(scores)) - math.log(4) == pytest.approx(drmm_kl, abs=1e-12)
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    q_bar = q.mean(0)
    balance = class_balance_term(torch.from_numpy(q_bar), torch.from_numpy(np.log(prior)))
    assert float(balance) == pytest.approx(scipy.stats.entropy(q_bar, prior), abs=1e-12)
    # no labelled image: no cross-entropy
    assert float(cross_entropy_term(scores, torch.full((7,), UNLABELLED))) == 0.0


@pytest.mark.parametrize("name", PARAMETER_NAMES)
def test_nonnegativity_penalises_the_negative_top_down_signals_at_latents(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=6)
    x = images(model, 4, seed=7)
    with torch.no_grad():
        scores, latents = drm.max_sum(model, x)
        signals = drm.top_down(model, scores.argmax(1), latents)
    expected = sum(
        float((torch.clamp(signals[i + 1], max=0.0) ** 2).sum()) / signals[i + 1].numel()
        for i, level in enumerate(model.levels)
        if isinstance(level, (drm.Switch, drm.MaxPool))
    )
    value = float(nonnegativity_term(model, signals))
    assert value == pytest.approx(expected, rel=IDENTITY_TOL)
    assert value > 0  # random signed templates: some signal is negative

    nonnegative = build(ARCHITECTURES[name], seed=6, nonnegative=True)
    assert not nonnegative.exactness_violations()
    with torch.no_grad():
        scores, latents = drm.max_sum(nonnegative, x)
        signals = drm.top_down(nonnegative, scores.argmax(1), latents)
    # E3's condition holds: every signal reaching a latent is >= 0, and the penalty is 0
    assert float(nonnegativity_term(nonnegative, signals)) == 0.0


def test_path_normalization_by_hand() -> None:
    model = build(ARCHITECTURES["leaky"], seed=8)
    x = images(model, 3, seed=9)
    zero = torch.zeros(1, *model.input_shape, dtype=torch.float64)
    with torch.no_grad():
        scores, latents = drm.max_sum(model, x)
        classes = scores.argmax(1)
        signals = drm.top_down(model, classes, latents)
        reference_scores, reference_latents = drm.max_sum(model, zero)
        c0 = reference_scores.argmax(1)
        reference = drm.top_down(model, c0, reference_latents)
        value = path_normalization_term(model, classes, signals, c0, reference)
        same = path_normalization_term(model, c0, reference, c0, reference)
    log_prior = model.class_log_prior.detach()
    expected = float((log_prior[classes] - log_prior[c0]).abs().mean())
    for i, level in enumerate(list(model.levels)[:-1]):
        if isinstance(level, (drm.Conv, drm.Dense)):
            b = level.bias.detach()
            shape = (1, -1, 1, 1) if signals[i + 1].ndim == 4 else (1, -1)
            expected += float((b.view(shape) * (signals[i + 1] - reference[i + 1])).abs().mean())
    assert float(value) == pytest.approx(expected, rel=IDENTITY_TOL)
    assert float(same) == 0.0  # the reference against itself


def test_weights_are_validated() -> None:
    with pytest.raises(ValueError, match="entropy"):
        LossWeights(entropy=-1.0)
    with pytest.raises(ValueError, match="reconstruction"):
        LossWeights(reconstruction=math.inf)


def test_step_refuses_bad_labels() -> None:
    model = build(ARCHITECTURES["leaky"], seed=10)
    trainer = SemiSupervisedEM(model)
    x = images(model, 4, seed=11)
    with pytest.raises(ValueError, match="-1"):
        trainer.step(x, torch.tensor([0, 1, -2, 0]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        trainer.step(x, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(TypeError, match="int64"):
        trainer.step(x, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        trainer.step(x, torch.tensor([0, 1]))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_cross_entropy_alone_is_discriminative_em_on_the_labelled_images(optimizer: str) -> None:
    """Zero weight on every other term: the trajectory of DEM(1) = SGD (E9) on the labels."""
    model = build(ARCHITECTURES["leaky"], seed=12)
    weights = only(cross_entropy=1.0)
    ours = SemiSupervisedEM(copy.deepcopy(model), weights, optimizer=optimizer, lr=0.05)  # type: ignore[arg-type]
    dem = drm.DiscriminativeEM(copy.deepcopy(model), optimizer=optimizer, lr=0.05)  # type: ignore[arg-type]
    for step in range(4):
        x = images(model, 9, seed=20 + step)
        y = labels_with_unlabelled(model, 9, seed=30 + step)
        known = y >= 0
        loss = ours.step(x, y)
        dem_loss = dem.step(x[known], y[known])
        assert loss == pytest.approx(dem_loss, abs=TRAJECTORY_TOL)
    moved = 0.0
    for (name, a), b, c in zip(
        ours.model.state_dict().items(),
        dem.model.state_dict().values(),
        model.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=TRAJECTORY_TOL, rtol=0, msg=name)
        moved = max(moved, float((a - c).abs().max()))
    assert moved > 1e-3  # the comparison is not vacuous


def test_every_term_trains_and_the_summary_is_the_epoch_mean() -> None:
    model = build(ARCHITECTURES["leaky"], seed=13)
    weights = LossWeights(
        class_balance=0.5,
        path_normalization=0.5,
        min_cross_entropy=0.5,
        consistency=0.5,
        generative_cross_entropy=0.5,
    )
    assert all(w > 0 for _, w in weights.items())  # every term
    trainer = SemiSupervisedEM(model, weights, lr=0.01)
    batches = [(images(model, 6, seed=40 + i), labels_with_unlabelled(model, 6, 50 + i))
               for i in range(3)]  # fmt: skip
    before = copy.deepcopy(model.state_dict())
    losses = []
    for x, y in batches:
        with torch.no_grad():  # the terms at the parameters the step starts from
            values, loss = trainer.terms(x, y)
        total = sum(w * float(values[k]) for k, w in weights.items())
        assert float(loss) == pytest.approx(total, rel=IDENTITY_TOL)
        losses.append((values, total))
        assert trainer.step(x, y) == pytest.approx(total, rel=IDENTITY_TOL)
    summary = trainer.end_epoch()
    for name, _ in weights.items():
        assert summary[name] == pytest.approx(np.mean([float(v[name]) for v, _ in losses]))
    assert summary["loss"] == pytest.approx(np.mean([t for _, t in losses]))
    assert trainer.end_epoch() == {}  # the sums start again
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- the generative view ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv-relu-pool", "padding-stride", "pool-then-switch"])
def test_the_factorized_prior_is_normalised(name: str) -> None:
    """sum over every (c, z) of p(c, z) = 1 (enumeration), with non-uniform switch priors."""
    model = build(TINY_ARCHITECTURES[name], seed=14)
    for i, level in enumerate(model.levels):
        if isinstance(level, drm.Switch):
            level.set_prior_on(0.2 + 0.1 * i)
    total = num_configurations(model)
    latents = configurations(model, torch.arange(total))
    log_mass = []
    for c in range(model.num_classes):
        classes = torch.full((total,), c, dtype=torch.long)
        log_mass.append(factorized_log_prior(model, classes, latents))
    mass = torch.logsumexp(torch.cat(log_mass), 0).detach()
    assert float(mass) == pytest.approx(0.0, abs=IDENTITY_TOL)


@pytest.mark.parametrize("name", PARAMETER_NAMES)
def test_generative_scores_are_the_factorized_log_joint_of_every_class(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=15)
    x = images(model, 4, seed=16)
    with torch.no_grad():
        _, latents = drm.max_sum(model, x)
        scores = generative_scores(model, x)
        for c in range(model.num_classes):
            classes = torch.full((4,), c, dtype=torch.long)
            expected = factorized_log_joint(model, x, classes, latents)
            torch.testing.assert_close(scores[:, c], expected, atol=IDENTITY_TOL, rtol=0)


def generative_log_posterior(
    model: drm.DeepRenderingModel, x: torch.Tensor, y: torch.Tensor, latents: drm.Latents
) -> torch.Tensor:
    """log p(y | x, z*) of the labelled images, class by class from `factorized_log_joint`."""
    labelled = y >= 0
    kept = tuple(None if z is None else z[labelled] for z in latents)
    joint = torch.stack(
        [
            factorized_log_joint(model, x[labelled], torch.full_like(y[labelled], c), kept)
            for c in range(model.num_classes)
        ],
        1,
    )  # (L, C)
    return joint.gather(1, y[labelled][:, None])[:, 0] - torch.logsumexp(joint, 1)


@pytest.mark.parametrize("name", PARAMETER_NAMES)
def test_generative_cross_entropy_is_the_generative_posterior_of_the_labels(name: str) -> None:
    """The term against scipy's log-softmax of the factorized log-joint of every class."""
    model = build(ARCHITECTURES[name], seed=31)
    x = images(model, 6, seed=32)
    y = labels_with_unlabelled(model, 6, seed=33)
    trainer = SemiSupervisedEM(model, only(generative_cross_entropy=1.0))
    with torch.no_grad():
        values, loss = trainer.terms(x, y)
        _, latents = drm.max_sum(model, x)
        labelled = y >= 0
        joint = np.stack(
            [
                factorized_log_joint(model, x, torch.full_like(y, c), latents).numpy()
                for c in range(model.num_classes)
            ],
            1,
        )[labelled.numpy()]  # (L, C), float64
    log_posterior = scipy.special.log_softmax(joint, axis=1)
    expected = -log_posterior[np.arange(len(joint)), y[labelled].numpy()].mean()
    assert float(values["generative_cross_entropy"]) == pytest.approx(expected, rel=IDENTITY_TOL)
    assert float(loss) == pytest.approx(expected, rel=IDENTITY_TOL)
    nobody = torch.full((6,), UNLABELLED)
    with torch.no_grad():
        assert float(trainer.terms(x, nobody)[0]["generative_cross_entropy"]) == 0.0


def test_generative_class_guess_is_the_generative_classifier_on_unlabelled_images() -> None:
    """class_guess="generative": label where known, else arg max_c factorized_log_joint(x, c, z*);
    the default guesses from the CNN's scores. A class template scaled by 10 makes the two
    guesses differ (the CNN rewards its brighter rendering, the Gaussian likelihood does not)."""
    differ = 0
    for name in PARAMETER_NAMES:
        model = build(ARCHITECTURES[name], seed=34)
        x = images(model, 9, seed=35)
        y = torch.full((9,), UNLABELLED)
        y[::3] = 0
        with torch.no_grad():
            favourite = SemiSupervisedEM(model).e_step(x, y)[2][1]
            model.classes.weight[favourite] *= 10.0
            scores, latents = drm.max_sum(model, x)
            joint = torch.stack(
                [factorized_log_joint(model, x, torch.full_like(y, c), latents)
                 for c in range(model.num_classes)], 1)  # fmt: skip
            generative = SemiSupervisedEM(model, class_guess="generative").e_step(x, y)[2]
            cnn = SemiSupervisedEM(model).e_step(x, y)[2]
        expected = torch.where(y >= 0, y, joint.argmax(1))
        torch.testing.assert_close(generative, expected, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(cnn, torch.where(y >= 0, y, scores.argmax(1)), rtol=0, atol=0)
        differ += int((generative != cnn).sum())
    assert differ > 0  # the comparison is not vacuous
    with pytest.raises(ValueError, match="class_guess must be"):
        SemiSupervisedEM(model, class_guess="label")


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_inference_gap_bound_lies_between_zero_and_the_exact_gap(name: str) -> None:
    model = build(TINY_ARCHITECTURES[name], seed=17)
    x = images(model, 6, seed=18)
    with torch.no_grad():
        scores, _ = drm.max_sum(model, x)
        classes = scores.argmax(1)
        exact = drm.exact_map(model, x)[0] + drm.logit_offset(model, x)[:, None]
        exact_gap = (exact - scores).gather(1, classes[:, None])[:, 0]
    bound = inference_gap_lower_bound(model, x)
    assert bool((bound >= 0).all())
    assert bool((bound <= exact_gap + IDENTITY_TOL).all())
    nonnegative = build(TINY_ARCHITECTURES[name], seed=17, nonnegative=True)
    assert float(inference_gap_lower_bound(nonnegative, x).abs().max()) == 0.0


def test_inference_gap_bound_is_positive_somewhere() -> None:
    gaps = []
    for name in sorted(TINY_ARCHITECTURES):
        model = build(TINY_ARCHITECTURES[name], seed=19)
        gaps.append(inference_gap_lower_bound(model, images(model, 6, seed=20)))
    assert float(torch.cat(gaps).max()) > 1e-3


@pytest.mark.parametrize("target", ["prior", "uniform"])
def test_class_balance_gradient_reaches_every_image_of_the_batch(target: str) -> None:
    """The batch term's gradient is that of KL(mean posterior || target), target the learned
    class prior pi or uniform, by autograd on a formula."""
    model = build(ARCHITECTURES["leaky"], seed=21)
    with torch.no_grad():  # a prior far from uniform, so that the two targets differ
        model.levels[-1].bias.copy_(torch.linspace(-1.0, 1.0, model.num_classes))
    weights = only(class_balance=1.0)
    trainer = SemiSupervisedEM(model, weights, balance_target=target)
    x = images(model, 5, seed=22)
    y = torch.full((5,), UNLABELLED)
    values, loss = trainer.terms(x, y)
    ours = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    scores, _ = drm.max_sum(model, x)
    q = F.softmax(scores, 1).mean(0)
    pi = model.class_log_prior.detach().exp()
    if target == "uniform":
        pi = torch.full_like(pi, 1.0 / model.num_classes)
    kl = (q * (q / pi).log()).sum()
    balance = float(values["class_balance"].detach())
    assert balance == pytest.approx(float(kl.detach()), rel=IDENTITY_TOL)
    theirs = torch.autograd.grad(kl, list(model.parameters()), allow_unused=True)
    for a, b in zip(ours, theirs, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=IDENTITY_TOL, rtol=0)


@pytest.mark.parametrize("term", list(TERMS))
def test_each_term_alone_has_the_gradient_of_its_formula(term: str) -> None:
    """The trainer's loss with one weight at 2 (the others 0) against autograd of 2 x the term."""
    model = build(ARCHITECTURES["leaky"], seed=23)
    x = images(model, 6, seed=24)
    y = labels_with_unlabelled(model, 6, seed=25)
    trainer = SemiSupervisedEM(model, only(**{term: 2.0}))
    _, loss = trainer.terms(x, y)
    parameters = list(model.parameters())
    ours = torch.autograd.grad(loss, parameters, allow_unused=True)

    scores, latents = drm.max_sum(model, x)
    classes = torch.where(y >= 0, y, scores.detach().argmax(1))
    signals = drm.top_down(model, classes, latents)
    mu = model.sigma2 * signals[0]
    if term == "cross_entropy":
        value = cross_entropy_term(scores, y)
    elif term == "reconstruction":
        value = reconstruction_term(model, x, mu)
    elif term == "entropy":
        value = entropy_term(scores)
    elif term == "nonnegativity":
        value = nonnegativity_term(model, signals)
    elif term == "class_balance":
        uniform = torch.full((model.num_classes,), -math.log(model.num_classes), dtype=x.dtype)
        value = class_balance_term(scores.softmax(1).mean(0), uniform)  # the default target
    elif term == "min_cross_entropy":
        value = cross_entropy_term(min_sum(model, x)[0], y)
    elif term == "generative_cross_entropy":
        value = -generative_log_posterior(model, x, y, latents).mean()
    elif term == "consistency":
        offset = trainer.translation_offset()
        unlabelled = x[y < 0]
        shifted = translate(unlabelled, content_shifts(unlabelled, offset, 2))
        q = scores[y < 0].detach().softmax(1)
        p = drm.max_sum(model, shifted)[0].softmax(1)
        value = (q * (q / p).log()).sum(1).mean()
    else:
        zero_image = torch.zeros(1, *model.input_shape, dtype=torch.float64)
        reference_scores, reference_latents = drm.max_sum(model, zero_image)
        c0 = reference_scores.detach().argmax(1)
        reference = drm.top_down(model, c0, reference_latents)
        value = path_normalization_term(model, classes, signals, c0, reference)
    theirs = torch.autograd.grad(2.0 * value, parameters, allow_unused=True)
    nonzero = 0
    for p, a, b in zip(parameters, ours, theirs, strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, atol=IDENTITY_TOL, rtol=0)
        nonzero += int(float(b.abs().max()) > 0)
    assert nonzero >= 1  # the term moves some parameter


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_min_sum_is_the_min_branch_network(name: str) -> None:
    """Oracle: the equivalent CNN's own layers with min(0, u) for ReLU and min-pooling."""
    model = build(ARCHITECTURES[name], seed=26)
    x = images(model, 3, seed=27)
    y = x
    with torch.no_grad():
        for layer in to_cnn(model):
            if isinstance(layer, torch.nn.ReLU):
                y = -F.relu(-y)
            elif isinstance(layer, torch.nn.LeakyReLU):
                y = -F.leaky_relu(-y, layer.negative_slope)
            elif isinstance(layer, torch.nn.MaxPool2d):
                y = -layer(-y)
            else:
                y = layer(y)
        scores, latents = min_sum(model, x)
        frozen = drm.frozen_scores(model, x, latents)
    torch.testing.assert_close(scores, y, atol=IDENTITY_TOL, rtol=0)
    torch.testing.assert_close(frozen, scores, atol=IDENTITY_TOL, rtol=0)


def test_min_cross_entropy_is_reported_only_when_weighted() -> None:
    model = build(ARCHITECTURES["leaky"], seed=28)
    x, y = images(model, 4, seed=29), labels_with_unlabelled(model, 4, seed=30)
    plain = SemiSupervisedEM(copy.deepcopy(model), only(cross_entropy=1.0))
    plain.step(x, y)
    assert "min_cross_entropy" not in plain.end_epoch()
    weighted = SemiSupervisedEM(copy.deepcopy(model), only(min_cross_entropy=1.0))
    with torch.no_grad():
        values, _ = weighted.terms(x, y)
        expected = cross_entropy_term(min_sum(model, x)[0], y)
    assert float(values["min_cross_entropy"]) == pytest.approx(float(expected), rel=IDENTITY_TOL)
    weighted.step(x, y)
    assert "min_cross_entropy" in weighted.end_epoch()


def test_translate_moves_each_image_by_its_shift() -> None:
    """Oracle: slicing into a zero canvas, image by image."""
    generator = torch.Generator().manual_seed(32)
    x = torch.rand(5, 2, 6, 7, generator=generator, dtype=torch.float64)
    shifts = torch.tensor([[0, 0], [1, -2], [-2, 2], [2, 1], [-1, 0]])
    moved = translate(x, shifts)
    for n, (dy, dx) in enumerate(shifts.tolist()):
        canvas = torch.zeros(2, 6 + 4, 7 + 4, dtype=torch.float64)
        canvas[:, 2 + dy : 2 + dy + 6, 2 + dx : 2 + dx + 7] = x[n]
        torch.testing.assert_close(moved[n], canvas[:, 2:8, 2:9], atol=0, rtol=0)


def test_content_shifts_do_not_depend_on_the_batch() -> None:
    x = images(build(ARCHITECTURES["leaky"], seed=33), 12, seed=34).sigmoid()
    shifts = content_shifts(x, offset=77, max_shift=2)
    assert int(shifts.abs().max()) <= 2 and shifts.dtype == torch.long
    assert len({tuple(s) for s in shifts.tolist()}) > 3  # they vary from image to image
    for part in (slice(0, 5), slice(5, 12), slice(3, 4)):  # a shard shifts its images alike
        assert torch.equal(content_shifts(x[part], offset=77, max_shift=2), shifts[part])
    assert not torch.equal(content_shifts(x, offset=78, max_shift=2), shifts)  # another step


def test_consistency_is_zero_for_translation_invariant_scores() -> None:
    """A model whose scores ignore where the image sits (one class template per channel mean)."""
    from drm import ConvSpec, FlattenSpec, ModelConfig

    config = ModelConfig((1, 6, 6), 3, (ConvSpec(3, 6), FlattenSpec()))  # a 6x6 filter: 1 output
    model = build(config, seed=35)
    with torch.no_grad():
        model.levels[0].weight.fill_(1.0)  # the sum of the pixels: invariant to a shift...
    x = torch.zeros(4, 1, 6, 6, dtype=torch.float64)
    x[:, :, 2:4, 2:4] = 1.0  # ...of an image that stays inside the frame
    trainer = SemiSupervisedEM(model, only(consistency=1.0), max_shift=2)
    values, _ = trainer.terms(x, torch.full((4,), UNLABELLED))
    assert float(values["consistency"].detach()) == pytest.approx(0.0, abs=IDENTITY_TOL)


def test_a_mean_teacher_sets_the_consistency_target() -> None:
    """With a teacher, the target is the teacher's posterior of the untranslated image; value and
    gradient against the explicit formula (float64). A teacher equal to the model is the
    model's own target; the teacher is not trained."""
    model = build(ARCHITECTURES["leaky"], seed=36)
    x = images(model, 6, seed=37)
    y = labels_with_unlabelled(model, 6, seed=38)
    teacher = build(ARCHITECTURES["leaky"], seed=39).requires_grad_(False)
    trainer = SemiSupervisedEM(model, only(consistency=2.0), teacher=teacher)
    values, loss = trainer.terms(x, y)
    parameters = list(model.parameters())
    ours = torch.autograd.grad(loss, parameters, allow_unused=True)

    unlabelled = x[y < 0]
    shifted = translate(unlabelled, content_shifts(unlabelled, trainer.translation_offset(), 2))
    q = drm.max_sum(teacher, unlabelled)[0].softmax(1)
    p = drm.max_sum(model, shifted)[0].softmax(1)
    value = (q * (q / p).log()).sum(1).mean()
    expected = float(value.detach())
    assert float(values["consistency"].detach()) == pytest.approx(expected, rel=IDENTITY_TOL)
    theirs = torch.autograd.grad(2.0 * value, parameters, allow_unused=True)
    for a, b in zip(ours, theirs, strict=True):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, atol=IDENTITY_TOL, rtol=0)
    with torch.no_grad():
        own = float(SemiSupervisedEM(model, only(consistency=1.0)).terms(x, y)[0]["consistency"])
        same = SemiSupervisedEM(model, only(consistency=1.0), teacher=copy.deepcopy(model))
        assert float(same.terms(x, y)[0]["consistency"]) == pytest.approx(own, rel=IDENTITY_TOL)
    assert expected != pytest.approx(own, rel=1e-3)  # the teacher's target differs
    before = [t.clone() for t in teacher.parameters()]
    trainer.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


def test_a_teacher_of_another_model_is_refused() -> None:
    """A teacher of other classes, image shape or dtype would set the targets of another model."""
    model = build(ARCHITECTURES["leaky"], seed=40)  # 3 classes, (1, 8, 8), float64
    same_shape = build(ARCHITECTURES["pool-before-switch"], seed=41)  # 3 classes, (1, 8, 8)
    SemiSupervisedEM(model, teacher=same_shape)  # another architecture of the same task: fine
    for other, message in [
        (build(ARCHITECTURES["avgpool-divisor"], seed=42), "differ from the model's"),  # 2 classes
        (build(ARCHITECTURES["dense-only"], seed=43), "differ from the model's"),  # (1, 4, 5)
        (copy.deepcopy(model).float(), "differ from the model's"),  # float32
    ]:
        with pytest.raises(ValueError, match=message):
            SemiSupervisedEM(model, teacher=other)
    trainer = SemiSupervisedEM(model)
    with pytest.raises(TypeError, match="teacher must be a DeepRenderingModel"):
        trainer.teacher = torch.nn.Linear(2, 3)  # type: ignore[assignment]
    assert trainer.teacher is None
