"""Architectures the tests sweep: MNIST-sized ones for identities, tiny ones for enumeration."""

from __future__ import annotations

import torch

import drm
from drm import AvgPoolSpec as Avg
from drm import ConvSpec as Conv
from drm import DenseSpec as Dense
from drm import FlattenSpec as Flat
from drm import MaxPoolSpec as Max
from drm import ModelConfig
from drm import SwitchSpec as Sw

# Architectures for the identities that hold for every model (E1, E2, E6, E8): every level
# kind and every conv/pool option, on images large enough to exercise borders.
ARCHITECTURES: dict[str, ModelConfig] = {
    "lenet": drm.lenet_config((1, 28, 28), 10, (6, 16, 32)),
    "padding-stride": ModelConfig(
        (2, 11, 9), 4, (Conv(5, 3, stride=2, padding=1), Sw(), Max(2), Flat(), Dense(7), Sw())
    ),
    "dilation-groups": ModelConfig(
        (4, 12, 12), 3, (Conv(6, 3, dilation=2, groups=2, padding=2), Sw(), Max(3, 2, 1), Flat())
    ),
    "overlapping-ceil-pool": ModelConfig(
        (1, 10, 10),
        5,
        (
            Conv(3, 3),
            Sw(),
            Max(3, 2, ceil_mode=True),
            Conv(4, 2),
            Sw(),
            Max(2, 1, dilation=1),
            Flat(),
        ),
    ),
    "pool-dilation-padding": ModelConfig(
        (2, 9, 9), 3, (Conv(3, 2), Sw(0.05), Max(3, 2, padding=1, dilation=2), Flat())
    ),
    "leaky": ModelConfig(
        (1, 8, 8),
        3,
        (Conv(4, 3, padding=1), Sw(0.1), Max(2), Conv(4, 3), Sw(0.2), Flat(), Dense(6), Sw(0.01)),
    ),
    "avgpool": ModelConfig(
        (3, 9, 9),
        4,
        (
            Conv(4, 3),
            Sw(),
            Avg(2, 1),
            Conv(5, 2, stride=2),
            Sw(),
            Avg(3, 2, 1, count_include_pad=False),
            Flat(),
        ),
    ),
    "avgpool-divisor": ModelConfig(
        (1, 8, 8), 2, (Conv(2, 3, padding=1), Avg(2, divisor_override=3), Sw(), Max(2), Flat())
    ),
    "pool-before-switch": ModelConfig(
        (1, 8, 8), 3, (Conv(3, 3), Max(2), Sw(), Conv(3, 2), Conv(2, 1), Sw(), Flat())
    ),
    "dense-only": ModelConfig((1, 4, 5), 3, (Flat(), Dense(8), Sw(), Dense(6), Sw(0.3), Dense(5))),
}

# Tiny architectures for brute-force enumeration (at most ~3e4 configurations each).
TINY_ARCHITECTURES: dict[str, ModelConfig] = {
    "conv-relu-pool": ModelConfig((1, 3, 3), 3, (Conv(2, 2), Sw(), Max(2, 1), Flat())),
    "padding-stride": ModelConfig(
        (1, 4, 4),
        3,
        (Conv(1, 3, stride=2, padding=1), Sw(), Max(2, 1, padding=1), Flat(), Dense(2), Sw()),
    ),
    "overlapping-leaky": ModelConfig((1, 3, 4), 3, (Conv(1, 2), Sw(0.1), Max(2, 1), Flat())),
    "avgpool-dense": ModelConfig(
        (1, 4, 4), 3, (Conv(1, 2), Sw(), Avg(2, 1), Flat(), Dense(2), Sw(0.2))
    ),
    "dilation-ceil": ModelConfig(
        (1, 5, 5), 3, (Conv(1, 2, dilation=2), Sw(), Max(2, 2, ceil_mode=True), Flat())
    ),
    "two-levels": ModelConfig(
        (1, 4, 4), 3, (Conv(2, 2, stride=2), Sw(), Conv(1, 2), Sw(), Flat(), Dense(2), Sw())
    ),
    "groups": ModelConfig((2, 3, 3), 2, (Conv(2, 2, groups=2), Sw(), Max(2), Flat())),
    "pool-then-switch": ModelConfig(
        (1, 4, 4), 3, (Conv(1, 2), Max(2, 1), Sw(0.1), Flat(), Dense(2), Sw())
    ),
}


def build(config: ModelConfig, seed: int = 0, nonnegative: bool = False) -> drm.DeepRenderingModel:
    """A float64 model with random templates and a random class prior.

    With `nonnegative`, every template above the first latent level (class templates included)
    is made non-negative, the sufficient condition for exact max-sum (E3).
    """
    model = drm.DeepRenderingModel.from_config(config, seed=seed, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        model.classes.bias.copy_(
            torch.randn(model.num_classes, generator=generator, dtype=torch.float64)
        )
        if nonnegative:
            first_latent = min(model.latent_levels)
            for i, level in enumerate(model.levels):
                if i > first_latent and isinstance(level, (drm.Conv, drm.Dense)):
                    level.weight.abs_()
    return model


def images(model: drm.DeepRenderingModel, batch: int, seed: int = 0) -> torch.Tensor:
    """Random images (B, C0, H, W) in the model's dtype, drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.input_shape, generator=generator, dtype=torch.float64).to(
        model.device, model.dtype
    )
