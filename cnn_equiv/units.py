"""Individual units: what one unit sees, where it fires most, and the template it renders.

The lecture's "individual neuron activation", both ways. The neural-net way: `top_patches` finds
the dataset positions where a unit's bottom-up message (`bottom_up_to`, the CNN's activation) is
largest and crops the image under its receptive field. `receptive_field` is the nominal window,
by interval arithmetic over kernel, stride, padding and dilation (each level's `field_rule` and
`window`), or with exact=True the bounding box of `receptive_field_support`: the support of a
one-hot rendered with every switch ON, every pool cell chosen and all-ones templates
(`Level.spread_down`). The DRM way: `unit_template` renders the unit's partial template top-down
with given latents (e.g. those of its top-activating image).

Level indices are those of `model.levels`; a unit is a flat index into that level's output
(B, *out_shape) flattened per image. Level index -1 stands for the image itself.

References:
    Zeiler, Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014.
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cnn_equiv._walks import one_hot, output_shape, walk_down
from drm.checks import (
    check_images,
    check_int_at_least,
    check_latents,
    check_level_index,
    check_model,
    check_unit_indices,
)
from drm.inference import max_sum, walk_up
from drm.model import DeepRenderingModel, Latents


def _check_units(model: DeepRenderingModel, level_index: int, units: object) -> Tensor:
    """(K,) int64 flat unit indices into level `level_index`'s per-image output."""
    if not isinstance(units, Tensor):
        raise TypeError(f"units must be an int64 tensor, got {type(units).__name__}")
    if units.ndim != 1:
        raise ValueError(f"units must have shape (K,), got {tuple(units.shape)}")
    size = math.prod(output_shape(model, level_index))
    return check_unit_indices(units, size, units.shape[0], model.device)


def receptive_field(
    model: DeepRenderingModel, level_index: int, units: Tensor, exact: bool = False
) -> Tensor:
    """The window of pixels each unit sees.

    Nominal window (exact=False), by interval arithmetic over the levels below the unit: walking
    down, a window [lo, hi] of a sliding level's output maps to
    [lo * stride - pad, hi * stride - pad + dilation * (kernel - 1)] of its input (per axis);
    switches keep it; a Flatten turns a flat unit into its (channel, row, column); a dense level
    (or the class level) sees the whole image. It is not clipped to the image, so every unit of a
    spatial level gets a window of the same size, and it contains `receptive_field_support`.
    Clipped to the image it is usually the support's bounding box, but it can be larger: where
    strided windows never reach the last rows or columns, where a dilated or pooling window's
    taps fall in the padding, and for dense units over such maps.

    Exact box (exact=True): the bounding box of `receptive_field_support` (inside the image;
    (0, 0, 0, 0) for a unit that no pixel reaches).

    Args:
        level_index: in [-1, len(levels)), -1 is the image.
        units: (K,) int64 flat unit indices into the level's per-image output.
        exact: the support's bounding box instead of the nominal window.

    Returns:
        (K, 4) int64 boxes (top, left, bottom, right), bottom and right exclusive.
    """
    model = check_model(model)
    level_index = check_level_index(model, level_index)
    units = _check_units(model, level_index, units)
    if exact:
        return _bounding_box(receptive_field_support(model, level_index, units).any(1))
    shape = output_shape(model, level_index)
    _, height, width = model.input_shape
    whole = torch.tensor([0, 0, height, width], device=units.device).expand(units.shape[0], 4)
    flat: Tensor | None = None  # flat indices while the walk is in a 1-D level
    box: Tensor | None = None  # (K, 4) inclusive (row lo, col lo, row hi, col hi)
    if len(shape) == 3:
        hw = units % (shape[1] * shape[2])
        rows, cols = hw // shape[2], hw % shape[2]
        box = torch.stack([rows, cols, rows, cols], 1)
    else:
        flat = units
    for j in range(level_index, -1, -1):
        level = model.levels[j]
        rule = level.field_rule
        if rule == "dense":  # the class level too: every pixel reaches every unit
            return whole.clone()
        if rule == "flatten":
            assert flat is not None
            _, h_in, w_in = level.in_shape
            hw = flat % (h_in * w_in)
            rows, cols = hw // w_in, hw % w_in
            box, flat = torch.stack([rows, cols, rows, cols], 1), None
            continue
        if rule == "pointwise":
            continue  # switches keep the window
        if rule != "window":
            raise TypeError(
                f"levels[{j}] ({type(level).__name__}) has no receptive-field rule: set its "
                "field_rule (drm/levels.py)"
            )
        assert box is not None
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = level.window()
        step = box.new_tensor([sh, sw, sh, sw])
        shift = box.new_tensor([-ph, -pw, -ph + dh * (kh - 1), -pw + dw * (kw - 1)])
        box = box * step + shift
    assert box is not None
    return box + box.new_tensor([0, 0, 1, 1])


