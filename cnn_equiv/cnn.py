"""The neural-net view: the equivalent CNN as an ordinary torch module, and its latents.

`EquivalentCNN` is a plain `nn.Sequential` of torch layers (Conv2d, Linear, ReLU, LeakyReLU,
MaxPool2d, AvgPool2d, Flatten) that remembers the image shape it was built for; it runs wherever
torch runs (`.to("cuda")`). `record_latents` reads off what a CNN's forward pass decided, the ReLU
masks and the max-pool indices, by intercepting the torch calls themselves (modules or functions),
so that it is an oracle independent of `drm.max_sum` and of the fx tracing of `to_drm`.

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
from torch.overrides import TorchFunctionMode

from drm.checks import check_input_shape


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
        switch_layers, pool_layers: the dotted module path that ran each (or the function).
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
    """`shape`, or else the input shape `net` carries, checked to be three positive sizes
    (`drm.checks.check_input_shape`).

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
    return check_input_shape(shape, name, dims)


def cnn_input_shape(cnn: nn.Module, shape: Sequence[int] | None) -> tuple[int, ...]:
    """(C0, H, W): `shape`, or the input shape of an `EquivalentCNN`."""
    return input_shape_of(
        cnn,
        shape,
        "shape=(C0, H, W) is needed for a CNN that is no EquivalentCNN",
        name="shape",
        dims="(C0, H, W)",
    )


def iter_layers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Leaf layers of nested nn.Sequential containers, with dotted paths, in forward order."""
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from iter_layers(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix, module


_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_LEAKY_RELUS = {F.leaky_relu, F.leaky_relu_}


def _max_pool_arguments(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
                        dilation: Any = 1, ceil_mode: bool = False,
                        return_indices: bool = False) -> dict[str, Any]:  # fmt: skip
    return {"kernel_size": kernel_size, "stride": stride, "padding": padding,
            "dilation": dilation, "ceil_mode": ceil_mode}  # fmt: skip


class _Recorder(TorchFunctionMode):
    """Sees every ReLU, LeakyReLU and (adaptive) max-pooling call of a forward pass, module or
    function."""

    def __init__(self, where: list[str]) -> None:
        super().__init__()
        self.where = where  # the module paths being run, innermost last
        self.switches: list[Tensor] = []
        self.translations: list[Tensor] = []
        self.switch_layers: list[str] = []
        self.pool_layers: list[str] = []

    def _name(self, func: Any) -> str:
        return self.where[-1] if self.where else f"{getattr(func, '__name__', func)}()"

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _RELUS or func in _LEAKY_RELUS:
            # the pre-activation, before an in-place ReLU overwrites it
            self.switches.append(args[0] > 0)
            self.switch_layers.append(self._name(func))
        elif func is F.adaptive_max_pool2d:
            _, indices = F.adaptive_max_pool2d(args[0], *args[1:2], return_indices=True,
                                               **{k: v for k, v in kwargs.items()
                                                  if k == "output_size"})  # fmt: skip
            self.translations.append(indices)
            self.pool_layers.append(self._name(func))
        elif func is F.max_pool2d:
            pool = _max_pool_arguments(*args, **kwargs)
            _, indices = F.max_pool2d(args[0], return_indices=True, **pool)
            self.translations.append(indices)
            self.pool_layers.append(self._name(func))
        return func(*args, **kwargs)


def record_latents(cnn: nn.Module, x: Tensor) -> CNNLatents:
    """Run `cnn` on x and record every ReLU mask and max-pool index, in the order they run.

    Every call is seen, whether a module (nn.ReLU, nn.MaxPool2d, a module used twice) or a
    function (F.relu, F.max_pool2d, x.relu()) makes it: a torch function mode intercepts them
    during the forward pass (independent of torch.fx, which `to_drm` uses to read the network).
    Each is named by the innermost module running it.
    """
    where: list[str] = []
    handles = []

    def enter(path: str) -> Any:
        def hook(*_: Any) -> None:
            where.append(path)

        return hook

    def leave(*_: Any) -> None:  # returns None: the module's output stays as it is
        where.pop()

    for path, module in cnn.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(enter(path)))
            handles.append(module.register_forward_hook(leave))
    recorder = _Recorder(where)
    try:
        with torch.no_grad(), recorder:
            logits = cnn(x)
    finally:
        for handle in handles:
            handle.remove()
    return CNNLatents(logits, recorder.switches, recorder.translations, recorder.switch_layers,
                      recorder.pool_layers)  # fmt: skip
