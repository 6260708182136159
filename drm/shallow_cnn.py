"""The CNN view of the shallow rendering model: template matching, bias, ReLU, pooling.

`ShallowCNNView` holds the methods that score a `drm.shallow.ShallowRenderingModel` the way a CNN
does; the model inherits them (its generative view, `render`, `log_joint`, `sample`, written
literally with no convolution, stays in `drm.shallow`, the independent definition the tests check
this view against). Every T_g is norm-preserving, so after dropping the class-independent
constant K(x) = ||x||^2 / (2 sigma^2) + (D / 2) log(2 pi sigma^2) the score of (c, g, a) is

    log pi_c - log G + log p(a) + a * (<x, T_g mu_c> / sigma^2 - ||mu_c||^2 / (2 sigma^2)),

i.e. template matching (one convolution of x with mu_c / sigma^2), a bias, then max over a =
ReLU, sum over a = softplus, max over g = max-pooling, sum over g = log-sum-exp, and the exact
posterior p(c | x) = softmax of the summed scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from drm.shallow_config import MODES, ShallowLatents

__all__ = ["ShallowCNNView"]


def _softplus(z: Tensor) -> Tensor:
    """log(1 + exp(z)) to full precision.

    `torch.nn.functional.softplus` returns z itself above its threshold (20), an error of up to
    exp(-20) ~ 2e-9, which is larger than the 1e-10 identities this module is tested to.
    """
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


class ShallowCNNView:
    """The CNN-view methods of `drm.shallow.ShallowRenderingModel`, which inherits them.

    The model provides the attributes and properties declared here (the properties below only
    name them: the model's own definitions override them).
    """

    templates: Tensor
    sigma2: Tensor
    translation: str
    switch_prior_on: float | None

    @property
    def template_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError  # defined by the model

    @property
    def num_translations(self) -> int:
        raise NotImplementedError  # defined by the model

    @property
    def num_pixels(self) -> int:
        raise NotImplementedError  # defined by the model

    @property
    def log_prior(self) -> Tensor:
        raise NotImplementedError  # defined by the model

    def _check_x(self, x: object, name: str = "x") -> Tensor:
        raise NotImplementedError  # defined by the model

    def _log_switch_prior(self) -> tuple[float, float]:
        """(log P(a = 0), log P(a = 1)); (-inf, 0) without a switch."""
        if self.switch_prior_on is None:
            return (-math.inf, 0.0)
        return (math.log1p(-self.switch_prior_on), math.log(self.switch_prior_on))

    def _template_energy(self) -> Tensor:
        """(C,) ||mu_c||^2 / (2 sigma^2), also ||T_g mu_c||^2 / (2 sigma^2): T_g keeps norms."""
        return self.templates.pow(2).flatten(1).sum(1) / (2 * self.sigma2)

    def score_constant(self, x: Tensor) -> Tensor:
        """K(x) = ||x||^2 / (2 sigma^2) + (D/2) log(2 pi sigma^2), the class-independent constant.

        `class_scores` and `joint_scores` are log-joint reductions plus K(x).

        Args:
            x: (B, C0, H, W).

        Returns:
            (B,).
        """
        x = self._check_x(x)
        return x.pow(2).flatten(1).sum(1) / (2 * self.sigma2) + 0.5 * self.num_pixels * torch.log(
            2 * math.pi * self.sigma2
        )

    def match_map(self, x: Tensor) -> Tensor:
        """<x, T_g mu_c> / sigma^2 for every class and placement, as a feature map.

        One `F.conv2d` of x with the templates / sigma^2 (cross-correlation is template matching):
        "interior" is a valid convolution; "circular" pads x circularly by (h - 1, w - 1) at the
        bottom and right first, so that output (i, j) sees the template rolled by (i, j);
        "none" is a linear layer.

        Args:
            x: (B, C0, H, W).

        Returns:
            (B, C, Hg, Wg), with (Hg, Wg) = `translation_grid`.
        """
        x = self._check_x(x)
        weight = self.templates / self.sigma2  # (C, C0, h, w)
        if self.translation == "none":
            return F.linear(x.flatten(1), weight.flatten(1))[:, :, None, None]  # (B, C, 1, 1)
        if self.translation == "circular":
            _, h, w = self.template_shape
            x = F.pad(x, (0, w - 1, 0, h - 1), mode="circular")  # (B, C0, H + h - 1, W + w - 1)
        return F.conv2d(x, weight)

    def match_scores(self, x: Tensor) -> Tensor:
        """<x, T_g mu_c> / sigma^2 for all (c, g); see `match_map`.

        Args:
            x: (B, C0, H, W).

        Returns:
            (B, C, G), g = i * Wg + j.
        """
        return self.match_map(x).flatten(2)

    def preactivation(self, x: Tensor) -> Tensor:
        """The CNN unit before the nonlinearity: the log-odds of a = 1 given (x, c, g).

        Without a switch: <x, T_g mu_c> / sigma^2 - ||mu_c||^2 / (2 sigma^2) (the template-matching
        layer with bias -||mu_c||^2 / (2 sigma^2)); with a switch, + log(pi_on / pi_off).

        Args:
            x: (B, C0, H, W).

        Returns:
            (B, C, G).
        """
        z = self.match_scores(x) - self._template_energy()[:, None]
        if self.switch_prior_on is not None:
            log_off, log_on = self._log_switch_prior()
            z = z + (log_on - log_off)
        return z

    def _class_bias(self) -> Tensor:
        """(C,) the score part outside the nonlinearity: log pi_c - log G (+ log pi_off)."""
        bias = self.log_prior - math.log(self.num_translations)
        if self.switch_prior_on is not None:
            bias = bias + self._log_switch_prior()[0]
        return bias

    def class_scores(self, x: Tensor, mode: str = "max") -> Tensor:
        """Class scores, computed the CNN way (conv, bias, ReLU/softplus, max-pool/log-sum-exp).

        mode="max": max_{g, a} log p(x, c, g, a) + K(x), the CNN logit (MAP classification).
        mode="sum": log sum_{g, a} p(x, c, g, a) + K(x) = log p(x, c) + K(x).
        K(x) is `score_constant(x)`, the same for every class.

        Args:
            x: (B, C0, H, W).
            mode: "max" or "sum".

        Returns:
            (B, C).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        z = self.preactivation(x)  # (B, C, G)
        if self.switch_prior_on is not None:
            z = torch.relu(z) if mode == "max" else _softplus(z)
        # max over g is global max-pooling of the (Hg, Wg) map; relu commutes with it
        pooled = z.amax(dim=-1) if mode == "max" else z.logsumexp(dim=-1)  # (B, C)
        return pooled + self._class_bias()

    def joint_scores(self, x: Tensor) -> Tensor:
        """log p(x, c, g, a) + K(x) for every (c, g, a).

        Args:
            x: (B, C0, H, W).

        Returns:
            (B, C, G, A): A = 2 with a switch (index 0 is a = 0, index 1 is a = 1), A = 1 without
            (a = 1).
        """
        z = self.preactivation(x)  # (B, C, G)
        bias = self._class_bias()[:, None]  # (C, 1)
        if self.switch_prior_on is None:
            return (z + bias)[..., None]
        return torch.stack([bias.expand_as(z), z + bias], dim=-1)

    def latent_posterior(self, x: Tensor) -> Tensor:
        """The exact posterior p(c, g, a | x) (the E-step of exact EM).

        Args:
            x: (B, C0, H, W).

        Returns:
            (B, C, G, A) probabilities summing to 1 per image; A as in `joint_scores`.
        """
        s = self.joint_scores(x)
        return torch.softmax(s.flatten(1), dim=-1).view_as(s)

    def posterior(self, x: Tensor) -> Tensor:
        """The exact class posterior p(c | x) = softmax of the summed class scores.

        Args:
            x: (B, C0, H, W).

        Returns:
            (B, C).
        """
        return torch.softmax(self.class_scores(x, "sum"), dim=-1)

    def map_classes(self, x: Tensor, mode: str = "max") -> Tensor:
        """The predicted class.

        mode="max" (default): the class of the joint MAP (c, g, a), i.e. the CNN's decision;
        mode="sum": argmax_c p(c | x), the Bayes classifier.

        Args:
            x: (B, C0, H, W).
            mode: "max" or "sum".

        Returns:
            (B,) long.
        """
        return self.class_scores(x, mode).argmax(dim=-1)

    def log_likelihood(self, x: Tensor) -> Tensor:
        """The exact log p(x) = logsumexp over (c, g, a) of log p(x, c, g, a).

        Args:
            x: (B, C0, H, W).

        Returns:
            (B,).
        """
        return self.class_scores(x, "sum").logsumexp(dim=-1) - self.score_constant(x)

    def map_latents(self, x: Tensor) -> ShallowLatents:
        """The joint MAP (c, g, a) = argmax log p(x, c, g, a).

        Ties go to the first class and placement and to a = 0; when a = 0 every g ties, and g = 0.

        Args:
            x: (B, C0, H, W).

        Returns:
            `ShallowLatents(classes (B,) long, translations (B,) long, switches (B,) bool)`
            (switches all True without a switch).
        """
        z = self.preactivation(x)  # (B, C, G)
        unit = torch.relu(z) if self.switch_prior_on is not None else z
        scores = unit + self._class_bias()[:, None]  # (B, C, G)
        batch, _, num_g = scores.shape
        flat = scores.flatten(1).argmax(dim=-1)  # (B,)
        classes, translations = flat // num_g, flat % num_g
        if self.switch_prior_on is None:
            switches = torch.ones(batch, dtype=torch.bool, device=z.device)
        else:
            switches = z[torch.arange(batch, device=z.device), classes, translations] > 0
            # with the object absent every placement ties; report g = 0 for a canonical answer
            translations = torch.where(switches, translations, torch.zeros_like(translations))
        return ShallowLatents(classes, translations, switches)
