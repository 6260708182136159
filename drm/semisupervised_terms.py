"""The terms of the semi-supervised loss (`drm.semisupervised`), each a function with its formula.

Each returns a scalar that is a mean over its images (the module docstring of
`drm.semisupervised` says which images, and where each term comes from); `translate` and
`content_shifts` make the consistency term's translations, `deform` its deformations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from drm.model import DeepRenderingModel, gaussian_log_likelihood

UNLABELLED = -1  # the label of an unlabelled image in `SemiSupervisedEM.step(x, y)`


def cross_entropy_term(scores: Tensor, labels: Tensor) -> Tensor:
    """-(1/|L|) sum_{n in L} log softmax(s_n)_{y_n} over the labelled images L (0 if none).

    Args:
        scores: (B, C) max-sum scores (the CNN logits).
        labels: (B,) int64, UNLABELLED (-1) for unlabelled images.
    """
    labelled = labels >= 0
    if not bool(labelled.any()):
        return scores.sum() * 0.0
    return F.cross_entropy(scores[labelled], labels[labelled])


def generative_cross_entropy_term(generative: Tensor, labels: Tensor) -> Tensor:
    """-(1/|L|) sum_{n in L} log p(y_n | x_n, z*_n), p(c | x, z*) = softmax_c(log p(x, c, z*)).

    The cross-entropy of the generative classifier's own posterior (0 if no image is labelled).

    Args:
        generative: (B, C) log p(x, c, z*) under the factorized prior
            (`drm.inference.generative_scores`).
        labels: (B,) int64, UNLABELLED (-1) for unlabelled images.
    """
    return cross_entropy_term(generative, labels)


def reconstruction_term(model: DeepRenderingModel, x: Tensor, mu: Tensor) -> Tensor:
    """(1/B) sum_n [ ||x_n - mu_n||^2 / (2 sigma^2) + (D/2) log(2 pi sigma^2) ].

    The Gaussian negative log-likelihood of the images under their renderings mu(c^, z*), i.e.
    minus the pixel part of `drm.model.factorized_log_joint`. x, mu: (B, C0, H, W).
    """
    return -gaussian_log_likelihood(model, x, mu).mean()


def entropy_term(scores: Tensor) -> Tensor:
    """(1/B) sum_n H(q_n), q_n = softmax(s_n): the posterior's entropy (entropy minimisation).

    The DRMM code's "KL" term, -sum_c q_c log(C q_c), is this minus log C.
    """
    log_q = scores.log_softmax(1)
    return -(log_q.exp() * log_q).sum(1).mean()


def nonnegativity_term(model: DeepRenderingModel, signals: list[Tensor]) -> Tensor:
    """sum_l mean relu(-g_l)^2 over the latent levels l (mean over images and units).

    Args:
        signals: `propagate_down`'s list; signals[l + 1] is the top-down signal g_l that reaches
            the output of level l. When every g_l that reaches a latent is >= 0, max-sum is the
            exact MAP (E3); the penalty is 0 exactly then.
    """
    total = signals[0].new_zeros(())
    for index in model.latent_levels:
        total = total + signals[index + 1].clamp(max=0.0).square().mean()  # relu(-g)^2
    return total


def class_balance_term(mean_posterior: Tensor, log_prior: Tensor) -> Tensor:
    """KL(q || pi) = sum_c q_c (log q_c - log pi_c) for the batch's mean posterior q: (C,) -> ()."""
    return (mean_posterior * (mean_posterior.clamp_min(1e-30).log() - log_prior)).sum()


def path_normalization_term(
    model: DeepRenderingModel,
    classes: Tensor,
    signals: list[Tensor],
    reference_class: Tensor,
    reference_signals: list[Tensor],
) -> Tensor:
    """(1/B) sum_n |log pi_{c_n} - log pi_{c0}| + sum_l mean |b_l * (g_l - g0_l)| (NRM).

    The CNN prior's bias terms <b_l, g_l> unit by unit, on each image's configuration against
    the reference configuration (c0, z0) (one image: max-sum's on an all-zero image).

    Args:
        classes: (B,) the rendered classes; signals: their `propagate_down` list.
        reference_class: (1,) c0; reference_signals: its `propagate_down` list (batch 1).
    """
    log_prior = model.class_log_prior
    total = (log_prior[classes] - log_prior[reference_class]).abs().mean()
    for index, level in enumerate(list(model.levels)[:-1]):  # the class level's: above
        if level.has_templates:  # the levels with a bias
            gap = signals[index + 1] - reference_signals[index + 1]
            total = total + level.prior_units(gap).abs().mean()
    return total


