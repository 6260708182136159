"""The exact M-steps of discriminative EM (drm.m_steps): optimality, descent, convexity, resume,
data-parallel sums, and the command line's --m-step.

Oracles: scipy.optimize.minimize on the same objective computed through another code path
(`drm.frozen_scores` of the whole network, autograd gradients); random perturbations; the
Hessian by torch.autograd.functional.hessian; `DiscriminativeEM` itself (the "gradient" design);
an uninterrupted trainer (resume); one trainer on the whole batch (threads as processes).
Everything is float64 on tiny models.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import drm
from drm.checkpoint import load_checkpoint, save_checkpoint
from drm.em import DiscriminativeEM
from drm.inference import walk_up
from drm.m_steps import (
    M_STEPS,
    BlockEM,
    ExactTopEM,
    LargeBatchEM,
    LevelObjective,
    MStepName,
    NewtonSettings,
    discriminative_em,
    newton_cg,
)
from experiments import train
from experiments.training.config import RunConfig, RunError
from experiments.training.rundir import check_resumable
from experiments.training.trainers import build_trainer
from tests.architectures import ARCHITECTURES, build, images
from tests.test_distributed import assert_same_parameters, batches, sharded, whole

OPTIMUM_GRAD_TOL = 1e-9  # |grad J| at the solve's weights (float64, tight settings)
SCIPY_TOL = 1e-6  # max |theta - scipy's minimiser|; J is 1/eta-strongly convex, scipy's gtol 1e-10
PERTURBATION_TOL = 1e-14  # J(theta* + d) >= J(theta*) - this (float64 rounding of J ~ 1)
DESCENT_TOL = 1e-14  # J after an M-step <= J before + this
PSD_TOL = 1e-10  # min eigenvalue of a level's Hessian >= -PSD_TOL * max |eigenvalue|
# threads as processes vs one trainer: only the order of the sums differs (~1e-16 relative);
# Newton contracts it, truncated CG and Adam scale it a little (measured 7e-16 after 6 steps)
THREADS_TOL = 1e-12
TIGHT = NewtonSettings(iterations=50, cg_iterations=500, grad_tol=1e-11)
EXACT: list[MStepName] = ["exact-top", "block", "large-batch"]  # every design but "gradient"

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(seed: int = 0) -> tuple[drm.DeepRenderingModel, Tensor, Tensor, drm.Latents]:
    """The 'leaky' model (conv, conv, dense, classes), 16 images, 3 classes, max-sum latents."""
    model = build(ARCHITECTURES["leaky"], seed=seed)
    x = images(model, 16, seed=seed + 1)
    y = torch.arange(16) % 3
    with torch.no_grad():
        latents = walk_up(model, x).latents
    return model, x, y, latents


def parameter_levels(model: drm.DeepRenderingModel) -> list[int]:
    return [i for i, level in enumerate(model.levels) if list(level.parameters())]


def oracle_objective(
    model: drm.DeepRenderingModel, index: int, x: Tensor, y: Tensor, latents: drm.Latents,
    anchor: Tensor, eta: float,
) -> Any:  # fmt: skip
    """theta -> (J, grad J) as numpy, through the whole frozen-latent network from x."""
    level = model.levels[index]
    names = [f"model.levels.{index}.{name}" for name, _ in level.named_parameters()]
    shapes = [p.shape for p in level.parameters()]
    wrapper = _Frozen(model, x, latents)

    def j(theta: Tensor) -> Tensor:
        parts = theta.split([int(np.prod(s)) for s in shapes])
        values = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        scores = torch.func.functional_call(wrapper, values, ())
        return F.cross_entropy(scores, y) + ((theta - anchor) ** 2).sum() / (2 * eta)

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        value = j(t)
        (grad,) = torch.autograd.grad(value, t)
        return float(value.detach()), grad.numpy()

    return fun, j


class _Frozen(nn.Module):
    """The frozen-latent scores of fixed images, as a module (for functional_call)."""

    def __init__(self, model: drm.DeepRenderingModel, x: Tensor, latents: drm.Latents) -> None:
        super().__init__()
        self.model, self.x, self.latents = model, x, latents

    def forward(self) -> Tensor:
        return drm.frozen_scores(self.model, self.x, self.latents)


# --- each exact M-step reaches its optimum ------------------------------------------------------


@pytest.mark.parametrize("which", ["classes", "dense", "conv-upper", "conv-lower"])
def test_a_level_solve_reaches_its_optimum(which: str) -> None:
    model, x, y, latents = problem(seed=1)
    index = dict(zip(["conv-lower", "conv-upper", "dense", "classes"], parameter_levels(model),
                     strict=True))[which]  # fmt: skip
    eta = 2.0
    objective = LevelObjective.at(model, index, x, y, latents, eta=eta)
    anchor = objective.anchor.clone()
    report = newton_cg(objective, TIGHT)
    value, gradient, _ = objective.linearize()
    assert float(gradient.norm()) <= OPTIMUM_GRAD_TOL
    assert report.gradient_norm == pytest.approx(float(gradient.norm()), rel=1e-6, abs=1e-15)
    assert report.objective == float(value) < report.objective_before
    optimum = objective.theta()
    # no random perturbation does better (J is strongly convex: it does strictly worse)
    generator = torch.Generator().manual_seed(2)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(5):
            d = torch.randn(optimum.shape, generator=generator, dtype=torch.float64) * scale
            objective.assign(optimum + d)
            assert float(objective.value()) >= float(value) - PERTURBATION_TOL
    objective.assign(optimum)
    # scipy's minimiser of the same objective, computed through the whole network from x
    fun, _ = oracle_objective(model, index, x, y, latents, anchor, eta)
    result = scipy.optimize.minimize(fun, anchor.numpy(), jac=True, method="BFGS",
                                     options={"gtol": 1e-10, "maxiter": 10_000})  # fmt: skip
    assert result.fun == pytest.approx(float(value), abs=1e-12)
    assert float(np.abs(result.x - optimum.numpy()).max()) <= SCIPY_TOL


def test_exact_top_trainer_solves_the_class_level_to_its_tolerance() -> None:
    """ExactTopEM's default solve ends at |grad J_top| <= grad_tol on every batch."""
    model, x, y, _ = problem(seed=3)
    trainer = ExactTopEM(model, eta=5.0, lr=0.01)
    for batch in range(3):
        trainer.step(images(model, 12, seed=10 + batch), torch.arange(12) % 3)
        assert trainer.counts.gradient_norm / trainer.counts.solves <= trainer.newton.grad_tol
    assert trainer.end_epoch()["m_step_gradient_norm"] <= trainer.newton.grad_tol


