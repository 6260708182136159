"""The frozen-latent objective of one level and its Newton-CG solve: the exact M-steps' core.

After the E-step (bottom-up max-sum, `walk_up`) the latents z* are frozen, and the network is
then affine in the parameters theta_l = (W_l, b_l) of any one level l, the other levels fixed:
the level's input h_l is fixed (it depends on the levels below only), its output is affine in
theta_l, and everything above is linear in its input (masks and pool indices frozen). The
frozen-latent discriminative objective of one level (`LevelObjective`),

    J_l(theta) = sum_n w_n CE(s_n(theta), y_n) + ||theta - theta_old||^2 / (2 eta),

is therefore convex in theta (`tests/test_m_steps.py` checks the Hessian numerically): the
cross-entropy CE(s, y) = logsumexp(s) - s_y is convex in s, and s_n(theta) is affine. For the
class level it is multinomial logistic regression on the fixed features h_top (the class
log prior enters as log_softmax(b), whose constant shift cancels in CE, so J is convex in b
as well). w_n = 1 / B (B the global batch: a process holding b of the B images weights its own
with share / b, `share` = b / B), so sum_n w_n CE is the batch's mean cross-entropy. The proximal
term, theta_old the parameters before the M-step, makes J strongly convex (separable data has no
minimiser without it) and sets the step length: eta -> 0 gives theta_old - eta * grad, a gradient
step of rate eta (the proximal-point method); eta -> infinity, the batch's own optimum.

Solver (`newton_cg`): Newton's method with the exact Hessian, as Hessian-vector products
(autograd's double backward through the frozen-latent network above the level), the Newton
system H p = -g solved by truncated conjugate gradients (`drm.em.conjugate_gradient`, from 0,
relative residual min(0.5, sqrt(|g|)), at most `cg_iterations`), then an Armijo backtracking
line search from step 1, halving: a step is taken if J falls by at least 1e-4 * step * |g'p|
or if J's slope along p is still <= 0 at the trial point (J is convex along the line, so it fell
all the way there; this test stays exact near the optimum, where J's own decrease is below its
rounding: in float32 from |g| ~ 1e-4), so J never increases (up to rounding); when no step
passes, the solve stops where it is. It stops when |grad J| <= `grad_tol` or after
`iterations` Newton steps; the reported |grad J| is at the returned parameters.

Data-parallel (`reduce`, as in `drm.em`): every number the solver uses is a sum over images, so
every process sums its weighted losses, gradients and Hessian-vector products over the
processes (one collective each) and adds the proximal term once; every process then runs the
same iterations and takes the same decisions, and the result is the one-process solve of the
whole batch (up to the order of the sums). An empty shard takes part with zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drm.distributed import Reduce, reduce_together
from drm.em import conjugate_gradient
from drm.inference import walk_up
from drm.model import DeepRenderingModel, Latents

DEFAULT_ETA = 1.0  # the proximal step length eta (--m-step-eta)


@dataclass(frozen=True)
class NewtonSettings:
    """The stopping rules of `newton_cg` (see the module docstring)."""

    iterations: int = 10  # Newton steps at most
    cg_iterations: int = 25  # CG steps per Newton system at most
    grad_tol: float = 1e-6  # stop when |grad J| <= grad_tol
    backtracks: int = 30  # step halvings per line search at most
    armijo: float = 1e-4  # sufficient-decrease fraction

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.cg_iterations < 1 or self.backtracks < 1:
            raise ValueError(f"Newton iteration counts must be >= 1, got {self}")
        if not (self.grad_tol >= 0 and 0 < self.armijo < 1):
            raise ValueError(f"need grad_tol >= 0 and armijo in (0, 1), got {self}")


@dataclass(frozen=True)
class SolveReport:
    """What one `newton_cg` solve did: steps taken, J before and after, |grad J| last seen."""

    iterations: int
    objective_before: float
    objective: float
    gradient_norm: float


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class LevelObjective:
    """J_l(theta) of the module docstring, for level `index`, its input `inputs` fixed.

    Args:
        model: the DRM; the level's parameters are read and written in place.
        index: the level (it must have parameters).
        inputs: the level's bottom-up input h_l for this process's images (fixed).
        latents: the frozen latents of every level, for these images.
        y: their labels.
        share: this process's fraction of the global batch (1.0: the whole batch).
        eta: the proximal step length; theta_old is the level's parameters now.
        reduce: sums a tensor over the processes; None: one process.
    """

    def __init__(
        self,
        model: DeepRenderingModel,
        index: int,
        inputs: Tensor,
        latents: Latents,
        y: Tensor,
        *,
        share: float = 1.0,
        eta: float = DEFAULT_ETA,
        reduce: Reduce | None = None,
    ) -> None:
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        self.model, self.index, self.latents, self.y = model, index, latents, y
        self.inputs = inputs.detach()
        self.params: list[nn.Parameter] = list(model.levels[index].parameters())
        if not self.params:
            raise ValueError(f"level {index} has no parameters to solve for")
        self.eta, self.reduce = eta, reduce
        count = inputs.shape[0]
        self.weight = share / count if count else 0.0  # w_n = 1 / B
        self.anchor = self.theta()  # theta_old

    @classmethod
    def at(
        cls,
        model: DeepRenderingModel,
        index: int,
        x: Tensor,
        y: Tensor,
        latents: Latents,
        **options: Any,
    ) -> LevelObjective:
        """J_l for images x with frozen `latents`: computes the level's input first."""
        with torch.no_grad():
            inputs = walk_up(model, x, latents, stop=index).output
        return cls(model, index, inputs, latents, y, **options)

    def theta(self) -> Tensor:
        """The level's parameters, flattened (a copy)."""
        return _flat([p.detach() for p in self.params]).clone()

    def assign(self, theta: Tensor) -> None:
        """Write a flat parameter vector into the level."""
        with torch.no_grad():
            for p, part in zip(self.params, theta.split([p.numel() for p in self.params]),
                               strict=True):  # fmt: skip
                p.copy_(part.view_as(p))

    def _local_loss(self) -> Tensor:
        """sum over this process's images of w_n CE(s_n, y_n) at the current parameters."""
        scores = walk_up(self.model, self.inputs, self.latents, start=self.index).output
        return F.cross_entropy(scores, self.y, reduction="sum") * self.weight

    def _proximal(self, theta: Tensor) -> Tensor:
        return ((theta - self.anchor) ** 2).sum() / (2 * self.eta)

    def _sum(self, tensors: list[Tensor]) -> list[Tensor]:
        return tensors if self.reduce is None else reduce_together(tensors, self.reduce)

    def value(self) -> Tensor:
        """J at the current parameters (a 0-d tensor), summed over the processes."""
        with torch.no_grad():
            local = self._local_loss() if self.inputs.shape[0] else self.anchor.new_zeros(())
            (total,) = self._sum([local.reshape(1)])
            return total[0] + self._proximal(self.theta())

    def linearize(self) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """(J, grad J, v -> H v) at the current parameters, summed over the processes."""
        theta = self.theta()
        empty = self.inputs.shape[0] == 0
        with torch.enable_grad():
            if empty:
                loss, grads = theta.new_zeros(()), [torch.zeros_like(p) for p in self.params]
            else:
                loss = self._local_loss()
                grads = list(torch.autograd.grad(loss, self.params, create_graph=True))
            total, gradient = self._sum([loss.detach().reshape(1), _flat(grads).detach()])
        value = total[0] + self._proximal(theta)
        gradient = gradient + (theta - self.anchor) / self.eta
        sizes = [p.numel() for p in self.params]
        curved = [i for i, g in enumerate(grads) if g.requires_grad]

        def hvp(v: Tensor) -> Tensor:
            parts = [torch.zeros_like(p) for p in self.params]
            if curved:
                pieces = [v.split(sizes)[i].view_as(self.params[i]) for i in curved]
                products = torch.autograd.grad(
                    [grads[i] for i in curved],
                    self.params,
                    grad_outputs=pieces,
                    retain_graph=True,
                    allow_unused=True,
                )
                parts = [z if h is None else h for z, h in zip(parts, products, strict=True)]
            (local,) = self._sum([_flat(parts).detach()])
            return local + v / self.eta

        return value.detach(), gradient, hvp


