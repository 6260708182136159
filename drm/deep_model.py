"""The `DeepRenderingModel` class: the parameters of a Deep Rendering Model and what they fix.

The class holds the levels (fine to coarse, the class templates last) and the pixel noise
sigma^2, checks them once at construction, and answers for their shapes, dtype, device,
architecture (`config`) and the exactness condition of max-sum. What is computed with a model
(rendering, the log-joint: `drm.model`; inference: `drm.inference`) lives elsewhere, after the
argument checks of `drm.checks`, which need this class and so sit between the two
(levels -> deep_model -> checks -> model). `drm.model` re-exports `DeepRenderingModel` and
`Latents`, and `drm.DeepRenderingModel` is the same class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from drm.config import ModelConfig
from drm.levels import Classes, Level, LevelStack, check_level_list, init_level

# One entry per level of the model: the level's latent tensor, or None for levels without one.
Latents = tuple[Tensor | None, ...]


def select_latents(latents: Latents, index: Tensor | slice) -> Latents:
    """The latents of the images that `index` (a mask, indices or a slice of the batch) picks."""
    return tuple(None if z is None else z[index] for z in latents)


class DeepRenderingModel(nn.Module):
    """A hierarchical rendering model: hidden levels (fine to coarse), then the class templates.

    Args:
        input_shape: (C0, H, W) of one image.
        levels: the levels bottom-up, the last one a `Classes` level.
        sigma2: pixel noise variance sigma^2 > 0.

    The model holds parameters, not data; inference, rendering and sampling are the functions of
    this package (`drm.max_sum`, `drm.render`, `drm.log_joint`, `drm.sample`, `drm.exact_map`).
    """

    def __init__(
        self, input_shape: Sequence[int], levels: Sequence[Level], sigma2: float = 1.0
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {shape}")
        check_level_list(levels)
        if not (math.isfinite(float(sigma2)) and float(sigma2) > 0):
            raise ValueError(f"sigma2 must be finite and > 0, got {sigma2}")
        for i, level in enumerate(levels):
            for name, tensor in level.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    kind = type(level).__name__
                    raise ValueError(f"levels[{i}].{name} ({kind}) holds NaN or inf")
        self.input_shape: tuple[int, int, int] = (shape[0], shape[1], shape[2])
        self.levels = LevelStack(levels)
        current: tuple[int, ...] = shape
        for i, level in enumerate(levels):
            try:
                current = level.bind(current)
            except ValueError as err:
                raise ValueError(f"levels[{i}] ({type(level).__name__}): {err}") from err
        dtype = levels[-1].templates.dtype
        self.register_buffer("sigma2", torch.tensor(float(sigma2), dtype=dtype))
        self.sigma2: Tensor

    @classmethod
    def from_config(
        cls, config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> DeepRenderingModel:
        """A model with random templates (fan-in uniform, as torch initialises layers).

        Class templates are random too and the class prior is uniform.
        """
        generator = torch.Generator().manual_seed(seed)
        levels: list[Level] = []
        shape: tuple[int, ...] = config.input_shape
        for i, spec in enumerate(config.levels):
            try:
                level = init_level(spec, shape, generator, dtype)
                shape = level.bind(shape)
            except ValueError as err:
                raise ValueError(f"levels[{i}] ({type(spec).__name__}): {err}") from err
            levels.append(level)
        if len(shape) != 1:
            raise ValueError(
                f"the last hidden level outputs shape {shape}; the class templates need a "
                "vector: end the levels with FlattenSpec or DenseSpec"
            )
        bound = 1.0 / math.sqrt(shape[0])
        templates = (
            torch.rand(config.num_classes, shape[0], generator=generator, dtype=dtype) * 2 - 1
        ) * bound
        levels.append(Classes(templates, torch.zeros(config.num_classes, dtype=dtype)))
        return cls(config.input_shape, levels, config.sigma2)

    @property
    def config(self) -> ModelConfig:
        """The architecture of this model (no tensors)."""
        return ModelConfig(
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            levels=tuple(level.spec for level in list(self.levels)[:-1]),
            sigma2=float(self.sigma2),
        )

    @property
    def classes(self) -> Classes:
        """The top level."""
        return cast(Classes, self.levels[-1])  # checked at construction

    @property
    def num_classes(self) -> int:
        return int(self.classes.weight.shape[0])

    @property
    def class_templates(self) -> Tensor:
        """mu_c, one row per class: (C, D_L)."""
        return self.classes.weight

    @property
    def class_log_prior(self) -> Tensor:
        """log pi_c: (C,)."""
        return self.classes.log_prior

    @property
    def dtype(self) -> torch.dtype:
        return self.classes.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.classes.weight.device

    @property
    def latent_levels(self) -> list[int]:
        """Indices of the levels that carry a latent (switches and translations)."""
        return [i for i, level in enumerate(self.levels) if level.has_latent]

    def exactness_violations(self) -> list[str]:
        """Why the sufficient condition for exact max-sum (E3) fails; empty when it holds.

        Max-sum is exact when every top-down signal that reaches a latent is non-negative for
        every configuration. Sufficient: the class templates and every template above the first
        latent level are non-negative, and every switch's OFF value (negative_slope) is >= 0.
        Templates below the first latent level, and all biases, may have any sign.
        """
        violations: list[str] = []
        first_latent = min(self.latent_levels, default=len(self.levels))
        for i, level in enumerate(self.levels):
            if i > first_latent:
                violations += [
                    f"levels[{i}] ({type(level).__name__}): {violation}"
                    for violation in level.exactness_violations()
                ]
        return violations

    def forward(self, x: Tensor) -> Tensor:
        raise TypeError(
            "a DeepRenderingModel is not called directly: use drm.max_sum(model, x) for the "
            "bottom-up scores, or cnn_equiv.to_cnn(model) for the equivalent CNN"
        )


__all__ = ["DeepRenderingModel", "Latents"]
