"""Bottom-up max-sum inference: the CNN's forward pass, with the MAP latents it implies.

Max-sum message passing, fine to coarse: each level maximises its message over its own latent
(ReLU = max over the switch a, max-pooling = max over the translation t) and hands the result up;
the top level adds the class log prior. The returned scores equal the logits of the equivalent CNN
(E2) and, when every top-down signal is non-negative, the exact max_z log p(x, c, z) up to a
class-independent constant (E3, tested against `drm.exact_map`).

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drm.model import (
    DeepRenderingModel,
    Latents,
    check_images,
    check_latents,
    factorized_log_prior,
    gaussian_log_likelihood,
    propagate_down,
)


def max_sum(model: DeepRenderingModel, x: Tensor) -> tuple[Tensor, Latents]:
    """Bottom-up max-sum inference.

    Args:
        model: the rendering model.
        x: (B, C0, H, W) images of the model's dtype and device.

    Returns:
        scores: (B, C), the CNN logits; log_joint(x, c, z*) + logit_offset(x) for every c.
        latents: one entry per level: the switch states (bool, shaped like the level's input)
            and translation indices (int64, shaped like the pooled output) that the CNN chose;
            None for levels without a latent.
    """
    y = check_images(model, x)
    latents: list[Tensor | None] = []
    owned = False  # y is the user's x (or a view of it) until a level returns a new tensor
    for level in model.levels:
        y, latent = level.bottom_up(y, overwrite=owned)
        latents.append(latent)
        owned = level.output_kind == "new" or (level.output_kind == "view" and owned)
    return y, tuple(latents)


def min_sum(model: DeepRenderingModel, x: Tensor) -> tuple[Tensor, Latents]:
    """Bottom-up min-sum: each level minimises its message over its own latent.

    The "min" branch of the Neural Rendering Model's max-min network (Ho et al. 2018): the CNN
    with every ReLU u -> max(0, u) replaced by min(0, u) (LeakyReLU: -LeakyReLU(-u)) and every
    max-pooling by min-pooling, sharing the weights. Returns (scores (B, C), arg-min latents), the
    frozen-latent scores at those latents (`frozen_scores`).
    """
    y = check_images(model, x)
    latents: list[Tensor | None] = []
    for level in model.levels:
        y, latent = level.bottom_up_min(y)
        latents.append(latent)
    return y, tuple(latents)


def frozen_scores(model: DeepRenderingModel, x: Tensor, latents: Latents) -> Tensor:
    """The CNN with every ReLU mask and pool index frozen at `latents`: (B, C) logits.

    With latents frozen the network is affine in x; at the latents of `max_sum` it is the CNN
    (the scores are equal), and its gradients are those of the CNN (E9).
    """
    y = check_images(model, x)
    return propagate_up(model, y, check_latents(model, latents, y.shape[0]))


def propagate_up(model: DeepRenderingModel, x: Tensor, latents: Latents) -> Tensor:
    """`frozen_scores` without its input checks, for inner loops whose inputs are valid."""
    y = x
    for level, latent in zip(model.levels, latents, strict=True):
        y = level.bottom_up_frozen(y, latent)
    return y


def latents_or_max_sum(
    model: DeepRenderingModel, x: Tensor, latents: Latents | None = None
) -> Latents:
    """The given `latents`, checked for a batch of x.shape[0] images, or else `max_sum`'s of x."""
    if latents is None:
        return max_sum(model, x)[1]
    return check_latents(model, latents, x.shape[0])


def generative_scores(
    model: DeepRenderingModel, x: Tensor, latents: Latents | None = None
) -> Tensor:
    """log p(x, c, z*) under the factorized prior for every class c: (B, C).

    The generative classifier: every class is rendered through the same latents z* (default
    max-sum's) and scored by its Gaussian likelihood and prior,
    log N(x; mu(c, z*), sigma^2 I) + log pi_c + log p(z*); its arg-max over c is the class whose
    rendering best explains the image. The CNN's scores (`max_sum`) are instead the log-joint
    under the CNN prior, whose ||mu||^2 / (2 sigma^2) term rewards bright renderings.
    """
    x = check_images(model, x)
    latents = latents_or_max_sum(model, x, latents)
    columns = []
    for c in range(model.num_classes):
        classes = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
        mu = model.sigma2 * propagate_down(model, classes, latents)[0]
        prior = factorized_log_prior(model, classes, latents)
        columns.append(gaussian_log_likelihood(model, x, mu) + prior)
    return torch.stack(columns, 1)
