"""A new kind of level is one class: the library asks the level, never its type.

`SignSwitch` is a level kind the library does not ship: a sign latent s in {-1, +1} per unit,
whose max-marginal max_s s u = |u| is the absolute-value rectifier. Written as one class in this
file, it must work in max-sum, exact enumeration, the top-down refinement, generative EM,
sampling, projections and receptive fields. `BareSignSwitch` has only the messages (bottom-up,
top-down, the latent's states): every operation that needs more refuses it with an error naming
the missing method; none skips it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import drm
from cnn_equiv import visualize
from drm.config import ConvSpec, MaxPoolSpec
from drm.em import GenerativeEM
from drm.levels import Classes, Conv, Flatten, Level, MaxPool, Shape, SwitchRule
from drm.refine import level_inputs, refine_latents

DTYPE = torch.float64
EXACT_TOL = 1e-10  # float64: the same sums in another order


class BareSignSwitch(Level):
    """Sign latent s per unit (True = +1): bottom-up max_s s u = |u|, top-down g s."""

    has_latent = True

    def _output_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def signs(self, latent: Tensor, dtype: torch.dtype) -> Tensor:
        return latent.to(dtype) * 2 - 1

    def bottom_up(self, y: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor | None]:
        return y.abs(), y > 0

    def bottom_up_frozen(self, y: Tensor, latent: Tensor | None) -> Tensor:
        assert latent is not None
        return y * self.signs(latent, y.dtype)

    def top_down(self, g: Tensor, latent: Tensor | None, rule: SwitchRule = "drm") -> Tensor:
        if rule != "drm":
            raise ValueError(f"a sign switch renders with rule 'drm' only, got {rule!r}")
        assert latent is not None
        return g * self.signs(latent, g.dtype)

    def latent_counts(self) -> Tensor:
        return torch.full((math.prod(self.in_shape),), 2, dtype=torch.long)

    def latent_from_digits(self, digits: Tensor) -> Tensor:
        return digits.bool().view(digits.shape[0], *self.in_shape)

    def check_latent(self, latent: Tensor, batch: int) -> None:
        if latent.dtype != torch.bool or tuple(latent.shape) != (batch, *self.in_shape):
            raise ValueError("a sign latent is a bool tensor shaped like the level's input")

    def factorized_log_prior(self, latent: Tensor, dtype: torch.dtype) -> Tensor:
        log_uniform = -math.prod(self.in_shape) * math.log(2.0)  # each sign uniform
        return torch.full((latent.shape[0],), log_uniform, dtype=dtype, device=latent.device)


class SignSwitch(BareSignSwitch):
    """The same level answering everything the library asks of a level."""

    latent_kind = "sign"
    field_rule = "pointwise"

    def best_latent(self, y: Tensor, h: Tensor) -> Tensor:
        return h * y > 0  # max over s of h s y: s = sign(h y)

    def prior_statistics(self, latent: Tensor) -> Tensor | None:
        return None  # a fixed uniform prior

    def learn_prior(self, statistics: Tensor) -> dict[str, float]:
        return {}

    def exactness_violations(self) -> list[str]:
        return ["a sign latent flips the top-down signal"]

    def spread_down(self, g: Tensor) -> Tensor:
        return g.abs()  # both signs reach every unit


def tiny_model(kind: type[Level], seed: int = 0) -> drm.DeepRenderingModel:
    """Conv 3x3 (1 -> 1 channel) on 5x5, max-pool 2 (stride 1), the sign level, 3 classes:
    4^4 x 2^4 = 4,096 latent configurations, enumerable."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=DTYPE) * 2 - 1

    levels = [
        Conv(ConvSpec(1, (3, 3)), uniform(1, 1, 3, 3), uniform(1)),
        MaxPool(MaxPoolSpec((2, 2), stride=(1, 1))),
        kind(),
        Flatten(),
        Classes(uniform(3, 4), uniform(3)),
    ]
    return drm.DeepRenderingModel((1, 5, 5), levels, sigma2=1.0)


