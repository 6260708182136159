"""The Deep Rendering Model: top-down rendering, the log-joint, and ancestral sampling.

Rendering, coarse to fine (DESIGN section 3, docs/equivalence.md eq. 1-3): start from the one-hot
class indicator at the top, walk the levels from the class templates down to the pixels, each level
passing the signal through its top-down rendering (`Level.top_down`); the signal that reaches the
pixels is h^(0), and the rendered image is mu(c, z) = sigma^2 * h^(0).

The log-joint under the CNN prior (eq. 4), up to the normaliser log Z that depends on nothing,

    log p(x, c, z) + log Z = -||x - mu||^2 / (2 sigma^2) - (D/2) log(2 pi sigma^2)
                             + log pi_c + ||mu||^2 / (2 sigma^2) + sum_l <b^(l), v^(l)>,

is computed here from the top-down rendering alone (no conv2d, ReLU or max-pool), so that it is an
independent definition against which `drm.max_sum` (the CNN's forward pass) is tested.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Ho, Nguyen, Patel et al., Neural Rendering Model, arXiv:1811.02657 (2018) (the CNN prior).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from drm.config import ModelConfig
from drm.levels import (
    SWITCH_RULES,
    AvgPool,
    Classes,
    Level,
    LevelStack,
    MaxPool,
    SwitchRule,
    check_level_list,
    init_level,
)

# One entry per level of the model: the level's latent tensor, or None for levels without one.
Latents = tuple[Tensor | None, ...]


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


# --- input validation ------------------------------------------------------------------------


def check_images(model: DeepRenderingModel, x: object, name: str = "x") -> Tensor:
    """Return `x` if it is a batch of images the model accepts, else raise a clear error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != model.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the model is {model.dtype}; convert one of them "
            f"(e.g. x.to({model.dtype}) or model.to({x.dtype}))"
        )
    if x.device != model.device:
        raise ValueError(f"{name} is on {x.device} but the model is on {model.device}")
    if x.ndim != 4 or tuple(x.shape[1:]) != model.input_shape:
        expected = "(B, {}, {}, {})".format(*model.input_shape)
        if x.ndim == 4 and x.shape[1] != model.input_shape[0]:
            raise ValueError(
                f"{name} has {x.shape[1]} channels but the model expects {model.input_shape[0]}: "
                f"expected shape {expected}, got {tuple(x.shape)}"
            )
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    # One cheap reduction first: a sum is finite unless some entry is NaN/inf (or it overflows,
    # which the exact elementwise check then clears).
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_classes(model: DeepRenderingModel, classes: object, batch: int | None = None) -> Tensor:
    """Return `classes` if it is a (B,) int64 tensor of valid class indices."""
    if not isinstance(classes, Tensor):
        raise TypeError(f"classes must be a torch.Tensor, got {type(classes).__name__}")
    if classes.dtype != torch.long:
        raise TypeError(f"classes must be an int64 tensor, got dtype {classes.dtype}")
    if classes.ndim != 1 or (batch is not None and classes.shape[0] != batch):
        want = "(B,)" if batch is None else f"({batch},)"
        raise ValueError(f"classes must have shape {want}, got {tuple(classes.shape)}")
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= model.num_classes):
        raise ValueError(
            f"class index out of range: classes must lie in [0, {model.num_classes}), got "
            f"values in [{int(classes.min())}, {int(classes.max())}]"
        )
    return classes.to(model.device)


def check_latents(model: DeepRenderingModel, latents: object, batch: int) -> Latents:
    """Return `latents` if it holds one valid latent per latent level (None elsewhere)."""
    if not isinstance(latents, (tuple, list)) or len(latents) != len(model.levels):
        raise ValueError(
            f"latents must be a sequence with one entry per level ({len(model.levels)}), as "
            "returned by drm.max_sum"
        )
    for i, (level, latent) in enumerate(zip(model.levels, latents, strict=True)):
        if not level.has_latent:
            if latent is not None:
                raise ValueError(f"latents[{i}] must be None: {type(level).__name__} has none")
            continue
        if not isinstance(latent, Tensor):
            raise TypeError(f"latents[{i}] must be a tensor for {type(level).__name__}")
        try:
            level.check_latent(latent, batch)
        except (TypeError, ValueError) as err:
            raise type(err)(f"latents[{i}]: {err}") from err
    return tuple(latents)