def newton_cg(objective: LevelObjective, settings: NewtonSettings | None = None) -> SolveReport:
    """Minimise `objective` over its level's parameters (written in place); see the module."""
    settings = settings or NewtonSettings()
    theta = objective.theta()
    value, gradient, hvp = objective.linearize()
    before = float(value)
    steps = 0
    norm = float(gradient.norm())
    for _ in range(settings.iterations):
        if norm <= settings.grad_tol:
            break
        direction = conjugate_gradient(
            hvp,
            None,
            torch.zeros_like(gradient),
            settings.cg_iterations,
            tol=min(0.5, math.sqrt(norm)),
            residual=-gradient,
        )
        slope = float((gradient * direction).sum())
        if not slope < 0:  # no descent direction left (rounding at the optimum)
            break
        step, accepted = 1.0, None
        for _ in range(settings.backtracks):
            objective.assign(theta + step * direction)
            trial = objective.linearize()
            # Armijo, or J still falling at the trial point (J is convex along the line, so it
            # fell all the way: a test that rounding cannot fool near the optimum, where J's
            # own decrease is below its rounding, in float32 from |g| ~ 1e-4)
            if float(trial[0]) <= float(value) + settings.armijo * step * slope or (
                float((trial[1] * direction).sum()) <= 0
            ):
                accepted = trial
                break
            step *= 0.5
        if accepted is None:
            objective.assign(theta)
            break
        steps += 1
        theta = theta + step * direction
        value, gradient, hvp = accepted
        norm = float(gradient.norm())
    return SolveReport(steps, before, float(value), norm)
