"""The levels of a Deep Rendering Model, each an adjoint pair of messages.

Every level is one class that pairs
  * its bottom-up message (`bottom_up`): what the CNN layer computes, i.e. template matching
    plus bias for `Conv`/`Dense`, max-marginalisation over the level's latent for `Switch`
    (ReLU) and `MaxPool` (max-pooling), returning the arg-max latent; and
  * its top-down rendering (`top_down`): the adjoint of the bottom-up map with the latent
    frozen (`bottom_up_frozen`): conv_transpose for `Conv`, unpool (scatter-add) for `MaxPool`,
    multiplication by the switch state for `Switch`.

An abstraction level l of the paper (templates W^(l), switch-prior parameters b^(l), switching
latents a^(l), translation latents t^(l)) is a `Conv` or `Dense` level followed by its `Switch`
and pooling levels, exactly as the layers of the equivalent CNN follow each other. The class level
`Classes` (templates mu_c, log prior log pi_c) ends every model.

Latents: a `Switch` level's latent is a bool tensor shaped like its input (True = ON, the CNN's
ReLU mask); a `MaxPool` level's latent is an int64 tensor shaped like its output holding, for each
pooled unit, the flat index h*W + w of the chosen cell in its channel's (H, W) plane (the index
torch's `max_pool2d(return_indices=True)` returns). Enumeration (`drm.exact_map`), sampling and
the Pyro program address a latent through `latent_counts` (states per unit) and
`latent_from_digits` (unit states -> latent tensor), so a new kind of latent touches one class.

Everything the rest of the library asks about a level, the level answers itself (nothing outside
this module and `cnn_equiv.mapping` tests a level's type):
  * `has_templates`, `templates`, `render_with_templates`: whether generative EM solves for its
    templates, and the rendering with other templates in their place;
  * `best_latent`: its best latent given its input and the signal from above (the refinement's
    coordinate step); `default_latent`, `sample_latent`: its latent with every unit in its first
    state, and a draw from its factorized prior; `prior_statistics` and `learn_prior`: what
    generative EM counts to learn that prior;
  * `exactness_violations`: what breaks E3's sufficient condition (non-negative top-down signals);
  * `field_rule`, `window`, `spread_down`: how a unit's receptive field grows through the level.
A level kind that lacks an answer raises NotImplementedError naming the method, so a new kind is
refused where it is not yet supported, never silently skipped.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Zeiler, Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014 (deconvnet).
    Springenberg et al., Striving for Simplicity: The All Convolutional Net, ICLR-W 2015 (guided).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drm.config import (
    AvgPoolSpec,
    ConvSpec,
    DenseSpec,
    FlattenSpec,
    LevelSpec,
    MaxPoolSpec,
    Pair,
    SwitchSpec,
)

Shape = tuple[int, ...]
# How a `Switch` level passes a top-down signal: "drm" multiplies by the switch state (the DRM
# rendering, which is also the input gradient), "deconvnet" applies the nonlinearity to the signal
# itself (Zeiler and Fergus), "guided" does both (guided backpropagation).
SwitchRule = Literal["drm", "deconvnet", "guided"]
SWITCH_RULES: tuple[str, ...] = ("drm", "deconvnet", "guided")


def _pooled_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool) -> int:
    """Output length of a pooling window sweep, with torch's ceil_mode rule."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1  # torch drops a last window that would start in the right padding
    return out


# How a unit's receptive field grows through a level, walking down (`cnn_equiv.units`):
# "pointwise" keeps it, "window" widens it by the level's sliding `window`, "dense" makes it the
# whole image, "flatten" turns a flat unit back into its (channel, row, column).
FieldRule = Literal["pointwise", "window", "dense", "flatten"]
Window = tuple[Pair, Pair, Pair, Pair]  # kernel, stride, padding, dilation


