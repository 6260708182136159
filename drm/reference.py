"""Exact oracles by brute-force enumeration of every latent configuration (tiny models only).

`exact_map` scores every (c, z) with the top-down rendering and the log-joint alone
(`drm.model.rendering_terms`, `drm.model.gaussian_log_joint`): no conv2d, no ReLU, no max-pool.
It is the independent oracle against which bottom-up max-sum (the CNN) is tested: equal when every
top-down signal is non-negative (E3), a lower bound otherwise (E4).

A configuration is addressed by a mixed-radix integer: every latent unit of every latent level is
one digit, with as many states as the unit has (2 for a switch, the window's cell count for a
translation); `Level.latent_from_digits` turns digits into latent tensors.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from drm.checks import check_classes, check_images
from drm.model import (
    DeepRenderingModel,
    Latents,
    gaussian_log_joint,
    unchecked_rendering_terms,
)

DEFAULT_MAX_CONFIGURATIONS = 1_000_000
# Elements per chunk of the (images x configurations x classes x pixels) residual tensor.
_CHUNK_ELEMENTS = 1 << 22


def num_configurations(model: DeepRenderingModel) -> int:
    """The number of latent configurations z (classes not counted): a Python int, exact."""
    total = 1
    for i in model.latent_levels:
        total *= math.prod(model.levels[i].latent_counts().tolist())
    return total


def configurations(model: DeepRenderingModel, index: Tensor) -> Latents:
    """Latents for configuration numbers `index` (N,) int64, in [0, num_configurations)."""
    latents: list[Tensor | None] = [None] * len(model.levels)
    place = torch.ones((), dtype=torch.long)
    for i in model.latent_levels:
        level = model.levels[i]
        counts = level.latent_counts()  # (U,)
        # place value of each digit: product of the radices before it
        places = place * torch.cumprod(torch.cat([counts.new_ones(1), counts[:-1]]), 0)
        digits = (index.cpu()[:, None] // places[None, :]) % counts[None, :]
        latents[i] = level.latent_from_digits(digits.to(model.device))
        place = places[-1] * counts[-1]
    return tuple(latents)


def _check_size(model: DeepRenderingModel, max_configurations: int) -> int:
    total = num_configurations(model)
    if total > max_configurations:
        per_level = ", ".join(
            f"levels[{i}] ({type(model.levels[i]).__name__}): "
            f"{math.prod(model.levels[i].latent_counts().tolist())}"
            for i in model.latent_levels
        )
        raise ValueError(
            f"the model has {total} latent configurations ({per_level}), above "
            f"max_configurations={max_configurations}; brute force is for tiny models: use a "
            "smaller model or raise max_configurations"
        )
    return total


def _rendered_chunks(
    model: DeepRenderingModel, total: int, chunk: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (start, mu (n, C, C0, H, W), log_prior (n, C)) for consecutive configurations."""
    num_classes = model.num_classes
    for start in range(0, total, chunk):
        index = torch.arange(start, min(total, start + chunk))
        n = index.shape[0]
        latents = tuple(
            None if z is None else z.repeat_interleave(num_classes, 0)
            for z in configurations(model, index)
        )
        classes = torch.arange(num_classes, device=model.device).repeat(n)  # config-major
        mu, log_prior = unchecked_rendering_terms(model, classes, latents)
        yield start, mu.view(n, num_classes, *model.input_shape), log_prior.view(n, num_classes)


def exact_map(
    model: DeepRenderingModel,
    x: Tensor,
    classes: Tensor | None = None,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
) -> tuple[Tensor, Latents]:
    """max_z log p(x, c, z) (+ log Z) for every class, by enumerating every configuration.

    Args:
        x: (B, C0, H, W) images.
        classes: (B,) the class whose arg-max latents to return per image; default: the MAP class.
        max_configurations: refuse (ValueError) models with more latent configurations.

    Returns:
        scores: (B, C), max over z of `drm.log_joint(model, x, c, z)`. Adding
            `drm.logit_offset(model, x)` puts them on the scale of the CNN logits.
        latents: the arg-max latents of B images for `classes` (first maximiser on ties).
    """
    x = check_images(model, x)
    total = _check_size(model, max_configurations)
    if classes is not None:
        classes = check_classes(model, classes, x.shape[0])
    return unchecked_exact_map(model, x, total, classes)


def unchecked_exact_map(
    model: DeepRenderingModel, x: Tensor, total: int, classes: Tensor | None = None
) -> tuple[Tensor, Latents]:
    """`exact_map` for checked inputs: `total` is the model's number of configurations."""
    batch, num_classes = x.shape[0], model.num_classes
    pixels = math.prod(model.input_shape)
    chunk = max(1, _CHUNK_ELEMENTS // (batch * num_classes * pixels))
    best = x.new_full((batch, num_classes), -math.inf)
    best_index = torch.zeros(batch, num_classes, dtype=torch.long, device=x.device)
    with torch.no_grad():
        for start, mu, log_prior in _rendered_chunks(model, total, chunk):
            # (B, 1, 1, C0, H, W) against (1, n, C, C0, H, W) -> (B, n, C)
            scores = gaussian_log_joint(model, x[:, None, None], mu[None], log_prior[None])
            chunk_best, arg = scores.max(1)
            better = chunk_best > best  # strict: keep the first maximiser
            best = torch.where(better, chunk_best, best)
            best_index = torch.where(better, arg + start, best_index)
    if classes is None:
        classes = best.argmax(1)
    return best, configurations(model, best_index.gather(1, classes[:, None])[:, 0])


def sample_cnn_prior(
    model: DeepRenderingModel,
    n: int,
    generator: torch.Generator | None = None,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
) -> tuple[Tensor, Latents]:
    """Exact draws of (c, z) from the CNN prior p(c, z) ∝ pi_c exp(||mu||^2/(2 sigma^2) + <b, v>).

    Enumerates every configuration, so tiny models only.
    """
    total = _check_size(model, max_configurations)
    chunk = max(1, _CHUNK_ELEMENTS // (model.num_classes * math.prod(model.input_shape)))
    parts = []
    with torch.no_grad():
        for _, mu, log_prior in _rendered_chunks(model, total, chunk):
            energy = (mu**2).flatten(2).sum(2) / (2 * model.sigma2)
            parts.append((log_prior + energy).flatten())  # config-major, class-minor
    weights = torch.softmax(torch.cat(parts).to("cpu", torch.float64), 0)
    draws = torch.multinomial(weights, n, replacement=True, generator=generator)
    classes = (draws % model.num_classes).to(model.device)
    return classes, configurations(model, draws // model.num_classes)
