"""Every argument check of `drm` and `cnn_equiv`, in one module.

A public function checks its arguments once, at the door, with these helpers, then calls
unchecked code (`propagate_down`, `walk_up`, `coordinate_ascent`, ...). What is here:

* numbers and flags: `check_real`, `check_positive`, `check_nonnegative`, `check_flag`,
  `check_int`, `check_count` and `check_int_at_least` (the same test; their messages differ,
  "must be >= m" and "must be an int >= m", and each keeps its callers' message),
  `check_max_sweeps`;
* shapes and index tensors: `check_input_shape` (a (C, H, W) image shape), `check_index`;
* the deep model (`drm.deep_model.DeepRenderingModel`): `check_model`, `check_images`,
  `check_classes`, `check_latents`, `check_labelled_batch` (a trainer's images and labels),
  `check_partial_labels` (labels, or a mark for none;
  `drm.semisupervised`), its levels and units (`check_level_index`,
  `check_unit_indices`) and the switch rules of the top-down pass (`check_switch_rule`);
* the shallow model: `check_shallow_images`, `check_shallow_labels`;
* a torch network and what the attacks take: `dtype_device`, `check_classifier`, `check_batch`,
  `check_labels`, `check_attack_labels`, `check_pixel_range` (`PixelRange`), `check_alphas`.

Each helper returns the checked value (converted where it says so) or raises TypeError (wrong
type or dtype) / ValueError (wrong shape or value) with a message naming the argument. The
constructors check their own invariants (`DeepRenderingModel`, the levels, the configs), and a
level checks its own latent (`Level.check_latent`, called by `check_latents`).

Imports: levels -> deep_model -> checks -> model; this module needs the model class, and every
module that computes with a model needs this one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from drm.deep_model import DeepRenderingModel, Latents
from drm.levels import SWITCH_RULES, SwitchRule

__all__ = [
    "PixelRange",
    "check_alphas",
    "check_attack_labels",
    "check_batch",
    "check_classes",
    "check_classifier",
    "check_count",
    "check_flag",
    "check_images",
    "check_index",
    "check_input_shape",
    "check_int",
    "check_int_at_least",
    "check_labelled_batch",
    "check_latents",
    "check_level_index",
    "check_max_sweeps",
    "check_model",
    "check_nonnegative",
    "check_partial_labels",
    "check_positive",
    "check_real",
    "check_shallow_images",
    "check_shallow_labels",
    "check_switch_rule",
    "check_unit_indices",
    "dtype_device",
]

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


def check_int_at_least(value: object, name: str, minimum: int = 1) -> int:
    """An int (not a bool) >= `minimum` (`check_count`, with "must be an int >= m")."""
    value = check_int(value, name)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_max_sweeps(max_sweeps: int) -> None:
    """Raise a clear error unless `max_sweeps` >= 1."""
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be >= 1, got {max_sweeps}")


# --- shapes and index tensors ------------------------------------------------------------------


def check_input_shape(
    shape: Sequence[int], name: str = "input_shape", dims: str = "(C, H, W)"
) -> tuple[int, ...]:
    """Three positive sizes, as a tuple of ints; the ValueError names `name` and its form `dims`."""
    sizes = tuple(int(s) for s in shape)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"{name} must be {dims} with positive sizes, got {sizes}")
    return sizes


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


# --- the deep model ----------------------------------------------------------------------------


def check_model(model: object) -> DeepRenderingModel:
    if not isinstance(model, DeepRenderingModel):
        raise TypeError(f"model must be a drm.DeepRenderingModel, got {type(model).__name__}")
    return model


def check_images(model: DeepRenderingModel, x: object, name: str = "x") -> Tensor:
    """Return `x` if it is a batch of images the model accepts, else raise a clear error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != model.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the model is {model.dtype}; convert one of them "
            f"(e.g. x.to({model.dtype}) or model.to({x.dtype}))"
        )
    if x.device != model.device:
        raise ValueError(f"{name} is on {x.device} but the model is on {model.device}")
    if x.ndim != 4 or tuple(x.shape[1:]) != model.input_shape:
        expected = "(B, {}, {}, {})".format(*model.input_shape)
        if x.ndim == 4 and x.shape[1] != model.input_shape[0]:
            raise ValueError(
                f"{name} has {x.shape[1]} channels but the model expects {model.input_shape[0]}: "
                f"expected shape {expected}, got {tuple(x.shape)}"
            )
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    # One cheap reduction first: a sum is finite unless some entry is NaN/inf (or it overflows,
    # which the exact elementwise check then clears).
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_classes(model: DeepRenderingModel, classes: object, batch: int | None = None) -> Tensor:
    """Return `classes` if it is a (B,) int64 tensor of valid class indices."""
    if not isinstance(classes, Tensor):
        raise TypeError(f"classes must be a torch.Tensor, got {type(classes).__name__}")
    if classes.dtype != torch.long:
        raise TypeError(f"classes must be an int64 tensor, got dtype {classes.dtype}")
    if classes.ndim != 1 or (batch is not None and classes.shape[0] != batch):
        want = "(B,)" if batch is None else f"({batch},)"
        raise ValueError(f"classes must have shape {want}, got {tuple(classes.shape)}")
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= model.num_classes):
        raise ValueError(
            f"class index out of range: classes must lie in [0, {model.num_classes}), got "
            f"values in [{int(classes.min())}, {int(classes.max())}]"
        )
    return classes.to(model.device)


