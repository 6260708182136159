"""The only place parameters cross between the two views: `to_cnn` and `to_drm`, side by side.

Each formula cites its numbered equation in docs/equivalence.md. Every copy checks its shape
against the one the layer's hyper-parameters (or the bound level's shapes) imply.

    DRM level                         torch layer                  equation
    Conv(W, b)                        Conv2d(weight=W, bias=b)     (10)
    Dense(W, b)                       Linear(weight=W, bias=b)     (11)
    Classes(mu, prior_logits)         Linear(weight=mu, bias=log pi) (12)
    Switch(negative_slope=alpha)      ReLU / LeakyReLU(alpha)      (13)
    MaxPool(window)                   MaxPool2d(window)            (14)
    AvgPool(window), Flatten          AvgPool2d, Flatten           (15)
    (folded into the Conv/Dense)      BatchNorm1d/2d in eval mode  (16)
    (dropped: identity at inference)  Dropout*, Identity
    sigma^2 (rendering scale only)    (absent)                     (17)
    ShallowRenderingModel, no         Linear(weight=mu/sigma^2,    (18)
      translation, no switch            bias=log pi - |mu|^2/2sigma^2)  (`to_linear_classifier`)

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Ioffe, Szegedy, Batch Normalization, ICML 2015 (the folding of eq. 16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cnn_equiv.cnn import EquivalentCNN, input_shape_of
from cnn_equiv.tracing import SUPPORTED, trace_chain
from drm.config import AvgPoolSpec, ConvSpec, DenseSpec, MaxPoolSpec, SwitchSpec, as_pair
from drm.levels import AvgPool, Classes, Conv, Dense, Flatten, Level, MaxPool, Switch
from drm.model import DeepRenderingModel
from drm.shallow import ShallowRenderingModel

SUPPORTED_LAYERS = SUPPORTED
_DROPPED = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


def _copy(tensor: Tensor, shape: Sequence[int], what: str) -> Tensor:
    """A detached copy of `tensor`, asserting its shape (the views must never share storage)."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor.detach().clone()


# --- DRM -> CNN --------------------------------------------------------------------------------