def test_exact_top_solves_the_class_level_on_the_cached_batches_features() -> None:
    """With a cache of 2 batches, after the third step the class level minimises the mean
    cross-entropy over batches 2 and 3, each with the features its own E-step computed (the
    lower levels then one and zero Adam steps old), plus the proximal term from the weights
    before the step: its gradient, by autograd of that explicit objective, is ~0."""
    model, _, _, _ = problem(seed=3)
    trainer = ExactTopEM(model, eta=2.0, lr=0.05, cache=2, newton=TIGHT)
    top = trainer.top
    level = model.levels[top]
    recorded = []
    for batch in range(3):
        x, y = images(model, 10, seed=20 + batch), (torch.arange(10) + batch) % 3
        with torch.no_grad():
            recorded.append((walk_up(model, x, record_inputs=True).inputs[top].clone(), y))
        anchor = [p.detach().clone() for p in level.parameters()]
        trainer.step(x, y)
    assert len(trainer.features) == 2  # the oldest batch dropped
    params = [p.detach().clone().requires_grad_(True) for p in level.parameters()]
    names = [name for name, _ in level.named_parameters()]
    cached = recorded[1:]

    def frozen(h: Tensor) -> Tensor:
        values = {f"level.{n}": p for n, p in zip(names, params, strict=True)}
        return torch.func.functional_call(_TopLevel(level), values, (h,))

    ce = torch.cat([F.cross_entropy(frozen(h), y, reduction="none") for h, y in cached]).mean()
    proximal = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)) / (2 * 2.0)
    gradient = torch.autograd.grad(ce + proximal, params)
    assert float(torch.cat([g.reshape(-1) for g in gradient]).norm()) <= OPTIMUM_GRAD_TOL * 10
    # the cache matters: a cache of one batch ends elsewhere
    alone = ExactTopEM(build(ARCHITECTURES["leaky"], seed=3), eta=2.0, lr=0.05, cache=1,
                       newton=TIGHT)  # fmt: skip
    for batch in range(3):
        alone.step(images(model, 10, seed=20 + batch), (torch.arange(10) + batch) % 3)
    assert not torch.allclose(alone.model.levels[top].weight, level.weight)