def _spread_down(model: DeepRenderingModel, g: Tensor, level_index: int) -> Tensor:
    """Indicator of the pixels a non-negative signal can reach under some latent configuration.

    Every template is replaced by ones (no cancellation, no zero weights hide a pixel), every
    switch is ON and a pooled unit renders onto every valid cell of its window.
    """
    for j in range(level_index, -1, -1):
        g = model.levels[j].spread_down(g)
        g = (g > 0).to(g.dtype)  # keep an indicator: bounded however deep the model is
    return g


def receptive_field_support(model: DeepRenderingModel, level_index: int, units: Tensor) -> Tensor:
    """The pixels that can influence each unit under some latent configuration: (K, C0, H, W) bool.

    The support of the rendering of a one-hot at the unit with every switch ON, every pooling
    window's cells all marked and every template replaced by ones.

    Args:
        level_index: in [-1, len(levels)), -1 is the image.
        units: (K,) int64 flat unit indices into the level's per-image output.
    """
    model = check_model(model)
    level_index = check_level_index(model, level_index)
    units = _check_units(model, level_index, units)
    with torch.no_grad():
        return _spread_down(model, one_hot(model, level_index, units), level_index) > 0


def _bounding_box(mask: Tensor) -> Tensor:
    """(K, 4) int64 (top, left, bottom, right) of the True entries of (K, H, W); zeros if none."""
    height, width = mask.shape[1:]
    rows, cols = mask.any(2), mask.any(1)  # (K, H), (K, W)
    row_at = torch.arange(height, device=mask.device)
    col_at = torch.arange(width, device=mask.device)
    box = torch.stack(
        [
            torch.where(rows, row_at, height).amin(1),
            torch.where(cols, col_at, width).amin(1),
            torch.where(rows, row_at + 1, 0).amax(1),
            torch.where(cols, col_at + 1, 0).amax(1),
        ],
        1,
    )
    return torch.where(rows.any(1, keepdim=True), box, 0)


def bottom_up_to(model: DeepRenderingModel, x: Tensor, level_index: int) -> Tensor:
    """The bottom-up max-sum message at level `level_index`'s output (-1: x): (B, *out_shape).

    The CNN's activation of that layer (its feature map y^(l)); differentiable in x.
    """
    model = check_model(model)
    level_index = check_level_index(model, level_index)
    return walk_up(model, check_images(model, x), stop=level_index + 1).output


class TopPatches(NamedTuple):
    """Result of `top_patches`: the k most active placements of one unit, best first.

    Attributes:
        values: (k,) the unit's bottom-up message (its activation) there.
        image_index: (k,) int64 index into the dataset.
        units: (k,) int64 flat index of the unit (channel and position) in the level's output.
        boxes: (k, 4) int64 receptive fields (top, left, bottom, right), not clipped.
        patches: (k, C0, bottom - top, right - left) the image under each box, zero outside it.
        latents: the CNN latents of the k images (`drm.max_sum`), for `unit_template`.
    """

    values: Tensor
    image_index: Tensor
    units: Tensor
    boxes: Tensor
    patches: Tensor
    latents: Latents


