"""E9 and the deep model's EM algorithms.

Oracles: SGD on the torch CNN (E9); torch.linalg.lstsq on an explicitly built design matrix
(the generative M-step); torch.linalg.solve (conjugate gradients); the log-joint computed from
the rendering (the refined E-step).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import drm
from cnn_equiv import SGDTrainer, to_cnn
from drm.em import DiscriminativeEM, GenerativeEM, conjugate_gradient
from drm.model import propagate_down
from drm.refine import refine_latents
from tests.architectures import ARCHITECTURES, TINY_ARCHITECTURES, build, images

E9_TOL = 1e-12  # float64; the two paths compute the same gradients by different graphs
LSTSQ_TOL = 1e-9  # relative excess of CG's least-squares objective over lstsq's, float64
REFINE_TOL = 1e-10  # float64 log-joint: refinement never lowers it


@pytest.mark.parametrize("name", ["lenet", "leaky", "avgpool", "pool-before-switch"])
def test_e9_cnn_gradient_is_the_frozen_latent_gradient(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=91)
    x = images(model, 6, seed=92)
    labels = torch.arange(6) % model.num_classes
    cnn = to_cnn(model)
    F.cross_entropy(cnn(x), labels).backward()
    with torch.no_grad():
        _, latents = drm.max_sum(model, x)  # the bottom-up E-step
    F.cross_entropy(drm.frozen_scores(model, x, latents), labels).backward()
    for (name_a, a), b in zip(model.named_parameters(), cnn.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, atol=E9_TOL, rtol=0, msg=name_a)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_e9_discriminative_em_with_one_m_step_is_sgd(optimizer: str) -> None:
    """Same trajectory over several batches: every parameter, and the class log prior."""
    config = ARCHITECTURES["leaky"]
    dem = DiscriminativeEM(build(config, seed=93), m_steps=1, optimizer=optimizer, lr=0.05)
    sgd = SGDTrainer(build(config, seed=93), optimizer=optimizer, lr=0.05)
    for batch in range(4):
        x = images(dem.model, 8, seed=94 + batch)
        y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(batch))
        assert abs(dem.step(x, y) - sgd.step(x, y)) < E9_TOL
    mapped = sgd.current_model()
    for (name, a), b in zip(dem.model.named_parameters(), mapped.parameters(), strict=True):
        if name.endswith(f"{len(dem.model.levels) - 1}.bias"):
            continue  # prior logits differ by a constant; compared as log pi below
        torch.testing.assert_close(a, b, atol=E9_TOL, rtol=0, msg=name)
    torch.testing.assert_close(dem.model.class_log_prior, mapped.class_log_prior,
                               atol=E9_TOL, rtol=0)  # fmt: skip


def test_discriminative_em_with_several_m_steps_is_a_different_algorithm() -> None:
    one = DiscriminativeEM(build(ARCHITECTURES["leaky"], seed=95), m_steps=1, lr=0.01)
    three = DiscriminativeEM(build(ARCHITECTURES["leaky"], seed=95), m_steps=3, lr=0.01)
    x = images(one.model, 16, seed=96)
    y = torch.arange(16) % 3
    one.step(x, y)
    three.step(x, y)
    assert not torch.allclose(one.model.levels[0].weight, three.model.levels[0].weight)
    # the M-step lowers the conditional log-likelihood loss of its batch at frozen latents
    with torch.no_grad():
        latents = drm.max_sum(three.model, x)[1]
    before = F.cross_entropy(drm.frozen_scores(three.model, x, latents), y).item()
    three.step(x, y)
    with torch.no_grad():
        after = F.cross_entropy(drm.frozen_scores(three.model, x, latents), y).item()
    assert after < before


def test_conjugate_gradient_solves_spd_systems() -> None:
    generator = torch.Generator().manual_seed(97)
    a = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    spd = a @ a.T + 0.1 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=generator, dtype=torch.float64)
    x = conjugate_gradient(lambda v: spd @ v, b, torch.zeros_like(b), iterations=60)
    torch.testing.assert_close(x, torch.linalg.solve(spd, b), atol=LSTSQ_TOL, rtol=0)
    # warm-started from x0 with the caller's residual b - A x0 (b not needed): the same solution,
    # and one matvec fewer
    x0 = torch.randn(12, generator=generator, dtype=torch.float64)
    calls: list[int] = []

    def counted(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return spd @ v

    x = conjugate_gradient(counted, None, x0, iterations=60, residual=b - spd @ x0)
    torch.testing.assert_close(x, torch.linalg.solve(spd, b), atol=LSTSQ_TOL, rtol=0)
    assert len(calls) <= 60
    calls.clear()
    conjugate_gradient(counted, b, x0, iterations=3)
    assert len(calls) == 4  # the residual, then one per iteration
    calls.clear()
    conjugate_gradient(counted, None, x0, iterations=3, residual=b - spd @ x0)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="needs b or the residual"):
        conjugate_gradient(counted, None, x0, iterations=3)


@pytest.mark.parametrize("name", ["two-levels", "avgpool-dense", "padding-stride"])
def test_generative_m_step_is_the_least_squares_solution(name: str) -> None:
    """CG run to convergence equals lstsq on the explicit design matrix of each level."""
    model = build(TINY_ARCHITECTURES[name], seed=98)
    x = images(model, 40, seed=99)
    y = torch.arange(40) % model.num_classes
    trainer = GenerativeEM(model, cg_iterations=500)
    with torch.no_grad():
        latents = drm.max_sum(model, x)[1]
    for index in trainer.template_levels:
        level = model.levels[index]
        assert isinstance(level, (drm.Conv, drm.Dense))
        solution = trainer.solve_level(index, x, y, latents)
        # Oracle: the rendering is linear in the level's templates; build its matrix column by
        # column (one unit template at a time) and solve min ||x - sigma^2 A w||.
        basis = torch.eye(level.weight.numel(), dtype=torch.float64)
        columns = []
        for e in basis:
            with torch.no_grad():
                original = level.weight.detach().clone()
                level.weight.copy_(e.view_as(level.weight))
                columns.append(model.sigma2 * propagate_down(model, y, latents)[0].flatten())
                level.weight.copy_(original)
        design = torch.stack(columns, 1)
        expected = torch.linalg.lstsq(design, x.flatten()[:, None]).solution[:, 0]
        # The problem may be rank deficient, so compare the minimum reached, not templates.
        reached = ((x.flatten() - design @ solution.flatten()) ** 2).sum()
        optimum = ((x.flatten() - design @ expected) ** 2).sum()
        assert float(reached - optimum) <= LSTSQ_TOL * float(optimum)


def test_generative_em_never_increases_the_batch_reconstruction_error() -> None:
    model = build(ARCHITECTURES["leaky"], seed=100)
    trainer = GenerativeEM(model, cg_iterations=3, step_size=1.0, levels_per_step=1)
    x = images(model, 32, seed=101)
    y = torch.arange(32) % 3
    with torch.no_grad():
        latents = drm.max_sum(model, x)[1]
    for index in trainer.template_levels:
        before = trainer.level_objective(x, y, latents)
        with torch.no_grad():
            model.levels[index].weight.copy_(trainer.solve_level(index, x, y, latents))
        after = trainer.level_objective(x, y, latents)
        assert float(after) <= float(before) * (1 + 1e-12)


def test_generative_em_priors_are_latent_frequencies() -> None:
    model = build(ARCHITECTURES["leaky"], seed=102)
    trainer = GenerativeEM(model)
    x = images(model, 30, seed=103)
    y = torch.tensor([0] * 20 + [1] * 7 + [2] * 3)
    with torch.no_grad():
        latents = drm.max_sum(model, x)[1]  # the E-step the trainer will take (before updates)
    on = latents[1]
    assert on is not None
    mse = trainer.step(x, y)
    summary = trainer.end_epoch()
    # each number once: the learned priors and the mean squared residual (sigma^2 is kept)
    switches = [i for i, level in enumerate(model.levels) if isinstance(level, drm.Switch)]
    assert set(summary) == {f"prior_on_level{i}" for i in switches} | {"reconstruction_mse"}
    assert summary["reconstruction_mse"] == pytest.approx(mse, rel=1e-12)
    expected = torch.tensor([21 / 33, 8 / 33, 4 / 33], dtype=torch.float64).log()
    torch.testing.assert_close(model.class_log_prior, expected, atol=1e-12, rtol=0)
    assert summary["prior_on_level1"] == pytest.approx(float(on.double().mean()), abs=1e-12)
    switch = model.levels[1]
    assert isinstance(switch, drm.Switch)
    assert switch.spec.prior_on == pytest.approx(float(on.double().mean()), abs=1e-12)


def test_generative_em_refined_e_step_raises_the_log_joint() -> None:
    """With refine_sweeps the E-step's latents are refine_latents' and score at least max-sum's."""
    model = build(ARCHITECTURES["leaky"], seed=104)
    x = images(model, 24, seed=105)
    y = torch.arange(24) % 3
    bottom_up = GenerativeEM(model).e_step(x, y)
    refined = GenerativeEM(model, refine_sweeps=5).e_step(x, y)
    expected = refine_latents(model, x, y, bottom_up, max_sweeps=5)[0]
    for a, b in zip(refined, expected, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    with torch.no_grad():
        before = drm.log_joint(model, x, y, bottom_up)
        after = drm.log_joint(model, x, y, refined)
    assert bool((after >= before - REFINE_TOL).all())
    assert float((after - before).max()) > 1e-6  # the refinement changed some images' latents
    # the M-step on the refined latents still never increases the reconstruction error
    trainer = GenerativeEM(model, cg_iterations=3, step_size=1.0, refine_sweeps=5)
    for index in trainer.template_levels:
        before_error = trainer.level_objective(x, y, refined)
        with torch.no_grad():
            model.levels[index].weight.copy_(trainer.solve_level(index, x, y, refined))
        assert float(trainer.level_objective(x, y, refined)) <= float(before_error) * (1 + 1e-12)


def test_trainer_arguments_are_checked() -> None:
    model = build(ARCHITECTURES["leaky"])
    with pytest.raises(ValueError, match="m_steps must be >= 1"):
        DiscriminativeEM(model, m_steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        DiscriminativeEM(model, lr=0.0)
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd'"):
        DiscriminativeEM(model, optimizer="lbfgs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step_size must lie in"):
        GenerativeEM(model, step_size=1.5)
    with pytest.raises(ValueError, match="refine_sweeps must be >= 0"):
        GenerativeEM(model, refine_sweeps=-1)
    with pytest.raises(ValueError, match="class index out of range"):
        DiscriminativeEM(model).step(images(model, 2), torch.tensor([0, 7]))


def _count_image_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every call to `drm.checks.check_images`, wherever a module of drm looks it up."""
    import sys

    import drm.checks

    original = drm.checks.check_images
    calls = [0]

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("drm", "cnn_equiv") and (
            getattr(module, "check_images", None) is original
        ):
            monkeypatch.setattr(module, "check_images", counting)
    return calls


def test_each_em_step_checks_its_batch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer's step checks its images at the door, once; inner code is unchecked."""
    from drm.semisupervised import UNLABELLED, LossWeights, SemiSupervisedEM

    model = build(ARCHITECTURES["lenet"], seed=131)
    x = images(model, 6, seed=132)
    y = torch.arange(6) % model.num_classes
    every_term = LossWeights(path_normalization=0.1, min_cross_entropy=0.1, consistency=0.1)
    trainers = {
        "generative": GenerativeEM(model, cg_iterations=2, refine_sweeps=2),
        "discriminative": DiscriminativeEM(model, m_steps=2),
        "semi-supervised": SemiSupervisedEM(model, every_term),
    }
    for name, trainer in trainers.items():
        labels = torch.where(torch.arange(6) % 3 == 0, UNLABELLED, y) if "semi" in name else y
        calls = _count_image_checks(monkeypatch)
        trainer.step(x, labels)
        assert calls[0] == 1, name
        monkeypatch.undo()