class _TopLevel(nn.Module):
    """One level's frozen-latent map (no latent), as a module (for functional_call)."""

    def __init__(self, level: nn.Module) -> None:
        super().__init__()
        self.level = level

    def forward(self, h: Tensor) -> Tensor:
        return self.level.bottom_up_frozen(h, None)


# --- the frozen-latent objective never increases ------------------------------------------------


@pytest.mark.parametrize("eta", [0.1, 10.0, 1e4])
def test_a_solve_never_increases_the_frozen_latent_objective(eta: float) -> None:
    """Every level, few and many Newton steps, mild and aggressive proximal terms."""
    model, x, y, latents = problem(seed=4)
    for index in parameter_levels(model):
        for settings in (NewtonSettings(iterations=1, cg_iterations=3), TIGHT):
            objective = LevelObjective.at(model, index, x, y, latents, eta=eta)
            before = float(objective.value())
            report = newton_cg(objective, settings)
            assert report.objective_before == before
            assert float(objective.value()) == report.objective <= before + DESCENT_TOL


def test_a_block_step_never_increases_the_batch_cross_entropy_at_its_latents() -> None:
    """Each level's J_l <= J_l(old) and the proximal term is >= 0, so the frozen-latent
    cross-entropy at the E-step's latents falls over the whole sweep."""
    model, x, y, latents = problem(seed=5)
    trainer = BlockEM(model, eta=3.0)
    for _ in range(3):
        with torch.no_grad():
            latents = walk_up(model, x).latents
            before = float(F.cross_entropy(drm.frozen_scores(model, x, latents), y))
        assert trainer.step(x, y) == pytest.approx(before, abs=1e-14)
        with torch.no_grad():
            after = float(F.cross_entropy(drm.frozen_scores(model, x, latents), y))
        assert after <= before + DESCENT_TOL


# --- convexity, numerically ----------------------------------------------------------------


def level_hessian(model: drm.DeepRenderingModel, indices: list[int], seed: int) -> Tensor:
    """The Hessian of the frozen-latent mean cross-entropy in the parameters of `indices`."""
    x = images(model, 10, seed=seed)
    y = torch.arange(10) % model.num_classes
    with torch.no_grad():
        latents = walk_up(model, x).latents
    wrapper = _Frozen(model, x, latents)
    named = [(f"model.levels.{i}.{n}", p) for i in indices
             for n, p in model.levels[i].named_parameters()]  # fmt: skip
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def cross_entropy(t: Tensor) -> Tensor:
        parts = t.split([p.numel() for _, p in named])
        values = {n: v.view_as(p) for (n, p), v in zip(named, parts, strict=True)}
        return F.cross_entropy(torch.func.functional_call(wrapper, values, ()), y)

    hessian = torch.autograd.functional.hessian(cross_entropy, theta)
    assert isinstance(hessian, Tensor)
    return hessian


@pytest.mark.parametrize("which", ["classes", "dense", "conv"])
def test_the_frozen_latent_objective_is_convex_in_one_level(which: str) -> None:
    for seed in (6, 7):
        model = build(ARCHITECTURES["leaky"], seed=seed)
        index = {"conv": 3, "dense": 6, "classes": 8}[which]
        assert list(model.levels[index].parameters())
        eigenvalues = torch.linalg.eigvalsh(level_hessian(model, [index], seed + 10))
        scale = float(eigenvalues.abs().max())
        assert scale > 1e-6  # not vacuous
        assert float(eigenvalues.min()) >= -PSD_TOL * scale, which


def test_the_frozen_latent_objective_is_not_convex_in_two_levels_jointly() -> None:
    """The control: in (dense, classes) together the scores are bilinear, and the Hessian has a
    clearly negative eigenvalue, so the check above can fail."""
    model = build(ARCHITECTURES["leaky"], seed=6)
    eigenvalues = torch.linalg.eigvalsh(level_hessian(model, [6, 8], 16))
    assert float(eigenvalues.min()) < -1e-3 * float(eigenvalues.abs().max())


