"""Argument checks shared by `cnn_equiv.attacks` and `cnn_equiv.visualize` (private)."""

from __future__ import annotations

import math

import torch
from torch import nn

from drm.model import DeepRenderingModel


def check_nonnegative(value: object, name: str, positive: bool = False) -> float:
    """A finite real number >= 0 (> 0 when `positive`), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value}")
    return number


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """An int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def dtype_device(net: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of a model: a DRM's own, else its first floating parameter or buffer's.

    A module without any floating tensor gets the default dtype, on the CPU.
    """
    if isinstance(net, DeepRenderingModel):
        return net.dtype, net.device
    for tensor in (*net.parameters(), *net.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")
