"""Read a CNN's chain of operations with torch.fx, whatever container or functions it uses.

`trace_chain(cnn, input_shape)` symbolically traces `cnn` (`torch.fx`), propagates the shapes of
one batch through the graph, and returns the operations in the order they run as torch layers:
module calls as themselves (a module called twice appears twice), functional calls (`F.relu`,
`F.leaky_relu`, `F.max_pool2d`, `F.avg_pool2d`, `F.adaptive_*_pool2d`, `F.dropout`) as the
equivalent layer, every reshape that flattens (`torch.flatten`, `x.view(x.size(0), -1)`,
`x.reshape`, `x.flatten(1)`, `nn.Flatten`) as `nn.Flatten()`, adaptive pooling as the fixed
pooling it equals at this input shape, and a final `log_softmax` dropped (and reported).
Anything else (a residual addition, a concatenation, a sigmoid, a parameter used directly) is
refused with one error naming the node, its source line and what is supported.

`cnn_equiv.to_drm` maps the chain to DRM levels; `nn.Sequential` goes through the same path.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

# what the chain may hold, for the error messages
SUPPORTED = (
    "Conv2d, Linear, ReLU, LeakyReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d/AdaptiveMaxPool2d "
    "(when the output size divides the input size), flattening (nn.Flatten, torch.flatten, "
    "view/reshape/flatten to (batch, -1)), Dropout, Identity, BatchNorm1d/2d (eval mode, right "
    "after a Conv2d or Linear), a final log_softmax / LogSoftmax (dropped); as modules or as "
    "torch.nn.functional calls, in one chain"
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_MODULES = (
    nn.Conv2d, nn.Linear, nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, *_BATCHNORM, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.LogSoftmax,
)  # fmt: skip
_IDENTITY_METHODS = {"contiguous"}
_FLATTENING_METHODS = {"view", "reshape", "flatten"}


# The signatures of the functional calls we map (keyword names as torch.nn.functional has them):
def _relu(input: Any, inplace: bool = False) -> None: ...
def _leaky_relu(input: Any, negative_slope: float = 0.01, inplace: bool = False) -> None: ...
def _max_pool2d(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                dilation: Any = 1, ceil_mode: bool = False,
                return_indices: bool = False) -> None: ...  # fmt: skip
def _avg_pool2d(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                ceil_mode: bool = False, count_include_pad: bool = True,
                divisor_override: Any = None) -> None: ...  # fmt: skip
def _adaptive_pool2d(input: Any, output_size: Any, return_indices: bool = False) -> None: ...
def _dropout(input: Any, p: float = 0.5, training: bool = False, inplace: bool = False) -> None: ...
def _flatten(input: Any, start_dim: int = 0, end_dim: int = -1) -> None: ...
def _log_softmax(input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> None: ...


_RELU = {F.relu, F.relu_, torch.relu, torch.relu_}
_FUNCTIONS: dict[Any, Callable[..., None]] = {
    **dict.fromkeys(_RELU, _relu),
    F.leaky_relu: _leaky_relu,
    F.leaky_relu_: _leaky_relu,
    F.max_pool2d: _max_pool2d,
    F.avg_pool2d: _avg_pool2d,
    F.adaptive_avg_pool2d: _adaptive_pool2d,
    F.adaptive_max_pool2d: _adaptive_pool2d,
    F.dropout: _dropout,
    F.dropout1d: _dropout,
    F.dropout2d: _dropout,
    F.alpha_dropout: _dropout,
    torch.flatten: _flatten,
    F.log_softmax: _log_softmax,
    torch.log_softmax: _log_softmax,
}
_METHODS: dict[str, Callable[..., None]] = {
    "relu": _relu,
    "relu_": _relu,
    "log_softmax": _log_softmax,
}


@dataclass
class Chain:
    """The traced network: its operations as torch layers, in the order they run.

    Attributes:
        layers: (name, layer) pairs; `name` is the module path, or the function and its source
            line, for the error messages.
        shapes: the output shape (without the batch) after each layer.
        dropped_log_softmax: the network ended with a log_softmax, not kept in `layers`.
    """

    layers: list[tuple[str, nn.Module]]
    shapes: list[tuple[int, ...]]
    dropped_log_softmax: bool


class _Tracer(torch.fx.Tracer):
    """A tracer that records the user's source line of every node."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True


class _Misfit(Exception):
    def __init__(self, node: torch.fx.Node, reason: str) -> None:
        super().__init__(reason)
        self.node, self.reason = node, reason


class _Shapes(torch.fx.Interpreter):
    """Runs the graph once, recording each tensor node's shape in node.meta["shape"]; names the
    node where the input stops fitting."""

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise _Misfit(n, " ".join(str(err).split())) from err
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(int(s) for s in result.shape)
        return result