# --- "gradient" is today's DiscriminativeEM -------------------------------------------------


def test_the_gradient_m_step_is_discriminative_em_bit_for_bit() -> None:
    config = train.parse_args(["--smoke", "--algo", "dem", "--m-steps", "2"])
    assert config.m_step == "gradient" and config.m_step_eta is None
    model = build(ARCHITECTURES["leaky"], seed=8)
    built = build_trainer(config, copy.deepcopy(model))
    assert type(built) is DiscriminativeEM
    assert config.lr is not None
    today = DiscriminativeEM(copy.deepcopy(model), m_steps=2, optimizer="adam", lr=config.lr)
    named = discriminative_em(copy.deepcopy(model), "gradient", m_steps=2, lr=config.lr)
    assert type(named) is DiscriminativeEM
    for batch in range(3):
        x, y = images(model, 8, seed=20 + batch), torch.arange(8) % 3
        losses = {today.step(x, y), built.step(x, y), named.step(x, y)}
        assert len(losses) == 1
    for trainer in (built, named):
        for a, b in zip(today.model.parameters(), trainer.current_model().parameters(),
                        strict=True):  # fmt: skip
            assert torch.equal(a, b)


# --- resume and data-parallel sums ------------------------------------------------------------


def make(name: MStepName, model: drm.DeepRenderingModel, accumulate: int = 3) -> Any:
    """A trainer of design `name` (large-batch: `accumulate` minibatches, so that it solves)."""
    if name == "large-batch":
        return LargeBatchEM(model, eta=2.0, accumulate=accumulate)
    return discriminative_em(model, name, lr=0.01, eta=2.0)


def train_batches(trainer: Any, model: drm.DeepRenderingModel, start: int, stop: int) -> None:
    for batch in range(start, stop):
        x = images(model, 9, seed=30 + batch)
        trainer.step(x, (torch.arange(9) + batch) % 3)


@pytest.mark.parametrize("name", EXACT)
def test_resume_mid_training_equals_the_uninterrupted_run(name: MStepName, tmp_path: Path) -> None:
    model = build(ARCHITECTURES["leaky"], seed=9)
    straight = make(name, copy.deepcopy(model))
    train_batches(straight, model, 0, 4)
    first = make(name, copy.deepcopy(model))
    train_batches(first, model, 0, 2)  # large-batch: 2 minibatches stored, none solved
    save_checkpoint(tmp_path / "mid.safetensors", first.current_model(), first.state_dict())
    stored = load_checkpoint(tmp_path / "mid.safetensors")
    assert isinstance(stored.model, drm.DeepRenderingModel)
    resumed = make(name, stored.model)
    resumed.load_state_dict(stored.trainer_state)
    train_batches(resumed, model, 2, 4)
    for flush in (False, True):  # large-batch: its 4th minibatch is solved by end_epoch
        if flush:
            assert straight.end_epoch() == resumed.end_epoch()
        for a, b in zip(straight.current_model().state_dict().values(),
                        resumed.current_model().state_dict().values(), strict=True):  # fmt: skip
            assert torch.equal(a, b)
    key = "levels.0.weight"
    assert not torch.equal(straight.current_model().state_dict()[key], model.state_dict()[key])


@pytest.mark.parametrize("name", EXACT)
def test_shards_sum_to_the_whole_batch(name: MStepName) -> None:
    """3 ranks in threads (shards of unequal size, some empty) make the one-process steps."""
    model = build(ARCHITECTURES["leaky"], seed=11)
    data: list[tuple[Tensor, Tensor | None]] = list(batches(model, seed=12))

    one, ranks = make(name, copy.deepcopy(model), 2), [make(name, copy.deepcopy(model), 2)
                                                       for _ in range(3)]  # fmt: skip
    whole(one, data, epochs=2)
    sharded(ranks, data, epochs=2)
    assert_same_parameters(one.model, ranks, THREADS_TOL)
    for level in parameter_levels(model):
        changed = (one.model.levels[level].weight - model.levels[level].weight).detach()
        assert float(changed.abs().max()) > 1e-3, level  # every level moved: not vacuous


