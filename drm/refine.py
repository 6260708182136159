"""Inference beyond the CNN: coordinate ascent on the latents, level by level (top-down E-step).

Bottom-up max-sum (the CNN) chooses every latent from below only: a switch is ON when its
pre-activation is positive, a pooled unit takes its largest cell. That is the exact maximiser of
the log-joint when every top-down signal is non-negative (E3), and a lower bound otherwise (E4).

With the class and every other latent fixed, the score of a configuration (docs/equivalence.md,
eq. 5) is affine in the output of any one level: score = <h, F(y; z_l)> + const, where y is that
level's bottom-up input (a function of the latents below, fixed), h the top-down signal reaching
its output (a function of the class and the latents above, fixed) and F the level's map with its
own latent z_l. That is separable over the level's units, so the best z_l given the rest is
exact and cheap (each level's `best_latent`):

    switch a_j:      ON  iff  h_j u_j > 0          (max of h_j a u_j over a in {alpha, 1})
    translation t_p:  t_p = argmax_{t in window} h_p y_t   (argmin of y when h_p < 0)

`refine_latents` sweeps the latent levels coarse to fine (re-choosing lower latents given upper
ones: the top-down pass the CNN's E-step lacks), starting from the CNN's latents, until a sweep
changes nothing. Every update can only raise the log-joint, so the result lies between max-sum and
the exact MAP (`drm.exact_map`), and it equals max-sum whenever E3's condition holds.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016 (the
    discriminative EM's "no coarse-to-fine pass in the E-step").
"""

from __future__ import annotations

import torch
from torch import Tensor

from drm.checks import check_classes, check_images, check_max_sweeps
from drm.inference import latents_or_max_sum, propagate_up, walk_up
from drm.levels import Level
from drm.model import DeepRenderingModel, Latents, walk_down


def level_inputs(model: DeepRenderingModel, x: Tensor, latents: Latents) -> list[Tensor]:
    """The bottom-up input of every level with the latents frozen (no input checks)."""
    return walk_up(model, x, latents, record_inputs=True).inputs


def refine_latents(
    model: DeepRenderingModel,
    x: Tensor,
    classes: Tensor,
    latents: Latents | None = None,
    max_sweeps: int = 20,
) -> tuple[Latents, Tensor, int]:
    """Coordinate ascent on log p(x, c, z) over z, level by level, coarse to fine.

    Args:
        x: (B, C0, H, W) images.
        classes: (B,) the class of each image (held fixed).
        latents: the starting point; default the CNN's (`drm.max_sum`).
        max_sweeps: stop after this many sweeps even if the latents still change.

    Returns:
        latents: the refined latents.
        scores: (B,) their score on the CNN logit scale (log_joint + logit_offset).
        sweeps: the number of sweeps run (the last one changed nothing, unless max_sweeps hit).
    """
    x = check_images(model, x)
    classes = check_classes(model, classes, x.shape[0])
    check_max_sweeps(max_sweeps)
    with torch.no_grad():
        start = latents_or_max_sum(model, x, latents)
    return coordinate_ascent(model, x, classes, start, max_sweeps)


def coordinate_ascent(
    model: DeepRenderingModel, x: Tensor, classes: Tensor, latents: Latents, max_sweeps: int
) -> tuple[Latents, Tensor, int]:
    """`refine_latents` without its input checks, from given latents, for checked inputs."""
    with torch.no_grad():
        current = list(latents)
        inputs: list[Tensor] = []
        changed = False

        def choose(index: int, g: Tensor) -> Tensor | None:
            """Re-choose level `index`'s latent given the signal g from above (ties: keep)."""
            nonlocal changed
            level = model.levels[index]
            if level.has_latent:
                previous = current[index]
                assert previous is not None
                choice = level.best_latent(inputs[index], g)
                if not torch.equal(choice, previous):
                    # keep the previous choice wherever the new one is no better (ties):
                    # the score then never decreases and the sweeps terminate
                    better = _unit_gain(level, inputs[index], g, choice) > _unit_gain(
                        level, inputs[index], g, previous
                    )
                    if bool(better.any()):
                        current[index] = torch.where(better, choice, previous)
                        changed = True
            return current[index]

        top = torch.nn.functional.one_hot(classes, model.num_classes).to(model.dtype)
        sweeps = 0
        for sweeps in range(1, max_sweeps + 1):  # noqa: B007 - reported below
            changed = False
            # A coarse-to-fine sweep changes latents only above the level it is at, so the
            # bottom-up inputs computed at its start stay valid throughout, and the top-down
            # signal is carried down level by level: one pass each way per sweep.
            inputs = level_inputs(model, x, tuple(current))
            walk_down(model, top, tuple(current), len(model.levels) - 1, 0, "drm", choose)
            if not changed:
                break
        refined = tuple(current)
        scores = propagate_up(model, x, refined).gather(1, classes[:, None])[:, 0]
    return refined, scores, sweeps


def _unit_gain(level: Level, y: Tensor, h: Tensor, latent: Tensor) -> Tensor:
    """h * F(y; z), unit by unit: the part of the score that this level's latent controls."""
    return h * level.bottom_up_frozen(y, latent)


def inference_gap_lower_bound(
    model: DeepRenderingModel, x: Tensor, classes: Tensor | None = None, max_sweeps: int = 20
) -> Tensor:
    """How much refinement raises the log-joint above max-sum's latents: (B,), >= 0.

    The exact inference gap max_z log p(x, c, z) - log p(x, c, z*) (E4) needs enumeration,
    which only tiny models allow; refining z* (`refine_latents`) climbs towards the MAP, so the
    rise it finds is a certified lower bound on the gap, 0 when E3's condition holds.

    Args:
        x: (B, C0, H, W) images.
        classes: (B,) the class of each image; default max-sum's predicted class.
    """
    x = check_images(model, x)
    with torch.no_grad():
        scores, latents, _ = walk_up(model, x)
        if classes is None:
            classes = scores.argmax(1)
        classes = check_classes(model, classes, x.shape[0])
        check_max_sweeps(max_sweeps)
        _, refined, _ = coordinate_ascent(model, x, classes, latents, max_sweeps)
        # max-sum's score by the same frozen-latent arithmetic as the refined one: where the
        # refinement changed nothing the two are the same numbers, and the gap is exactly 0
        start = propagate_up(model, x, latents).gather(1, classes[:, None])[:, 0]
        return refined - start
