"""Generative detection: what the rendering model sees in clean and in attacked images.

The probabilistic view reads each image (`drm_view`): the max-sum scores, the log-joint of the
MAP configuration, how well the rendering of the predicted class explains the pixels, and how far
greedy bottom-up inference is from the best configuration (the inference gap, E4: a lower bound by
top-down coordinate ascent, `drm.refine.refine_latents`, on any model; exact by enumeration,
`cnn_equiv.compare.inference_gap`, on tiny ones). `detection_auc` and `detection_report` measure
how well each of those statistics separates adversarial from clean images (ROC AUC); the attacks
are those of `cnn_equiv.attacks` (`default_attacks`).

References:
    Hanley, McNeil, The Meaning and Use of the Area under a ROC Curve, Radiology 143, 1982.
    Goodfellow, Shlens, Szegedy, Explaining and Harnessing Adversarial Examples, ICLR 2015.
    Kurakin, Goodfellow, Bengio, Adversarial Examples in the Physical World, ICLR 2017 workshop.
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from cnn_equiv.attacks import fgsm, fool_with_template, iterative_attack, minimal_template_alpha
from cnn_equiv.compare import inference_gap
from drm.checks import (
    PixelRange,
    check_classes,
    check_images,
    check_int_at_least,
    check_labels,
    check_nonnegative,
    check_pixel_range,
)
from drm.inference import max_sum, walk_up
from drm.model import DeepRenderingModel, gaussian_log_joint, unchecked_rendering_terms
from drm.reference import DEFAULT_MAX_CONFIGURATIONS
from drm.refine import coordinate_ascent

# An attack for `detection_report`: (model, x (B, C0, H, W), y (B,)) -> adversarial x.
Attack = Callable[[DeepRenderingModel, Tensor, Tensor], Tensor]

# Each statistic of `drm_view` used for detection, with the sign that makes "larger = more
# suspicious": a low log-joint, a large reconstruction error, a large inference gap, a low
# confidence are what one expects of an image the model does not explain.
DETECTION_STATISTICS: dict[str, float] = {
    "log_joint": -1.0,
    "reconstruction_error": 1.0,
    "scaled_reconstruction_error": 1.0,
    "gap_lower_bound": 1.0,
    "max_softmax": -1.0,
}


# --- what the rendering model sees -------------------------------------------------------------


@dataclass(frozen=True)
class DRMView:
    """How the DRM sees a batch of B images (every tensor detached).

    Attributes:
        scores: (B, C) max-sum scores, the CNN's logits.
        predicted: (B,) the arg-max class.
        classes: (B,) the class each image is explained as (default `predicted`).
        max_softmax: (B,) the largest softmax probability of the scores.
        log_joint: (B,) log p(x, c, z*) + log Z at the CNN's latents z* for `classes`
            (`drm.log_joint`; equals score_c - `drm.logit_offset(x)`, E1).
        rendering: (B, C0, H, W) mu(c, z*) = sigma^2 h^(0) (`drm.render`).
        reconstruction_error: (B,) ||x - mu(c, z*)||^2. Its scale follows sigma^2: the CNN fixes
            h^(0) (the input gradient, E6) but not sigma^2 (eq. 17), which `to_drm` chooses.
        render_scale: (B,) s* = <x, mu> / ||mu||^2, the least-squares scale of the rendering
            (0 where mu = 0); unconstrained, so negative when x and mu point apart.
        scaled_reconstruction_error: (B,) min_s ||x - s mu||^2 = ||x||^2 - <x, mu>^2 / ||mu||^2,
            independent of sigma^2: how much of x the rendering's direction leaves unexplained.
        gap_lower_bound: (B,) score of `drm.refine.refine_latents` (top-down coordinate ascent
            from z*) minus the max-sum score: >= 0 (up to rounding) and <= the exact gap (E4).
        refine_sweeps: sweeps the refinement ran.
        exact_gap: (B,) max_z score - max-sum score for `classes` by enumeration
            (`drm.exact_map`), or None when the model is too large.
    """

    scores: Tensor
    predicted: Tensor
    classes: Tensor
    max_softmax: Tensor
    log_joint: Tensor
    rendering: Tensor
    reconstruction_error: Tensor
    render_scale: Tensor
    scaled_reconstruction_error: Tensor
    gap_lower_bound: Tensor
    refine_sweeps: int
    exact_gap: Tensor | None = None

    def statistic(self, name: str) -> Tensor:
        """One of `DETECTION_STATISTICS` by name: (B,)."""
        if name not in DETECTION_STATISTICS:
            raise ValueError(
                f"statistic must be one of {sorted(DETECTION_STATISTICS)}, got {name!r}"
            )
        value = getattr(self, name)
        assert isinstance(value, Tensor)
        return value


def drm_view(
    model: DeepRenderingModel,
    x: Tensor,
    classes: Tensor | None = None,
    *,
    exact: bool | None = None,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
    max_sweeps: int = 20,
) -> DRMView:
    """What the rendering model sees in each image of a batch.

    Args:
        x: (B, C0, H, W) images.
        classes: (B,) int64 the class to explain each image as; default the max-sum prediction.
        exact: compute the exact inference gap by enumeration; default when the model has at
            most `max_configurations` latent configurations (`drm.num_configurations`).
        max_sweeps: the refinement's sweep limit (`drm.refine.refine_latents`).

    Returns:
        A `DRMView` of (B,) tensors (and the (B, C) scores, (B, C0, H, W) renderings).
    """
    x = check_images(model, x).detach()
    max_sweeps = check_int_at_least(max_sweeps, "max_sweeps")
    with torch.no_grad():
        scores, latents, _ = walk_up(model, x)
        scores = scores.detach()
        predicted = scores.argmax(1)
        classes = predicted if classes is None else check_classes(model, classes, x.shape[0])
        chosen = scores.gather(1, classes[:, None])[:, 0]  # (B,)
        # one top-down pass for both the rendering and the log-joint (`drm.log_joint`)
        mu, log_prior = unchecked_rendering_terms(model, classes, latents)
        joint = gaussian_log_joint(model, x, mu, log_prior).detach()
        mu = mu.detach()
        flat_x, flat_mu = x.flatten(1), mu.flatten(1)  # (B, D)
        error = ((flat_x - flat_mu) ** 2).sum(1)
        energy = (flat_mu**2).sum(1)
        inner = (flat_x * flat_mu).sum(1)
        scale = torch.where(energy > 0, inner / energy.clamp_min(torch.finfo(x.dtype).tiny), 0)
        # ||x - s mu||^2 directly (not ||x||^2 - <x, mu>^2 / ||mu||^2: no cancellation)
        scaled_error = ((flat_x - scale[:, None] * flat_mu) ** 2).sum(1)
        _, refined, sweeps = coordinate_ascent(model, x, classes, latents, max_sweeps)
        gap_bound = refined.detach() - chosen
        gap = inference_gap(model, x, scores, exact=exact, max_configurations=max_configurations)
        exact_gap = None if gap is None else gap.gather(1, classes[:, None])[:, 0]
    return DRMView(
        scores=scores,
        predicted=predicted,
        classes=classes,
        max_softmax=torch.softmax(scores, 1).max(1).values,
        log_joint=joint,
        rendering=mu,
        reconstruction_error=error,
        render_scale=scale,
        scaled_reconstruction_error=scaled_error,
        gap_lower_bound=gap_bound,
        refine_sweeps=sweeps,
        exact_gap=exact_gap,
    )


# --- detection ---------------------------------------------------------------------------------


def _check_statistic(values: object, name: str) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.ndim != 1 or values.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got dtype {values.dtype}")
    values = values.detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return values


def detection_auc(clean_scores: Tensor, adversarial_scores: Tensor) -> float:
    """ROC AUC of a statistic that is larger on adversarial images: P(adv > clean) + P(tie) / 2.

    The Mann-Whitney rank formula: with average ranks r over the pooled values (ties share their
    mean rank), AUC = (sum of the adversarial ranks - n1 (n1 + 1) / 2) / (n0 n1). 0.5 means no
    separation, 1 perfect, 0 perfect the other way round.

    Args:
        clean_scores: (n0,) the statistic on clean images.
        adversarial_scores: (n1,) the statistic on adversarial images (the positives).

    Returns:
        The AUC, a float in [0, 1].
    """
    clean = _check_statistic(clean_scores, "clean_scores")
    adversarial = _check_statistic(adversarial_scores, "adversarial_scores").to(clean.device)
    pooled = torch.cat([clean, adversarial])  # (n0 + n1,)
    _, group, counts = torch.unique(pooled, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(torch.float64)  # 1-based rank of each tie group's last member
    ranks = (last - (counts - 1).to(torch.float64) / 2)[group]  # average rank of every value
    n0, n1 = clean.shape[0], adversarial.shape[0]
    u = ranks[n0:].sum() - n1 * (n1 + 1) / 2
    return float(u / (n0 * n1))


def default_attacks(
    epsilon: float = 0.1, steps: int = 10, clamp: PixelRange = (0.0, 1.0)
) -> dict[str, Attack]:
    """The attacks of `detection_report`: FGSM, BIM and the minimal template attack.

    "fgsm": `fgsm` with budget epsilon; "iterative": `iterative_attack` with the same budget,
    step epsilon / 4 and `steps` steps; "template": `fool_with_template` toward the runner-up
    class with `minimal_template_alpha` (inf, i.e. unreachable, leaves the image unchanged).
    """
    epsilon = check_nonnegative(epsilon, "epsilon", positive=True)
    steps = check_int_at_least(steps, "steps")
    clamp = check_pixel_range(clamp)

    def fgsm_attack(model: DeepRenderingModel, x: Tensor, y: Tensor) -> Tensor:
        return fgsm(model, x, y, epsilon, clamp=clamp)

    def iterative(model: DeepRenderingModel, x: Tensor, y: Tensor) -> Tensor:
        return iterative_attack(model, x, y, epsilon, epsilon / 4, steps, clamp=clamp)

    def template(model: DeepRenderingModel, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            scores, latents = max_sum(model, x)  # the clean images' inference, run once
            runner_up = scores.topk(2, dim=1).indices[:, 1]
        alpha = minimal_template_alpha(model, x, runner_up, latents=latents, clamp=clamp)
        alpha = torch.where(torch.isfinite(alpha), alpha, torch.zeros_like(alpha))
        return fool_with_template(model, x, runner_up, alpha, latents=latents, clamp=clamp)

    return {"fgsm": fgsm_attack, "iterative": iterative, "template": template}


@dataclass(frozen=True)
class DetectionReport:
    """Clean against attacked images, through the DRM's eyes.

    Attributes:
        auc: attack -> statistic -> ROC AUC of the statistic signed as in `DETECTION_STATISTICS`
            (larger = more suspicious), adversarial images as positives; nan when a set is empty.
        accuracy: "clean" and each attack -> accuracy of the CNN on the batch.
        counts: "clean" and each attack -> images in the set the AUC compares.
        views: "clean" and each attack -> the `DRMView` of all B images.
    """

    auc: dict[str, dict[str, float]]
    accuracy: dict[str, float]
    counts: dict[str, int]
    views: dict[str, DRMView]

    def to_text(self) -> str:
        """A table: one row per attack, its accuracy, set size and AUC per statistic."""
        names = list(DETECTION_STATISTICS)
        header = ["attack", "accuracy", "n"] + names
        rows = [["clean", f"{self.accuracy['clean']:.3f}", str(self.counts["clean"])]]
        rows[0] += ["" for _ in names]
        for attack, aucs in self.auc.items():
            rows.append(
                [attack, f"{self.accuracy[attack]:.3f}", str(self.counts[attack])]
                + ["n/a" if math.isnan(aucs[name]) else f"{aucs[name]:.3f}" for name in names]
            )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
            for row in [header, *rows]
        ]
        return "\n".join(line.rstrip() for line in lines)


def detection_report(
    model: DeepRenderingModel,
    x: Tensor,
    y: Tensor,
    attacks: Mapping[str, Attack] | None = None,
    *,
    only_successful: bool = True,
    max_sweeps: int = 20,
) -> DetectionReport:
    """Attack a batch, look at clean and attacked images with `drm_view`, and score detectors.

    Args:
        model: the rendering model (its CNN is attacked).
        x: (B, C0, H, W) clean images.
        y: (B,) int64 true labels.
        attacks: name -> attack(model, x, y) -> adversarial x; default `default_attacks()`.
        only_successful: compare correctly classified clean images with the attacked images that
            were correctly classified before and are misclassified after (the usual protocol);
            False compares all B clean with all B attacked images.
        max_sweeps: passed to `drm_view`.

    Returns:
        A `DetectionReport`. The exact gap is not computed (models worth attacking are too large
        to enumerate).
    """
    x = check_images(model, x).detach()
    y = check_classes(model, check_labels(y, x.shape[0], "y"), x.shape[0])
    attacks = default_attacks() if attacks is None else attacks
    clean_view = drm_view(model, x, exact=False, max_sweeps=max_sweeps)
    correct = clean_view.predicted == y
    views = {"clean": clean_view}
    accuracy = {"clean": float(correct.double().mean())}
    counts = {"clean": int(correct.sum()) if only_successful else x.shape[0]}
    auc: dict[str, dict[str, float]] = {}
    for name, attack in attacks.items():
        if name == "clean":
            raise ValueError("'clean' is reserved for the clean images: rename that attack")
        adversarial = attack(model, x, y)
        view = drm_view(
            model,
            check_images(model, adversarial, name).detach(),
            exact=False,
            max_sweeps=max_sweeps,
        )
        wrong = view.predicted != y
        views[name] = view
        accuracy[name] = float((~wrong).double().mean())
        keep_clean = correct if only_successful else torch.ones_like(correct)
        keep_adversarial = (correct & wrong) if only_successful else torch.ones_like(correct)
        counts[name] = int(keep_adversarial.sum())
        auc[name] = {}
        for statistic, sign in DETECTION_STATISTICS.items():
            clean_values = sign * clean_view.statistic(statistic)[keep_clean]
            attacked = sign * view.statistic(statistic)[keep_adversarial]
            empty = clean_values.numel() == 0 or attacked.numel() == 0
            auc[name][statistic] = math.nan if empty else detection_auc(clean_values, attacked)
    return DetectionReport(auc=auc, accuracy=accuracy, counts=counts, views=views)


__all__ = [
    "DETECTION_STATISTICS",
    "Attack",
    "DRMView",
    "DetectionReport",
    "default_attacks",
    "detection_auc",
    "detection_report",
    "drm_view",
]
