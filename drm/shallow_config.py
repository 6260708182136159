"""The shallow rendering model's architecture and typed results.

This module holds `ShallowConfig` (a frozen dataclass, the counterpart of
`drm.config.ModelConfig`: every architectural choice of a `drm.shallow.ShallowRenderingModel`,
no tensors), the typed results `ShallowSample` (what `sample` draws) and `ShallowLatents` (the
joint MAP of `map_latents`) and the literal types `Translation` and `ScoreMode`. `drm.shallow`
re-exports every public name; the model's image check is `drm.checks.check_shallow_images`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

from torch import Tensor

from drm.checks import check_count, check_real

__all__ = [
    "ScoreMode",
    "ShallowConfig",
    "ShallowLatents",
    "ShallowSample",
    "Translation",
]

Translation = Literal["circular", "interior", "none"]
ScoreMode = Literal["max", "sum"]
TRANSLATIONS: tuple[str, ...] = get_args(Translation)
MODES: tuple[str, ...] = get_args(ScoreMode)


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
        if self.translation not in TRANSLATIONS:
            raise ValueError(f"translation must be one of {TRANSLATIONS}, got {self.translation!r}")
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
