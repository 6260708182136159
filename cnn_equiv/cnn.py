"""The neural-net view: the equivalent CNN as an ordinary torch module, and its latents.

`EquivalentCNN` is a plain `nn.Sequential` of torch layers (Conv2d, Linear, ReLU, LeakyReLU,
MaxPool2d, AvgPool2d, Flatten) that remembers the image shape it was built for; it runs wherever
torch runs (`.to("cuda")`). `record_latents` reads off what a CNN's forward pass decided, the ReLU
masks and the max-pool indices, with forward hooks on the torch layers themselves, so that it is an
oracle independent of `drm.max_sum`.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EquivalentCNN(nn.Sequential):
    """A CNN whose forward pass equals bottom-up max-sum in a Deep Rendering Model.

    Built by `cnn_equiv.to_cnn(model)`; `forward(x)` maps (B, C0, H, W) images to (B, C) logits.
    """

    def __init__(self, input_shape: tuple[int, int, int], *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.input_shape = tuple(input_shape)

    def __getitem__(self, idx: slice | int) -> nn.Sequential | nn.Module:
        # nn.Sequential rebuilds slices with type(self)(OrderedDict), which would be read here
        # as an input shape: a slice is a plain nn.Sequential of the same layers.
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


@dataclass
class CNNLatents:
    """What a CNN's forward pass decided, in layer order.

    Attributes:
        logits: (B, C).
        switches: one bool mask per ReLU/LeakyReLU layer, 1[pre-activation > 0], input-shaped.
        translations: one int64 index tensor per MaxPool2d layer (torch's return_indices).
        switch_layers, pool_layers: the dotted module paths of those layers.
    """

    logits: Tensor
    switches: list[Tensor]
    translations: list[Tensor]
    switch_layers: list[str]
    pool_layers: list[str]


def input_shape_of(
    net: object,
    shape: Sequence[int] | None,
    missing: str,
    *,
    name: str = "input_shape",
    dims: str = "(C, H, W)",
    attribute: bool = False,
) -> tuple[int, ...]:
    """`shape`, or else the input shape `net` carries, checked to be three positive sizes.

    Args:
        net: the network whose input shape is the default: an `EquivalentCNN`'s `input_shape`,
            or with `attribute` that of any object with an `input_shape` attribute.
        shape: the shape given by the caller, or None for the default.
        missing: the ValueError message when `shape` is None and `net` has no input shape.
        name, dims: how the ValueError for a malformed shape names the argument and its form.
    """
    if shape is None:
        default = (
            getattr(net, "input_shape", None)
            if attribute or isinstance(net, EquivalentCNN)
            else None
        )
        if default is None:
            raise ValueError(missing)
        shape = default
    sizes = tuple(int(s) for s in shape)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"{name} must be {dims} with positive sizes, got {sizes}")
    return sizes


def iter_layers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Leaf layers of nested nn.Sequential containers, with dotted paths, in forward order."""
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from iter_layers(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix, module


def record_latents(cnn: nn.Module, x: Tensor) -> CNNLatents:
    """Run `cnn` on x and record every ReLU mask and max-pool index with forward hooks."""
    switches: list[Tensor] = []
    translations: list[Tensor] = []
    switch_layers: list[str] = []
    pool_layers: list[str] = []
    handles = []

    def on_switch(path: str) -> Any:
        # a pre-hook sees the pre-activation even when the layer works in place
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            switches.append(inputs[0] > 0)
            switch_layers.append(path)

        return hook

    def on_pool(path: str) -> Any:
        def hook(module: nn.MaxPool2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            _, indices = F.max_pool2d(
                inputs[0],
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.ceil_mode,
                return_indices=True,
            )
            translations.append(indices)
            pool_layers.append(path)

        return hook

    for path, layer in iter_layers(cnn):
        if isinstance(layer, (nn.ReLU, nn.LeakyReLU)):
            handles.append(layer.register_forward_pre_hook(on_switch(path)))
        elif isinstance(layer, nn.MaxPool2d):
            handles.append(layer.register_forward_hook(on_pool(path)))
    try:
        with torch.no_grad():
            logits = cnn(x)
    finally:
        for handle in handles:
            handle.remove()
    return CNNLatents(logits, switches, translations, switch_layers, pool_layers)