# --- top-down rendering ------------------------------------------------------------------------


def top_down(
    model: DeepRenderingModel, classes: Tensor, latents: Latents, rule: SwitchRule = "drm"
) -> list[Tensor]:
    """The top-down signals at every level boundary, rendered from the class indicator.

    Args:
        classes: (B,) int64.
        latents: one entry per level, as returned by `drm.max_sum`.
        rule: "drm" renders with the switch states (the model's rendering, equal to the input
            gradient of the logit, E6); "deconvnet" and "guided" are Zeiler's deconvnet and guided
            backpropagation, the same pass with other switch rules.

    Returns:
        signals: list of len(levels) + 1 tensors; signals[i] (B, *levels[i].in_shape) arrives at
        the input of level i, signals[-1] is the one-hot class indicator (B, C), and
        signals[0] = h^(0), the rendered image divided by sigma^2.
    """
    if rule not in SWITCH_RULES:
        raise ValueError(f"rule must be one of {SWITCH_RULES}, got {rule!r}")
    classes = check_classes(model, classes)
    latents = check_latents(model, latents, classes.shape[0])
    return propagate_down(model, classes, latents, rule)


def propagate_down(
    model: DeepRenderingModel,
    classes: Tensor,
    latents: Latents,
    rule: SwitchRule = "drm",
    *,
    stop: int = 0,
) -> list[Tensor]:
    """`top_down` without its input checks, for inner loops whose inputs are already valid.

    Args:
        stop: in [0, len(levels)]; render only through levels[stop:], coarse to fine. The result
            is `top_down`'s list from index `stop` on: result[k] arrives at the input of level
            stop + k, result[-1] is the one-hot class indicator (stop = 0: the whole list).
    """
    count = len(model.levels)
    if not 0 <= stop <= count:
        raise ValueError(f"stop must lie in [0, {count}], got {stop}")
    g = torch.nn.functional.one_hot(classes, model.num_classes).to(model.dtype)
    return walk_down(model, g, latents, count - 1, stop, rule)


def walk_down(
    model: DeepRenderingModel,
    signal: Tensor,
    latents: Latents,
    start: int,
    stop: int = 0,
    rule: SwitchRule = "drm",
    choose: Callable[[int, Tensor], Tensor | None] | None = None,
) -> list[Tensor]:
    """The one top-down walk (no input checks): levels start, start - 1, ..., stop.

    Every top-down pass of the library is a call to this function.

    Args:
        signal: the signal at level `start`'s output (start = len(levels) - 1: the one-hot class
            indicator; start = stop - 1: nothing to walk).
        latents: one entry per level; level j renders with latents[j].
        choose: if given, called as choose(j, g) with the signal g at level j's output before
            level j renders it; its return value replaces latents[j] (coordinate ascent).

    Returns:
        signals: result[k] arrives at the input of level stop + k; result[-1] is `signal`.
    """
    g = signal
    signals = [g]
    for j in range(start, stop - 1, -1):
        latent = latents[j] if choose is None else choose(j, g)
        g = model.levels[j].top_down(g, latent, rule)
        signals.append(g)
    signals.reverse()
    return signals


def rendering_terms(
    model: DeepRenderingModel, classes: Tensor, latents: Latents
) -> tuple[Tensor, Tensor]:
    """The rendered image and the CNN log-prior of each configuration (eq. 3 and 4).

    Returns:
        mu: (B, C0, H, W), the rendered image mu(c, z) = sigma^2 h^(0).
        log_prior: (B,), log pi_c + sum_l <b^(l), v^(l)>, without the ||mu||^2 term.
    """
    signals = top_down(model, classes, latents)
    log_prior = sum(
        (level.prior_term(out) for level, out in zip(model.levels, signals[1:], strict=True)),
        start=signals[0].new_zeros(signals[0].shape[0]),
    )
    return model.sigma2 * signals[0], log_prior


def render(model: DeepRenderingModel, classes: Tensor, latents: Latents) -> Tensor:
    """The rendered image mu(c, z): (B, C0, H, W) for classes (B,) and latents of B images."""
    return rendering_terms(model, classes, latents)[0]