def _source(node: torch.fx.Node) -> str:
    """'file.py:LINE' of the user's code that made `node`, when fx recorded it."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.stack_trace or "")
    torch_dir = str(torch.__file__).rsplit("/", 1)[0]
    user = [(f, n) for f, n in frames if not f.startswith(torch_dir)]
    if not user:
        return ""
    path, line = user[-1]
    return f" ({path.rsplit('/', 1)[-1]}:{line})"


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"call {name}(){_source(node)}"
    if node.op == "call_method":
        return f"method .{node.target}(){_source(node)}"
    return f"{node.op} {node.target}{_source(node)}"


def _refuse(node: torch.fx.Node, why: str) -> ValueError:
    return ValueError(f"to_drm: {_describe(node)}: {why}; supported: {SUPPORTED}")


def _bind(signature: Callable[..., None], node: torch.fx.Node) -> dict[str, Any]:
    try:
        bound = inspect.signature(signature).bind(*node.args, **node.kwargs)
    except TypeError as err:
        raise _refuse(node, f"unexpected arguments ({err})") from err
    bound.apply_defaults()
    return dict(bound.arguments)


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The shape of the node's value when it is a tensor (recorded by _Shapes), else None."""
    return node.meta.get("shape")


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _adaptive(
    node: torch.fx.Node, output_size: Any, in_shape: tuple[int, ...], kind: str
) -> nn.Module:
    """AdaptiveAvg/MaxPool2d at this input shape: identity, or a pooling with equal windows."""
    if len(in_shape) != 3:
        raise _refuse(node, f"adaptive pooling of a {len(in_shape)}-d input")
    sizes = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    height, width = in_shape[1:]
    out = tuple(
        full if o is None else int(o) for o, full in zip(sizes, (height, width), strict=True)
    )
    if out == (height, width):
        return nn.Identity()
    if height % out[0] or width % out[1]:
        raise _refuse(
            node,
            f"adaptive pooling of {height}x{width} to {out[0]}x{out[1]} has unequal windows at "
            "this input shape (the output size must divide the input size)",
        )
    window = (height // out[0], width // out[1])
    return nn.AvgPool2d(window, window) if kind == "avg" else nn.MaxPool2d(window, window)


def _flattening(node: torch.fx.Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
                ) -> nn.Module:  # fmt: skip
    """A reshape that flattens each image into a vector (or leaves it as it is)."""
    if out_shape == in_shape:
        return nn.Identity()
    if out_shape == (math.prod(in_shape),):
        return nn.Flatten()
    raise _refuse(
        node,
        f"reshapes (batch, {', '.join(map(str, in_shape))}) to (batch, "
        f"{', '.join(map(str, out_shape))}); only flattening each image to a vector is a level",
    )


def _as_layer(
    node: torch.fx.Node, module: nn.Module | None, in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> nn.Module | None:  # fmt: skip
    """The torch layer that `node` computes; None for a log_softmax (dropped at the end)."""
    if module is not None:
        if isinstance(module, nn.Flatten):
            return _flattening(node, in_shape, out_shape)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return _adaptive(node, module.output_size, in_shape, "avg")
        if isinstance(module, nn.AdaptiveMaxPool2d):
            if module.return_indices:
                raise _refuse(node, "return_indices=True returns a tuple")
            return _adaptive(node, module.output_size, in_shape, "max")
        if isinstance(module, nn.LogSoftmax):
            return None
        return module
    if node.op == "call_method" and node.target in _FLATTENING_METHODS:
        return _flattening(node, in_shape, out_shape)
    if node.op == "call_method" and node.target in _IDENTITY_METHODS:
        return nn.Identity()
    signature = _FUNCTIONS.get(node.target) if node.op == "call_function" else None
    if node.op == "call_method":
        signature = _METHODS.get(str(node.target))
    if signature is None:
        raise _refuse(node, "not an operation of a CNN chain")
    a = _bind(signature, node)
    if signature is _relu:
        return nn.ReLU()
    if signature is _leaky_relu:
        return nn.LeakyReLU(float(a["negative_slope"]))
    if signature is _max_pool2d:
        if a["return_indices"]:
            raise _refuse(node, "return_indices=True returns a tuple")
        return nn.MaxPool2d(a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                            ceil_mode=a["ceil_mode"])  # fmt: skip
    if signature is _avg_pool2d:
        return nn.AvgPool2d(a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                            a["count_include_pad"], a["divisor_override"])  # fmt: skip
    if signature is _adaptive_pool2d:
        if a["return_indices"]:
            raise _refuse(node, "return_indices=True returns a tuple")
        kind = "avg" if node.target is F.adaptive_avg_pool2d else "max"
        return _adaptive(node, a["output_size"], in_shape, kind)
    if signature is _dropout:
        return nn.Identity()  # the DRM is the network at inference, where dropout is identity
    if signature is _flatten:
        return _flattening(node, in_shape, out_shape)
    return None  # _log_softmax


def _tensor_inputs(node: torch.fx.Node, tensors: set[torch.fx.Node]) -> list[torch.fx.Node]:
    return [n for n in node.all_input_nodes if n in tensors]


def trace_chain(cnn: nn.Module, input_shape: Sequence[int]) -> Chain:
    """The operations of `cnn` on (C, H, W) images, as torch layers in the order they run.

    Raises:
        ValueError: a construct fx cannot trace, a node that is not a CNN chain operation (named
            with its source line), a graph that branches, or BatchNorm in training mode.
    """
    for path, sub in cnn.named_modules():
        if isinstance(sub, _BATCHNORM) and sub.training:
            raise ValueError(
                f"to_drm: {path} ({type(sub).__name__}) is in training mode, where it normalises "
                "with batch statistics; call cnn.eval() first"
            )
    try:
        graph = _Tracer().trace(cnn)
    except Exception as err:  # fx raises many kinds (TraceError, TypeError, ...): name it once
        message = " ".join(str(err).split())
        raise ValueError(
            f"to_drm: torch.fx cannot trace {type(cnn).__name__} ({type(err).__name__}: "
            f"{message}); write its forward without data-dependent control flow"
        ) from err
    module = torch.fx.GraphModule(cnn, graph)
    for node in module.graph.nodes:  # before running anything: layers with no DRM level
        if node.op == "call_module":
            called = module.get_submodule(str(node.target))
            if type(called) not in _MODULES:
                raise ValueError(
                    f"to_drm: unsupported layer {node.target} ({type(called).__name__}); "
                    f"supported: {SUPPORTED}"
                )
    reference = next(iter(cnn.parameters()), None)
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    device = reference.device if reference is not None else torch.device("cpu")
    example = torch.zeros((2, *input_shape), dtype=dtype, device=device)
    try:
        # only the shapes matter: torch's performance warnings are not the user's concern here
        # a train-mode dropout must not consume the caller's random numbers: fork the RNG
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), warnings.catch_warnings(), torch.random.fork_rng(devices):
            warnings.simplefilter("ignore")
            _Shapes(module).run(example)
    except _Misfit as misfit:
        raise ValueError(
            f"to_drm: input shape {tuple(input_shape)} does not fit {_describe(misfit.node)}: "
            f"{misfit.reason}"
        ) from misfit

    layers: list[tuple[str, nn.Module]] = []
    shapes: list[tuple[int, ...]] = []
    tensors: set[torch.fx.Node] = set()  # nodes whose value is a tensor
    current: torch.fx.Node | None = None  # the node holding the chain's current tensor
    dropped_log_softmax = False
    for node in module.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise _refuse(node, "the network takes more than one input")
            current = node
            tensors.add(node)
            continue
        inputs = _tensor_inputs(node, tensors)
        if node.op == "output":
            result = node.args[0]
            if result is not current:
                raise _refuse(node, "the network must return the one tensor its chain computes")
            break
        shape = _shape(node)
        if shape is None:  # x.size(0), x.shape[...]: metadata of the current tensor
            continue
        tensors.add(node)
        if node.op == "get_attr":
            raise _refuse(node, "a parameter or buffer used directly (not through a layer)")
        if inputs != [current]:
            raise _refuse(
                node,
                "the network is not a single chain (this node combines or reuses other tensors "
                "than the previous operation's output, as a residual or a concatenation does)",
            )
        if dropped_log_softmax:
            raise _refuse(node, "log_softmax is accepted only as the last operation")
        assert current is not None
        in_shape, out_shape = _shape(current), shape
        assert in_shape is not None
        sub = module.get_submodule(str(node.target)) if node.op == "call_module" else None
        layer = _as_layer(node, sub, in_shape[1:], out_shape[1:])
        current = node
        if layer is None:
            dropped_log_softmax = True
            dim = sub.dim if isinstance(sub, nn.LogSoftmax) else _bind(_log_softmax, node)["dim"]
            if dim not in (1, -1) or len(out_shape) != 2:
                raise _refuse(node, "log_softmax must normalise the class scores (dim=1)")
            continue
        name = str(node.target) if node.op == "call_module" else _describe(node)
        layers.append((name, layer))
        shapes.append(out_shape[1:])
    return Chain(layers, shapes, dropped_log_softmax)
