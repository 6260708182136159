"""Ancestral sampling of (c, z, x) from a Deep Rendering Model, under either prior.

`sample(model, n, prior="factorized" | "cnn")`: the class from pi, the latents from the factorized
prior (each switch ON with its level's prior_on, each translation uniform) or, on tiny models,
exactly from the CNN prior of eq. 4 by enumeration (`drm.reference.sample_cnn_prior`), then
x = mu(c, z) + eps. `default_latents(model, batch)`: every level's default latent (every switch
ON, every pooled unit on the first cell of its window), the starting point of the class models.
Its own module: it uses both drm.model and drm.reference, which uses drm.model, so no module
imports in a circle.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from drm.model import DeepRenderingModel, Latents, unchecked_rendering_terms
from drm.reference import sample_cnn_prior


class Sample(NamedTuple):
    """Draws from the model: images (n, C0, H, W), classes (n,), latents of n images."""

    x: Tensor
    classes: Tensor
    latents: Latents


def sample_factorized_latents(
    model: DeepRenderingModel, n: int, generator: torch.Generator | None = None
) -> Latents:
    """Latents from the factorized prior: a ~ Bernoulli(prior_on), t uniform over its window."""
    return tuple(
        level.sample_latent(n, generator, model.device) if level.has_latent else None
        for level in model.levels
    )


def sample(
    model: DeepRenderingModel,
    n: int,
    prior: str = "factorized",
    generator: torch.Generator | None = None,
    max_configurations: int = 1_000_000,
) -> Sample:
    """Ancestral sampling of (c, z, x): x = mu(c, z) + eps, eps ~ N(0, sigma^2 I).

    Args:
        n: number of draws.
        prior: "factorized" (the 2015 paper's generative prior: c ~ pi, each switch ON with its
            level's prior_on, each translation uniform over its window; its MAP is NOT a CNN) or
            "cnn" (the CNN prior of eq. 4, whose MAP is the CNN; exact sampling by enumeration,
            so tiny models only, at most `max_configurations` latent configurations).
        generator: a CPU torch.Generator for reproducible draws.
    """
    with torch.no_grad():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if prior == "factorized":
            probs = model.class_log_prior.exp().to("cpu", torch.float64)
            classes = torch.multinomial(probs, n, replacement=True, generator=generator)
            classes = classes.to(model.device)
            latents = sample_factorized_latents(model, n, generator)
        elif prior == "cnn":
            classes, latents = sample_cnn_prior(model, n, generator, max_configurations)
        else:
            raise ValueError(f"prior must be 'factorized' or 'cnn', got {prior!r}")
        mu = unchecked_rendering_terms(model, classes, latents)[0]
        noise = torch.randn(mu.shape, generator=generator, dtype=torch.float64)
        x = mu + model.sigma2.sqrt() * noise.to(mu.device, mu.dtype)
        return Sample(x, classes, latents)


def default_latents(model: DeepRenderingModel, batch: int) -> Latents:
    """Every level's `default_latent` (every switch ON, every pooled unit on the first cell of
    its window) for `batch` images."""
    return tuple(
        level.default_latent(batch, model.device) if level.has_latent else None
        for level in model.levels
    )


__all__ = ["Sample", "default_latents", "sample", "sample_factorized_latents"]
