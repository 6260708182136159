"""The Deep Rendering Model: top-down rendering and the log-joint.

The model class is `drm.deep_model.DeepRenderingModel` (re-exported here with `Latents`); its
arguments are checked by `drm.checks`, once per public function, which then calls the unchecked
walks (`propagate_down`, `walk_down`, `unchecked_rendering_terms`).

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
from collections.abc import Callable

import torch
from torch import Tensor

from drm.checks import check_classes, check_images, check_latents, check_switch_rule
from drm.deep_model import DeepRenderingModel, Latents
from drm.levels import AvgPool, MaxPool, SwitchRule

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
    rule = check_switch_rule(rule)
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
    classes = check_classes(model, classes)
    return unchecked_rendering_terms(
        model, classes, check_latents(model, latents, classes.shape[0])
    )


def unchecked_rendering_terms(
    model: DeepRenderingModel, classes: Tensor, latents: Latents
) -> tuple[Tensor, Tensor]:
    """`rendering_terms` without its input checks, for checked inputs."""
    signals = propagate_down(model, classes, latents)
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
    latents = check_latents(model, latents, x.shape[0])
    mu = unchecked_rendering_terms(model, classes, latents)[0]
    return gaussian_log_likelihood(model, x, mu) + factorized_log_prior(model, classes, latents)


def log_joint(model: DeepRenderingModel, x: Tensor, classes: Tensor, latents: Latents) -> Tensor:
    """log p(x, c, z) + log Z under the CNN prior, from the top-down rendering only: (B,).

    Args:
        x: (B, C0, H, W) images.
        classes: (B,) int64 classes.
        latents: latents of B images (one entry per level).
    """
    x = check_images(model, x)
    classes = check_classes(model, classes, x.shape[0])
    latents = check_latents(model, latents, x.shape[0])
    mu, log_prior = unchecked_rendering_terms(model, classes, latents)
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
    "factorized_log_joint",
    "factorized_log_prior",
    "gaussian_log_joint",
    "gaussian_log_likelihood",
    "log_joint",
    "logit_offset",
    "render",
    "rendering_terms",
    "top_down",
    "unchecked_rendering_terms",
]
