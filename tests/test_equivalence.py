"""E1 and E2: the log-joint of any configuration is a frozen-latent CNN logit, and bottom-up
max-sum is the CNN's forward pass with the CNN's own masks and pool indices.

Oracles: the torch layers of `to_cnn(model)` (with forward hooks that freeze ReLU masks and pool
indices for E1), and `record_latents`' hooks on those layers (for E2).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import drm
from cnn_equiv import record_latents, to_cnn
from drm.sampling import sample_factorized_latents
from tests.architectures import ARCHITECTURES, build, images

IDENTITY_TOL = 1e-10  # float64 identities; observed errors are ~1e-13 (logits ~ 1e1)


def frozen_cnn_logits(
    model: drm.DeepRenderingModel, x: torch.Tensor, latents: drm.Latents
) -> torch.Tensor:
    """The torch CNN with every ReLU replaced by its frozen mask and every max-pool by a gather
    at frozen indices (forward hooks override the layers' outputs)."""
    cnn = to_cnn(model)
    handles = []
    for layer, latent in zip(cnn, latents, strict=True):
        if isinstance(layer, (nn.ReLU, nn.LeakyReLU)):
            slope = getattr(layer, "negative_slope", 0.0)

            def switch_hook(
                module: nn.Module,
                inputs: Any,
                output: Any,
                on: torch.Tensor = latent,
                slope: float = slope,
            ) -> torch.Tensor:
                return torch.where(on, inputs[0], inputs[0] * slope)

            handles.append(layer.register_forward_hook(switch_hook))
        elif isinstance(layer, nn.MaxPool2d):

            def pool_hook(
                module: nn.Module, inputs: Any, output: Any, index: torch.Tensor = latent
            ) -> torch.Tensor:
                return inputs[0].flatten(2).gather(2, index.flatten(2)).view(index.shape)

            handles.append(layer.register_forward_hook(pool_hook))
    try:
        return cnn(x)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_e1_log_joint_of_any_configuration_is_a_frozen_cnn_logit(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=1)
    batch = 5
    x = images(model, batch, seed=2)
    generator = torch.Generator().manual_seed(3)
    latents = sample_factorized_latents(model, batch, generator)
    frozen = frozen_cnn_logits(model, x, latents).detach()
    offset = drm.logit_offset(model, x).detach()
    for c in range(model.num_classes):
        classes = torch.full((batch,), c, dtype=torch.long)
        lj = drm.log_joint(model, x, classes, latents).detach()
        torch.testing.assert_close(lj + offset, frozen[:, c], atol=IDENTITY_TOL, rtol=0)
    # the library's own frozen pass agrees with the hooked torch CNN
    torch.testing.assert_close(
        drm.frozen_scores(model, x, latents).detach(), frozen, atol=IDENTITY_TOL, rtol=0
    )


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_e2_max_sum_is_the_cnn_forward_pass(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=4)
    x = images(model, 6, seed=5)
    scores, latents = drm.max_sum(model, x)
    seen = record_latents(to_cnn(model), x)
    torch.testing.assert_close(scores.detach(), seen.logits, atol=IDENTITY_TOL, rtol=0)
    switches = [
        z for level, z in zip(model.levels, latents, strict=True) if isinstance(level, drm.Switch)
    ]
    pools = [
        z for level, z in zip(model.levels, latents, strict=True) if isinstance(level, drm.MaxPool)
    ]
    assert len(switches) == len(seen.switches) and len(pools) == len(seen.translations)
    for mine, theirs in zip(switches, seen.switches, strict=True):
        assert mine is not None and torch.equal(mine, theirs)
    for mine, theirs in zip(pools, seen.translations, strict=True):
        assert mine is not None and torch.equal(mine, theirs)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_max_sum_scores_are_log_joint_at_the_cnn_latents(name: str) -> None:
    """E1 at z* = the CNN's latents: for every class, the logit is the log-joint plus offset."""
    model = build(ARCHITECTURES[name], seed=6)
    x = images(model, 4, seed=7)
    scores, latents = drm.max_sum(model, x)
    offset = drm.logit_offset(model, x)
    for c in range(model.num_classes):
        classes = torch.full((4,), c, dtype=torch.long)
        lj = drm.log_joint(model, x, classes, latents)
        torch.testing.assert_close(
            (lj + offset).detach(), scores[:, c].detach(), atol=IDENTITY_TOL, rtol=0
        )


def test_softmax_of_scores_is_the_posterior_over_classes_at_the_map_latents() -> None:
    model = build(ARCHITECTURES["lenet"], seed=8)
    x = images(model, 3, seed=9)
    scores, latents = drm.max_sum(model, x)
    joint = torch.stack(
        [
            drm.log_joint(model, x, torch.full((3,), c, dtype=torch.long), latents)
            for c in range(model.num_classes)
        ],
        dim=1,
    )
    torch.testing.assert_close(
        F.softmax(scores, 1).detach(), F.softmax(joint, 1).detach(), atol=IDENTITY_TOL, rtol=0
    )


@pytest.mark.parametrize(
    "config",
    [
        ARCHITECTURES["dense-only"],  # Flatten first: a view of x reaches the first Dense
        drm.ModelConfig((1, 4, 4), 3, (drm.SwitchSpec(), drm.FlattenSpec())),
        drm.ModelConfig((1, 4, 4), 3, (drm.FlattenSpec(), drm.SwitchSpec(0.1))),
        drm.ModelConfig((1, 4, 4), 3, (drm.MaxPoolSpec(2), drm.SwitchSpec(), drm.FlattenSpec())),
    ],
    ids=["flatten-dense", "switch-first", "flatten-switch", "pool-switch"],
)
def test_max_sum_never_writes_into_the_images(config: drm.ModelConfig) -> None:
    model = build(config, seed=10)
    x = images(model, 3, seed=11)
    kept = x.clone()
    scores, _ = drm.max_sum(model, x)
    assert torch.equal(x, kept)
    torch.testing.assert_close(scores.detach(), to_cnn(model)(x), atol=IDENTITY_TOL, rtol=0)


SWITCH_AFTER_SWITCH = drm.ModelConfig(
    (1, 6, 6),
    3,
    (drm.ConvSpec(2, 3), drm.SwitchSpec(), drm.SwitchSpec(0.1), drm.FlattenSpec(),
     drm.SwitchSpec(), drm.DenseSpec(4), drm.SwitchSpec(0.2), drm.SwitchSpec()),
)  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [ARCHITECTURES["lenet"], ARCHITECTURES["leaky"], ARCHITECTURES["pool-before-switch"],
     SWITCH_AFTER_SWITCH],
    ids=["lenet", "leaky", "pool-before-switch", "switch-after-switch"],
)  # fmt: skip
def test_max_sum_backpropagates_like_the_cnn(config: drm.ModelConfig) -> None:
    """In-place switches in max_sum leave autograd intact: parameter gradients are the CNN's."""
    model = build(config, seed=12)
    x = images(model, 4, seed=13)
    labels = torch.arange(4) % model.num_classes
    cnn = to_cnn(model)
    F.cross_entropy(drm.max_sum(model, x)[0], labels).backward()
    F.cross_entropy(cnn(x), labels).backward()
    for a, b in zip(model.parameters(), cnn.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, atol=IDENTITY_TOL, rtol=0)