def top_patches(
    model: DeepRenderingModel, images: Tensor, level_index: int, channel: int, k: int
) -> TopPatches:
    """Where in a dataset one unit fires most, and the image patches under its receptive field.

    The unit is a channel of a spatial level's output at any position (or, for a level with flat
    output, the unit `channel`); its activation is the bottom-up message (`bottom_up_to`).
    Computed without autograd.

    Args:
        images: (N, C0, H, W) the dataset.
        level_index: in [-1, len(levels)).
        channel: the channel (or flat unit) index.
        k: how many placements, at most the number of candidates (N * H_l * W_l, or N).

    Returns:
        `TopPatches`, best first (ties in `torch.topk`'s order).
    """
    model = check_model(model)
    level_index = check_level_index(model, level_index)
    images = check_images(model, images, "images")
    shape = output_shape(model, level_index)
    if isinstance(channel, bool) or not isinstance(channel, int):
        raise TypeError(f"channel must be an int, got {type(channel).__name__}")
    if not 0 <= channel < shape[0]:
        raise ValueError(f"channel must lie in [0, {shape[0]}) for this level, got {channel}")
    per_image = math.prod(shape[1:])  # positions of the channel in one image (1 if flat)
    k = check_int_at_least(k, "k")
    if k > images.shape[0] * per_image:
        raise ValueError(
            f"k={k} exceeds the {images.shape[0] * per_image} placements of the unit in the data"
        )
    with torch.no_grad():
        activations = bottom_up_to(model, images, level_index)[:, channel]  # (N, *spatial)
        values, flat = activations.reshape(-1).topk(k)
        image_index, position = flat // per_image, flat % per_image
        units = channel * per_image + position
        boxes = receptive_field(model, level_index, units)
        # crop every box out of a zero-padded copy of the images
        height, width = model.input_shape[1:]
        top, left = int(-boxes[:, 0].min().clamp_max(0)), int(-boxes[:, 1].min().clamp_max(0))
        bottom = int((boxes[:, 2] - height).max().clamp_min(0))
        right = int((boxes[:, 3] - width).max().clamp_min(0))
        padded = F.pad(images, (left, right, top, bottom))
        box_h = int(boxes[0, 2] - boxes[0, 0])
        box_w = int(boxes[0, 3] - boxes[0, 1])
        rows = boxes[:, 0, None] + top + torch.arange(box_h, device=boxes.device)  # (k, bh)
        cols = boxes[:, 1, None] + left + torch.arange(box_w, device=boxes.device)  # (k, bw)
        chans = torch.arange(images.shape[1], device=boxes.device)
        patches = padded[
            image_index[:, None, None, None],
            chans[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]  # (k, C0, bh, bw)
        latents = max_sum(model, images[image_index])[1]
    return TopPatches(values, image_index, units, boxes, patches, latents)


def unit_template(
    model: DeepRenderingModel, level_index: int, unit: int | Tensor, latents: Latents
) -> Tensor:
    """The rendered partial template of one unit: sigma^2 times the top-down pass of its one-hot.

    A one-hot at the unit is rendered down through its level and every level below with the given
    latents (the levels above are not used), scaled like `drm.render` (mu = sigma^2 h^(0)); for
    the class level it is `drm.render`, and with an image's CNN latents it is sigma^2 times
    `project(model, x, Unit(level_index, unit))`. Computed without autograd.

    Args:
        level_index: in [-1, len(levels)).
        unit: an int or (B,) int64 flat index into the level's per-image output.
        latents: latents of B images (one entry per level), e.g. `TopPatches.latents`.

    Returns:
        (B, C0, H, W) template, supported inside the unit's receptive field.
    """
    model = check_model(model)
    level_index = check_level_index(model, level_index)
    if not isinstance(latents, (tuple, list)):
        raise TypeError(f"latents must be a tuple of tensors, got {type(latents).__name__}")
    batch = next((z.shape[0] for z in latents if isinstance(z, Tensor)), None)
    if batch is None:
        batch = unit.shape[0] if isinstance(unit, Tensor) and unit.ndim == 1 else 1
    latents = check_latents(model, latents, batch)
    size = math.prod(output_shape(model, level_index))
    units = check_unit_indices(unit, size, batch, model.device)
    with torch.no_grad():
        g = walk_down(model, one_hot(model, level_index, units), level_index, latents, "drm")
        return model.sigma2 * g


__all__ = [
    "TopPatches",
    "bottom_up_to",
    "receptive_field",
    "receptive_field_support",
    "top_patches",
    "unit_template",
]
