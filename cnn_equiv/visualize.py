"""Understanding and visualising a CNN, each method computed the neural-net way and the DRM way.

The lecture's section "Understanding and Visualizing CNN" lists four tools; here each one is a
library function on the torch CNN (autograd, optimisation) next to its reading in the Deep
Rendering Model (a top-down rendering with latents, docs/equivalence.md):

1. *Top-down projection* of a class or of one unit (Zeiler & Fergus's deconvnet, Springenberg's
   guided backpropagation, Simonyan's saliency). `project` starts a top-down pass from a one-hot
   at a level's output and walks down with the image's max-sum latents (`Level.top_down`); with
   rule "drm" the result is the DRM rendering divided by sigma^2, which is the input gradient of
   the unit (eq. 9, E6) that `saliency` computes with autograd.
2. *Class-score maximisation* (Simonyan et al.) against the DRM's *MAP rendering* of a class.
   `maximize_class_score` does gradient ascent on S_c(x) - l2 ||x||^2. In the DRM
   (eq. 4-5, with z_CNN(x) the max-sum latents of x)

       S_c(x) - ||x||^2 / (2 sigma^2) = log p(x, c, z_CNN(x)) + log Z + (D/2) log(2 pi sigma^2),

   so with l2 = 1/(2 sigma^2) Simonyan's objective *is* the log-joint at the CNN's latents, and one
   gradient step with lr = sigma^2 is exactly x <- mu(c, z_CNN(x)): the rendering of the class
   with the latents the CNN reads off x. `map_rendering` does the same alternation with a better
   z-step: x <- mu(c, z) (the arg-max over x of log p(x, c, z)) and z <- `drm.refine.refine_latents`
   (coordinate ascent over z given x), so log p(x, c, z) never decreases; since
   max_x log p(x, c, z) = log p(c, z) + const, the result is a local maximum of the CNN prior
   p(c, z) over z, rendered.
3. *Individual units*: `top_patches` finds the dataset positions where a unit's bottom-up message
   is largest and crops the image under its receptive field (`receptive_field`: the nominal
   window by interval arithmetic over kernel, stride, padding and dilation, or with exact=True
   the bounding box of `receptive_field_support`, the support of a one-hot rendered with every
   switch ON, every pool cell chosen and all-ones templates); `unit_template` renders the unit's
   partial template top-down with given latents (e.g. those of its top-activating image).
4. *Feature inversion*: `invert_by_optimization` (Mahendran & Vedaldi: minimise
   ||phi_l(x) - phi_0||^2 / ||phi_0||^2 + lambda TV(x) from noise) against
   `invert_by_rendering`, the DRM's top-down rendering of the features y^(l) to the pixels with
   the latents inferred from x0: sigma^2 A_l(z)^T y^(l), where A_l(z) is the linear part of the
   frozen-latent map from pixels to level l (no rescaling that peeks at x0). `inversion_report`
   tabulates both methods' errors level by level (`relative_error`, plain and scale-invariant).

Level indices are those of `model.levels` (for `to_cnn(model)`, the same indices address the
torch layers); a unit is a flat index into that level's output (B, *out_shape) flattened per
image. Level index -1 stands for the image itself (its "features" are the pixels).

References:
    Zeiler, Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014.
    Springenberg, Dosovitskiy, Brox, Riedmiller, Striving for Simplicity: The All Convolutional
    Net, ICLR Workshop 2015 (guided backpropagation).
    Simonyan, Vedaldi, Zisserman, Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps, ICLR Workshop 2014.
    Mahendran, Vedaldi, Understanding Deep Image Representations by Inverting Them, CVPR 2015.
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, TypedDict, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnn_equiv._checks import check_count, check_nonnegative, dtype_device
from cnn_equiv.cnn import input_shape_of, iter_layers
from drm.inference import latents_or_max_sum, max_sum
from drm.levels import (
    SWITCH_RULES,
    SwitchRule,
)
from drm.model import (
    DeepRenderingModel,
    Latents,
    check_classes,
    check_images,
    check_latents,
    gaussian_log_joint,
    rendering_terms,
)
from drm.refine import refine_latents


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


# --- argument checks ---------------------------------------------------------------------------


def _check_model(model: object) -> DeepRenderingModel:
    if not isinstance(model, DeepRenderingModel):
        raise TypeError(f"model must be a drm.DeepRenderingModel, got {type(model).__name__}")
    return model


def _check_int(value: object) -> int:
    """`value` as a level index, an int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"level_index must be an int, got {type(value).__name__}")
    return value


