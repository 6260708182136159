"""Coordinate-ascent refinement of the latents (a top-down E-step) between max-sum and exact MAP.

Oracles: `drm.exact_map` (brute force) as the upper bound, `drm.max_sum` as the start, and
brute force over one level's latent with the others fixed (the exactness of each update).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import drm
from drm.refine import level_inputs, refine_latents
from tests.architectures import ARCHITECTURES, TINY_ARCHITECTURES, build, images

BOUND_TOL = 1e-10


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_refinement_lies_between_max_sum_and_the_exact_map(name: str) -> None:
    model = build(TINY_ARCHITECTURES[name], seed=111)
    x = images(model, 6, seed=112)
    with torch.no_grad():
        scores, _ = drm.max_sum(model, x)
        exact = drm.exact_map(model, x)[0] + drm.logit_offset(model, x)[:, None]
    closed, total = 0.0, 0.0
    for c in range(model.num_classes):
        classes = torch.full((6,), c, dtype=torch.long)
        latents, refined, sweeps = refine_latents(model, x, classes)
        assert bool((refined >= scores[:, c] - BOUND_TOL).all())
        assert bool((refined <= exact[:, c] + BOUND_TOL).all())
        # the reported score is the log-joint of the returned latents (E1)
        lj = drm.log_joint(model, x, classes, latents) + drm.logit_offset(model, x)
        torch.testing.assert_close(lj, refined, atol=BOUND_TOL, rtol=0)
        assert sweeps >= 1
        closed += float((refined - scores[:, c]).sum())
        total += float((exact[:, c] - scores[:, c]).sum())
    assert total > 0 and closed >= 0


def test_refinement_closes_most_of_the_gap_on_tiny_models() -> None:
    """Measured: over the tiny architectures it closes well over half of the exact gap."""
    closed, total = 0.0, 0.0
    for name in sorted(TINY_ARCHITECTURES):
        model = build(TINY_ARCHITECTURES[name], seed=113)
        x = images(model, 6, seed=114)
        with torch.no_grad():
            scores, _ = drm.max_sum(model, x)
            exact = drm.exact_map(model, x)[0] + drm.logit_offset(model, x)[:, None]
        for c in range(model.num_classes):
            _, refined, _ = refine_latents(model, x, torch.full((6,), c, dtype=torch.long))
            closed += float((refined - scores[:, c]).sum())
            total += float((exact[:, c] - scores[:, c]).sum())
    assert closed / total > 0.5


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_refinement_changes_nothing_when_max_sum_is_exact(name: str) -> None:
    model = build(TINY_ARCHITECTURES[name], seed=115, nonnegative=True)
    x = images(model, 4, seed=116)
    _, cnn_latents = drm.max_sum(model, x)
    for c in range(model.num_classes):
        latents, _, sweeps = refine_latents(model, x, torch.full((4,), c, dtype=torch.long))
        assert sweeps == 1
        for a, b in zip(latents, cnn_latents, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["conv-relu-pool", "overlapping-leaky", "pool-then-switch"])
def test_each_update_is_the_best_choice_for_its_level(name: str) -> None:
    """Brute force over every state of one level's latent, the others fixed at the CNN's."""
    model = build(TINY_ARCHITECTURES[name], seed=117)
    x = images(model, 1, seed=118)
    classes = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        _, latents = drm.max_sum(model, x)
        for index in model.latent_levels:
            level = model.levels[index]
            assert isinstance(level, (drm.Switch, drm.MaxPool))
            inputs = level_inputs(model, x, latents)
            signals = drm.model.propagate_down(model, classes, latents)
            choice = level.best_latent(inputs[index], signals[index + 1])
            trial = list(latents)
            trial[index] = choice
            best = drm.log_joint(model, x, classes, tuple(trial))
            counts = level.latent_counts().tolist()
            for digits in itertools.product(*(range(k) for k in counts)):
                trial[index] = level.latent_from_digits(torch.tensor([digits]))
                score = drm.log_joint(model, x, classes, tuple(trial))
                assert float(score) <= float(best) + BOUND_TOL


def test_refinement_on_a_larger_model_and_bad_arguments() -> None:
    model = build(ARCHITECTURES["leaky"], seed=119)
    x = images(model, 5, seed=120)
    classes = torch.arange(5) % 3
    scores, _ = drm.max_sum(model, x)
    _, refined, _ = refine_latents(model, x, classes)
    assert bool((refined >= scores.gather(1, classes[:, None])[:, 0] - BOUND_TOL).all())
    with pytest.raises(ValueError, match="max_sweeps must be >= 1"):
        refine_latents(model, x, classes, max_sweeps=0)
    with pytest.raises(ValueError, match="class index out of range"):
        refine_latents(model, x, torch.full((5,), 9))