def gaussian_log_joint(
    model: DeepRenderingModel, x: Tensor, mu: Tensor, log_prior: Tensor
) -> Tensor:
    """The log-joint (eq. 4) from a rendering: x, mu (..., C0, H, W), log_prior (...) -> (...)."""
    energy = (mu**2).sum(tuple(range(-len(model.input_shape), 0)))
    return gaussian_log_likelihood(model, x, mu) + energy / (2 * model.sigma2) + log_prior


def gaussian_log_likelihood(model: DeepRenderingModel, x: Tensor, mu: Tensor) -> Tensor:
    """log N(x; mu, sigma^2 I) per image: x, mu (..., C0, H, W) -> (...).

    The pixel term of the log-joint under either prior: -||x - mu||^2 / (2 sigma^2) -
    (D/2) log(2 pi sigma^2). Differentiable in x, mu and sigma^2.
    """
    dims = model.input_shape
    reduce = tuple(range(-len(dims), 0))
    residual = ((x - mu) ** 2).sum(reduce)
    return -residual / (2 * model.sigma2) - 0.5 * math.prod(dims) * torch.log(
        2 * math.pi * model.sigma2
    )


def factorized_log_prior(model: DeepRenderingModel, classes: Tensor, latents: Latents) -> Tensor:
    """log pi_c + sum_l log p(z_l) under the factorized prior (no input checks): (B,).

    Each switch unit is ON with its level's prior_on, independently; each translation is uniform
    over its window (DESIGN section 3, the 2015 paper's generative prior).
    """
    total = model.class_log_prior[classes]
    for level, latent in zip(model.levels, latents, strict=True):
        if level.has_latent:
            assert latent is not None
            total = total + level.factorized_log_prior(latent, model.dtype)
    return total


def factorized_log_joint(
    model: DeepRenderingModel, x: Tensor, classes: Tensor, latents: Latents
) -> Tensor:
    """log p(x, c, z) under the factorized prior (normalised: no log Z), per image: (B,).

        log p(x, c, z) = log N(x; mu(c, z), sigma^2 I) + log pi_c + sum_l log p(z_l).

    Unlike the CNN prior of `log_joint`, this is the prior that `drm.sample` draws from; its MAP
    over z is not the CNN's forward pass.

    Args:
        x: (B, C0, H, W) images.
        classes: (B,) int64 classes.
        latents: latents of B images (one entry per level).
    """
    x = check_images(model, x)
    classes = check_classes(model, classes, x.shape[0])
    mu = render(model, classes, latents)
    return gaussian_log_likelihood(model, x, mu) + factorized_log_prior(model, classes, latents)


def log_joint(model: DeepRenderingModel, x: Tensor, classes: Tensor, latents: Latents) -> Tensor:
    """log p(x, c, z) + log Z under the CNN prior, from the top-down rendering only: (B,).

    Args:
        x: (B, C0, H, W) images.
        classes: (B,) int64 classes.
        latents: latents of B images (one entry per level).
    """
    x = check_images(model, x)
    mu, log_prior = rendering_terms(model, check_classes(model, classes, x.shape[0]), latents)
    return gaussian_log_joint(model, x, mu, log_prior)


def logit_offset(model: DeepRenderingModel, x: Tensor) -> Tensor:
    """||x||^2 / (2 sigma^2) + (D/2) log(2 pi sigma^2): (B,).

    log_joint(x, c, z) + logit_offset(x) is the CNN logit of class c with latents frozen at z
    (E1); it depends on neither c nor z, so it changes no arg-max and no softmax.
    """
    x = check_images(model, x)
    num_pixels = math.prod(model.input_shape)
    return (x**2).flatten(1).sum(1) / (2 * model.sigma2) + 0.5 * num_pixels * torch.log(
        2 * math.pi * model.sigma2
    )


__all__ = [
    "AvgPool",
    "DeepRenderingModel",
    "Latents",
    "MaxPool",
    "check_classes",
    "check_images",
    "check_latents",
    "factorized_log_joint",
    "factorized_log_prior",
    "gaussian_log_joint",
    "gaussian_log_likelihood",
    "log_joint",
    "logit_offset",
    "render",
    "rendering_terms",
    "top_down",
]
