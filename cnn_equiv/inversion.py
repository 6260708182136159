"""Feature inversion: the image behind a level's features, by optimisation and by rendering.

The lecture's "invert CNN features", both ways. `invert_by_optimization` is Mahendran & Vedaldi's:
minimise ||phi_l(x) - phi_0||^2 / ||phi_0||^2 + lambda TV(x) (`total_variation`) from noise, on a
rendering model or a torch CNN. `invert_by_rendering` is the DRM's top-down rendering of the
features y^(l) to the pixels with the latents inferred from x0: sigma^2 A_l(z)^T y^(l), where
A_l(z) is the linear part of the frozen-latent map from pixels to level l (no rescaling that peeks
at x0). `inversion_report` tabulates both methods' errors level by level (`relative_error`, plain
and scale-invariant).

Level indices are those of `model.levels` (for `to_cnn(model)`, the same indices address the
torch layers); level index -1 stands for the image itself (its "features" are the pixels).

References:
    Mahendran, Vedaldi, Understanding Deep Image Representations by Inverting Them, CVPR 2015.
    Zeiler, Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014.
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, TypedDict

import torch
from torch import Tensor, nn

from cnn_equiv._walks import leaf_layer, output_shape, run_to, walk_down
from cnn_equiv.cnn import cnn_input_shape
from cnn_equiv.units import bottom_up_to
from drm.checks import (
    check_images,
    check_int,
    check_int_at_least,
    check_level_index,
    check_model,
    check_nonnegative,
    check_switch_rule,
    dtype_device,
)
from drm.inference import latents_or_max_sum, walk_up
from drm.levels import SwitchRule
from drm.model import DeepRenderingModel, Latents


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
    steps = check_int_at_least(steps, "steps", minimum=0)
    tv_weight = check_nonnegative(tv_weight, "tv_weight")
    lr = check_nonnegative(lr, "lr", positive=True)
    init_scale = check_nonnegative(init_scale, "init_scale")
    if not isinstance(features_target, Tensor) or features_target.ndim < 2:
        raise TypeError("features_target must be a (B, ...) tensor")
    if isinstance(net, DeepRenderingModel):
        level_index = check_level_index(net, level_index)
        dims: tuple[int, ...] = net.input_shape
        dtype, device = net.dtype, net.device
        model = net

        def phi(x: Tensor) -> Tensor:
            return bottom_up_to(model, x, level_index)

    elif isinstance(net, nn.Module):
        level_index = check_int(level_index, "level_index")
        dims = cnn_input_shape(net, shape)
        dtype, device = dtype_device(net)
        cnn = net
        # the layer is looked up once, at the first call (where a bad index has always raised)
        layer: list[nn.Module | None] = []

        def phi(x: Tensor) -> Tensor:
            if not layer:
                layer.append(leaf_layer(cnn, level_index))
            return run_to(cnn, x, layer[0], level_index)

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
    model = check_model(model)
    level_index = check_level_index(model, level_index)
    rule = check_switch_rule(rule)
    x0 = check_images(model, x0, "x0")
    with torch.no_grad():
        latents = latents_or_max_sum(model, x0, latents)
        features = walk_up(model, x0, stop=level_index + 1).output  # x0 checked above
        return model.sigma2 * walk_down(model, features, level_index, latents, rule)


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
    model = check_model(model)
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
        latents = walk_up(model, x0).latents  # x0's CNN latents, for every level's rendering
    for level_index in level_indices:
        level_index = check_level_index(model, level_index)
        table["level"].append(level_index)
        table["kind"].append(
            "Image" if level_index < 0 else type(model.levels[level_index]).__name__
        )
        table["features"].append(math.prod(output_shape(model, level_index)))
        with torch.no_grad():
            # the level's features: rendered down here (`invert_by_rendering`), and the target
            # of the optimisation below
            target = walk_up(model, x0, stop=level_index + 1).output  # checked inputs
            rendered = model.sigma2 * walk_down(model, target, level_index, latents, "drm")
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
    "FeatureInversion",
    "InversionTable",
    "inversion_report",
    "invert_by_optimization",
    "invert_by_rendering",
    "relative_error",
    "total_variation",
]
