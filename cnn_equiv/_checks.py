"""Argument checks shared by the tools of `cnn_equiv` (private).

Generic numbers (`check_nonnegative`, `check_count`, `check_int`), a model's levels and units
(`check_model`, `check_level_index`, `check_unit_indices`, `check_switch_rule`; these and
`check_nonnegative`, `check_int` live in `drm.checks`, re-exported here), a CNN's input
shape and dtype (`cnn_input_shape`, `dtype_device`), and what the attacks take (`check_classifier`,
`check_batch`, `check_labels`, `check_attack_labels`, `check_pixel_range`, `check_alphas`). Each
returns the checked value (converted where it says so) or raises TypeError / ValueError naming
the argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cnn_equiv.cnn import input_shape_of
from drm.checks import check_int as check_int
from drm.checks import check_level_index as check_level_index
from drm.checks import check_model as check_model
from drm.checks import check_nonnegative as check_nonnegative
from drm.checks import check_switch_rule as check_switch_rule
from drm.checks import check_unit_indices as check_unit_indices
from drm.model import DeepRenderingModel, check_images

# A pixel range (low, high) that every image is clamped to, or None for no clamping.
PixelRange = tuple[float, float] | None

# Layers whose training mode changes what a torch classifier computes (batch statistics, random
# masks): an attack on them would attack a random function.
_TRAINING_DEPENDENT = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


# --- numbers -----------------------------------------------------------------------------------


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """An int (not a bool) >= `minimum`."""
    value = check_int(value, name)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


# --- a torch network ---------------------------------------------------------------------------


def cnn_input_shape(cnn: nn.Module, shape: Sequence[int] | None) -> tuple[int, ...]:
    """(C0, H, W): `shape`, or the input shape of an `EquivalentCNN`."""
    return input_shape_of(
        cnn,
        shape,
        "shape=(C0, H, W) is needed for a CNN that is no EquivalentCNN",
        name="shape",
        dims="(C0, H, W)",
    )


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


# --- what the attacks take ---------------------------------------------------------------------


def check_classifier(classifier: object) -> nn.Module:
    if not isinstance(classifier, nn.Module):
        raise TypeError(
            "classifier must be a DeepRenderingModel or a torch nn.Module mapping images to "
            f"logits, got {type(classifier).__name__}"
        )
    if not isinstance(classifier, DeepRenderingModel):
        for name, module in classifier.named_modules():
            if isinstance(module, _TRAINING_DEPENDENT) and module.training:
                raise ValueError(
                    f"classifier layer {name or '<root>'} ({type(module).__name__}) is in "
                    "training mode, where its output is random or depends on the batch; call "
                    "classifier.eval() first"
                )
    return classifier


def check_batch(classifier: nn.Module, x: object, name: str = "x") -> Tensor:
    if isinstance(classifier, DeepRenderingModel):
        return check_images(classifier, x, name)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_labels(labels: object, batch: int, name: str) -> Tensor:
    """(B,) int64; the attacks check the range against the logits."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.long:
        raise TypeError(f"{name} must be an int64 tensor, got dtype {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")
    return labels


def check_attack_labels(y: Tensor | None, target: Tensor | None, batch: int) -> tuple[Tensor, bool]:
    """The labels whose cross-entropy the attack raises (y) or lowers (target)."""
    if y is None and target is None:
        raise ValueError("give the true labels y (untargeted attack) or a target (targeted)")
    if y is not None:
        y = check_labels(y, batch, "y")
    if target is not None:
        return check_labels(target, batch, "target"), True
    assert y is not None
    return y, False


def check_pixel_range(clamp: object, x: Tensor | None = None) -> PixelRange:
    """A valid pixel range; the clean images `x` must already lie inside it."""
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"clamp must be None or a pair (low, high), got {clamp!r}")
    low, high = (float(v) for v in clamp)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"clamp must be finite with low < high, got {clamp!r}")
    if x is not None and x.numel():
        lowest, highest = float(x.detach().min()), float(x.detach().max())
        if lowest < low or highest > high:
            raise ValueError(
                f"the images span [{lowest:.4g}, {highest:.4g}], outside clamp=({low}, {high}): "
                "pass the images' pixel range as clamp, or clamp=None"
            )
    return (low, high)


def check_alphas(alpha: float | Tensor, x: Tensor) -> Tensor:
    """alpha as a (B,) tensor of x's dtype and device, checked >= 0 and finite."""
    if isinstance(alpha, Tensor):
        if alpha.ndim == 0:
            alpha = alpha.expand(x.shape[0])
        if alpha.shape != (x.shape[0],):
            raise ValueError(f"alpha must be a number or ({x.shape[0]},), got {tuple(alpha.shape)}")
        values = alpha.detach().to(x.device, x.dtype)
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError("alpha must be finite and >= 0")
        return values
    return x.new_full((x.shape[0],), check_nonnegative(alpha, "alpha"))
