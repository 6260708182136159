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

from typing import NamedTuple

import torch
from torch import Tensor

from drm.checks import check_images, check_latents
from drm.model import (
    DeepRenderingModel,
    Latents,
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
    walk = walk_up(model, check_images(model, x))
    return walk.output, walk.latents


def min_sum(model: DeepRenderingModel, x: Tensor) -> tuple[Tensor, Latents]:
    """Bottom-up min-sum: each level minimises its message over its own latent.

    The "min" branch of the Neural Rendering Model's max-min network (Ho et al. 2018): the CNN
    with every ReLU u -> max(0, u) replaced by min(0, u) (LeakyReLU: -LeakyReLU(-u)) and every
    max-pooling by min-pooling, sharing the weights. Returns (scores (B, C), arg-min latents), the
    frozen-latent scores at those latents (`frozen_scores`).
    """
    walk = walk_up(model, check_images(model, x), minimize=True)
    return walk.output, walk.latents


def frozen_scores(model: DeepRenderingModel, x: Tensor, latents: Latents) -> Tensor:
    """The CNN with every ReLU mask and pool index frozen at `latents`: (B, C) logits.

    With latents frozen the network is affine in x; at the latents of `max_sum` it is the CNN
    (the scores are equal), and its gradients are those of the CNN (E9).
    """
    y = check_images(model, x)
    return propagate_up(model, y, check_latents(model, latents, y.shape[0]))


def propagate_up(model: DeepRenderingModel, x: Tensor, latents: Latents) -> Tensor:
    """`frozen_scores` without its input checks, for inner loops whose inputs are valid."""
    return walk_up(model, x, latents).output


class UpWalk(NamedTuple):
    """Result of `walk_up`.

    Attributes:
        output: the message at the output of the last level walked (the scores for all levels).
        latents: the latents walked with: the given ones, or those chosen on the way (one entry
            per level walked).
        inputs: the bottom-up input of every level walked (empty unless `record_inputs`).
    """

    output: Tensor
    latents: Latents
    inputs: list[Tensor]


def walk_up(
    model: DeepRenderingModel,
    x: Tensor,
    latents: Latents | None = None,
    stop: int | None = None,
    record_inputs: bool = False,
    *,
    minimize: bool = False,
    start: int = 0,
) -> UpWalk:
    """The one bottom-up walk (no input checks): levels start, ..., stop - 1 (default: all).

    Every bottom-up pass over a rendering model's levels is a call to this function.

    Args:
        x: (B, C0, H, W) images, already checked.
        latents: None: max-sum, each level chooses its latent (`Level.bottom_up`); else the
            latents are frozen (`Level.bottom_up_frozen`), one entry per level.
        stop: walk levels[:stop]; None walks them all.
        record_inputs: also return the bottom-up input of every level walked.
        minimize: with latents None, min-sum instead (`Level.bottom_up_min`, `min_sum`).
        start: with frozen latents only, walk from level `start`, x being its input (the
            frozen-latent network above a level, `drm.m_steps`).
    """
    levels = list(model.levels) if stop is None else list(model.levels)[:stop]
    inputs: list[Tensor] = []
    y = x
    if latents is not None:
        for index, level in enumerate(levels[start:], start):
            if record_inputs:
                inputs.append(y)
            y = level.bottom_up_frozen(y, latents[index])
        return UpWalk(y, latents, inputs)
    if start:
        raise ValueError("walk_up: start > 0 needs frozen latents")
    chosen: list[Tensor | None] = []
    owned = False  # y is the user's x (or a view of it) until a level returns a new tensor
    for level in levels:
        if record_inputs:
            inputs.append(y)
        if minimize:
            y, latent = level.bottom_up_min(y)
            chosen.append(latent)
            continue
        # a recorded input must survive the walk: no level may then reuse its memory
        y, latent = level.bottom_up(y, overwrite=owned and not record_inputs)
        chosen.append(latent)
        owned = level.output_kind == "new" or (level.output_kind == "view" and owned)
    return UpWalk(y, tuple(chosen), inputs)


def latents_or_max_sum(
    model: DeepRenderingModel, x: Tensor, latents: Latents | None = None
) -> Latents:
    """The given `latents`, checked for a batch of x.shape[0] images, or else `max_sum`'s of x.

    x must already be checked (`check_images`): the caller checks it once.
    """
    if latents is None:
        return walk_up(model, x).latents
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