class Level(nn.Module):
    """Base class: one level of the rendering model, bound to a fixed per-image input shape."""

    has_latent: bool = False
    has_templates: bool = False
    # the name of the level's kind of latent ("switch", "translation"); None without a latent
    latent_kind: str | None = None
    field_rule: FieldRule | None = None
    in_shape: Shape
    out_shape: Shape

    def bind(self, in_shape: Shape) -> Shape:
        """Fix the per-image input shape (no batch dim); validate it; return the output shape."""
        self.in_shape = tuple(in_shape)
        self.out_shape = self._output_shape(self.in_shape)
        return self.out_shape

    def _output_shape(self, in_shape: Shape) -> Shape:
        raise NotImplementedError

    @property
    def spec(self) -> LevelSpec:
        """The hyperparameters of this level (no tensors)."""
        raise NotImplementedError

    # What `bottom_up` returns, which decides whether the next level may overwrite it in place:
    # "new" (a fresh tensor nothing else needs), "view" (a view of the input: as reusable as the
    # input was), "saved" (kept by autograd for this level's backward pass: never overwrite).
    output_kind: Literal["new", "view", "saved"] = "new"

    def bottom_up(self, y: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor | None]:
        """Bottom-up max-sum message: (B, *in_shape) -> ((B, *out_shape), arg-max latent).

        Args:
            y: the message from the level below.
            overwrite: the caller owns y and allows the level to reuse its memory (`max_sum`
                passes True for intermediate messages; never for the user's images).
        """
        return self.bottom_up_frozen(y, None), None

    def bottom_up_frozen(self, y: Tensor, latent: Tensor | None) -> Tensor:
        """The bottom-up map with the latent frozen: affine in y."""
        raise NotImplementedError

    def bottom_up_min(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """The min-sum message: like `bottom_up`, minimising over the latent instead.

        (B, *in_shape) -> ((B, *out_shape), arg-min latent). The "min" branch of the NRM's
        max-min network: -LeakyReLU(-u) for a switch, min-pooling for a translation.
        """
        return self.bottom_up_frozen(y, None), None

    def top_down(self, g: Tensor, latent: Tensor | None, rule: SwitchRule = "drm") -> Tensor:
        """Top-down rendering: the adjoint of the linear part of `bottom_up_frozen`.

        Args:
            g: (B, *out_shape) top-down signal arriving at this level's output.
            latent: this level's latent (None for levels without one).
            rule: how a `Switch` level passes the signal; ignored elsewhere.

        Returns:
            (B, *in_shape) signal arriving at this level's input.
        """
        raise NotImplementedError

    def prior_term(self, g: Tensor) -> Tensor:
        """<b, g> per image for the level's bias b (zero for levels without one): (B,)."""
        return g.new_zeros(g.shape[0])

    def prior_units(self, g: Tensor) -> Tensor:
        """b * g unit by unit, the terms of `prior_term` (zero without a bias): g's shape."""
        return torch.zeros_like(g)

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(
            f"the level kind {type(self).__name__} does not implement {method}, which this "
            "operation needs (see drm/levels.py: a level answers for itself)"
        )

    # --- templates: levels with has_templates = True implement these ----------------------------

    @property
    def templates(self) -> nn.Parameter:
        """The level's templates W (levels with has_templates only)."""
        raise TypeError(f"{type(self).__name__} has no templates")

    def render_with_templates(self, g: Tensor, weight: Tensor) -> Tensor:
        """The rendering with templates `weight` in place of W: linear in both g and weight."""
        raise TypeError(f"{type(self).__name__} has no templates")

    def exactness_violations(self) -> list[str]:
        """What, in this level, breaks E3's sufficient condition for max-sum to be the exact MAP.

        The level must pass a non-negative top-down signal on as a non-negative one for every
        latent state (checked only for the levels above the first latent level).
        """
        raise self._missing("exactness_violations")

    # --- receptive fields ---------------------------------------------------------------------

    def window(self) -> Window:
        """(kernel, stride, padding, dilation) of a level with field_rule "window"."""
        raise self._missing("window")

    def spread_down(self, g: Tensor) -> Tensor:
        """A non-negative signal rendered onto every input cell some latent state reaches.

        (B, *out_shape) -> (B, *in_shape); zero exactly where no configuration renders.
        """
        raise self._missing("spread_down")

    # --- latents: only levels with has_latent = True implement these ---------------------------

    def best_latent(self, y: Tensor, h: Tensor) -> Tensor:
        """argmax over the level's latent of <h, F(y; z)>, unit by unit.

        Args:
            y: (B, *in_shape) the level's bottom-up input.
            h: (B, *out_shape) the top-down signal at its output.
        """
        raise self._missing("best_latent")

    def default_latent(self, batch: int, device: torch.device) -> Tensor:
        """Every unit in its first state (digit 0): the latent of `batch` images."""
        counts = self.latent_counts()
        digits = torch.zeros(batch, counts.shape[0], dtype=torch.long, device=device)
        return self.latent_from_digits(digits)

    def sample_latent(
        self, n: int, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """n draws from the factorized prior; here uniform over each unit's states."""
        counts = self.latent_counts().to(torch.float64)  # (U,)
        uniform = torch.rand(n, counts.shape[0], generator=generator, dtype=torch.float64)
        digits = (uniform * counts).long().clamp_max(counts.long() - 1)
        return self.latent_from_digits(digits.to(device))

    def prior_statistics(self, latent: Tensor) -> Tensor | None:
        """The counts from which generative EM learns this level's prior, a float64 CPU tensor
        summed over batches and processes (zero for a latent of 0 images); None for a prior
        that is fixed."""
        raise self._missing("prior_statistics")

    def learn_prior(self, statistics: Tensor) -> dict[str, float]:
        """Set the prior from an epoch's summed `prior_statistics`; returns what it set."""
        raise self._missing("learn_prior")

    def latent_counts(self) -> Tensor:
        """Number of states of each latent unit: (U,) int64, U = number of latent units."""
        raise NotImplementedError

    def latent_from_digits(self, digits: Tensor) -> Tensor:
        """Latent tensor (N, ...) from unit states `digits` (N, U), digits[:, u] < counts[u]."""
        raise NotImplementedError

    def check_latent(self, latent: Tensor, batch: int) -> None:
        """Raise ValueError/TypeError unless `latent` is a valid latent for `batch` images."""
        raise NotImplementedError

    def factorized_log_prior(self, latent: Tensor, dtype: torch.dtype) -> Tensor:
        """log p(z_l) of each image's latent under the factorized prior: (B,) of `dtype`."""
        raise NotImplementedError


class TemplateLevel(Level):
    """A level whose templates are its `weight` (Conv, Dense, Classes): E3 needs them
    non-negative."""

    has_templates = True
    template_name = "templates"
    weight: nn.Parameter

    @property
    def templates(self) -> nn.Parameter:
        return self.weight

    def exactness_violations(self) -> list[str]:
        count = int((self.weight < 0).sum())
        return [f"{count} negative {self.template_name}"] if count else []


class Conv(TemplateLevel):
    """Convolutional templates: bottom-up conv2d + bias, top-down conv_transpose2d."""

    field_rule = "window"

    def __init__(self, spec: ConvSpec, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        kh, kw = spec.kernel_size
        if weight.ndim != 4 or weight.shape[0] != spec.out_channels or weight.shape[2:] != (kh, kw):
            raise ValueError(
                f"Conv weight must have shape ({spec.out_channels}, in/groups, {kh}, {kw}), "
                f"got {tuple(weight.shape)}"
            )
        if bias.shape != (spec.out_channels,):
            raise ValueError(f"Conv bias must have shape ({spec.out_channels},), got {bias.shape}")
        self._spec = spec
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.output_padding: Pair = (0, 0)

    @property
    def spec(self) -> ConvSpec:
        return self._spec

    def _output_shape(self, in_shape: Shape) -> Shape:
        s = self._spec
        if len(in_shape) != 3:
            raise ValueError(f"Conv expects (C, H, W) inputs, got shape {in_shape}")
        expected = self.weight.shape[1] * s.groups
        if in_shape[0] != expected:
            raise ValueError(f"Conv expects {expected} input channels, got {in_shape[0]}")
        out_hw = []
        output_padding = []
        for size, k, st, p, d in zip(
            in_shape[1:], s.kernel_size, s.stride, s.padding, s.dilation, strict=True
        ):
            span = size + 2 * p - d * (k - 1) - 1
            if span < 0:
                raise ValueError(f"Conv kernel {s.kernel_size} does not fit input {in_shape}")
            out_hw.append(span // st + 1)
            # conv_transpose2d needs the remainder to land exactly on the input size.
            output_padding.append(span % st)
        self.output_padding = (output_padding[0], output_padding[1])
        return (s.out_channels, out_hw[0], out_hw[1])

    def bottom_up_frozen(self, y: Tensor, latent: Tensor | None) -> Tensor:
        s = self._spec
        return F.conv2d(y, self.weight, self.bias, s.stride, s.padding, s.dilation, s.groups)

    def top_down(self, g: Tensor, latent: Tensor | None, rule: SwitchRule = "drm") -> Tensor:
        return self.render_with_templates(g, self.weight)

    def render_with_templates(self, g: Tensor, weight: Tensor) -> Tensor:
        """The rendering with templates `weight` in place of W: linear in both g and weight."""
        s = self._spec
        if g.dtype != torch.float64 and weight.is_contiguous(memory_format=torch.channels_last):
            # oneDNN's transposed convolution runs fastest on NHWC signals, and an unpooled
            # signal arrives in NCHW: one copy pays (about 1.1x on generative EM's LeNet step in
            # either layout). Weights with one input channel, like LeNet's first level, count as
            # channels_last in either layout. Not in float64 (no oneDNN kernel there).
            g = g.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(
            g, weight, None, s.stride, s.padding, self.output_padding, s.groups, s.dilation
        )

    def prior_term(self, g: Tensor) -> Tensor:
        return torch.einsum("bchw,c->b", g, self.bias)

    def prior_units(self, g: Tensor) -> Tensor:
        return g * self.bias[:, None, None]

    def window(self) -> Window:
        s = self._spec
        return s.kernel_size, s.stride, s.padding, s.dilation

    def spread_down(self, g: Tensor) -> Tensor:
        return self.render_with_templates(g, torch.ones_like(self.weight))


class Dense(TemplateLevel):
    """Fully connected templates: bottom-up linear + bias, top-down multiplication by W."""

    field_rule = "dense"  # every input unit reaches every output unit

    def __init__(self, spec: DenseSpec, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] != spec.out_features:
            raise ValueError(
                f"Dense weight must have shape ({spec.out_features}, in_features), "
                f"got {tuple(weight.shape)}"
            )
        if bias.shape != (spec.out_features,):
            raise ValueError(f"Dense bias must have shape ({spec.out_features},), got {bias.shape}")
        self._spec = spec
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    @property
    def spec(self) -> DenseSpec:
        return self._spec

    def offset(self) -> Tensor:
        """The additive term of the bottom-up map, (out,)."""
        return self.bias

    def _output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 1:
            raise ValueError(
                f"{type(self).__name__} expects flat inputs, got shape {in_shape}: "
                "put a Flatten level before it"
            )
        if in_shape[0] != self.weight.shape[1]:
            raise ValueError(
                f"{type(self).__name__} expects {self.weight.shape[1]} input features, "
                f"got {in_shape[0]}"
            )
        return (self.weight.shape[0],)

    def bottom_up_frozen(self, y: Tensor, latent: Tensor | None) -> Tensor:
        return F.linear(y, self.weight, self.offset())

    def top_down(self, g: Tensor, latent: Tensor | None, rule: SwitchRule = "drm") -> Tensor:
        return self.render_with_templates(g, self.weight)

    def render_with_templates(self, g: Tensor, weight: Tensor) -> Tensor:
        """The rendering with templates `weight` in place of W: linear in both g and weight."""
        return g @ weight

    def prior_term(self, g: Tensor) -> Tensor:
        return g @ self.offset()

    def prior_units(self, g: Tensor) -> Tensor:
        return g * self.offset()

    def spread_down(self, g: Tensor) -> Tensor:
        return self.render_with_templates(g, torch.ones_like(self.weight))


class Classes(Dense):
    """The top level: class templates mu_c (rows of the weight) and class log prior log pi_c.

    The prior is stored as unnormalised logits; `log_prior` = log_softmax(prior_logits) is what the
    model and the equivalent CNN use, so log pi is always a normalised distribution.
    """

    template_name = "class templates"

    def __init__(self, templates: Tensor, prior_logits: Tensor) -> None:
        if templates.ndim != 2 or prior_logits.shape != (templates.shape[0],):
            raise ValueError(
                "Classes needs templates (C, D) and prior_logits (C,), got "
                f"{tuple(templates.shape)} and {tuple(prior_logits.shape)}"
            )
        super().__init__(DenseSpec(templates.shape[0]), templates, prior_logits)

    @property
    def log_prior(self) -> Tensor:
        """log pi_c: (C,)."""
        return torch.log_softmax(self.bias, dim=0)

    def offset(self) -> Tensor:
        return self.log_prior


class Switch(Level):
    """Switching latent a per unit (ON = 1, OFF = negative_slope): max over a is (Leaky)ReLU."""

    has_latent = True
    latent_kind = "switch"
    field_rule = "pointwise"
    output_kind = "saved"  # ReLU's backward pass reads its output

    def __init__(self, spec: SwitchSpec | None = None) -> None:
        super().__init__()
        self._spec = spec if spec is not None else SwitchSpec()

    @property
    def spec(self) -> SwitchSpec:
        return self._spec

    def set_prior_on(self, prior_on: float) -> None:
        """Replace P(a = ON) of the factorized prior (learned by generative EM)."""
        self._spec = dataclasses.replace(self._spec, prior_on=float(prior_on))

    def _output_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def switch_values(self, on: Tensor, dtype: torch.dtype) -> Tensor:
        """The value of a: 1 where ON, negative_slope where OFF."""
        alpha = self._spec.negative_slope
        if alpha == 0.0:
            return on.to(dtype)
        # build in `dtype` directly: a Python float in torch.where would round through float32
        one = torch.ones((), dtype=dtype, device=on.device)
        return torch.where(on, one, torch.full((), alpha, dtype=dtype, device=on.device))

    def bottom_up(self, y: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor | None]:
        # argmax_a a*u over a in {alpha, 1} (alpha <= 1) is ON iff u > 0; ties (u = 0) go OFF,
        # which is the CNN's mask 1[u > 0]. In place when allowed: on large batches the saved
        # allocation is worth ~10% of a LeNet forward pass on the CPU. Autograd accepts it: no
        # level before a switch saves its output for the backward pass.
        alpha = self._spec.negative_slope
        if alpha == 0.0:
            out = torch.relu_(y) if overwrite else torch.relu(y)
            # relu(u) != 0 exactly when u > 0, and a bool cast is several times cheaper than a
            # comparison kernel on the CPU (the inputs are finite: `check_images`).
            return out, out.bool()
        on = y > 0
        return (F.leaky_relu_(y, alpha) if overwrite else F.leaky_relu(y, alpha)), on

    def bottom_up_frozen(self, y: Tensor, latent: Tensor | None) -> Tensor:
        assert latent is not None
        return y * self.switch_values(latent, y.dtype)

    def bottom_up_min(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        # argmin_a a*u over a in {alpha, 1} (alpha <= 1) is ON iff u < 0
        on = y < 0
        return y * self.switch_values(on, y.dtype), on

    def top_down(self, g: Tensor, latent: Tensor | None, rule: SwitchRule = "drm") -> Tensor:
        alpha = self._spec.negative_slope
        if rule == "deconvnet":
            return torch.relu(g) if alpha == 0.0 else F.leaky_relu(g, alpha)
        assert latent is not None
        if rule == "guided":
            g = torch.relu(g)
        return g * self.switch_values(latent, g.dtype)

    def factorized_log_prior(self, latent: Tensor, dtype: torch.dtype) -> Tensor:
        # each unit ON with probability prior_on, independently
        p_on = self._spec.prior_on
        on = latent.flatten(1).sum(1).to(dtype)
        return on * math.log(p_on) + (math.prod(self.in_shape) - on) * math.log1p(-p_on)

    def latent_counts(self) -> Tensor:
        return torch.full((math.prod(self.in_shape),), 2, dtype=torch.long)

    def latent_from_digits(self, digits: Tensor) -> Tensor:
        return digits.bool().view(digits.shape[0], *self.in_shape)

    def best_latent(self, y: Tensor, h: Tensor) -> Tensor:
        # h a u over a in {alpha, 1}, alpha <= 1: ON iff h u > 0 (ties OFF, as the CNN)
        return h * y > 0

    def default_latent(self, batch: int, device: torch.device) -> Tensor:
        return torch.ones(batch, *self.in_shape, dtype=torch.bool, device=device)  # every ON

    def sample_latent(
        self, n: int, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        probs = torch.full((n, *self.in_shape), self._spec.prior_on, dtype=torch.float64)
        return torch.bernoulli(probs, generator=generator).bool().to(device)

    def prior_statistics(self, latent: Tensor) -> Tensor | None:
        """(units ON, units): the ON frequency is P(a = ON)'s maximum-likelihood estimate."""
        return torch.tensor([float(latent.sum()), float(latent.numel())], dtype=torch.float64)

    def learn_prior(self, statistics: Tensor) -> dict[str, float]:
        on, units = statistics.tolist()
        if not units:
            return {}
        prior_on = min(max(on / units, 1e-6), 1 - 1e-6)  # never exactly 0 or 1
        self.set_prior_on(prior_on)
        return {"prior_on": prior_on}

    def exactness_violations(self) -> list[str]:
        slope = self._spec.negative_slope
        return [f"negative_slope {slope} < 0"] if slope < 0 else []

    def spread_down(self, g: Tensor) -> Tensor:
        return g  # every switch ON

    def check_latent(self, latent: Tensor, batch: int) -> None:
        if latent.dtype != torch.bool:
            raise TypeError(f"a Switch latent must be a bool tensor, got {latent.dtype}")
        if tuple(latent.shape) != (batch, *self.in_shape):
            raise ValueError(
                f"a Switch latent must have shape {(batch, *self.in_shape)}, "
                f"got {tuple(latent.shape)}"
            )


class MaxPool(Level):
    """Translation latent t per pooled unit: max over t is max-pooling, rendering is unpooling."""

    has_latent = True
    latent_kind = "translation"
    field_rule = "window"

    def __init__(self, spec: MaxPoolSpec) -> None:
        super().__init__()
        self._spec = spec
        self.window_cells: Tensor  # (P, k), flat cell index per window slot, -1 outside the image
        self.window_counts: Tensor  # (P,), valid cells per window

    @property
    def spec(self) -> MaxPoolSpec:
        return self._spec

    def _output_shape(self, in_shape: Shape) -> Shape:
        s = self._spec
        if len(in_shape) != 3:
            raise ValueError(f"MaxPool expects (C, H, W) inputs, got shape {in_shape}")
        channels, height, width = in_shape
        axes = []
        for size, k, st, p, d in zip(
            (height, width), s.kernel_size, s.stride_pair, s.padding, s.dilation, strict=True
        ):
            out = _pooled_size(size, k, st, p, d, s.ceil_mode)
            if out < 1:
                raise ValueError(f"MaxPool window {s.kernel_size} does not fit input {in_shape}")
            # cells[o, j]: coordinate of slot j of window o along this axis, -1 when outside.
            coords = torch.arange(out)[:, None] * st - p + torch.arange(k)[None, :] * d
            coords[(coords < 0) | (coords >= size)] = -1
            axes.append(coords)
        rows, cols = axes  # (Ho, kh), (Wo, kw)
        valid = (rows[:, None, :, None] >= 0) & (cols[None, :, None, :] >= 0)
        cells = rows[:, None, :, None] * width + cols[None, :, None, :]  # (Ho, Wo, kh, kw)
        cells = torch.where(valid, cells, -1).flatten(2).flatten(0, 1)  # (P, kh*kw)
        counts = (cells >= 0).sum(1)
        if int(counts.min()) < 1:
            raise ValueError(f"MaxPool has a window with no cell inside input {in_shape}")
        # Valid cells first, so digit d < count picks the d-th valid cell.
        order = torch.argsort((cells < 0).to(torch.int8), dim=1, stable=True)
        self.register_buffer("window_cells", cells.gather(1, order), persistent=False)
        self.register_buffer("window_counts", counts, persistent=False)
        return (channels, rows.shape[0], cols.shape[0])

    def bottom_up(self, y: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor | None]:
        s = self._spec
        out, indices = F.max_pool2d(
            y, s.kernel_size, s.stride_pair, s.padding, s.dilation, s.ceil_mode, return_indices=True
        )
        return out, indices

    def bottom_up_min(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        # min-pooling: the max-pooling of -y, whose indices pick the smallest cell
        s = self._spec
        _, indices = F.max_pool2d(
            -y,
            s.kernel_size,
            s.stride_pair,
            s.padding,
            s.dilation,
            s.ceil_mode,
            return_indices=True,
        )
        return self.bottom_up_frozen(y, indices), indices

    def bottom_up_frozen(self, y: Tensor, latent: Tensor | None) -> Tensor:
        assert latent is not None
        # gather the chosen cell of every window: (B, C, H*W) -> (B, C, Ho*Wo)
        return y.flatten(2).gather(2, latent.flatten(2)).view_as(latent)

    def top_down(self, g: Tensor, latent: Tensor | None, rule: SwitchRule = "drm") -> Tensor:
        assert latent is not None
        channels, height, width = self.in_shape
        # Unpool = adjoint of the gather = scatter-ADD: overlapping windows that chose the same
        # cell both render onto it (max_unpool2d would overwrite).
        out = g.new_zeros(g.shape[0], channels, height * width)
        out.scatter_add_(2, latent.flatten(2), g.flatten(2))
        return out.view(g.shape[0], channels, height, width)

    def factorized_log_prior(self, latent: Tensor, dtype: torch.dtype) -> Tensor:
        # each pooled unit uniform over the cells of its window: the same for every latent
        log_uniform = -self.out_shape[0] * float(self.window_counts.double().log().sum())
        return torch.full((latent.shape[0],), log_uniform, dtype=dtype, device=latent.device)

    def latent_counts(self) -> Tensor:
        return self.window_counts.repeat(self.out_shape[0]).cpu()

    def latent_from_digits(self, digits: Tensor) -> Tensor:
        cells = self.window_cells.to(digits.device)
        pooled = cells.shape[0]
        channels = self.out_shape[0]
        unit_window = torch.arange(pooled, device=digits.device).repeat(channels)  # (U,)
        chosen = cells[unit_window[None, :].expand_as(digits), digits]  # (N, U)
        return chosen.view(digits.shape[0], *self.out_shape)

    def best_latent(self, y: Tensor, h: Tensor) -> Tensor:
        # t_p = argmax over the cells t of window p of h_p y_t (argmin of y where h_p < 0)
        cells = self.window_cells.to(y.device)  # (P, k), -1 outside the image
        values = y.flatten(2)[:, :, cells.clamp_min(0)]  # (B, C, P, k)
        gain = values * h.flatten(2)[..., None]  # h_p y_t for every cell t of window p
        gain = gain.masked_fill(cells < 0, -torch.inf)
        choice = gain.argmax(-1)  # (B, C, P): the first best cell, as torch's max-pool
        return cells[torch.arange(cells.shape[0], device=y.device), choice].view(
            y.shape[0], *self.out_shape
        )

    def prior_statistics(self, latent: Tensor) -> Tensor | None:
        return None  # uniform over each window's cells: nothing to learn

    def learn_prior(self, statistics: Tensor) -> dict[str, float]:
        return {}

    def exactness_violations(self) -> list[str]:
        return []  # unpooling moves a signal, it never changes its sign

    def window(self) -> Window:
        p = self._spec
        return p.kernel_size, p.stride_pair, p.padding, p.dilation

    def spread_down(self, g: Tensor) -> Tensor:
        # every valid cell of every window receives the signal
        batch, channels = g.shape[:2]
        cells = self.window_cells.to(g.device)  # (P, k), -1 outside the image
        valid = (cells >= 0).to(g.dtype)
        src = g.flatten(2)[..., None] * valid  # (B, C, P, k)
        index = cells.clamp_min(0).expand(batch, channels, *cells.shape)
        out = g.new_zeros(batch, channels, math.prod(self.in_shape[1:]))
        out.scatter_add_(2, index.flatten(2), src.flatten(2))
        return out.view(batch, *self.in_shape)

    def check_latent(self, latent: Tensor, batch: int) -> None:
        if latent.dtype != torch.long:
            raise TypeError(f"a MaxPool latent must be an int64 index tensor, got {latent.dtype}")
        if tuple(latent.shape) != (batch, *self.out_shape):
            raise ValueError(
                f"a MaxPool latent must have shape {(batch, *self.out_shape)}, "
                f"got {tuple(latent.shape)}"
            )
        # Every index must be a cell of its own window.
        cells = self.window_cells.to(latent.device)  # (P, k)
        flat = latent.flatten(2)  # (B, C, P)
        inside = (flat[..., None] == cells).any(-1)
        if not bool(inside.all()):
            raise ValueError("a MaxPool latent holds an index outside its pooling window")


class AvgPool(Level):
    """Average pooling: a fixed linear rendering (no latent); top-down spreads h / divisor."""

    field_rule = "window"

    def __init__(self, spec: AvgPoolSpec) -> None:
        super().__init__()
        self._spec = spec
        self.divisor: Tensor  # (Ho, Wo), the divisor of each window
        self.output_padding: Pair = (0, 0)

    @property
    def spec(self) -> AvgPoolSpec:
        return self._spec

    def _output_shape(self, in_shape: Shape) -> Shape:
        s = self._spec
        if len(in_shape) != 3:
            raise ValueError(f"AvgPool expects (C, H, W) inputs, got shape {in_shape}")
        out_hw, output_padding = [], []
        for size, k, st, p in zip(
            in_shape[1:], s.kernel_size, s.stride_pair, s.padding, strict=True
        ):
            span = size + 2 * p - k
            if span < 0:
                raise ValueError(f"AvgPool window {s.kernel_size} does not fit input {in_shape}")
            out_hw.append(span // st + 1)
            output_padding.append(span % st)
        self.output_padding = (output_padding[0], output_padding[1])
        kh, kw = s.kernel_size
        if s.divisor_override is not None:
            divisor = torch.full(out_hw, float(s.divisor_override))
        elif s.count_include_pad:
            divisor = torch.full(out_hw, float(kh * kw))
        else:
            # number of real (unpadded) cells in each window
            ones = torch.ones(1, 1, *in_shape[1:], dtype=torch.float64)
            divisor = F.conv2d(
                ones, torch.ones(1, 1, kh, kw, dtype=torch.float64), None, s.stride_pair, s.padding
            )[0, 0]
        self.register_buffer("divisor", divisor, persistent=False)
        return (in_shape[0], out_hw[0], out_hw[1])

    def bottom_up_frozen(self, y: Tensor, latent: Tensor | None) -> Tensor:
        s = self._spec
        return F.avg_pool2d(
            y,
            s.kernel_size,
            s.stride_pair,
            s.padding,
            False,
            s.count_include_pad,
            s.divisor_override,
        )

    def exactness_violations(self) -> list[str]:
        return []  # positive weights 1 / divisor

    def window(self) -> Window:
        a = self._spec
        return a.kernel_size, a.stride_pair, a.padding, (1, 1)

    def spread_down(self, g: Tensor) -> Tensor:
        return self.top_down(g, None)

    def top_down(self, g: Tensor, latent: Tensor | None, rule: SwitchRule = "drm") -> Tensor:
        s = self._spec
        channels = self.in_shape[0]
        ones = g.new_ones(channels, 1, *s.kernel_size)
        return F.conv_transpose2d(
            g / self.divisor.to(g.dtype),
            ones,
            None,
            s.stride_pair,
            s.padding,
            self.output_padding,
            channels,
        )


class Flatten(Level):
    """Flatten (C, H, W) to (C*H*W,); rendering reshapes back."""

    output_kind = "view"
    field_rule = "flatten"

    def __init__(self, spec: FlattenSpec | None = None) -> None:
        super().__init__()

    @property
    def spec(self) -> FlattenSpec:
        return FlattenSpec()

    def _output_shape(self, in_shape: Shape) -> Shape:
        return (math.prod(in_shape),)

    def bottom_up_frozen(self, y: Tensor, latent: Tensor | None) -> Tensor:
        return y.flatten(1)

    def top_down(self, g: Tensor, latent: Tensor | None, rule: SwitchRule = "drm") -> Tensor:
        return g.view(g.shape[0], *self.in_shape)

    def exactness_violations(self) -> list[str]:
        return []

    def spread_down(self, g: Tensor) -> Tensor:
        return self.top_down(g, None)


class LevelStack(nn.ModuleList):
    """An nn.ModuleList that holds `Level`s, so that iteration and indexing are typed."""

    def __iter__(self) -> Iterator[Level]:
        return cast(Iterator[Level], super().__iter__())

    def __getitem__(self, index: int) -> Level:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError("index a LevelStack with an int; use list(stack) for slices")
        return cast(Level, super().__getitem__(index))

    def __reversed__(self) -> Iterator[Level]:
        return reversed(list(self))


def check_level_list(levels: object) -> None:
    """Raise a clear error unless `levels` is a non-empty sequence of drm Levels whose last one,
    and only the last, is `Classes`."""
    if not isinstance(levels, (list, tuple, nn.ModuleList)) or not levels:
        raise ValueError("the last level must be Classes (the class templates and prior)")
    for i, item in enumerate(levels):
        if not isinstance(item, Level):
            raise TypeError(f"levels[{i}] is {type(item).__name__}, not a drm Level")
    if not isinstance(levels[-1], Classes):
        raise ValueError("the last level must be Classes (the class templates and prior)")
    for i, item in enumerate(list(levels)[:-1]):
        if isinstance(item, Classes):
            raise ValueError(f"levels[{i}] is Classes, which may only be the last level")


def init_level(
    spec: LevelSpec, in_shape: Shape, generator: torch.Generator, dtype: torch.dtype
) -> Level:
    """A level for `spec` with random templates (torch's default fan-in uniform init)."""
    if isinstance(spec, ConvSpec):
        if len(in_shape) != 3:
            raise ValueError(f"Conv expects (C, H, W) inputs, got shape {in_shape}")
        if in_shape[0] % spec.groups:
            raise ValueError(f"groups={spec.groups} must divide {in_shape[0]} input channels")
        fan_in = in_shape[0] // spec.groups * spec.kernel_size[0] * spec.kernel_size[1]
        shape = (spec.out_channels, in_shape[0] // spec.groups, *spec.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        weight = (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound
        bias = (torch.rand(spec.out_channels, generator=generator, dtype=dtype) * 2 - 1) * bound
        return Conv(spec, weight, bias)
    if isinstance(spec, DenseSpec):
        if len(in_shape) != 1:
            raise ValueError(f"Dense expects flat inputs, got shape {in_shape}: add a Flatten")
        bound = 1.0 / math.sqrt(in_shape[0])
        weight = (
            torch.rand(spec.out_features, in_shape[0], generator=generator, dtype=dtype) * 2 - 1
        ) * bound
        bias = (torch.rand(spec.out_features, generator=generator, dtype=dtype) * 2 - 1) * bound
        return Dense(spec, weight, bias)
    if isinstance(spec, SwitchSpec):
        return Switch(spec)
    if isinstance(spec, MaxPoolSpec):
        return MaxPool(spec)
    if isinstance(spec, AvgPoolSpec):
        return AvgPool(spec)
    if isinstance(spec, FlattenSpec):
        return Flatten(spec)
    raise TypeError(f"unknown level spec {type(spec).__name__}")