def check_latents(model: DeepRenderingModel, latents: object, batch: int) -> Latents:
    """Return `latents` if it holds one valid latent per latent level (None elsewhere)."""
    if not isinstance(latents, (tuple, list)) or len(latents) != len(model.levels):
        raise ValueError(
            f"latents must be a sequence with one entry per level ({len(model.levels)}), as "
            "returned by drm.max_sum"
        )
    for i, (level, latent) in enumerate(zip(model.levels, latents, strict=True)):
        if not level.has_latent:
            if latent is not None:
                raise ValueError(f"latents[{i}] must be None: {type(level).__name__} has none")
            continue
        if not isinstance(latent, Tensor):
            raise TypeError(f"latents[{i}] must be a tensor for {type(level).__name__}")
        try:
            level.check_latent(latent, batch)
        except (TypeError, ValueError) as err:
            raise type(err)(f"latents[{i}]: {err}") from err
    return tuple(latents)


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


def check_labelled_batch(model: DeepRenderingModel, x: object, y: object) -> None:
    """Raise a clear error unless x (B, C0, H, W) and labels y (B,) fit the model (a trainer's
    batch)."""
    x = check_images(model, x)
    check_classes(model, y, x.shape[0])


def check_partial_labels(
    model: DeepRenderingModel, y: object, batch: int, unlabelled: int
) -> Tensor:
    """(batch,) int64 labels in [0, C), or `unlabelled` for an image without a label."""
    if not isinstance(y, Tensor) or y.dtype != torch.long:
        raise TypeError(f"y must be an int64 tensor of labels, {unlabelled} for unlabelled images")
    if y.shape != (batch,):
        raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < unlabelled or int(y.max()) >= model.num_classes):
        raise ValueError(
            f"labels must lie in [0, {model.num_classes}) or be {unlabelled} (unlabelled), got "
            f"values in [{int(y.min())}, {int(y.max())}]"
        )
    return y


# --- the shallow model -------------------------------------------------------------------------


def check_shallow_labels(
    y: object, batch: int, num_classes: int, device: torch.device, supervised: bool
) -> Tensor | None:
    """None (every image unlabelled), or (batch,) int64 labels on `device`, in [0, C) or -1
    (unlabelled) when `supervised` (unsupervised EM ignores their values): the shallow model's
    EM (`drm.shallow_em`)."""
    if y is None:
        return None
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor or None, got {type(y).__name__}")
    if y.dtype != torch.long:
        raise TypeError(f"y must have dtype torch.int64 (long), got {y.dtype}")
    if y.device != device:
        raise ValueError(f"y is on device {y.device}, expected the model's device {device}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"y must have shape (B,) = ({batch},), got {tuple(y.shape)}")
    if supervised and y.numel() > 0 and (int(y.min()) < -1 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or be -1 (unlabelled), got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    return y


def check_shallow_images(
    x: object,
    name: str,
    image_shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """A finite (B, C0, H, W) batch for the shallow model (`drm.shallow`): its image shape,
    dtype and device."""
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


# --- a torch network and what the attacks take ------------------------------------------------


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
