"""Architectures the tests sweep: MNIST-sized ones for identities, tiny ones for enumeration."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import drm
from drm import AvgPoolSpec as Avg
from drm import ConvSpec as Conv
from drm import DenseSpec as Dense
from drm import FlattenSpec as Flat
from drm import MaxPoolSpec as Max
from drm import ModelConfig
from drm import SwitchSpec as Sw
from drm.data import Dataset
from drm.shallow import ShallowRenderingModel

# Architectures for the identities that hold for every model (E1, E2, E6, E8): every level
# kind and every conv/pool option, on images large enough to exercise borders.
ARCHITECTURES: dict[str, ModelConfig] = {
    "lenet": drm.lenet_config((1, 28, 28), 10, (6, 16, 32)),
    "padding-stride": ModelConfig(
        (2, 11, 9), 4, (Conv(5, 3, stride=2, padding=1), Sw(), Max(2), Flat(), Dense(7), Sw())
    ),
    "dilation-groups": ModelConfig(
        (4, 12, 12), 3, (Conv(6, 3, dilation=2, groups=2, padding=2), Sw(), Max(3, 2, 1), Flat())
    ),
    "overlapping-ceil-pool": ModelConfig(
        (1, 10, 10),
        5,
        (
            Conv(3, 3),
            Sw(),
            Max(3, 2, ceil_mode=True),
            Conv(4, 2),
            Sw(),
            Max(2, 1, dilation=1),
            Flat(),
        ),
    ),
    "pool-dilation-padding": ModelConfig(
        (2, 9, 9), 3, (Conv(3, 2), Sw(0.05), Max(3, 2, padding=1, dilation=2), Flat())
    ),
    "leaky": ModelConfig(
        (1, 8, 8),
        3,
        (Conv(4, 3, padding=1), Sw(0.1), Max(2), Conv(4, 3), Sw(0.2), Flat(), Dense(6), Sw(0.01)),
    ),
    "avgpool": ModelConfig(
        (3, 9, 9),
        4,
        (
            Conv(4, 3),
            Sw(),
            Avg(2, 1),
            Conv(5, 2, stride=2),
            Sw(),
            Avg(3, 2, 1, count_include_pad=False),
            Flat(),
        ),
    ),
    "avgpool-divisor": ModelConfig(
        (1, 8, 8), 2, (Conv(2, 3, padding=1), Avg(2, divisor_override=3), Sw(), Max(2), Flat())
    ),
    "pool-before-switch": ModelConfig(
        (1, 8, 8), 3, (Conv(3, 3), Max(2), Sw(), Conv(3, 2), Conv(2, 1), Sw(), Flat())
    ),
    "dense-only": ModelConfig((1, 4, 5), 3, (Flat(), Dense(8), Sw(), Dense(6), Sw(0.3), Dense(5))),
}

# Tiny architectures for brute-force enumeration (at most ~3e4 configurations each).
TINY_ARCHITECTURES: dict[str, ModelConfig] = {
    "conv-relu-pool": ModelConfig((1, 3, 3), 3, (Conv(2, 2), Sw(), Max(2, 1), Flat())),
    "padding-stride": ModelConfig(
        (1, 4, 4),
        3,
        (Conv(1, 3, stride=2, padding=1), Sw(), Max(2, 1, padding=1), Flat(), Dense(2), Sw()),
    ),
    "overlapping-leaky": ModelConfig((1, 3, 4), 3, (Conv(1, 2), Sw(0.1), Max(2, 1), Flat())),
    "avgpool-dense": ModelConfig(
        (1, 4, 4), 3, (Conv(1, 2), Sw(), Avg(2, 1), Flat(), Dense(2), Sw(0.2))
    ),
    "dilation-ceil": ModelConfig(
        (1, 5, 5), 3, (Conv(1, 2, dilation=2), Sw(), Max(2, 2, ceil_mode=True), Flat())
    ),
    "two-levels": ModelConfig(
        (1, 4, 4), 3, (Conv(2, 2, stride=2), Sw(), Conv(1, 2), Sw(), Flat(), Dense(2), Sw())
    ),
    "groups": ModelConfig((2, 3, 3), 2, (Conv(2, 2, groups=2), Sw(), Max(2), Flat())),
    "pool-then-switch": ModelConfig(
        (1, 4, 4), 3, (Conv(1, 2), Max(2, 1), Sw(0.1), Flat(), Dense(2), Sw())
    ),
}


def build(
    config: ModelConfig, seed: int = 0, nonnegative: bool = False, sigma2: float | None = None
) -> drm.DeepRenderingModel:
    """A float64 model with random templates and a random class prior.

    With `nonnegative`, every template above the first latent level (class templates included)
    is made non-negative, the sufficient condition for exact max-sum (E3). With `sigma2`, the
    model's noise variance is set to it (no random draws).
    """
    model = drm.DeepRenderingModel.from_config(config, seed=seed, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        model.classes.bias.copy_(
            torch.randn(model.num_classes, generator=generator, dtype=torch.float64)
        )
        if sigma2 is not None:
            model.sigma2.fill_(sigma2)
    if nonnegative:
        make_nonnegative(model)
    return model


def make_nonnegative(model: drm.DeepRenderingModel) -> None:
    """|W| in place for every template above the first latent level (class templates included)."""
    first_latent = min(model.latent_levels)
    with torch.no_grad():
        for i, level in enumerate(model.levels):
            if i > first_latent and isinstance(level, (drm.Conv, drm.Dense)):
                level.weight.abs_()


def images(model: drm.DeepRenderingModel, batch: int, seed: int = 0) -> torch.Tensor:
    """Random images (B, C0, H, W) in the model's dtype, drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.input_shape, generator=generator, dtype=torch.float64).to(
        model.device, model.dtype
    )


