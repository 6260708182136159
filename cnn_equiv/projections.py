"""Top-down projections of a class or a unit onto the pixels: deconvnet, guided backprop, DRM.

The lecture's "map activation back to the input pixel space", computed both ways. `project` starts
a top-down pass from a one-hot at a level's output and walks down with the image's max-sum latents
(`Level.top_down`); with rule "drm" the result is the DRM rendering divided by sigma^2, which is
the input gradient of the unit (eq. 9, E6) that `saliency` computes with autograd on the torch
CNN. Rules "deconvnet" (Zeiler & Fergus) and "guided" (Springenberg et al.) are the same pass with
other switch rules.

Level indices are those of `model.levels` (for `to_cnn(model)`, the same indices address the
torch layers); a unit is a flat index into that level's output (B, *out_shape) flattened per
image. Level index -1 stands for the image itself.

References:
    Zeiler, Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014.
    Springenberg, Dosovitskiy, Brox, Riedmiller, Striving for Simplicity: The All Convolutional
    Net, ICLR Workshop 2015 (guided backpropagation).
    Simonyan, Vedaldi, Zisserman, Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps, ICLR Workshop 2014.
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cnn_equiv._walks import layer_output, one_hot, output_shape, walk_down
from drm.checks import (
    check_classes,
    check_images,
    check_level_index,
    check_model,
    check_switch_rule,
    check_unit_indices,
)
from drm.inference import latents_or_max_sum
from drm.levels import SwitchRule
from drm.model import DeepRenderingModel, Latents


class Unit(NamedTuple):
    """One unit of a level.

    Attributes:
        level: index into `model.levels` (or a torch CNN's leaf layers); -1 is the image.
        flat_index: flat index into that level's per-image output, an int or (B,) int64 (one unit
            per image).
    """

    level: int
    flat_index: int | Tensor


# A projection target: classes (B,) int64 (or one int for the whole batch), or a `Unit`.
Target = Tensor | int | Unit | tuple[int, int | Tensor]


def _as_unit(target: object) -> Unit | None:
    """The `Unit` in `target`, or None when `target` names classes."""
    if isinstance(target, (Tensor, int)) and not isinstance(target, bool):
        return None
    if isinstance(target, tuple) and len(target) == 2:
        return Unit(target[0], target[1])
    raise TypeError(
        "target must be classes (a (B,) int64 tensor or an int) or a unit (level, flat_index), "
        f"got {type(target).__name__}"
    )


def project(
    model: DeepRenderingModel,
    x: Tensor,
    target: Target,
    rule: SwitchRule = "drm",
    latents: Latents | None = None,
) -> Tensor:
    """The top-down projection of a class or of one unit onto the pixels of each image.

    A one-hot signal at the target's level output is passed down through that level and every
    level below it with the image's latents (`Level.top_down`). With rule "drm" this is h^(0), the
    DRM rendering divided by sigma^2, and it equals the input gradient of the target's activation
    (the class logit, or the unit's bottom-up message) with the latents frozen at the CNN's, i.e.
    the CNN's own gradient (eq. 9, E6). "deconvnet" is Zeiler & Fergus's projection (the switch
    rectifies the signal instead of using the forward mask) and "guided" is guided
    backpropagation (both). Computed without autograd.

    Args:
        model: the rendering model.
        x: (B, C0, H, W) images of the model's dtype and device.
        target: classes (B,) int64 (or an int for every image), or a `Unit(level, flat_index)`:
            level in [-1, len(levels)), flat_index an int or (B,) int64 flat index into that
            level's per-image output.
        rule: "drm", "deconvnet" or "guided".
        latents: the images' latents; default `drm.max_sum(model, x)`'s (the CNN's).

    Returns:
        (B, C0, H, W) projection.
    """
    model = check_model(model)
    rule = check_switch_rule(rule)
    x = check_images(model, x)
    batch = x.shape[0]
    unit = _as_unit(target)
    if unit is None:
        level_index = len(model.levels) - 1
        if isinstance(target, int):
            units = torch.full((batch,), target, dtype=torch.long, device=model.device)
        else:
            assert isinstance(target, Tensor)
            units = target
        units = check_classes(model, units, batch)
    else:
        level_index = check_level_index(model, unit.level)
        size = math.prod(output_shape(model, level_index))
        units = check_unit_indices(unit.flat_index, size, batch, model.device)
    with torch.no_grad():
        latents = latents_or_max_sum(model, x, latents)
        return walk_down(model, one_hot(model, level_index, units), level_index, latents, rule)


def saliency(cnn: nn.Module, x: Tensor, target: Target) -> Tensor:
    """The input gradient of a class logit or of one unit, by autograd on the torch CNN.

    The neural-net way of `project(..., rule="drm")` (Simonyan et al.'s image-specific class
    saliency is `saliency(...).abs().amax(1)`). The CNN's parameters get no `.grad`.

    Args:
        cnn: any torch module mapping (B, C0, H, W) images to (B, C) logits (put it in eval mode);
            for a `Unit` target, an nn.Sequential whose leaf layers (`cnn_equiv.cnn.iter_layers`
            order) the unit's level indexes: for `to_cnn(model)` these are the model's levels.
        x: (B, C0, H, W) images.
        target: classes (B,) int64 or an int, or a `Unit(layer, flat_index)` (flat index into
            the layer's output flattened per image; layer -1 is the image).

    Returns:
        (B, C0, H, W) d activation / d x, per image.
    """
    if not isinstance(cnn, nn.Module):
        raise TypeError(f"cnn must be a torch nn.Module, got {type(cnn).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
        raise TypeError("x must be a floating-point (B, C0, H, W) tensor")
    unit = _as_unit(target)
    batch = x.shape[0]
    image = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if unit is None:
            out = cnn(image)
            classes = check_unit_indices(target, out.shape[1], batch, out.device)
        else:
            if isinstance(unit.level, bool) or not isinstance(unit.level, int):
                raise TypeError(f"a unit's layer must be an int, got {type(unit.level).__name__}")
            out = layer_output(cnn, image, unit.level).flatten(1)
            classes = check_unit_indices(unit.flat_index, out.shape[1], batch, out.device)
        (grad,) = torch.autograd.grad(out.gather(1, classes[:, None]).sum(), image)
    return grad


__all__ = ["Target", "Unit", "project", "saliency"]
