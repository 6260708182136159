"""Argument checks shared by the modules of `drm` (numbers, flags, index tensors).

Each helper returns the checked value (converted where it says so) or raises TypeError (wrong
type or dtype) / ValueError (wrong shape or value) with a message naming the argument. The
model-specific checks of the deep model (`drm.model.check_images`, `check_classes`,
`check_latents`) build on the same conventions.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["check_count", "check_flag", "check_index", "check_positive", "check_real"]


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