def _torch_layer(level: Level) -> nn.Module:
    """The torch layer computing `level`'s bottom-up message."""
    if isinstance(level, Dense):
        # eq. (11): W^(l) and b^(l) are the Linear weight and bias; eq. (12): for the Classes
        # level, the class templates mu_c are the rows and the bias is log pi_c (its offset).
        # the shape the bound level implies: (classes or units, features of its input)
        out_features, in_features = level.spec.out_features, math.prod(level.in_shape)
        linear = nn.Linear(
            in_features, out_features, dtype=level.weight.dtype, device=level.weight.device
        )
        linear.weight.data = _copy(level.weight, (out_features, in_features), "Dense weight")
        linear.bias.data = _copy(level.offset(), (out_features,), "Dense bias")
        return linear
    if isinstance(level, Conv):
        # eq. (10): the templates W^(l) are the filters, b^(l) the bias; same stride/padding.
        s = level.spec
        conv = nn.Conv2d(
            level.in_shape[0],
            s.out_channels,
            s.kernel_size,
            s.stride,
            s.padding,
            s.dilation,
            s.groups,
            dtype=level.weight.dtype,
            device=level.weight.device,
        )
        expected = (s.out_channels, level.in_shape[0] // s.groups, *s.kernel_size)
        conv.weight.data = _copy(level.weight, expected, "Conv weight")
        assert conv.bias is not None
        conv.bias.data = _copy(level.bias, (s.out_channels,), "Conv bias")
        return conv
    if isinstance(level, Switch):
        # eq. (13): max over a in {alpha, 1} of a*u is LeakyReLU(u; alpha); alpha = 0 is ReLU.
        alpha = level.spec.negative_slope
        return nn.ReLU() if alpha == 0.0 else nn.LeakyReLU(alpha)
    if isinstance(level, MaxPool):
        # eq. (14): max over the translation t of a pooled unit is max-pooling over its window.
        p = level.spec
        return nn.MaxPool2d(
            p.kernel_size, p.stride_pair, p.padding, p.dilation, ceil_mode=p.ceil_mode
        )
    if isinstance(level, AvgPool):
        # eq. (15): a fixed linear rendering.
        a = level.spec
        return nn.AvgPool2d(
            a.kernel_size, a.stride_pair, a.padding, False, a.count_include_pad, a.divisor_override
        )
    if isinstance(level, Flatten):
        return nn.Flatten()
    raise TypeError(f"to_cnn: level {type(level).__name__} has no CNN counterpart")


def to_cnn(model: DeepRenderingModel) -> EquivalentCNN:
    """The CNN whose forward pass is bottom-up max-sum in `model` (E2).

    Returns:
        An `EquivalentCNN` (an nn.Sequential) with copies of the model's parameters, on the
        model's device and dtype; `cnn(x)` equals `drm.max_sum(model, x)[0]`.
    """
    if not isinstance(model, DeepRenderingModel):
        raise TypeError(f"to_cnn expects a DeepRenderingModel, got {type(model).__name__}")
    layers = [_torch_layer(level) for level in model.levels]
    return EquivalentCNN(model.input_shape, *layers)


# --- CNN -> DRM --------------------------------------------------------------------------------


def _fold_batchnorm(
    weight: Tensor, bias: Tensor, norm: nn.BatchNorm1d | nn.BatchNorm2d, path: str
) -> tuple[Tensor, Tensor]:
    """eq. (16): BN(W y + b) = (s W) y + s (b - mean) + beta, s = gamma / sqrt(var + eps)."""
    if norm.training:
        raise ValueError(
            f"to_drm: {path} ({type(norm).__name__}) is in training mode, where it normalises "
            "with batch statistics; call cnn.eval() first"
        )
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(
            f"to_drm: {path} ({type(norm).__name__}) has track_running_stats=False, so it "
            "normalises with batch statistics and cannot be folded"
        )
    if norm.num_features != weight.shape[0]:
        raise ValueError(
            f"to_drm: {path} normalises {norm.num_features} features, the layer before it has "
            f"{weight.shape[0]}"
        )
    scale = torch.rsqrt(norm.running_var.to(weight.dtype) + norm.eps)
    shift = -norm.running_mean.to(weight.dtype) * scale
    if norm.affine:
        scale = scale * norm.weight.detach().to(weight.dtype)
        shift = shift * norm.weight.detach().to(weight.dtype) + norm.bias.detach().to(weight.dtype)
    view = (-1,) + (1,) * (weight.ndim - 1)
    return weight * scale.view(view), bias * scale + shift


def _conv_spec(conv: nn.Conv2d, path: str) -> ConvSpec:
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"to_drm: {path} (Conv2d) has padding_mode={conv.padding_mode!r}; only 'zeros' "
            "padding has a rendering adjoint here"
        )
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": symmetric only when every dilated kernel extent is odd
            extents = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
            if any(e % 2 for e in extents):
                raise ValueError(
                    f"to_drm: {path} (Conv2d) uses padding='same' with an even kernel extent, "
                    "which pads asymmetrically; use explicit integer padding"
                )
            padding = (extents[0] // 2, extents[1] // 2)
    return ConvSpec(
        conv.out_channels,
        as_pair(conv.kernel_size, "kernel_size"),
        as_pair(conv.stride, "stride"),
        as_pair(padding, "padding"),
        as_pair(conv.dilation, "dilation"),
        conv.groups,
    )


def to_drm(
    cnn: nn.Module,
    sigma2: float = 1.0,
    input_shape: Sequence[int] | None = None,
) -> DeepRenderingModel:
    """The Deep Rendering Model whose max-sum inference is the forward pass of `cnn`.

    Args:
        cnn: any nn.Module that torch.fx can trace whose forward is one chain of the
            operations listed in `SUPPORTED_LAYERS` (modules or functional calls; a module
            called twice is two levels), ending with the nn.Linear that scores the classes,
            optionally followed by a log_softmax (`cnn_equiv.tracing.trace_chain`).
        sigma2: the pixel noise variance sigma^2 of the rendering model; the CNN does not fix it
            (eq. 17), it only scales rendered images: mu = sigma^2 h^(0).
        input_shape: (C0, H, W) of one image; taken from the CNN when it is an `EquivalentCNN`.
            Adaptive pooling is mapped at this shape.

    Returns:
        A model with copies of the CNN's parameters (a layer applied twice, weight tying
        included, becomes two levels with copies of the same weights: the forward pass is the
        network's; training the DRM does not keep them tied). Its scores equal the CNN's logits
        minus the class-independent constant logsumexp(final bias) (eq. 12), so the softmax is
        identical. A final log_softmax is dropped: the scores then equal the network's output
        up to a per-image constant, so every softmax, arg max and cross-entropy is the same.

    Raises:
        TypeError: `cnn` is not an nn.Module.
        ValueError: an untraceable forward, an unsupported operation (named by its module path
            or function and source line), training-mode BatchNorm, or an input shape that does
            not fit the layers.
    """
    if not isinstance(cnn, nn.Module):
        raise TypeError(f"to_drm expects an nn.Module (a CNN), got {type(cnn).__name__}")
    shape = input_shape_of(
        cnn, input_shape, "to_drm needs input_shape=(C, H, W) (the size of one image)"
    )
    if not (math.isfinite(float(sigma2)) and float(sigma2) > 0):
        raise ValueError(f"sigma2 must be finite and > 0, got {sigma2}")
    chain = trace_chain(cnn, shape)

    # First pass: torch layers -> (path, level) with BatchNorm folded into the layer before it.
    entries: list[tuple[str, Level]] = []
    previous_linear: tuple[str, Level] | None = None  # a Conv/Dense that a BatchNorm may follow
    for path, layer in chain.layers:
        if isinstance(layer, _DROPPED):
            continue  # identity at inference; nothing between a layer and its BatchNorm though
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if previous_linear is None or entries[-1] is not previous_linear:
                raise ValueError(
                    f"to_drm: {path} ({type(layer).__name__}) must directly follow a Conv2d or "
                    "Linear to be folded into it"
                )
            prev_path, prev = previous_linear
            assert isinstance(prev, (Conv, Dense))
            weight, bias = _fold_batchnorm(prev.weight.detach(), prev.bias.detach(), layer, path)
            folded: Level = (
                Conv(prev.spec, weight, bias)
                if isinstance(prev, Conv)
                else Dense(prev.spec, weight, bias)
            )
            entries[-1] = previous_linear = (prev_path, folded)
            continue
        level: Level
        if isinstance(layer, nn.Conv2d):
            spec = _conv_spec(layer, path)
            bias = (
                layer.bias.detach()
                if layer.bias is not None
                else layer.weight.new_zeros(layer.out_channels)
            )
            level = Conv(
                spec,
                _copy(
                    layer.weight,
                    (layer.out_channels, layer.in_channels // layer.groups, *spec.kernel_size),
                    f"{path}.weight",
                ),  # fmt: skip
                _copy(bias, (layer.out_channels,), f"{path}.bias"),
            )
        elif isinstance(layer, nn.Linear):
            bias = (
                layer.bias.detach()
                if layer.bias is not None
                else layer.weight.new_zeros(layer.out_features)
            )
            level = Dense(
                DenseSpec(layer.out_features),
                _copy(layer.weight, (layer.out_features, layer.in_features), f"{path}.weight"),
                _copy(bias, (layer.out_features,), f"{path}.bias"),
            )
        elif isinstance(layer, nn.ReLU):
            level = Switch(SwitchSpec(0.0))
        elif isinstance(layer, nn.LeakyReLU):
            if layer.negative_slope > 1:
                raise ValueError(
                    f"to_drm: {path} (LeakyReLU) has negative_slope {layer.negative_slope} > 1, "
                    "which is not a max over switch states"
                )
            level = Switch(SwitchSpec(float(layer.negative_slope)))
        elif isinstance(layer, nn.MaxPool2d):
            level = MaxPool(
                MaxPoolSpec(
                    as_pair(layer.kernel_size, "kernel_size"),
                    as_pair(layer.stride, "stride"),
                    as_pair(layer.padding, "padding"),
                    as_pair(layer.dilation, "dilation"),
                    layer.ceil_mode,
                )
            )
        elif isinstance(layer, nn.AvgPool2d):
            if layer.ceil_mode:
                raise ValueError(f"to_drm: {path} (AvgPool2d) with ceil_mode=True is unsupported")
            level = AvgPool(
                AvgPoolSpec(
                    as_pair(layer.kernel_size, "kernel_size"),
                    as_pair(layer.stride, "stride"),
                    as_pair(layer.padding, "padding"),
                    layer.count_include_pad,
                    layer.divisor_override,
                )
            )
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                raise ValueError(f"to_drm: {path} (Flatten) must flatten dims 1..-1")
            level = Flatten()
        else:
            raise ValueError(
                f"to_drm: unsupported layer {path} ({type(layer).__name__}); supported layers: "
                f"{SUPPORTED_LAYERS}"
            )
        entries.append((path, level))
        previous_linear = entries[-1] if isinstance(level, (Conv, Dense)) else None

    if not entries or not isinstance(entries[-1][1], Dense):
        last = entries[-1][0] if entries else "(empty)"
        raise ValueError(
            f"to_drm: the CNN must end with the nn.Linear that scores the classes; its last "
            f"layer is {last}"
        )
    # eq. (12): the final Linear holds the class templates and the (unnormalised) class log prior.
    top_path, top = entries[-1]
    assert isinstance(top, Dense)
    entries[-1] = (top_path, Classes(top.weight.detach().clone(), top.bias.detach().clone()))

    # Bind shapes here so that a misfit names the torch layer, not a level index.
    current: tuple[int, ...] = shape
    for path, level in entries:
        try:
            current = level.bind(current)
        except ValueError as err:
            raise ValueError(
                f"to_drm: input shape {shape} does not fit layer {path}: {err}"
            ) from err
    return DeepRenderingModel(shape, [level for _, level in entries], sigma2)


# --- the shallow model -> a linear layer ------------------------------------------------------


class LinearClassifier(NamedTuple):
    """The weights of a linear layer: logits = x.flatten(1) @ weight.T + bias."""

    weight: Tensor  # (C, D), D = C0 * H * W
    bias: Tensor  # (C,)


def to_linear_classifier(model: ShallowRenderingModel) -> LinearClassifier:
    """The linear layer equal to a shallow model without translation or switch (DESIGN E7).

    eq. (18): weight_c = mu_c / sigma^2 and bias_c = log pi_c - ||mu_c||^2 / (2 sigma^2), so that
    x.flatten(1) @ weight.T + bias = `model.class_scores(x)` (both modes: with one latent
    configuration per class, max and sum agree).

    Args:
        model: a `drm.ShallowRenderingModel` with translation="none" and no switch.

    Returns:
        `LinearClassifier(weight (C, D), bias (C,))`, detached copies.

    Raises:
        TypeError: `model` is not a ShallowRenderingModel.
        ValueError: the model has a translation nuisance or a switch (its classifier then needs
            max-pooling or a ReLU, not just a linear layer).
    """
    if not isinstance(model, ShallowRenderingModel):
        raise TypeError(
            f"to_linear_classifier expects a ShallowRenderingModel, got {type(model).__name__}"
        )
    if model.translation != "none":
        raise ValueError(
            f"to_linear_classifier needs translation='none', got {model.translation!r} "
            f"(the classifier then needs max-pooling over translations)"
        )
    if model.switch_prior_on is not None:
        raise ValueError(
            "to_linear_classifier needs a model without a switch (switch_prior_on=None); "
            "with a switch the classifier needs a ReLU"
        )
    num_classes, num_pixels = model.num_classes, model.num_pixels  # the shape the model implies
    templates = model.templates.detach()
    energy = templates.pow(2).flatten(1).sum(1) / (2 * model.sigma2)  # (C,) ||mu_c||^2 / 2sigma^2
    weight = (templates / model.sigma2).flatten(1)  # (C, D)
    bias = model.log_prior.detach() - energy  # (C,)
    return LinearClassifier(
        _copy(weight, (num_classes, num_pixels), "linear classifier weight"),
        _copy(bias, (num_classes,), "linear classifier bias"),
    )