def _check_level_index(model: DeepRenderingModel, level_index: object) -> int:
    """A level index in [-1, len(levels)): -1 is the image itself."""
    level_index = _check_int(level_index)
    if not -1 <= level_index < len(model.levels):
        raise ValueError(
            f"level_index must lie in [-1, {len(model.levels)}) (-1 is the image), "
            f"got {level_index}"
        )
    return level_index


def _output_shape(model: DeepRenderingModel, level_index: int) -> tuple[int, ...]:
    """Per-image shape of level `level_index`'s output (the image for -1)."""
    return model.input_shape if level_index < 0 else model.levels[level_index].out_shape


def _unit_indices(index: object, size: int, batch: int, device: torch.device) -> Tensor:
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


def _check_rule(rule: object) -> SwitchRule:
    if rule not in SWITCH_RULES:
        raise ValueError(f"rule must be one of {SWITCH_RULES}, got {rule!r}")
    return cast(SwitchRule, rule)


# --- 1. top-down projection of a class or a unit -----------------------------------------------


def _one_hot(model: DeepRenderingModel, level_index: int, units: Tensor) -> Tensor:
    """One-hot signals (B, *out_shape) at level `level_index`'s output, one unit per image."""
    shape = _output_shape(model, level_index)
    g = F.one_hot(units, math.prod(shape)).to(model.dtype)  # (B, U)
    return g.view(units.shape[0], *shape)


def _walk_down(
    model: DeepRenderingModel, g: Tensor, level_index: int, latents: Latents, rule: SwitchRule
) -> Tensor:
    """Pass the signal g at level `level_index`'s output down to the pixels: (B, C0, H, W)."""
    for j in range(level_index, -1, -1):
        g = model.levels[j].top_down(g, latents[j], rule)
    return g


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
    model = _check_model(model)
    rule = _check_rule(rule)
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
        level_index = _check_level_index(model, unit.level)
        size = math.prod(_output_shape(model, level_index))
        units = _unit_indices(unit.flat_index, size, batch, model.device)
    with torch.no_grad():
        latents = latents_or_max_sum(model, x, latents)
        return _walk_down(model, _one_hot(model, level_index, units), level_index, latents, rule)


class _StopForward(Exception):
    """Raised by a forward hook once the wanted layer has run (nothing above it is needed)."""


def _leaf_layer(cnn: nn.Module, layer_index: int) -> nn.Module | None:
    """Leaf layer `layer_index` of `cnn` (in `iter_layers` order); None for -1 (x itself)."""
    if layer_index == -1:
        return None
    layers = [layer for _, layer in iter_layers(cnn)]
    if not 0 <= layer_index < len(layers):
        raise ValueError(
            f"layer index must lie in [-1, {len(layers)}) for this CNN, got {layer_index}"
        )
    return layers[layer_index]


def _layer_output(cnn: nn.Module, x: Tensor, layer_index: int) -> Tensor:
    """The output of leaf layer `layer_index` of `cnn` (in `iter_layers` order; -1: x itself)."""
    return _run_to(cnn, x, _leaf_layer(cnn, layer_index), layer_index)


