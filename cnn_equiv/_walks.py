"""The two walks the visualisation tools share (private): down a rendering model, up a torch CNN.

Down: `one_hot` puts a signal on one unit of a level's output and `walk_down` passes a signal
from that level's output down to the pixels with given latents (`drm.model.walk_down`), as
`cnn_equiv.projections.project`, `cnn_equiv.units.unit_template` and
`cnn_equiv.inversion.invert_by_rendering` do. Up: `layer_output` / `run_to` run a torch CNN up to
one leaf layer (in `cnn_equiv.cnn.iter_layers` order) and stop, as `saliency` and
`invert_by_optimization` do on the neural-net side. Level index -1 is the image itself.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from cnn_equiv.cnn import iter_layers
from drm.levels import SwitchRule
from drm.model import DeepRenderingModel, Latents
from drm.model import walk_down as drm_walk_down


def output_shape(model: DeepRenderingModel, level_index: int) -> tuple[int, ...]:
    """Per-image shape of level `level_index`'s output (the image for -1)."""
    return model.input_shape if level_index < 0 else model.levels[level_index].out_shape


# --- down the rendering model ------------------------------------------------------------------


def one_hot(model: DeepRenderingModel, level_index: int, units: Tensor) -> Tensor:
    """One-hot signals (B, *out_shape) at level `level_index`'s output, one unit per image."""
    shape = output_shape(model, level_index)
    g = F.one_hot(units, math.prod(shape)).to(model.dtype)  # (B, U)
    return g.view(units.shape[0], *shape)


def walk_down(
    model: DeepRenderingModel, g: Tensor, level_index: int, latents: Latents, rule: SwitchRule
) -> Tensor:
    """Pass the signal g at level `level_index`'s output down to the pixels: (B, C0, H, W)."""
    return drm_walk_down(model, g, latents, level_index, 0, rule)[0]


# --- up a torch CNN ----------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a forward hook once the wanted layer has run (nothing above it is needed)."""


def leaf_layer(cnn: nn.Module, layer_index: int) -> nn.Module | None:
    """Leaf layer `layer_index` of `cnn` (in `iter_layers` order); None for -1 (x itself)."""
    if layer_index == -1:
        return None
    layers = [layer for _, layer in iter_layers(cnn)]
    if not 0 <= layer_index < len(layers):
        raise ValueError(
            f"layer index must lie in [-1, {len(layers)}) for this CNN, got {layer_index}"
        )
    return layers[layer_index]


def layer_output(cnn: nn.Module, x: Tensor, layer_index: int) -> Tensor:
    """The output of leaf layer `layer_index` of `cnn` (in `iter_layers` order; -1: x itself)."""
    return run_to(cnn, x, leaf_layer(cnn, layer_index), layer_index)


def run_to(cnn: nn.Module, x: Tensor, layer: nn.Module | None, layer_index: int) -> Tensor:
    """The output of `layer` (`leaf_layer(cnn, layer_index)`; None: x itself) for input x."""
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
