"""The shallow (one-level) rendering model and its CNN view (DESIGN statement E7).

This module holds `ShallowRenderingModel` and re-exports its architecture `ShallowConfig` and
typed results `ShallowSample` / `ShallowLatents` (defined in `drm.shallow_config`). The model:
a class c ~ pi (C classes), a translation nuisance g uniform over G placements, an optional
switch a in {0, 1} with prior P(a = 1) = pi_on (object present or absent), and shared
isotropic Gaussian pixel noise:

    x = a * T_g mu_c + eps,    eps ~ N(0, sigma^2 I),    x: (C0, H, W),  D = C0 * H * W,

    log p(x, c, g, a) = log pi_c - log G + log p(a)
                        - ||x - a T_g mu_c||^2 / (2 sigma^2) - (D / 2) log(2 pi sigma^2).

Translation kinds: "circular" (image-sized templates, T_g = `torch.roll` by each of the H * W
shifts), "interior" (templates (C0, h, w) placed at each of the (H - h + 1)(W - w + 1) positions,
zeros elsewhere) and "none" (G = 1, image-sized templates, no shift).

The model has both views of itself:

* the generative view, written literally with no convolution (`render`, `log_joint`, `sample`,
  here), the independent definition the tests check everything else against;
* the CNN view (`score_constant`, `match_map`, `class_scores`, `joint_scores`, `posterior`,
  `map_classes`, `log_likelihood`, `map_latents`, ...), inherited from
  `drm.shallow_cnn.ShallowCNNView`: template matching, a bias, ReLU / softplus over the switch,
  max-pooling / log-sum-exp over the placements. Without translation or switch it is one linear
  layer, whose weights `cnn_equiv.mapping.to_linear_classifier` writes out (parameters cross
  between the views only in that module).

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from drm.checks import check_index, check_real, check_shallow_images
from drm.shallow_cnn import ShallowCNNView
from drm.shallow_config import (
    ScoreMode,
    ShallowConfig,
    ShallowLatents,
    ShallowSample,
    Translation,
)

__all__ = [
    "ScoreMode",
    "ShallowConfig",
    "ShallowLatents",
    "ShallowRenderingModel",
    "ShallowSample",
    "Translation",
]

# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class ShallowRenderingModel(nn.Module, ShallowCNNView):
    """One-level rendering model: class templates, translation and switch nuisances, shared noise.

    Attributes:
        templates: (C, C0, h, w) parameter, the class templates mu_c.
        prior_logits: (C,) parameter; the class prior is pi = softmax(prior_logits).
        sigma2: scalar buffer, the pixel noise variance sigma^2 > 0.
        image_shape: (C0, H, W).
        translation: "circular", "interior" or "none".
        switch_prior_on: pi_on = P(a = 1) in (0, 1), or None for no switch (a is always 1).

    Args:
        templates: (C, C0, h, w) floating tensor, copied into a parameter; its dtype and device are
            the model's.
        image_shape: (C0, H, W); defaults to the template shape (C0, h, w).
        translation: the translation nuisance, see the module docstring.
        prior_logits: (C,) class logits of the same dtype and device; defaults to a uniform prior.
        sigma2: the noise variance, a finite positive number.
        switch_prior_on: P(a = 1) in the open interval (0, 1), or None for no switch.

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: an argument has the wrong shape or value (e.g. a template larger than the
            image, sigma2 <= 0, an unknown translation, switch_prior_on outside (0, 1)).
    """

    templates: Tensor
    prior_logits: Tensor
    sigma2: Tensor

    def __init__(
        self,
        templates: Tensor,
        image_shape: Sequence[int] | None = None,
        *,
        translation: str = "circular",
        prior_logits: Tensor | None = None,
        sigma2: float | Tensor = 1.0,
        switch_prior_on: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(templates, Tensor):
            raise TypeError(f"templates must be a torch.Tensor, got {type(templates).__name__}")
        if not templates.is_floating_point():
            raise TypeError(f"templates must be a floating tensor, got dtype {templates.dtype}")
        if templates.ndim != 4:
            raise ValueError(
                f"templates must have shape (C, C0, h, w), got {tuple(templates.shape)}"
            )
        if templates.numel() == 0:
            raise ValueError(f"templates must be non-empty, got shape {tuple(templates.shape)}")
        if not bool(torch.isfinite(templates).all()):
            raise ValueError("templates contains NaN or infinite values")
        num_classes, c0_t, h, w = (int(s) for s in templates.shape)

        if image_shape is None:
            image_shape = (c0_t, h, w)
        config = ShallowConfig(
            num_classes=num_classes,
            template_shape=(c0_t, h, w),
            image_shape=image_shape,  # type: ignore[arg-type]  # checked by ShallowConfig
            translation=translation,  # type: ignore[arg-type]  # checked by ShallowConfig
            switch_prior_on=switch_prior_on,
        )

        if prior_logits is None:
            prior_logits = templates.new_zeros(num_classes)
        if not isinstance(prior_logits, Tensor):
            raise TypeError(
                f"prior_logits must be a torch.Tensor, got {type(prior_logits).__name__}"
            )
        if prior_logits.dtype != templates.dtype:
            raise TypeError(
                f"prior_logits has dtype {prior_logits.dtype}, expected the templates' dtype "
                f"{templates.dtype}"
            )
        if prior_logits.device != templates.device:
            raise ValueError(
                f"prior_logits is on device {prior_logits.device}, expected the templates' device "
                f"{templates.device}"
            )
        if tuple(prior_logits.shape) != (num_classes,):
            raise ValueError(
                f"prior_logits must have shape (C,) = ({num_classes},), "
                f"got {tuple(prior_logits.shape)}"
            )
        if not bool(torch.isfinite(prior_logits).all()):
            raise ValueError("prior_logits contains NaN or infinite values")

        sigma2_f = check_real(sigma2, "sigma2")
        if not (math.isfinite(sigma2_f) and sigma2_f > 0):
            raise ValueError(f"sigma2 must be a finite positive number, got {sigma2_f}")

        self.templates = nn.Parameter(templates.detach().clone())
        self.prior_logits = nn.Parameter(prior_logits.detach().clone())
        self.register_buffer(
            "sigma2", torch.tensor(sigma2_f, dtype=templates.dtype, device=templates.device)
        )
        self.image_shape: tuple[int, int, int] = config.image_shape
        self.translation: Translation = config.translation
        # learned by EM (`drm.shallow_em.ShallowEM`), hence an attribute, not only the config's
        self.switch_prior_on: float | None = config.switch_prior_on

    @classmethod
    def from_config(
        cls, config: ShallowConfig, dtype: torch.dtype = torch.float32
    ) -> ShallowRenderingModel:
        """A model of this architecture with zero templates, a uniform prior and sigma^2 = 1."""
        if not isinstance(config, ShallowConfig):
            raise TypeError(f"config must be a ShallowConfig, got {type(config).__name__}")
        return cls(
            torch.zeros((config.num_classes, *config.template_shape), dtype=dtype),
            config.image_shape,
            translation=config.translation,
            switch_prior_on=config.switch_prior_on,
        )

    @property
    def config(self) -> ShallowConfig:
        """The architecture of this model (no tensors; sigma^2 and the class prior are
        parameters, stored with the tensors)."""
        return ShallowConfig(
            num_classes=self.num_classes,
            template_shape=self.template_shape,
            image_shape=self.image_shape,
            translation=self.translation,
            switch_prior_on=self.switch_prior_on,
        )

    def config_dict(self) -> dict[str, Any]:
        """`self.config.to_dict()`: JSON-serialisable; `from_config_dict` inverts it."""
        return self.config.to_dict()

    @classmethod
    def from_config_dict(
        cls, config: dict[str, Any], dtype: torch.dtype = torch.float32
    ) -> ShallowRenderingModel:
        """`from_config(ShallowConfig.from_dict(config), dtype)`."""
        return cls.from_config(ShallowConfig.from_dict(config), dtype)

    # ------------------------------------------------------------------------------------------
    # Sizes and derived parameters
    # ------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return int(self.templates.shape[0])

    @property
    def template_shape(self) -> tuple[int, int, int]:
        """(C0, h, w), the shape of one template."""
        _, c0, h, w = self.templates.shape
        return (int(c0), int(h), int(w))

    @property
    def translation_grid(self) -> tuple[int, int]:
        """(Hg, Wg), the grid of placements; g = i * Wg + j is placement (i, j), G = Hg * Wg."""
        _, H, W = self.image_shape
        _, h, w = self.template_shape
        if self.translation == "circular":
            return (H, W)
        if self.translation == "interior":
            return (H - h + 1, W - w + 1)
        return (1, 1)

    @property
    def num_translations(self) -> int:
        """G, the number of translations (placements) of a template."""
        hg, wg = self.translation_grid
        return hg * wg

    @property
    def num_pixels(self) -> int:
        """D = C0 * H * W, the dimension of an image."""
        c0, H, W = self.image_shape
        return c0 * H * W

    @property
    def has_switch(self) -> bool:
        """Whether the model has the presence switch a."""
        return self.switch_prior_on is not None

    @property
    def log_prior(self) -> Tensor:
        """(C,) log pi_c = log_softmax(prior_logits)."""
        return torch.log_softmax(self.prior_logits, dim=-1)

    def _check_x(self, x: object, name: str = "x") -> Tensor:
        return check_shallow_images(
            x, name, self.image_shape, self.templates.dtype, self.templates.device
        )

    def _check_switches(self, switches: object, batch: int, required: bool) -> Tensor | None:
        """Validate switches (B,) bool; None means all ON (allowed only when not `required`)."""
        if switches is None:
            if required and self.has_switch:
                raise ValueError(
                    f"switches is required: the model has a switch "
                    f"(switch_prior_on={self.switch_prior_on})"
                )
            return None
        if not isinstance(switches, Tensor):
            raise TypeError(
                f"switches must be a torch.Tensor or None, got {type(switches).__name__}"
            )
        if switches.dtype != torch.bool:
            raise TypeError(f"switches must have dtype torch.bool, got {switches.dtype}")
        if switches.device != self.templates.device:
            raise ValueError(
                f"switches is on device {switches.device}, expected the model's device "
                f"{self.templates.device}"
            )
        if tuple(switches.shape) != (batch,):
            raise ValueError(
                f"switches must have shape (B,) = ({batch},), got {tuple(switches.shape)}"
            )
        if not self.has_switch and not bool(switches.all()):
            raise ValueError(
                "switches: this model has no switch (a is always 1), but some switches are off"
            )
        return switches

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, image_shape={self.image_shape}, "
            f"template_shape={self.template_shape}, translation={self.translation!r}, "
            f"sigma2={float(self.sigma2):.4g}, switch_prior_on={self.switch_prior_on}"
        )

    # ------------------------------------------------------------------------------------------
    # The generative view: literal definitions, no convolution
    # ------------------------------------------------------------------------------------------

    def render(
        self, classes: Tensor, translations: Tensor, switches: Tensor | None = None
    ) -> Tensor:
        """The noiseless image a * T_g mu_c, by direct indexing (no convolution).

        Args:
            classes: (B,) long in [0, C).
            translations: (B,) long in [0, G); g = i * Wg + j places the template at (i, j).
            switches: (B,) bool, or None for all ON. A model without a switch accepts only ON.

        Returns:
            (B, C0, H, W) rendered images.
        """
        device = self.templates.device
        c = check_index(classes, "classes", self.num_classes, None, device)
        batch = c.shape[0]
        g = check_index(translations, "translations", self.num_translations, batch, device)
        a = self._check_switches(switches, batch, required=False)
        c0, H, W = self.image_shape
        _, h, w = self.template_shape
        _, wg = self.translation_grid
        mu = self.templates[c]  # (B, C0, h, w)
        i, j = g // wg, g % wg  # (B,), (B,)
        b_idx = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        k_idx = torch.arange(c0, device=device).view(1, c0, 1, 1)
        if self.translation == "none":
            out = mu
        elif self.translation == "circular":
            # torch.roll(mu, (i, j)): out[r, s] = mu[(r - i) mod H, (s - j) mod W]
            rows = (torch.arange(H, device=device)[None, :] - i[:, None]) % H  # (B, H)
            cols = (torch.arange(W, device=device)[None, :] - j[:, None]) % W  # (B, W)
            out = mu[b_idx, k_idx, rows.view(batch, 1, H, 1), cols.view(batch, 1, 1, W)]
        else:
            # out[i + p, j + q] = mu[p, q], zeros elsewhere; index_put keeps autograd simple
            rows = i[:, None] + torch.arange(h, device=device)[None, :]  # (B, h)
            cols = j[:, None] + torch.arange(w, device=device)[None, :]  # (B, w)
            out = mu.new_zeros(batch, c0, H, W).index_put(
                (b_idx, k_idx, rows.view(batch, 1, h, 1), cols.view(batch, 1, 1, w)), mu
            )
        if a is not None:
            out = out * a.to(out.dtype).view(batch, 1, 1, 1)
        return out

    def log_joint(
        self,
        x: Tensor,
        classes: Tensor,
        translations: Tensor,
        switches: Tensor | None = None,
    ) -> Tensor:
        """log p(x, c, g, a), computed literally from the rendered image.

        log pi_c - log G + log p(a) - ||x - a T_g mu_c||^2 / (2 sigma^2) - (D/2) log(2 pi sigma^2).

        Args:
            x: (B, C0, H, W) images.
            classes: (B,) long in [0, C).
            translations: (B,) long in [0, G).
            switches: (B,) bool; required when the model has a switch, else None (or all ON).

        Returns:
            (B,) log joint densities.
        """
        x = self._check_x(x)
        batch = x.shape[0]
        device = self.templates.device
        c = check_index(classes, "classes", self.num_classes, batch, device)
        check_index(translations, "translations", self.num_translations, batch, device)
        a = self._check_switches(switches, batch, required=True)
        mu = self.render(c, translations, a)
        log_px = -(x - mu).pow(2).flatten(1).sum(1) / (2 * self.sigma2) - 0.5 * self.num_pixels * (
            torch.log(2 * math.pi * self.sigma2)
        )
        log_off, log_on = self._log_switch_prior()
        log_pa = (
            torch.zeros_like(log_px)
            if a is None
            else torch.where(a, log_px.new_tensor(log_on), log_px.new_tensor(log_off))
        )
        return log_px + self.log_prior[c] - math.log(self.num_translations) + log_pa

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> ShallowSample:
        """Ancestral sampling: c ~ pi, g ~ uniform, a ~ Bernoulli(pi_on), x = a T_g mu_c + eps.

        Args:
            n: number of samples, >= 1.
            generator: optional torch.Generator on the model's device, for reproducibility.

        Returns:
            `ShallowSample(x (n, C0, H, W), classes (n,) long, translations (n,) long,
            switches (n,) bool)` (switches all True for a model without a switch).
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        device, dtype = self.templates.device, self.templates.dtype
        classes = torch.multinomial(self.log_prior.exp(), n, replacement=True, generator=generator)
        translations = torch.randint(
            self.num_translations, (n,), generator=generator, device=device
        )
        if self.switch_prior_on is None:
            switches = torch.ones(n, dtype=torch.bool, device=device)
        else:
            u = torch.rand(n, generator=generator, dtype=dtype, device=device)
            switches = u < self.switch_prior_on
        noise = torch.randn((n, *self.image_shape), generator=generator, dtype=dtype, device=device)
        x = self.render(classes, translations, switches) + self.sigma2.sqrt() * noise
        return ShallowSample(x, classes, translations, switches)
