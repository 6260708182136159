"""Ancestral sampling: the factorized prior's frequencies and the CNN prior's exact law.

Oracles: binomial standard errors for the factorized prior; for the CNN prior, the class marginal
computed from `drm.log_joint` at x = mu (where the Gaussian term is its maximum, so that
log_joint(mu, c, z) + (D/2) log(2 pi sigma^2) = log p(c, z) + log Z).
"""

from __future__ import annotations

import math

import pytest
import torch

import drm
from drm.reference import configurations
from tests.architectures import ARCHITECTURES, TINY_ARCHITECTURES, build

NUM_SE = 5.0  # frequencies must lie within 5 binomial standard errors (false alarm ~ 6e-7)


def _within(freq: torch.Tensor, prob: torch.Tensor, n: int) -> None:
    se = torch.sqrt(prob * (1 - prob) / n).clamp_min(1e-12)
    assert bool(((freq - prob).abs() <= NUM_SE * se).all()), (freq, prob)


def test_factorized_prior_frequencies_and_noise() -> None:
    config = ARCHITECTURES["overlapping-ceil-pool"]
    levels = list(config.levels)
    levels[1] = drm.SwitchSpec(prior_on=0.2)
    model = build(drm.ModelConfig(config.input_shape, config.num_classes, tuple(levels), 0.5))
    n = 4000
    draw = drm.sample(model, n, generator=torch.Generator().manual_seed(41))
    assert draw.x.shape == (n, *model.input_shape) and draw.x.dtype == model.dtype
    counts = torch.bincount(draw.classes, minlength=model.num_classes).double() / n
    _within(counts, model.class_log_prior.exp().detach(), n)
    on = draw.latents[1]
    assert on is not None and on.dtype == torch.bool
    _within(on.double().mean().reshape(1), torch.tensor([0.2], dtype=torch.float64), on.numel())
    # translations are uniform over the (ceil-mode, partly clipped) windows
    pool = model.levels[2]
    t = draw.latents[2]
    assert isinstance(pool, drm.MaxPool) and t is not None
    for unit in range(pool.window_cells.shape[0]):
        cells = pool.window_cells[unit][: int(pool.window_counts[unit])]
        chosen = t[:, :, unit // t.shape[3], unit % t.shape[3]].flatten()
        freq = (chosen[:, None] == cells[None]).double().mean(0)
        _within(freq, torch.full_like(freq, 1 / len(cells)), chosen.numel())
    # x - mu is N(0, sigma^2 I)
    residual = draw.x - drm.render(model, draw.classes, draw.latents).detach()
    variance = residual.var().item()
    assert abs(variance - 0.5) < NUM_SE * 0.5 * math.sqrt(2 / residual.numel())


@pytest.mark.parametrize("name", ["conv-relu-pool", "two-levels"])
def test_cnn_prior_sampling_matches_the_enumerated_class_marginal(name: str) -> None:
    model = build(TINY_ARCHITECTURES[name], seed=42)
    total = drm.num_configurations(model)
    latents = configurations(model, torch.arange(total))
    log_weights = []
    for c in range(model.num_classes):
        classes = torch.full((total,), c, dtype=torch.long)
        mu = drm.render(model, classes, latents)
        log_weights.append(drm.log_joint(model, mu, classes, latents).detach())
    class_marginal = torch.softmax(torch.stack(log_weights, 1).flatten(), 0).view(total, -1).sum(0)
    n = 20000
    draw = drm.sample(model, n, prior="cnn", generator=torch.Generator().manual_seed(43))
    freq = torch.bincount(draw.classes, minlength=model.num_classes).double() / n
    _within(freq, class_marginal, n)
    assert torch.isfinite(draw.x).all()


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = build(TINY_ARCHITECTURES["groups"])
    a = drm.sample(model, 5, generator=torch.Generator().manual_seed(7))
    b = drm.sample(model, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.x, b.x) and torch.equal(a.classes, b.classes)