def images(batch: int, seed: int = 1) -> Tensor:
    return torch.rand((batch, 1, 5, 5), generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def test_max_sum_runs_the_new_level_as_the_network_would() -> None:
    model = tiny_model(SignSwitch)
    x = images(6)
    scores, latents = drm.max_sum(model, x)
    conv, _, _, _, classes = model.levels
    hidden = F.max_pool2d(F.conv2d(x, conv.weight, conv.bias), 2, 1).abs().flatten(1)
    expected = hidden @ classes.weight.T + classes.log_prior
    assert torch.allclose(scores, expected, rtol=0, atol=EXACT_TOL)
    assert latents[2] is not None and latents[2].dtype == torch.bool


def test_refinement_and_enumeration_handle_the_new_level() -> None:
    """max-sum <= refined <= exact MAP, and the refined latents are a fixed point of every
    latent level's own best_latent (the refinement visited the new level)."""
    model = tiny_model(SignSwitch, seed=3)
    x = images(5, seed=4)
    with torch.no_grad():
        scores, latents = drm.max_sum(model, x)
        classes = torch.tensor([0, 1, 2, 0, 1])
        exact, _ = drm.exact_map(model, x)
        exact = exact + drm.logit_offset(model, x)[:, None]
        refined, refined_scores, _ = refine_latents(model, x, classes, latents)
        start = scores.gather(1, classes[:, None])[:, 0]
        best = exact.gather(1, classes[:, None])[:, 0]
        assert bool((refined_scores >= start - EXACT_TOL).all())
        assert bool((refined_scores <= best + EXACT_TOL).all())
        inputs = level_inputs(model, x, refined)
        signals = drm.model.propagate_down(model, classes, refined)
        for index in model.latent_levels:
            level = model.levels[index]
            trial = list(refined)
            trial[index] = level.best_latent(inputs[index], signals[index + 1])
            gain = drm.log_joint(model, x, classes, tuple(trial)) - drm.log_joint(
                model, x, classes, refined
            )
            assert float(gain.max()) <= EXACT_TOL  # no level can improve on its own
    # the sign level's state sets the exactness report, as each level says of itself
    assert any("SignSwitch" in v and "flips" in v for v in model.exactness_violations())


def test_generative_em_trains_around_the_new_level() -> None:
    model = tiny_model(SignSwitch, seed=5)
    before = [level.templates.detach().clone() for level in model.levels if level.has_templates]
    trainer = GenerativeEM(model, refine_sweeps=2)
    assert trainer.template_levels == [4, 0] and trainer.prior_levels == []
    x, y = images(8, seed=6), torch.arange(8) % 3
    trainer.step(x, y)
    after = [level.templates.detach() for level in model.levels if level.has_templates]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    summary = trainer.end_epoch()
    assert set(summary) == {"reconstruction_mse"}  # the max-pool and sign priors are fixed


def test_sampling_projections_and_receptive_fields_handle_the_new_level() -> None:
    model = tiny_model(SignSwitch, seed=7)
    draws = drm.sample(model, 4, generator=torch.Generator().manual_seed(0))
    assert draws.x.shape == (4, 1, 5, 5) and draws.latents[2] is not None
    default = visualize.default_latents(model, 2)
    assert default[2] is not None and not bool(default[2].any())  # digit 0: sign -1
    x = images(3, seed=8)
    # the projection of a class is the input gradient of its score with the latents frozen
    _, latents = drm.max_sum(model, x)
    projection = visualize.project(model, x, 1)
    probe = x.clone().requires_grad_()
    frozen = drm.inference.propagate_up(model, probe, latents)
    (grad,) = torch.autograd.grad(frozen[:, 1].sum(), probe)
    assert torch.allclose(projection, grad, rtol=0, atol=EXACT_TOL)
    with pytest.raises(ValueError, match="rule 'drm' only"):
        visualize.project(model, x, 1, rule="guided")  # the level decides its own rules
    # a pointwise level keeps a unit's window: a max-pool unit of 2x2 over a 3x3 conv
    boxes = visualize.receptive_field(model, 2, torch.tensor([0, 3]))
    assert boxes.tolist() == [[0, 0, 4, 4], [1, 1, 5, 5]]
    support = visualize.receptive_field_support(model, 2, torch.tensor([0, 3]))
    assert visualize.receptive_field(model, 2, torch.tensor([0, 3]), exact=True).tolist() == (
        boxes.tolist()
    )
    assert support.shape == (2, 1, 5, 5)


def test_a_level_that_cannot_answer_is_refused_by_name_never_skipped() -> None:
    model = tiny_model(BareSignSwitch, seed=9)
    x = images(2, seed=10)
    drm.max_sum(model, x)  # the messages are all max-sum and enumeration need
    drm.exact_map(model, x)
    classes = torch.zeros(2, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="BareSignSwitch does not implement best_latent"):
        refine_latents(model, x, classes)
    with pytest.raises(NotImplementedError, match="prior_statistics"):
        GenerativeEM(model)
    with pytest.raises(NotImplementedError, match="exactness_violations"):
        model.exactness_violations()
    with pytest.raises(TypeError, match=r"levels\[2\] \(BareSignSwitch\) has no receptive-field"):
        visualize.receptive_field(model, 3, torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="spread_down"):
        visualize.receptive_field_support(model, 3, torch.tensor([0]))
