"""Argument checks shared by `drm` and `cnn_equiv` (numbers, flags, index tensors, a rendering
model's levels and units: `check_model`, `check_level_index`, `check_unit_indices`,
`check_switch_rule`).

Each helper returns the checked value (converted where it says so) or raises TypeError (wrong
type or dtype) / ValueError (wrong shape or value) with a message naming the argument. The
model-specific checks of the deep model (`drm.model.check_images`, `check_classes`,
`check_latents`) build on the same conventions.
"""

from __future__ import annotations

import math
import numbers
from typing import cast

import torch
from torch import Tensor

from drm.levels import SWITCH_RULES, SwitchRule
from drm.model import DeepRenderingModel

__all__ = [
    "check_count",
    "check_flag",
    "check_index",
    "check_int",
    "check_level_index",
    "check_model",
    "check_nonnegative",
    "check_positive",
    "check_real",
    "check_switch_rule",
    "check_unit_indices",
]


def check_real(value: object, name: str) -> float:
    """A real number (or a one-element non-bool tensor) as a float; bools are refused."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_positive(value: object, name: str) -> float:
    """A finite real number > 0, as a float (a one-element tensor is not accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{name} must be a finite positive number, got {out}")
    return out


def check_flag(value: object, name: str) -> bool:
    """A bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_count(value: object, name: str, minimum: int) -> int:
    """An int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_index(
    t: object, name: str, upper: int, batch: int | None, device: torch.device
) -> Tensor:
    """A (B,) int64 tensor on `device` with values in [0, upper) (and B = `batch` if given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.long:
        raise TypeError(f"{name} must have dtype torch.int64 (long), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on device {t.device}, expected the model's device {device}")
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has batch size {t.shape[0]}, expected B = {batch}")
    if t.numel() > 0 and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise ValueError(
            f"{name} must lie in [0, {upper}), got values in [{int(t.min())}, {int(t.max())}]"
        )
    return t


def check_nonnegative(value: object, name: str, positive: bool = False) -> float:
    """A finite real number >= 0 (> 0 when `positive`), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value}")
    return number


def check_int(value: object, name: str) -> int:
    """An int (not a bool), of any value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


# --- a rendering model's levels and units ------------------------------------------------------


def check_model(model: object) -> DeepRenderingModel:
    if not isinstance(model, DeepRenderingModel):
        raise TypeError(f"model must be a drm.DeepRenderingModel, got {type(model).__name__}")
    return model


def check_level_index(model: DeepRenderingModel, level_index: object) -> int:
    """A level index in [-1, len(levels)): -1 is the image itself."""
    level_index = check_int(level_index, "level_index")
    if not -1 <= level_index < len(model.levels):
        raise ValueError(
            f"level_index must lie in [-1, {len(model.levels)}) (-1 is the image), "
            f"got {level_index}"
        )
    return level_index


def check_unit_indices(index: object, size: int, batch: int, device: torch.device) -> Tensor:
    """(batch,) int64 unit indices in [0, size) from an int or a (batch,) int64 tensor."""
    if isinstance(index, bool):
        raise TypeError("a unit index must be an int or an int64 tensor, got bool")
    if isinstance(index, int):
        units = torch.full((batch,), index, dtype=torch.long, device=device)
    elif isinstance(index, Tensor):
        if index.dtype != torch.long:
            raise TypeError(f"unit indices must be an int64 tensor, got dtype {index.dtype}")
        if index.shape != (batch,):
            raise ValueError(f"unit indices must have shape ({batch},), got {tuple(index.shape)}")
        units = index.to(device)
    else:
        raise TypeError(
            f"a unit index must be an int or an int64 tensor, got {type(index).__name__}"
        )
    if units.numel() and (int(units.min()) < 0 or int(units.max()) >= size):
        raise ValueError(
            f"unit index out of range: the level has {size} units per image, got values in "
            f"[{int(units.min())}, {int(units.max())}]"
        )
    return units


def check_switch_rule(rule: object) -> SwitchRule:
    if rule not in SWITCH_RULES:
        raise ValueError(f"rule must be one of {SWITCH_RULES}, got {rule!r}")
    return cast(SwitchRule, rule)
