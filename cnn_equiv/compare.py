"""Reports that put the two views side by side for a model and a batch of images.

`comparison_report` runs the CNN (torch layers, with hooks recording its ReLU masks and max-pool
indices) and bottom-up max-sum in the rendering model on the same images, and reports how far
apart they are, whether the sufficient condition for exact inference (E3) holds, and, on models
small enough to enumerate, the inference gap: exact MAP score minus max-sum score, per class.
`inference_gap` is that last rule on its own, which `cnn_equiv.detection.drm_view` uses too.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cnn_equiv.cnn import record_latents
from cnn_equiv.mapping import to_cnn
from drm.checks import check_count, check_flag, check_images
from drm.inference import walk_up
from drm.model import DeepRenderingModel, logit_offset
from drm.reference import DEFAULT_MAX_CONFIGURATIONS, num_configurations, unchecked_exact_map


@dataclass
class ComparisonReport:
    """The neural-net view against the probabilistic view on one batch.

    Attributes:
        batch_size: number of images compared.
        logit_shift: mean of (CNN logit - max-sum score); 0 for `to_cnn(model)`, logsumexp of
            the final bias for an imported CNN (eq. 12). It changes no softmax.
        max_abs_logit_difference: max |CNN logit - max-sum score - logit_shift|.
        prediction_agreement: fraction of images with the same arg-max class.
        switch_agreement: fraction of switch units where the DRM state equals the ReLU mask.
        translation_agreement: fraction of pooled units with the same max-pool index.
        exactness_condition: whether the sufficient condition of E3 holds.
        violations: why it does not (levels with negative upper templates or slopes).
        num_configurations: latent configurations of the model (brute force is feasible below
            the limit).
        inference_gap: (B, C) exact max_z log p(x, c, z) minus the max-sum score on the same
            scale, or None when the model is too large to enumerate. >= 0 always (E4); 0 when the
            condition holds (E3).
    """

    batch_size: int
    logit_shift: float
    max_abs_logit_difference: float
    prediction_agreement: float
    switch_agreement: float
    translation_agreement: float
    exactness_condition: bool
    violations: list[str] = field(default_factory=list)
    num_configurations: int = 0
    inference_gap: Tensor | None = None

    def rows(self) -> list[tuple[str, str]]:
        """(quantity, value) rows, for printing as a table."""
        rows = [
            ("images", str(self.batch_size)),
            ("max |CNN logit - max-sum score|", f"{self.max_abs_logit_difference:.3e}"),
            ("constant logit shift (eq. 12)", f"{self.logit_shift:.6f}"),
            ("same predicted class", f"{100 * self.prediction_agreement:.2f}%"),
            ("switch states = ReLU masks", f"{100 * self.switch_agreement:.2f}%"),
            ("translations = max-pool indices", f"{100 * self.translation_agreement:.2f}%"),
            ("exactness condition (E3) holds", "yes" if self.exactness_condition else "no"),
            ("latent configurations", _count(self.num_configurations)),
        ]
        if self.inference_gap is not None:
            gap = self.inference_gap
            rows.append(("inference gap, mean over images and classes", f"{gap.mean():.3e}"))
            rows.append(("inference gap, max", f"{gap.max():.3e}"))
            rows.append(("inference gap, min (>= 0 up to rounding)", f"{gap.min():.3e}"))
        return rows

    def to_text(self) -> str:
        """The report as a two-column text table."""
        rows = self.rows()
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"  violation: {v}" for v in self.violations]
        return "\n".join(lines)


def _count(n: int) -> str:
    """An exact count, or its power of ten when it has more digits than fit a table."""
    return f"{n:,}" if n < 10**9 else f"~10^{math.log10(n):.1f}"


def _agreement(mine: list[Tensor], theirs: list[Tensor], what: str) -> float:
    if len(mine) != len(theirs):
        raise ValueError(f"the CNN has {len(theirs)} {what} layers, the model {len(mine)}")
    total = sum(t.numel() for t in mine)
    if total == 0:
        return 1.0
    same = sum(int((a == b).sum()) for a, b in zip(mine, theirs, strict=True))
    return same / total


def inference_gap(
    model: DeepRenderingModel,
    x: Tensor,
    scores: Tensor,
    *,
    exact: bool | None = None,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
) -> Tensor | None:
    """The inference gap of max-sum (E4), exact, per image and class, when it is affordable.

    max_z log p(x, c, z) by enumeration (`drm.exact_map`) minus the max-sum score of c, on the
    scale of the scores (`drm.logit_offset` added back): >= 0 up to rounding, 0 where the
    exactness condition holds (E3). Enumeration is exponential in the number of latent units, so
    it runs when `exact` is True or, by default, when the model has at most `max_configurations`
    latent configurations (`drm.num_configurations`); otherwise the gap is None, and
    `drm.refine.inference_gap_lower_bound` gives a certified lower bound at any size.

    Args:
        x: (B, C0, H, W) images.
        scores: (B, C) max-sum scores of x (`drm.max_sum(model, x)[0]`).
        exact: enumerate regardless of size (True) or never (False); default by size.
        max_configurations: the size limit of the default; an exact run on a larger model lifts
            `drm.exact_map`'s own limit to the model's size.

    Returns:
        (B, C) detached gap, or None when not enumerated.
    """
    x = check_images(model, x)
    if exact is not None:
        check_flag(exact, "exact")
    check_count(max_configurations, "max_configurations", 1)
    expected = (x.shape[0], model.num_classes)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != expected:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be the (B, C) = {expected} max-sum scores, got {shape}")
    total = num_configurations(model)
    if not (exact if exact is not None else total <= max_configurations):
        return None
    with torch.no_grad():
        best, _ = unchecked_exact_map(model, x, total)  # x checked above
        return (best + logit_offset(model, x)[:, None] - scores).detach()


def comparison_report(
    model: DeepRenderingModel,
    x: Tensor,
    cnn: nn.Module | None = None,
    exact: bool | None = None,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
) -> ComparisonReport:
    """Compare a CNN with bottom-up max-sum in `model` on the images x (B, C0, H, W).

    Args:
        cnn: the CNN to compare with; default `to_cnn(model)`. An imported CNN (the one given
            to `to_drm`) may contain BatchNorm and Dropout; its ReLU/LeakyReLU and MaxPool2d
            layers are matched to the model's switch and translation levels in order.
        exact, max_configurations: when to compute the exact inference gap (`inference_gap`):
            default when the model has at most `max_configurations` latent configurations.
    """
    x = check_images(model, x)
    if cnn is None:
        cnn = to_cnn(model)
    was_training = cnn.training
    cnn.eval()
    try:
        seen = record_latents(cnn, x)
    finally:
        cnn.train(was_training)
    with torch.no_grad():
        scores, latents, _ = walk_up(model, x)
    difference = (seen.logits.to(scores.dtype) - scores).detach()
    shift = float(difference.mean())
    kinds = [level.latent_kind for level in model.levels]
    switches = [z for kind, z in zip(kinds, latents, strict=True) if kind == "switch"]
    pools = [z for kind, z in zip(kinds, latents, strict=True) if kind == "translation"]
    gap = inference_gap(model, x, scores, exact=exact, max_configurations=max_configurations)
    violations = model.exactness_violations()
    return ComparisonReport(
        batch_size=x.shape[0],
        logit_shift=shift,
        max_abs_logit_difference=float((difference - shift).abs().max()),
        prediction_agreement=float((seen.logits.argmax(1) == scores.argmax(1)).double().mean()),
        switch_agreement=_agreement(
            [z for z in switches if z is not None], seen.switches, "switch"
        ),
        translation_agreement=_agreement(
            [z for z in pools if z is not None], seen.translations, "max-pool"
        ),
        exactness_condition=not violations,
        violations=violations,
        num_configurations=num_configurations(model),
        inference_gap=gap,
    )