def test_large_batch_is_the_block_m_step_of_the_gathered_minibatches() -> None:
    model = build(ARCHITECTURES["leaky"], seed=13)
    large = LargeBatchEM(copy.deepcopy(model), eta=2.0, accumulate=3)
    block = BlockEM(copy.deepcopy(model), eta=2.0, cycles=2, newton=large.block.newton)
    xs = [images(model, size, seed=40 + i) for i, size in enumerate((5, 4, 6))]
    ys = [torch.arange(x.shape[0]) % 3 for x in xs]
    for x, y in zip(xs, ys, strict=True):
        with torch.no_grad():
            expected = float(F.cross_entropy(drm.max_sum(large.model, x)[0], y))
        assert large.step(x, y) == expected  # its loss at the parameters before the solve
    block.step(torch.cat(xs), torch.cat(ys))
    for a, b in zip(large.model.parameters(), block.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert large.end_epoch() == block.end_epoch()  # nothing left to solve: the same counts


# --- arguments and the command line ---------------------------------------------------------


def test_bad_arguments_are_refused() -> None:
    assert {*EXACT, "gradient"} == set(M_STEPS)
    model = build(ARCHITECTURES["leaky"])
    with pytest.raises(ValueError, match="m_step must be one of"):
        discriminative_em(model, "newton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="m_steps applies to m_step 'gradient'"):
        discriminative_em(model, "exact-top", m_steps=2)
    with pytest.raises(ValueError, match="eta applies to the exact M-steps"):
        discriminative_em(model, "gradient", eta=1.0)
    with pytest.raises(ValueError, match="eta must be > 0"):
        discriminative_em(model, "block", eta=0.0)
    with pytest.raises(ValueError, match="accumulate must be >= 1"):
        LargeBatchEM(model, accumulate=0)
    for name in EXACT:
        with pytest.raises(ValueError, match="empty batch"):
            discriminative_em(model, name).step(images(model, 0), torch.zeros(0, dtype=torch.long))


def test_the_command_line_refuses_bad_m_steps(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["--algo", "dem", "--m-step", "newton"], "invalid choice: 'newton'"),
        (["--algo", "sgd", "--m-step", "block"], "--m-step applies to --algo dem"),
        (["--algo", "dem", "--m-step-eta", "2"], "--m-step-eta applies to --algo dem with"),
        (["--algo", "dem", "--m-step", "block", "--m-steps", "2"], "--m-steps applies to"),
        (["--algo", "dem", "--m-step", "block", "--m-step-eta", "0"], "must be a finite"),
    ]:
        with pytest.raises(SystemExit):
            train.parse_args(["--smoke", *argv])
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
    config = train.parse_args(["--smoke", "--algo", "dem", "--m-step", "exact-top"])
    assert (config.m_step, config.m_step_eta) == ("exact-top", 1.0)
    assert RunConfig(algo="sgd", smoke=True).m_step is None


def test_an_exact_m_step_run_records_it_and_old_runs_resume_as_gradient(tmp_path: Path) -> None:
    base = ["--data", "digits", "--limit-train", "64", "--limit-test", "50", "--no-progress"]
    exact = train.parse_args([*base, "--algo", "dem", "--m-step", "exact-top", "--epochs", "1",
                              "--out", str(tmp_path / "exact")])  # fmt: skip
    train.main(exact)
    stored = json.loads((tmp_path / "exact" / "config.json").read_text())["args"]
    assert (stored["m_step"], stored["m_step_eta"]) == ("exact-top", 1.0)
    # a dem run written before --m-step existed has neither key: it compares as "gradient"
    old = {k: v for k, v in exact.replace(m_step="gradient", m_step_eta=None).settings().items()
           if k not in ("m_step", "m_step_eta")}  # fmt: skip
    gradient = exact.replace(m_step="gradient", m_step_eta=None)
    check_resumable({"args": old}, gradient, tmp_path)
    with pytest.raises(RunError, match="--m-step 'gradient' .stored. vs 'exact-top'"):
        check_resumable({"args": old}, exact, tmp_path)
    with pytest.raises(RunError, match="--m-step-eta 1.0 .stored. vs 2.0"):
        check_resumable({"args": stored}, exact.replace(m_step_eta=2.0), tmp_path)