def consistency_term(target: Tensor, shifted_scores: Tensor) -> Tensor:
    """(1/B) sum_n KL(q_n || p_n) = sum_c q_nc (log q_nc - log p_nc), p_n = softmax(shifted_n).

    Args:
        target: (B, C) q, the posterior of the images themselves (held fixed by the caller).
        shifted_scores: (B, C) the scores of their translations.
    """
    log_p = shifted_scores.log_softmax(1)
    return (target * (target.clamp_min(1e-30).log() - log_p)).sum(1).mean()


def translate(x: Tensor, shifts: Tensor) -> Tensor:
    """Each image moved by its (dy, dx) pixels, zeros filling in: (B, C, H, W), shifts (B, 2)."""
    batch, channels, height, width = x.shape
    pad = int(shifts.abs().max()) if shifts.numel() else 0
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2 pad, W + 2 pad)
    # out[b, :, i, j] = x[b, :, i - dy, j - dx]
    rows = pad - shifts[:, 0:1] + torch.arange(height, device=x.device)  # (B, H)
    cols = pad - shifts[:, 1:2] + torch.arange(width, device=x.device)  # (B, W)
    b = torch.arange(batch, device=x.device)[:, None, None, None]
    c = torch.arange(channels, device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def content_shifts(x: Tensor, offset: int, max_shift: int) -> Tensor:
    """A pseudo-random (dy, dx) in [-max_shift, max_shift]^2 per image: (B, 2) int64.

    A function of the image's pixels (quantised to 1/256, so exact integer arithmetic) and of
    `offset`: the same image gets the same shift wherever it sits in a batch or a shard.
    """
    side = 2 * max_shift + 1
    levels = (x.detach().flatten(1).to(torch.float64) * 256).round().to(torch.int64)  # (B, D)
    weights = torch.randint(
        1, 2**20, (levels.shape[1],), generator=torch.Generator().manual_seed(12345)
    ).to(levels.device)
    key = ((levels * weights).sum(1) + offset) % (side * side)  # (B,)
    return torch.stack([key // side - max_shift, key % side - max_shift], 1)


# The consistency term's deformations at strength 1 (`deform`): each is drawn uniformly in
# [-scale, scale] per image and multiplied by the strength.
DEFORMATION_SCALES = {
    "rotation_degrees": 15.0,  # about the image centre
    "scale": 0.1,  # relative change of size
    "shear": 0.15,  # horizontal shear (pixels per pixel)
    "elastic_pixels": 1.5,  # displacement at each control point of the elastic field
}
ELASTIC_GRID = 4  # control points per side of the smooth elastic displacement field
# the numbers `deform` draws per image: translation (2), rotation, scale, shear, elastic field
DEFORMATION_PARAMETERS = 5 + 2 * ELASTIC_GRID**2
_PRIME = 2**31 - 1  # the hash's modulus


def content_uniforms(x: Tensor, offset: int, count: int) -> Tensor:
    """`count` pseudo-random numbers in [0, 1) per image: (B, count) float64.

    A function of the image's pixels (quantised to 1/256) and of `offset` alone, like
    `content_shifts`: the same image gets the same numbers wherever it sits in a batch or a
    shard, and on any device. The pixels' dot products with fixed integer weights are integers
    below 2^53, which float64 sums exactly in any order; multiplicative hashing mod 2^31 - 1
    then mixes them with the offset.
    """
    values = math.prod(x.shape[1:])
    if values * 4096 * 2**20 >= 2**53:  # the dot products would no longer be exact
        raise ValueError(f"content_uniforms: {values} values per image is too many (< 2^21)")
    levels = torch.remainder((x.detach().flatten(1).to(torch.float64) * 256).round(), 4096)
    generator = torch.Generator().manual_seed(54321)
    weights = torch.randint(1, 2**20, (levels.shape[1], count), generator=generator)  # (D, K)
    salt = torch.randint(1, _PRIME, (count,), generator=generator)  # (K,)
    key = (levels @ weights.to(levels)).to(torch.int64) % _PRIME  # (B, K), exact
    key = (key + (offset + 1) * salt.to(key.device)) % _PRIME
    for multiplier, shift in ((16807, 13), (48271, 11), (69621, 7)):
        key = (key * multiplier) % _PRIME
        key = key ^ (key >> shift)  # stays below 2^31
    return key.to(torch.float64) / 2**31


def source_coordinates(
    u: Tensor, height: int, width: int, max_shift: float, strength: float
) -> Tensor:
    """Where each output pixel of a deformed image samples its input: (B, H, W, 2) (row, col).

    u: (B, DEFORMATION_PARAMETERS) numbers in [0, 1), each mapped to a = 2u - 1 in [-1, 1):
    translation t = a[0:2] max_shift (rows, columns); the affine map about the centre c,
    rotation a[2] * 15 degrees * strength, scale 1 + a[3] * 0.1 * strength, shear a[4] * 0.15 *
    strength (`DEFORMATION_SCALES`); an elastic displacement e(q) that is the bicubic
    interpolation over the image of a[5:] * 1.5 * strength pixels at ELASTIC_GRID^2 control
    points. The output pixel q samples the input at c + k R S (q - c) - t + e(q).
    """
    a = 2 * u - 1  # (B, K)
    batch = a.shape[0]
    angle = a[:, 2] * math.radians(DEFORMATION_SCALES["rotation_degrees"]) * strength
    scale = 1 + a[:, 3] * DEFORMATION_SCALES["scale"] * strength
    shear = a[:, 4] * DEFORMATION_SCALES["shear"] * strength
    cos, sin = angle.cos(), angle.sin()
    # (col, row) = k R(angle) [[1, shear], [0, 1]] (dcol, drow)
    m_cc, m_cr = scale * cos, scale * (cos * shear - sin)
    m_rc, m_rr = scale * sin, scale * (sin * shear + cos)
    rows = torch.arange(height, dtype=a.dtype, device=a.device) - (height - 1) / 2
    cols = torch.arange(width, dtype=a.dtype, device=a.device) - (width - 1) / 2
    dr, dc = rows[None, :, None], cols[None, None, :]  # (1, H, 1), (1, 1, W)
    source_col = (width - 1) / 2 + m_cc[:, None, None] * dc + m_cr[:, None, None] * dr
    source_row = (height - 1) / 2 + m_rc[:, None, None] * dc + m_rr[:, None, None] * dr
    source = torch.stack([source_row, source_col], -1)  # (B, H, W, 2)
    source = source - (a[:, None, None, 0:2] * max_shift)
    control = a[:, 5 : 5 + 2 * ELASTIC_GRID**2].reshape(batch, 2, ELASTIC_GRID, ELASTIC_GRID)
    control = control * DEFORMATION_SCALES["elastic_pixels"] * strength
    field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
    return source + field.permute(0, 2, 3, 1)


def warp(x: Tensor, coordinates: Tensor) -> Tensor:
    """x bilinearly sampled at pixel coordinates (row, col), zeros outside: (B, C, H, W).

    coordinates: (B, H, W, 2), as `source_coordinates` gives them.
    """
    height, width = x.shape[-2:]
    rows, cols = coordinates[..., 0], coordinates[..., 1]
    # grid_sample's normalised coordinates (align_corners=False): pixel p is at (2p + 1)/n - 1
    grid = torch.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], -1)
    return F.grid_sample(
        x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )


def deform(x: Tensor, offset: int, max_shift: float, strength: float) -> Tensor:
    """Each image translated, rotated, scaled, sheared and elastically displaced by amounts
    drawn from its own pixels and `offset` (`content_uniforms`, `source_coordinates`):
    x (B, C, H, W) -> (B, C, H, W)."""
    u = content_uniforms(x, offset, DEFORMATION_PARAMETERS)
    return warp(x, source_coordinates(u, x.shape[-2], x.shape[-1], max_shift, strength))


__all__ = [
    "UNLABELLED",
    "class_balance_term",
    "consistency_term",
    "content_shifts",
    "content_uniforms",
    "cross_entropy_term",
    "deform",
    "entropy_term",
    "generative_cross_entropy_term",
    "nonnegativity_term",
    "path_normalization_term",
    "reconstruction_term",
    "source_coordinates",
    "translate",
    "warp",
]
