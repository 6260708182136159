"""Each level's top-down rendering is the adjoint of its bottom-up map (oracle: autograd vjp)."""

from __future__ import annotations

import pytest
import torch

import drm
from tests.architectures import ARCHITECTURES, TINY_ARCHITECTURES, build, images

ADJOINT_TOL = 1e-10  # float64: <A y, g> = <y, A^T g> is exact up to rounding


def _level_inputs(model: drm.DeepRenderingModel, x: torch.Tensor) -> list[torch.Tensor]:
    """The bottom-up input of every level on the images x."""
    inputs = []
    y = x
    for level in model.levels:
        inputs.append(y)
        y, _ = level.bottom_up(y)
    return inputs


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_top_down_is_the_adjoint_of_the_frozen_bottom_up_map(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=3)
    x = images(model, 3, seed=4)
    _, latents = drm.max_sum(model, x)
    generator = torch.Generator().manual_seed(5)
    for level, y, latent in zip(model.levels, _level_inputs(model, x), latents, strict=True):
        y = torch.randn(y.shape, generator=generator, dtype=torch.float64).requires_grad_()
        # the linear part: subtract the map at zero, which is the bias term
        linear = level.bottom_up_frozen(y, latent) - level.bottom_up_frozen(
            torch.zeros_like(y), latent
        )
        g = torch.randn(linear.shape, generator=generator, dtype=torch.float64)
        (vjp,) = torch.autograd.grad(linear, y, g)
        rendered = level.top_down(g, latent)
        assert rendered.shape == y.shape
        torch.testing.assert_close(rendered, vjp, atol=ADJOINT_TOL, rtol=0)
        lhs = (linear * g).sum().detach()
        rhs = (y * rendered).sum().detach()
        assert abs(float(lhs - rhs)) < ADJOINT_TOL * max(1.0, float(lhs.abs()))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_prior_term_is_the_bias_seen_by_the_top_down_signal(name: str) -> None:
    model = build(ARCHITECTURES[name], seed=6)
    x = images(model, 2, seed=7)
    _, latents = drm.max_sum(model, x)
    generator = torch.Generator().manual_seed(8)
    for level, y, latent in zip(model.levels, _level_inputs(model, x), latents, strict=True):
        out = level.bottom_up_frozen(y, latent)
        g = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        offset = level.bottom_up_frozen(torch.zeros_like(y), latent)  # the bias, broadcast
        expected = (offset * g).flatten(1).sum(1)
        torch.testing.assert_close(level.prior_term(g), expected, atol=ADJOINT_TOL, rtol=0)


@pytest.mark.parametrize(
    "spec",
    [
        drm.MaxPoolSpec(2),
        drm.MaxPoolSpec(3, 2, 1),
        drm.MaxPoolSpec(2, 1),
        drm.MaxPoolSpec(3, 2, ceil_mode=True),
        drm.MaxPoolSpec(2, 2, 1, dilation=2),
        drm.MaxPoolSpec((2, 3), (1, 2), (1, 1), ceil_mode=True),
    ],
)
def test_pool_windows_are_the_cells_torch_can_choose(spec: drm.MaxPoolSpec) -> None:
    """Oracle: put a large value at one cell; torch's argmax shows which windows contain it."""
    level = drm.MaxPool(spec)
    height, width = 7, 6
    level.bind((1, height, width))
    reachable: list[set[int]] = [set() for _ in range(level.window_cells.shape[0])]
    for cell in range(height * width):
        probe = torch.full((1, 1, height * width), -1.0, dtype=torch.float64)
        probe[0, 0, cell] = 1.0
        _, indices = level.bottom_up(probe.view(1, 1, height, width))
        for unit, index in enumerate(indices.flatten().tolist()):
            if index == cell:
                reachable[unit].add(cell)
    for unit, cells in enumerate(reachable):
        listed = level.window_cells[unit]
        assert set(listed[listed >= 0].tolist()) == cells
        assert int(level.window_counts[unit]) == len(cells)
        assert bool((listed[: len(cells)] >= 0).all())  # valid cells come first


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_latent_digits_cover_every_configuration_once(name: str) -> None:
    model = build(TINY_ARCHITECTURES[name])
    total = drm.num_configurations(model)
    latents = drm.reference.configurations(model, torch.arange(total))
    flat = torch.cat([z.flatten(1).long() for z in latents if z is not None], dim=1)
    assert torch.unique(flat, dim=0).shape[0] == total
    drm.checks.check_latents(model, latents, total)  # every index lies in its window
