"""E3 and E4: bottom-up max-sum against brute-force enumeration of every configuration.

Oracle: `drm.exact_map`, which scores every (c, z) with the top-down rendering and the log-joint
only (no conv2d, ReLU or max-pool).
"""

from __future__ import annotations

import pytest
import torch

import drm
from drm.model import top_down
from tests.architectures import TINY_ARCHITECTURES, build, images

EXACT_TOL = 1e-10  # float64: both sides are sums of a few dozen O(1) terms
BATCH = 6


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_e3_max_sum_is_exact_when_top_down_signals_are_nonnegative(name: str) -> None:
    model = build(TINY_ARCHITECTURES[name], seed=11, nonnegative=True)
    assert model.exactness_violations() == []
    x = images(model, BATCH, seed=12)
    with torch.no_grad():
        scores, latents = drm.max_sum(model, x)
        offset = drm.logit_offset(model, x)
        for c in range(model.num_classes):
            classes = torch.full((BATCH,), c, dtype=torch.long)
            exact, exact_latents = drm.exact_map(model, x, classes)
            # the max over z of the log-joint is the CNN logit, for every class
            torch.testing.assert_close(exact + offset[:, None], scores, atol=EXACT_TOL, rtol=0)
            # the CNN's latents are a maximiser ...
            at_cnn = drm.log_joint(model, x, classes, latents)
            torch.testing.assert_close(at_cnn, exact[:, c], atol=EXACT_TOL, rtol=0)
            # ... and agree with the enumerated arg-max wherever a latent matters: every
            # top-down signal is the same, and so is every switch that receives a signal.
            mine = top_down(model, classes, latents)
            theirs = top_down(model, classes, exact_latents)
            for a, b in zip(mine, theirs, strict=True):
                torch.testing.assert_close(a, b, atol=EXACT_TOL, rtol=0)
            for i in model.latent_levels:
                if isinstance(model.levels[i], drm.Switch):
                    signal = mine[i + 1] != 0
                    z_cnn, z_exact = latents[i], exact_latents[i]
                    assert z_cnn is not None and z_exact is not None
                    assert torch.equal(z_cnn[signal], z_exact[signal])


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_e4_max_sum_is_a_lower_bound_with_signed_templates(name: str) -> None:
    model = build(TINY_ARCHITECTURES[name], seed=13)
    assert model.exactness_violations() != []
    x = images(model, BATCH, seed=14)
    with torch.no_grad():
        scores, latents = drm.max_sum(model, x)
        exact, _ = drm.exact_map(model, x)
        gap = exact + drm.logit_offset(model, x)[:, None] - scores
    assert float(gap.min()) >= -EXACT_TOL


def test_e4_the_gap_is_positive_somewhere() -> None:
    """The bound is not an equality in disguise: signed upper templates do open a gap."""
    gaps = []
    for name in sorted(TINY_ARCHITECTURES):
        model = build(TINY_ARCHITECTURES[name], seed=13)
        x = images(model, BATCH, seed=14)
        with torch.no_grad():
            exact, _ = drm.exact_map(model, x)
            gaps.append(
                float(
                    (exact + drm.logit_offset(model, x)[:, None] - drm.max_sum(model, x)[0]).max()
                )
            )
    assert max(gaps) > 1e-3


def test_exact_map_latents_achieve_the_reported_scores() -> None:
    model = build(TINY_ARCHITECTURES["padding-stride"], seed=15)
    x = images(model, BATCH, seed=16)
    scores, latents = drm.exact_map(model, x)
    best = scores.argmax(1)
    torch.testing.assert_close(
        drm.log_joint(model, x, best, latents).detach(),
        scores.gather(1, best[:, None])[:, 0],
        atol=EXACT_TOL,
        rtol=0,
    )


def test_exact_map_refuses_large_models_with_a_clear_error() -> None:
    model = build(TINY_ARCHITECTURES["pool-then-switch"])
    x = images(model, 1)
    with pytest.raises(ValueError, match=r"16384 latent configurations.*max_configurations=100"):
        drm.exact_map(model, x, max_configurations=100)


def test_exact_map_on_imported_cnn_with_folded_batchnorm() -> None:
    """E3 through the mapping: a torch CNN with BatchNorm folded into its conv."""
    from torch import nn

    from cnn_equiv import to_drm

    torch.manual_seed(17)
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 2),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(2, 3),
    ).double()
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-1, 1)
        cnn[1].running_var.uniform_(0.5, 2)
        cnn[1].weight.uniform_(0.5, 2)  # positive gamma keeps the conv's output sign pattern
        cnn[5].weight.abs_()
    cnn.eval()
    model = to_drm(cnn, input_shape=(1, 3, 3))
    assert model.exactness_violations() == []
    x = images(model, BATCH, seed=18)
    with torch.no_grad():
        exact, _ = drm.exact_map(model, x)
        logits = cnn(x)
    shift = torch.logsumexp(cnn[5].bias.detach(), 0)  # eq. (12): the imported prior's constant
    torch.testing.assert_close(
        exact + drm.logit_offset(model, x)[:, None] + shift, logits, atol=EXACT_TOL, rtol=0
    )