def _run_to(cnn: nn.Module, x: Tensor, layer: nn.Module | None, layer_index: int) -> Tensor:
    """The output of `layer` (`_leaf_layer(cnn, layer_index)`; None: x itself) for input x."""
    if layer is None:
        return x
    captured: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        captured.append(output)
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        cnn(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {layer_index} of the CNN did not run in its forward pass")
    return captured[0]


def _cnn_input_shape(cnn: nn.Module, shape: Sequence[int] | None) -> tuple[int, ...]:
    """(C0, H, W): `shape`, or the input shape of an `EquivalentCNN`."""
    return input_shape_of(
        cnn,
        shape,
        "shape=(C0, H, W) is needed for a CNN that is no EquivalentCNN",
        name="shape",
        dims="(C0, H, W)",
    )


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
            classes = _unit_indices(target, out.shape[1], batch, out.device)
        else:
            if isinstance(unit.level, bool) or not isinstance(unit.level, int):
                raise TypeError(f"a unit's layer must be an int, got {type(unit.level).__name__}")
            out = _layer_output(cnn, image, unit.level).flatten(1)
            classes = _unit_indices(unit.flat_index, out.shape[1], batch, out.device)
        (grad,) = torch.autograd.grad(out.gather(1, classes[:, None]).sum(), image)
    return grad


# --- 2. class-score maximisation and the MAP rendering -------------------------------------------


class ClassScoreMaximization(NamedTuple):
    """Result of `maximize_class_score`.

    Attributes:
        image: (B, C0, H, W) the last iterate.
        trace: (steps + 1, B) the penalised score S_c(x_t) - l2 ||x_t||^2 at every iterate.
    """

    image: Tensor
    trace: Tensor


def maximize_class_score(
    cnn: nn.Module,
    c: Tensor | int,
    steps: int = 100,
    lr: float = 0.1,
    l2: float = 0.5,
    shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    init_scale: float = 0.01,
    start: Tensor | None = None,
) -> ClassScoreMaximization:
    """Simonyan et al.'s class model: gradient ascent on S_c(x) - l2 ||x||^2 from small noise.

    x_{t+1} = x_t + lr * grad_x (S_c(x_t) - l2 ||x_t||^2), S_c the CNN's logit of class c. For
    the CNN of a DRM with l2 = 1/(2 sigma^2), the objective is log p(x, c, z_CNN(x)) + log Z +
    (D/2) log(2 pi sigma^2), and a step with lr = sigma^2 is x <- mu(c, z_CNN(x)) (module
    docstring). Steps can lower the objective where they cross a ReLU / pooling boundary; within
    one linear region, lr <= 1/l2 never does.

    Args:
        cnn: a torch module mapping (B, C0, H, W) images to (B, C) logits (in eval mode).
        c: the class of each image, (B,) int64, or one int (B = 1 unless `start` is given).
        steps: number of ascent steps (>= 0).
        lr: step size (> 0).
        l2: weight of the L2 penalty (>= 0).
        shape: (C0, H, W); default `cnn.input_shape` of an `EquivalentCNN`, or `start`'s.
        generator: CPU generator for the initial noise (drawn on the CPU, then moved).
        init_scale: standard deviation of the initial noise.
        start: (B, C0, H, W) the starting images instead of noise.

    Returns:
        `ClassScoreMaximization(image, trace)`.
    """
    if not isinstance(cnn, nn.Module):
        raise TypeError(f"cnn must be a torch nn.Module, got {type(cnn).__name__}")
    steps = check_count(steps, "steps", minimum=0)
    lr = check_nonnegative(lr, "lr", positive=True)
    l2 = check_nonnegative(l2, "l2")
    init_scale = check_nonnegative(init_scale, "init_scale")
    dtype, device = dtype_device(cnn)
    if start is not None:
        if not isinstance(start, Tensor) or start.ndim != 4:
            raise TypeError("start must be a (B, C0, H, W) tensor")
        x = start.detach().to(device, dtype).clone()
    else:
        dims = _cnn_input_shape(cnn, shape)
        batch = c.shape[0] if isinstance(c, Tensor) and c.ndim == 1 else 1
        noise = torch.randn(batch, *dims, generator=generator, dtype=torch.float64)
        x = (init_scale * noise).to(device, dtype)
    batch = x.shape[0]
    with torch.no_grad():
        num_classes = cnn(x[:1]).shape[1]
    classes = _unit_indices(c, num_classes, batch, device)

    def objective(image: Tensor) -> Tensor:
        score = cnn(image).gather(1, classes[:, None])[:, 0]
        return score - l2 * (image**2).flatten(1).sum(1)

    trace = []
    with torch.enable_grad():
        for _ in range(steps):
            image = x.requires_grad_(True)
            value = objective(image)
            (grad,) = torch.autograd.grad(value.sum(), image)
            trace.append(value.detach())
            x = (image + lr * grad).detach()
    with torch.no_grad():
        trace.append(objective(x))
    return ClassScoreMaximization(x, torch.stack(trace))


class MapRendering(NamedTuple):
    """Result of `map_rendering`.

    Attributes:
        image: (B, C0, H, W) mu(c, z), the most probable image given the final latents.
        latents: the final latents of B images.
        trace: (T + 1, B) log p(mu_t, c, z_t) + log Z after each improving iteration (t = 0 is
            the start); strictly increasing in t while the latents change.
        steps: T, the number of iterations that changed the latents.
        converged: True when the last iteration changed nothing (a fixed point: x = mu(c, z) and
            no level's latent can be changed alone to raise log p(x, c, z)).
    """

    image: Tensor
    latents: Latents
    trace: Tensor
    steps: int
    converged: bool


def default_latents(model: DeepRenderingModel, batch: int) -> Latents:
    """Every level's `default_latent` (every switch ON, every pooled unit on the first cell of
    its window) for `batch` images."""
    model = _check_model(model)
    return tuple(
        level.default_latent(batch, model.device) if level.has_latent else None
        for level in model.levels
    )


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return a is None if b is None else a is not None and torch.equal(a, b)


def map_rendering(
    model: DeepRenderingModel,
    c: Tensor | int,
    steps: int = 50,
    start: Tensor | Latents | None = None,
    max_sweeps: int = 20,
) -> MapRendering:
    """The DRM's most probable image of class c, by alternating maximisation over x and z.

    x <- mu(c, z) = argmax_x log p(x, c, z); z <- `refine_latents(model, x, c, z)` (coordinate
    ascent over the latents, level by level). Each half-step can only raise log p(x, c, z); the
    loop stops at a fixed point or after `steps` iterations. At x = mu(c, z),
    log p(x, c, z) + log Z = log pi_c + ||mu||^2 / (2 sigma^2) + sum <b, g> - (D/2) log(2 pi
    sigma^2), the CNN prior log p(c, z) up to a constant, so the result is a coordinate-wise local
    maximum over z of the CNN prior, rendered. Computed without autograd.

    Args:
        model: the rendering model.
        c: (B,) int64 classes, or one int for every image.
        steps: the most iterations to run (>= 0).
        start: where z starts: None (every switch ON, every pooled unit on its window's first
            cell), images (B, C0, H, W) (their CNN latents, `drm.max_sum`), or latents of B images.
        max_sweeps: passed to `refine_latents` for each z-step.

    Returns:
        `MapRendering(image, latents, trace, steps, converged)`.
    """
    model = _check_model(model)
    steps = check_count(steps, "steps", minimum=0)
    max_sweeps = check_count(max_sweeps, "max_sweeps")
    with torch.no_grad():
        if start is None:
            batch = c.shape[0] if isinstance(c, Tensor) and c.ndim == 1 else 1
            latents = default_latents(model, batch)
        elif isinstance(start, Tensor):
            start = check_images(model, start, "start")
            batch = start.shape[0]
            latents = max_sum(model, start)[1]
        elif isinstance(start, (tuple, list)):
            sizes = [z.shape[0] for z in start if isinstance(z, Tensor)]
            batch = sizes[0] if sizes else (c.shape[0] if isinstance(c, Tensor) else 1)
            latents = check_latents(model, start, batch)
        else:
            raise TypeError(f"start must be None, images or latents, got {type(start).__name__}")
        if isinstance(c, int) and not isinstance(c, bool):
            c = torch.full((batch,), c, dtype=torch.long, device=model.device)
        classes = check_classes(model, c, batch)

        def rendered(z: Latents) -> tuple[Tensor, Tensor]:
            mu, log_prior = rendering_terms(model, classes, z)
            return mu, gaussian_log_joint(model, mu, mu, log_prior)

        mu, value = rendered(latents)
        trace = [value]
        converged = False
        done = 0
        for _ in range(steps):
            refined, _, _ = refine_latents(model, mu, classes, latents, max_sweeps)
            if all(_same(a, b) for a, b in zip(refined, latents, strict=True)):
                converged = True
                break
            latents = refined
            mu, value = rendered(latents)
            trace.append(value)
            done += 1
    return MapRendering(mu, latents, torch.stack(trace), done, converged)


# --- 3. individual units: receptive fields, top patches, templates ------------------------------


def _check_units(model: DeepRenderingModel, level_index: int, units: object) -> Tensor:
    """(K,) int64 flat unit indices into level `level_index`'s per-image output."""
    if not isinstance(units, Tensor):
        raise TypeError(f"units must be an int64 tensor, got {type(units).__name__}")
    if units.ndim != 1:
        raise ValueError(f"units must have shape (K,), got {tuple(units.shape)}")
    size = math.prod(_output_shape(model, level_index))
    return _unit_indices(units, size, units.shape[0], model.device)


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
    model = _check_model(model)
    level_index = _check_level_index(model, level_index)
    units = _check_units(model, level_index, units)
    if exact:
        return _bounding_box(receptive_field_support(model, level_index, units).any(1))
    shape = _output_shape(model, level_index)
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
    model = _check_model(model)
    level_index = _check_level_index(model, level_index)
    units = _check_units(model, level_index, units)
    with torch.no_grad():
        return _spread_down(model, _one_hot(model, level_index, units), level_index) > 0


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
    model = _check_model(model)
    level_index = _check_level_index(model, level_index)
    y = check_images(model, x)
    for j in range(level_index + 1):
        y = model.levels[j].bottom_up(y)[0]
    return y


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
    model = _check_model(model)
    level_index = _check_level_index(model, level_index)
    images = check_images(model, images, "images")
    shape = _output_shape(model, level_index)
    if isinstance(channel, bool) or not isinstance(channel, int):
        raise TypeError(f"channel must be an int, got {type(channel).__name__}")
    if not 0 <= channel < shape[0]:
        raise ValueError(f"channel must lie in [0, {shape[0]}) for this level, got {channel}")
    per_image = math.prod(shape[1:])  # positions of the channel in one image (1 if flat)
    k = check_count(k, "k")
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
    model = _check_model(model)
    level_index = _check_level_index(model, level_index)
    if not isinstance(latents, (tuple, list)):
        raise TypeError(f"latents must be a tuple of tensors, got {type(latents).__name__}")
    batch = next((z.shape[0] for z in latents if isinstance(z, Tensor)), None)
    if batch is None:
        batch = unit.shape[0] if isinstance(unit, Tensor) and unit.ndim == 1 else 1
    latents = check_latents(model, latents, batch)
    size = math.prod(_output_shape(model, level_index))
    units = _unit_indices(unit, size, batch, model.device)
    with torch.no_grad():
        g = _walk_down(model, _one_hot(model, level_index, units), level_index, latents, "drm")
        return model.sigma2 * g


# --- 4. feature inversion -----------------------------------------------------------------------


def relative_error(x: Tensor, x0: Tensor, scale_invariant: bool = False) -> Tensor:
    """||x - x0|| / ||x0|| per image; scale-invariant: min over s of ||s x - x0|| / ||x0||.

    Args:
        x, x0: (B, ...) reconstructions and originals; every x0 must be non-zero.
        scale_invariant: use the best real scale s = <x, x0> / ||x||^2 (0 when x = 0).

    Returns:
        (B,) errors; the scale-invariant one lies in [0, 1].
    """
    if not isinstance(x, Tensor) or not isinstance(x0, Tensor):
        raise TypeError("x and x0 must be tensors")
    if x.shape != x0.shape or x.ndim < 1:
        raise ValueError(f"x and x0 must have the same (B, ...) shape, got {x.shape}, {x0.shape}")
    x, x0 = x.detach().flatten(1), x0.detach().flatten(1)
    norm0 = x0.norm(dim=1)
    if bool((norm0 == 0).any()):
        raise ValueError("x0 has an all-zero image: its relative error is undefined")
    if scale_invariant:
        energy = (x**2).sum(1)
        scale = torch.where(energy > 0, (x * x0).sum(1) / energy.clamp_min(1e-300), 0.0)
        x = scale[:, None] * x
    return (x - x0).norm(dim=1) / norm0


def total_variation(x: Tensor) -> Tensor:
    """sum over pixels of (d_h x)^2 + (d_w x)^2 (Mahendran & Vedaldi's V^beta, beta = 2): (B,)."""
    dh = x[..., 1:, :-1] - x[..., :-1, :-1]
    dw = x[..., :-1, 1:] - x[..., :-1, :-1]
    return (dh**2 + dw**2).flatten(1).sum(1)


class FeatureInversion(NamedTuple):
    """Result of `invert_by_optimization`.

    Attributes:
        image: (B, C0, H, W) the last iterate.
        trace: (steps + 1, B) the objective at every iterate.
    """

    image: Tensor
    trace: Tensor


def invert_by_optimization(
    net: DeepRenderingModel | nn.Module,
    features_target: Tensor,
    level_index: int,
    steps: int = 200,
    tv_weight: float = 0.0,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
    init_scale: float = 0.01,
    shape: Sequence[int] | None = None,
) -> FeatureInversion:
    """Mahendran & Vedaldi's inversion: an image whose level-l features match a target.

    Minimises ||phi_l(x) - phi_0||^2 / ||phi_0||^2 + tv_weight * TV(x) (per image, `
    total_variation`) with Adam from small noise, phi_l the features at level `level_index`'s
    output: the bottom-up message of a `DeepRenderingModel` (`bottom_up_to`), or the output of
    leaf layer `level_index` of a torch CNN (for `to_cnn(model)` the same features).

    Args:
        net: a `DeepRenderingModel` or a torch nn.Sequential (in eval mode).
        features_target: (B, *feature_shape) phi_0, e.g. `bottom_up_to(model, x0, level_index)`;
            no image's may be all zero.
        level_index: -1 (the pixels) or a level / leaf-layer index.
        steps: Adam steps (>= 0).
        tv_weight: lambda >= 0.
        lr: Adam's learning rate (> 0).
        generator: CPU generator for the initial noise.
        init_scale: standard deviation of the initial noise.
        shape: (C0, H, W); default the model's or the `EquivalentCNN`'s input shape.

    Returns:
        `FeatureInversion(image, trace)`.
    """
    steps = check_count(steps, "steps", minimum=0)
    tv_weight = check_nonnegative(tv_weight, "tv_weight")
    lr = check_nonnegative(lr, "lr", positive=True)
    init_scale = check_nonnegative(init_scale, "init_scale")
    if not isinstance(features_target, Tensor) or features_target.ndim < 2:
        raise TypeError("features_target must be a (B, ...) tensor")
    if isinstance(net, DeepRenderingModel):
        level_index = _check_level_index(net, level_index)
        dims: tuple[int, ...] = net.input_shape
        dtype, device = net.dtype, net.device
        model = net

        def phi(x: Tensor) -> Tensor:
            return bottom_up_to(model, x, level_index)

    elif isinstance(net, nn.Module):
        level_index = _check_int(level_index)
        dims = _cnn_input_shape(net, shape)
        dtype, device = dtype_device(net)
        cnn = net
        # the layer is looked up once, at the first call (where a bad index has always raised)
        layer: list[nn.Module | None] = []

        def phi(x: Tensor) -> Tensor:
            if not layer:
                layer.append(_leaf_layer(cnn, level_index))
            return _run_to(cnn, x, layer[0], level_index)

    else:
        raise TypeError(f"net must be a DeepRenderingModel or nn.Module, got {type(net).__name__}")
    target = features_target.detach().to(device, dtype)
    norm2 = (target**2).flatten(1).sum(1)
    if bool((norm2 == 0).any()):
        raise ValueError("features_target has an all-zero image: the normalised loss is undefined")
    batch = target.shape[0]
    noise = torch.randn(batch, *dims, generator=generator, dtype=torch.float64)
    x = (init_scale * noise).to(device, dtype).requires_grad_(True)

    def objective(image: Tensor) -> Tensor:
        features = phi(image)
        if features.shape != target.shape:
            raise ValueError(
                f"features_target has shape {tuple(target.shape)}, but level {level_index} "
                f"outputs {tuple(features.shape)}"
            )
        misfit = ((features - target) ** 2).flatten(1).sum(1) / norm2
        return misfit + tv_weight * total_variation(image)

    optimizer = torch.optim.Adam([x], lr=lr)
    trace = []
    with torch.enable_grad():
        for _ in range(steps):
            value = objective(x)
            # grad of x only: the network's parameters get no .grad
            (x.grad,) = torch.autograd.grad(value.sum(), x)
            trace.append(value.detach())
            optimizer.step()
    with torch.no_grad():
        trace.append(objective(x))
    return FeatureInversion(x.detach(), torch.stack(trace))


def invert_by_rendering(
    model: DeepRenderingModel,
    x0: Tensor,
    level_index: int,
    rule: SwitchRule = "drm",
    latents: Latents | None = None,
) -> Tensor:
    """The DRM's reconstruction of x0 from its level-l features: render y^(l) down to the pixels.

    Returns sigma^2 A_l(z)^T y^(l), where y^(l) = `bottom_up_to(model, x0, level_index)` are the
    features, z the latents inferred from x0 (`drm.max_sum`, or `latents`) and A_l(z) the linear
    part of the frozen-latent map from the pixels to level l's output: the features are used as
    the top-down signal at that level and rendered like a class signal (`drm.render`: mu = sigma^2
    h^(0)). It uses x0's latents (which switches were ON, which cell each pooled unit took),
    information the features alone do not carry, as Zeiler & Fergus's deconvnet uses its pooling
    "switches"; `invert_by_optimization` sees the features only. Nothing else about x0 is used:
    in particular no least-squares scale is fitted; compare with
    `relative_error(..., scale_invariant=True)` for the error up to scale. Level -1 renders the
    pixels themselves: sigma^2 x0. With rule "deconvnet" this is Zeiler & Fergus's reconstruction
    of a layer's activations. Computed without autograd.

    Args:
        x0: (B, C0, H, W) images.
        level_index: in [-1, len(levels)).
        rule: the switch rule of the top-down pass.
        latents: the latents to render with; default x0's CNN latents.

    Returns:
        (B, C0, H, W) reconstruction.
    """
    model = _check_model(model)
    level_index = _check_level_index(model, level_index)
    rule = _check_rule(rule)
    x0 = check_images(model, x0, "x0")
    with torch.no_grad():
        latents = latents_or_max_sum(model, x0, latents)
        features = bottom_up_to(model, x0, level_index)
        return model.sigma2 * _walk_down(model, features, level_index, latents, rule)


class InversionTable(TypedDict):
    """`inversion_report`'s table: one entry per inverted level in every column."""

    level: list[int]  # the level index (-1: the image)
    kind: list[str]  # the level's class name ("Image" for -1)
    features: list[int]  # features per image at that level
    rendering_error: list[float]  # relative_error of invert_by_rendering, mean over images
    rendering_scale_invariant_error: list[float]  # the same up to the best scale
    optimization_error: list[float]  # relative_error of invert_by_optimization (NaN: see below)
    optimization_scale_invariant_error: list[float]  # the same up to the best scale
    optimization_objective: list[float]  # its final objective, mean over images


def inversion_report(
    model: DeepRenderingModel,
    x0: Tensor,
    level_indices: Sequence[int] | None = None,
    steps: int = 200,
    tv_weight: float = 0.0,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
) -> InversionTable:
    """Reconstruction errors of both inversions, level by level, as a table of columns.

    The optimisation's normalised loss is undefined for an image whose features are all zero (a
    level where every unit is OFF): such images are left out of its columns, which are NaN when
    no image is left.

    Args:
        x0: (B, C0, H, W) images (none all zero).
        level_indices: the levels to invert; default -1 (the pixels) and every level but the
            class level.
        steps, tv_weight, lr, generator: passed to `invert_by_optimization`.

    Returns:
        An `InversionTable` (a dict of equally long lists).
    """
    model = _check_model(model)
    x0 = check_images(model, x0, "x0")
    if level_indices is None:
        level_indices = list(range(-1, len(model.levels) - 1))
    table = InversionTable(
        level=[],
        kind=[],
        features=[],
        rendering_error=[],
        rendering_scale_invariant_error=[],
        optimization_error=[],
        optimization_scale_invariant_error=[],
        optimization_objective=[],
    )
    with torch.no_grad():
        latents = max_sum(model, x0)[1]  # x0's CNN latents, shared by every level's rendering
    for level_index in level_indices:
        level_index = _check_level_index(model, level_index)
        table["level"].append(level_index)
        table["kind"].append(
            "Image" if level_index < 0 else type(model.levels[level_index]).__name__
        )
        table["features"].append(math.prod(_output_shape(model, level_index)))
        with torch.no_grad():
            # the level's features: rendered down here (`invert_by_rendering`), and the target
            # of the optimisation below
            target = bottom_up_to(model, x0, level_index)
            rendered = model.sigma2 * _walk_down(model, target, level_index, latents, "drm")
        table["rendering_error"].append(float(relative_error(rendered, x0).mean()))
        table["rendering_scale_invariant_error"].append(
            float(relative_error(rendered, x0, scale_invariant=True).mean())
        )
        kept = target.flatten(1).ne(0).any(1)  # (B,) images with some non-zero feature
        if not bool(kept.any()):
            table["optimization_error"].append(math.nan)
            table["optimization_scale_invariant_error"].append(math.nan)
            table["optimization_objective"].append(math.nan)
            continue
        optimized = invert_by_optimization(
            model, target[kept], level_index, steps, tv_weight, lr, generator
        )
        original = x0[kept]
        table["optimization_error"].append(float(relative_error(optimized.image, original).mean()))
        table["optimization_scale_invariant_error"].append(
            float(relative_error(optimized.image, original, scale_invariant=True).mean())
        )
        table["optimization_objective"].append(float(optimized.trace[-1].mean()))
    return table


__all__ = [
    "ClassScoreMaximization",
    "FeatureInversion",
    "InversionTable",
    "MapRendering",
    "TopPatches",
    "Unit",
    "bottom_up_to",
    "default_latents",
    "invert_by_optimization",
    "invert_by_rendering",
    "inversion_report",
    "map_rendering",
    "maximize_class_score",
    "project",
    "receptive_field",
    "receptive_field_support",
    "relative_error",
    "saliency",
    "top_patches",
    "total_variation",
    "unit_template",
]
