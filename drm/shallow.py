"""The shallow (one-level) rendering model and its CNN view (DESIGN statement E7).

This module holds `ShallowRenderingModel`, its architecture `ShallowConfig` (a frozen dataclass,
the counterpart of `drm.config.ModelConfig`) and its typed results `ShallowSample` and
`ShallowLatents`. The model: a class c ~ pi (C classes), a translation nuisance g uniform over G
placements, an optional switch a in {0, 1} with prior P(a = 1) = pi_on (object present or
absent), and shared isotropic Gaussian pixel noise:

    x = a * T_g mu_c + eps,    eps ~ N(0, sigma^2 I),    x: (C0, H, W),  D = C0 * H * W,

    log p(x, c, g, a) = log pi_c - log G + log p(a)
                        - ||x - a T_g mu_c||^2 / (2 sigma^2) - (D / 2) log(2 pi sigma^2).

Translation kinds: "circular" (image-sized templates, T_g = `torch.roll` by each of the H * W
shifts), "interior" (templates (C0, h, w) placed at each of the (H - h + 1)(W - w + 1) positions,
zeros elsewhere) and "none" (G = 1, image-sized templates, no shift).

The module gives both views of the same model side by side:

* the generative view, written literally with no convolution (`render`, `log_joint`, `sample`),
  the independent definition the tests check everything else against;
* the CNN view: every T_g is norm-preserving, so after dropping the class-independent constant
  K(x) = ||x||^2 / (2 sigma^2) + (D / 2) log(2 pi sigma^2) the score of (c, g, a) is

      log pi_c - log G + log p(a) + a * (<x, T_g mu_c> / sigma^2 - ||mu_c||^2 / (2 sigma^2)),

  i.e. template matching (one convolution of x with mu_c / sigma^2), a bias, then
  max over a = ReLU, sum over a = softplus (with bias + log(pi_on / pi_off) inside and
  log(1 - pi_on) outside), max over g = max-pooling, sum over g = log-sum-exp, and the exact
  posterior p(c | x) = softmax of the summed scores. Without translation or switch it is one
  linear layer, whose weights `cnn_equiv.mapping.to_linear_classifier` writes out (parameters
  cross between the views only in that module).

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drm.checks import check_count, check_index, check_real

__all__ = [
    "ScoreMode",
    "ShallowConfig",
    "ShallowLatents",
    "ShallowRenderingModel",
    "ShallowSample",
    "Translation",
]

Translation = Literal["circular", "interior", "none"]
ScoreMode = Literal["max", "sum"]
_TRANSLATIONS: tuple[str, ...] = get_args(Translation)
_MODES: tuple[str, ...] = get_args(ScoreMode)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def _check_image(
    x: object,
    name: str,
    image_shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Check that `x` is a finite (B, C0, H, W) tensor of the model's dtype and device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of dtype {dtype}, got dtype {x.dtype}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected the model's dtype {dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on device {x.device}, expected the model's device {device}")
    c0, h, w = image_shape
    if x.ndim != 4:
        raise ValueError(
            f"{name} must have shape (B, C0, H, W) = (B, {c0}, {h}, {w}), got {tuple(x.shape)}"
        )
    if x.shape[1] != c0:
        raise ValueError(f"{name} has {x.shape[1]} channels, expected C0 = {c0}")
    if tuple(x.shape[2:]) != (h, w):
        raise ValueError(
            f"{name} has spatial size {tuple(x.shape[2:])}, expected (H, W) = {(h, w)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _softplus(z: Tensor) -> Tensor:
    """log(1 + exp(z)) to full precision.

    `torch.nn.functional.softplus` returns z itself above its threshold (20), an error of up to
    exp(-20) ~ 2e-9, which is larger than the 1e-10 identities this module is tested to.
    """
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


# ----------------------------------------------------------------------------------------------
# The architecture and the typed results
# ----------------------------------------------------------------------------------------------


def _shape3(value: object, name: str, what: str) -> tuple[int, int, int]:
    """A sequence of 3 positive ints (not bools), as a tuple."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise TypeError(f"{name} must be a sequence of 3 ints {what}, got {value!r}")
    a, b, c = (int(s) for s in value)
    if min(a, b, c) < 1:
        raise ValueError(f"{name} must be positive, got {(a, b, c)}")
    return (a, b, c)


