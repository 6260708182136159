"""Architecture specifications: frozen, validated, JSON-friendly descriptions of a model.

A `ModelConfig` lists the hidden levels of a Deep Rendering Model, coarse structure only (sizes,
strides, switch kinds); the tensors live in the levels themselves (`drm.levels`). The same config
describes the equivalent CNN layer by layer, so a config is also what a checkpoint stores.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

Pair = tuple[int, int]


def as_pair(value: int | tuple[int, ...] | list[int], name: str) -> Pair:
    """Normalise an int or a length-2 sequence of ints (torch's convention) to a pair."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _check_range(name: str, pair: Pair, low: int) -> None:
    if min(pair) < low:
        raise ValueError(f"{name} must be >= {low}, got {pair}")


def _check_window(kernel: Pair, stride: Pair, padding: Pair) -> None:
    """A pooling window as torch accepts it: padding at most half the kernel."""
    _check_range("kernel_size", kernel, 1)
    _check_range("stride", stride, 1)
    _check_range("padding", padding, 0)
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        raise ValueError(f"padding {padding} must be at most half of kernel_size {kernel}")


@dataclass(frozen=True)
class ConvSpec:
    """A convolutional rendering level: templates W (out, in/groups, kh, kw) and biases b (out,)."""

    out_channels: int  # K_l, the number of partial renderings (filters) at this level
    kernel_size: Pair  # (kh, kw) of each template
    stride: Pair = (1, 1)  # the same stride renders top-down (conv_transpose) and matches bottom-up
    padding: Pair = (0, 0)  # zero padding, as torch.nn.Conv2d(padding_mode="zeros")
    dilation: Pair = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        for name in ("kernel_size", "stride", "padding", "dilation"):
            object.__setattr__(self, name, as_pair(getattr(self, name), name))
        if self.out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {self.out_channels}")
        _check_range("kernel_size", self.kernel_size, 1)
        _check_range("stride", self.stride, 1)
        _check_range("padding", self.padding, 0)
        _check_range("dilation", self.dilation, 1)
        if self.groups < 1 or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide out_channels={self.out_channels}")


@dataclass(frozen=True)
class DenseSpec:
    """A fully connected rendering level: templates W (out, in) and biases b (out,)."""

    out_features: int  # K_l

    def __post_init__(self) -> None:
        if self.out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {self.out_features}")


@dataclass(frozen=True)
class SwitchSpec:
    """A switching latent a per unit: a in {0, 1} (ReLU) or {negative_slope, 1} (LeakyReLU)."""

    negative_slope: float = 0.0  # the OFF value of the switch; 0 is ReLU
    prior_on: float = 0.5  # P(a = ON) under the factorized prior used by `drm.sample`

    def __post_init__(self) -> None:
        if not self.negative_slope <= 1.0:
            # max over a in {alpha, 1} of a*u is LeakyReLU(u) only when alpha <= 1.
            raise ValueError(
                f"negative_slope must be <= 1 for max-marginalisation to be a LeakyReLU, "
                f"got {self.negative_slope}"
            )
        if not 0.0 < self.prior_on < 1.0:
            raise ValueError(f"prior_on must lie in (0, 1), got {self.prior_on}")


@dataclass(frozen=True)
class MaxPoolSpec:
    """A translation latent t per pooled unit: which cell of its window it was rendered at."""

    kernel_size: Pair
    stride: Pair | None = None  # None means stride = kernel_size, as in torch
    padding: Pair = (0, 0)  # padded cells are never chosen (torch pads with -inf)
    dilation: Pair = (1, 1)
    ceil_mode: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_size", as_pair(self.kernel_size, "kernel_size"))
        stride = self.kernel_size if self.stride is None else self.stride
        object.__setattr__(self, "stride", as_pair(stride, "stride"))
        object.__setattr__(self, "padding", as_pair(self.padding, "padding"))
        object.__setattr__(self, "dilation", as_pair(self.dilation, "dilation"))
        _check_window(self.kernel_size, self.stride_pair, self.padding)
        _check_range("dilation", self.dilation, 1)

    @property
    def stride_pair(self) -> Pair:
        assert self.stride is not None  # set in __post_init__
        return self.stride


@dataclass(frozen=True)
class AvgPoolSpec:
    """Average pooling: a fixed linear rendering with no latent."""

    kernel_size: Pair
    stride: Pair | None = None
    padding: Pair = (0, 0)
    count_include_pad: bool = True
    divisor_override: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_size", as_pair(self.kernel_size, "kernel_size"))
        stride = self.kernel_size if self.stride is None else self.stride
        object.__setattr__(self, "stride", as_pair(stride, "stride"))
        object.__setattr__(self, "padding", as_pair(self.padding, "padding"))
        _check_window(self.kernel_size, self.stride_pair, self.padding)
        if self.divisor_override is not None and self.divisor_override < 1:
            raise ValueError(f"divisor_override must be >= 1, got {self.divisor_override}")

    @property
    def stride_pair(self) -> Pair:
        assert self.stride is not None  # set in __post_init__
        return self.stride


@dataclass(frozen=True)
class FlattenSpec:
    """Flatten (C, H, W) maps to vectors; its rendering reshapes back."""


LevelSpec = ConvSpec | DenseSpec | SwitchSpec | MaxPoolSpec | AvgPoolSpec | FlattenSpec

SPEC_KINDS: dict[str, type] = {
    "conv": ConvSpec,
    "dense": DenseSpec,
    "switch": SwitchSpec,
    "maxpool": MaxPoolSpec,
    "avgpool": AvgPoolSpec,
    "flatten": FlattenSpec,
}
_KIND_OF = {cls: kind for kind, cls in SPEC_KINDS.items()}


@dataclass(frozen=True)
class ModelConfig:
    """A whole Deep Rendering Model: hidden levels bottom-up, then the class templates.

    The class level (templates mu_c and log prior log pi_c) is implicit: it follows the last
    hidden level, whose output must be a vector (end with `FlattenSpec` or `DenseSpec`).
    """

    input_shape: tuple[int, int, int]  # (C0, H, W) of one image
    num_classes: int  # C
    levels: tuple[LevelSpec, ...]  # hidden levels, fine (pixels) to coarse
    sigma2: float = 1.0  # pixel noise variance sigma^2

    def __post_init__(self) -> None:
        shape = tuple(self.input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {shape}")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "levels", tuple(self.levels))
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not (math.isfinite(self.sigma2) and self.sigma2 > 0):
            raise ValueError(f"sigma2 must be finite and > 0, got {self.sigma2}")
        for i, spec in enumerate(self.levels):
            if type(spec) not in _KIND_OF:
                raise TypeError(f"levels[{i}] is {type(spec).__name__}, not a level spec")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `ModelConfig.from_dict` inverts it."""
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "sigma2": self.sigma2,
            "levels": [{"kind": _KIND_OF[type(s)], **dataclasses.asdict(s)} for s in self.levels],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild a config from `to_dict` output, validating every field."""
        try:
            levels = []
            for entry in data["levels"]:
                fields = dict(entry)
                kind = fields.pop("kind")
                if kind not in SPEC_KINDS:
                    raise ValueError(f"unknown level kind {kind!r}")
                fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
                levels.append(SPEC_KINDS[kind](**fields))
            return cls(
                input_shape=tuple(data["input_shape"]),
                num_classes=int(data["num_classes"]),
                levels=tuple(levels),
                sigma2=float(data["sigma2"]),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed model config: {err}") from err


def lenet_config(
    input_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    widths: tuple[int, int, int] = (20, 50, 500),
    sigma2: float = 1.0,
) -> ModelConfig:
    """LeNet-5 in Caffe's form: conv5-relu-pool2, conv5-relu-pool2, dense-relu, classes.

    `DeepRenderingModel.from_config(lenet_config())` is the MNIST-sized model of the benchmark
    (`python -m experiments.bench_inference`).
    """
    c1, c2, hidden = widths
    return ModelConfig(
        input_shape=input_shape,
        num_classes=num_classes,
        sigma2=sigma2,
        levels=(
            ConvSpec(c1, (5, 5)),
            SwitchSpec(),
            MaxPoolSpec((2, 2)),
            ConvSpec(c2, (5, 5)),
            SwitchSpec(),
            MaxPoolSpec((2, 2)),
            FlattenSpec(),
            DenseSpec(hidden),
            SwitchSpec(),
        ),
    )


def small_config(
    input_shape: tuple[int, int, int] = (1, 8, 8), num_classes: int = 10
) -> ModelConfig:
    """conv3(16)-relu-pool2, conv3(32)-relu-pool2, dense(64)-relu, classes: for 8x8 digits.

    The model `python -m experiments.train --data digits` trains by default (images under
    28x28): about 0.94 test accuracy on the 8x8 digits after 5 epochs of SGD (batch 16).
    """
    return ModelConfig(
        input_shape=input_shape,
        num_classes=num_classes,
        levels=(
            ConvSpec(16, (3, 3), padding=(1, 1)),
            SwitchSpec(),
            MaxPoolSpec((2, 2)),
            ConvSpec(32, (3, 3), padding=(1, 1)),
            SwitchSpec(),
            MaxPoolSpec((2, 2)),
            FlattenSpec(),
            DenseSpec(64),
            SwitchSpec(),
        ),
    )


def tiny_patch_config() -> ModelConfig:
    """A tiny model of 4x4 digit patches whose exact MAP is computable by enumeration.

    conv2x2/2(2)-relu-pool2/1, dense(2)-relu, 3 classes: 16,384 latent configurations x 3
    classes. `python -m experiments.demo` checks max-sum against `drm.exact_map` on it (the
    inference gap is 0 to 1e-10 with non-negative weights above the first level, positive with
    signed ones); `python -m experiments.compare_views` reports the same comparison.
    """
    return ModelConfig(
        (1, 4, 4),
        3,
        (ConvSpec(2, (2, 2), stride=(2, 2)), SwitchSpec(), MaxPoolSpec((2, 2), (1, 1)),
         FlattenSpec(), DenseSpec(2), SwitchSpec()),
    )  # fmt: skip