# --- the training script's algorithms (name -> argv) -----------------------------------------

# every term of the semi-supervised loss switched on, 5 labelled images per class
SSL_ARGV = ["--algo", "ssl", "--labels", "50", "--labelled-batch-size", "8",
            "--class-balance-weight", "0.5", "--path-normalization-weight", "0.5",
            "--min-cross-entropy-weight", "0.5", "--consistency-weight", "0.5"]  # fmt: skip
TRAIN_ALGORITHMS: dict[str, list[str]] = {
    "sgd": ["--algo", "sgd"],
    "dem": ["--algo", "dem", "--m-steps", "2"],
    "em-deep": ["--algo", "em"],
    "em-shallow": [
        "--algo",
        "em",
        "--model",
        "shallow",
        "--translation",
        "interior",
        "--template-size",
        "6",
    ],  # fmt: skip
    "ssl": SSL_ARGV,
    # discriminative EM's exact M-step designs (drm.m_steps)
    "dem-exact-top": ["--algo", "dem", "--m-step", "exact-top"],
    "dem-block": ["--algo", "dem", "--m-step", "block"],
    "dem-large-batch": ["--algo", "dem", "--m-step", "large-batch"],
}


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread, as the training subprocesses use (--threads 1), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- oracles ---------------------------------------------------------------------------------


def hooked_gradient(
    cnn: nn.Sequential, x: torch.Tensor, layer: int, units: torch.Tensor, rule: str
) -> torch.Tensor:
    """d (output of `layer`)[unit] / d x by autograd, with the ReLU backward rule `rule`.

    The layer's output is read by a forward pre-hook on the next layer (after any backward hook
    of the layer itself is in place); layer -1 is the image, the last layer the logits.
    """
    layers = list(cnn)
    handles = []
    for module in layers:
        if rule == "drm" or not isinstance(module, (nn.ReLU, nn.LeakyReLU)):
            continue
        slope = getattr(module, "negative_slope", 0.0)

        def backward_rule(
            module: nn.Module, grad_input: Any, grad_output: Any, slope: float = slope
        ) -> tuple[torch.Tensor]:
            if rule == "deconvnet":  # Zeiler & Fergus: rectify the backward signal itself
                return (F.leaky_relu(grad_output[0], slope),)
            return (grad_input[0].clamp(min=0),)  # guided: the gradient, negatives zeroed

        handles.append(module.register_full_backward_hook(backward_rule))
    captured: list[torch.Tensor] = []
    if 0 <= layer < len(layers) - 1:

        def capture(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            captured.append(inputs[0])

        handles.append(layers[layer + 1].register_forward_pre_hook(capture))
    image = x.clone().requires_grad_()
    try:
        logits = cnn(image)
        out = image if layer == -1 else captured[0] if captured else logits
        (grad,) = torch.autograd.grad(out.flatten(1).gather(1, units[:, None]).sum(), image)
    finally:
        for handle in handles:
            handle.remove()
    return grad


def enumerate_latents(model: ShallowRenderingModel) -> list[tuple[int, int, bool]]:
    """Every (c, g, a) of a shallow model (a only True without a switch)."""
    switches = (False, True) if model.has_switch else (True,)
    return list(
        itertools.product(range(model.num_classes), range(model.num_translations), switches)
    )


def brute_log_joint(model: ShallowRenderingModel, x: torch.Tensor) -> torch.Tensor:
    """log p(x_n, c, g, a) for every (n, c, g, a) by the literal `log_joint`: (N, C, G, A)."""
    n = x.shape[0]
    num_a = 2 if model.has_switch else 1
    out = x.new_empty(n, model.num_classes, model.num_translations, num_a)
    for c, g, a in enumerate_latents(model):
        cls = torch.full((n,), c, dtype=torch.long)
        trans = torch.full((n,), g, dtype=torch.long)
        sw = torch.full((n,), a, dtype=torch.bool) if model.has_switch else None
        out[:, c, g, int(a) if model.has_switch else 0] = model.log_joint(x, cls, trans, sw)
    return out


# --- a small CNN trained on the 8x8 digits ---------------------------------------------------


def fit_digits(cnn: nn.Module, data: Dataset, steps: int, seed: int) -> None:
    """Adam (lr 1e-2) on the cross-entropy of `steps` random batches of 64 training digits."""
    optimizer = torch.optim.Adam(cnn.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, data.x_train.shape[0], (64,), generator=generator)
        loss = F.cross_entropy(cnn(data.x_train[batch]), data.y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