@dataclass(frozen=True)
class ShallowConfig:
    """The architecture of a `ShallowRenderingModel` (no tensors), validated on construction.

    The counterpart of `drm.config.ModelConfig` for the one-level model. `to_dict` /
    `from_dict` give the JSON form the checkpoints store.
    """

    num_classes: int  # C, the number of class templates
    template_shape: tuple[int, int, int]  # (C0, h, w) of one template
    image_shape: tuple[int, int, int]  # (C0, H, W) of one image
    translation: Translation = "circular"  # the translation nuisance (module docstring)
    switch_prior_on: float | None = None  # P(a = 1) in (0, 1), or None: no switch (a = 1)

    def __post_init__(self) -> None:
        check_count(self.num_classes, "num_classes", 1)
        c0_t, h, w = _shape3(self.template_shape, "template_shape", "(C0, h, w)")
        c0, H, W = _shape3(self.image_shape, "image_shape", "(C0, H, W)")
        object.__setattr__(self, "template_shape", (c0_t, h, w))
        object.__setattr__(self, "image_shape", (c0, H, W))
        if not isinstance(self.translation, str):
            raise TypeError(f"translation must be a str, got {type(self.translation).__name__}")
        if self.translation not in _TRANSLATIONS:
            raise ValueError(
                f"translation must be one of {_TRANSLATIONS}, got {self.translation!r}"
            )
        if c0_t != c0:
            raise ValueError(f"templates have C0 = {c0_t} channels but image_shape has C0 = {c0}")
        if self.translation in ("circular", "none") and (h, w) != (H, W):
            raise ValueError(
                f"translation={self.translation!r} needs image-sized templates: template spatial "
                f"size {(h, w)} != image (H, W) = {(H, W)}; use translation='interior' for "
                "smaller ones"
            )
        if h > H or w > W:
            raise ValueError(
                f"templates of spatial size {(h, w)} are larger than the image (H, W) = {(H, W)}"
            )
        if self.switch_prior_on is not None:
            on = check_real(self.switch_prior_on, "switch_prior_on")
            if not 0.0 < on < 1.0:
                raise ValueError(
                    f"switch_prior_on must lie in the open interval (0, 1) or be None, got {on}"
                )
            object.__setattr__(self, "switch_prior_on", on)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (template_shape holds C first); `from_dict` inverts it."""
        return {
            "template_shape": [self.num_classes, *self.template_shape],
            "image_shape": list(self.image_shape),
            "translation": self.translation,
            "switch_prior_on": self.switch_prior_on,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShallowConfig:
        """Rebuild a config from `to_dict` output, validating every field."""
        try:
            num_classes, *template_shape = (int(s) for s in data["template_shape"])
            return cls(
                num_classes=num_classes,
                template_shape=tuple(template_shape),  # type: ignore[arg-type]
                image_shape=tuple(int(s) for s in data["image_shape"]),  # type: ignore[arg-type]
                translation=str(data["translation"]),  # type: ignore[arg-type]
                switch_prior_on=data["switch_prior_on"],
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed shallow model config: {err}") from err


class ShallowSample(NamedTuple):
    """What `ShallowRenderingModel.sample` draws."""

    x: Tensor  # (n, C0, H, W) images
    classes: Tensor  # (n,) long
    translations: Tensor  # (n,) long, g = i * Wg + j
    switches: Tensor  # (n,) bool (all True without a switch)


class ShallowLatents(NamedTuple):
    """One (c, g, a) per image: the joint MAP of `ShallowRenderingModel.map_latents`."""

    classes: Tensor  # (B,) long
    translations: Tensor  # (B,) long, g = i * Wg + j
    switches: Tensor  # (B,) bool (all True without a switch)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class ShallowRenderingModel(nn.Module):
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

    def _log_switch_prior(self) -> tuple[float, float]:
        """(log P(a = 0), log P(a = 1)); (-inf, 0) without a switch."""
        if self.switch_prior_on is None:
            return (-math.inf, 0.0)
        return (math.log1p(-self.switch_prior_on), math.log(self.switch_prior_on))

    def _template_energy(self) -> Tensor:
        """(C,) ||mu_c||^2 / (2 sigma^2), also ||T_g mu_c||^2 / (2 sigma^2): T_g keeps norms."""
        return self.templates.pow(2).flatten(1).sum(1) / (2 * self.sigma2)

    def _check_x(self, x: object, name: str = "x") -> Tensor:
        return _check_image(x, name, self.image_shape, self.templates.dtype, self.templates.device)

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

    # ------------------------------------------------------------------------------------------
    # The CNN view: template matching, bias, ReLU / softplus, max-pool / log-sum-exp
    # ------------------------------------------------------------------------------------------

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
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
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
