"""M-steps for discriminative EM that use the structure a gradient step ignores (issue 13).

With the latents frozen at the E-step, the discriminative objective is convex in any one level's
parameters (`drm.level_objective`: J_l, the mean cross-entropy of the frozen-latent scores plus
a proximal term ||theta - theta_old||^2 / (2 eta), minimised by Newton-CG). The designs
(`M_STEPS`; `python -m experiments.train --algo dem --m-step NAME`):
* "gradient": `drm.em.DiscriminativeEM` unchanged: `m_steps` optimizer steps (1: SGD, E9).
* "exact-top" (`ExactTopEM`): the class level solved to optimality on the frozen features of
  the last 16 batches (a cache), then one optimizer (Adam) step for every lower level, on the
  gradient of the batch's frozen-latent cross-entropy with the new class level (block
  Gauss-Seidel, one E-step).
* "block" (`BlockEM`): every level with parameters, coarse to fine, gets a few Newton-CG steps
  on its own J_l, the others fixed; `cycles` passes per batch, the E-step redone before each
  (default one cycle: one E-step per batch). Coarse to fine keeps every level's cached input
  valid: solving level l changes no input of the levels below it.
* "large-batch" (`LargeBatchEM`): minibatches are gathered, `accumulate` at a time; then the
  E-step over all of them and `sweeps` block sweeps of tighter Newton solves on their summed
  objective, the E-step redone between sweeps. No learning rate and no schedule: eta alone.

Every design takes `reduce` (`drm.em`'s data-parallel convention) and makes the one-process
update of the whole batch: the solves sum their objective, gradients and Hessian-vector
products over the processes, and the optimizer steps sum their gradients (`sum_gradients`).
In float64 that is the one-process result to rounding (1e-15 measured). In float32 the solver's
data-dependent decisions (CG's relative residual, the line search, grad_tol) can fall the other
way on a rounding-level tie, and the runs then drift apart as runs with other rounding do.
`tests/test_distributed.py` runs each design under torchrun with 2 processes against one process
(relative parameter gaps measured after 22 digits batches of 15: exact-top 3e-5, large-batch
2e-6, against 5e-7 for "gradient"; block 2e-4 after 3 batches and 5e-2 after 7, where one of its
solver decisions has fallen the other way).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from drm.checks import check_labelled_batch
from drm.distributed import Reduce
from drm.em import (
    DiscriminativeEM,
    OptimizerName,
    Trainer,
    make_optimizer,
    sum_gradients,
)
from drm.inference import walk_up
from drm.level_objective import (
    DEFAULT_ETA,
    LevelObjective,
    NewtonSettings,
    SolveReport,
    newton_cg,
)
from drm.model import DeepRenderingModel

MStepName = Literal["gradient", "exact-top", "block", "large-batch"]
# name -> one line (the command line's --help)
M_STEPS: dict[str, str] = {
    "gradient": "--m-steps optimizer steps on the frozen-latent cross-entropy (SGD/Adam; default)",
    "exact-top": "class level solved exactly on the last 16 batches' features, one Adam step below",
    "block": "a few Newton-CG steps per level, coarse to fine, E-step per batch, no learning rate",
    "large-batch": "block M-steps on 16 minibatches at once, 2 sweeps, no learning rate",
}


class _SolveCounts:
    """The epoch's Newton statistics, reported by `end_epoch` and saved for resume."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.solves, self.newton_steps, self.gradient_norm = 0, 0, 0.0

    def add(self, report: SolveReport) -> None:
        self.solves += 1
        self.newton_steps += report.iterations
        self.gradient_norm += report.gradient_norm

    def summary(self) -> dict[str, float]:
        if not self.solves:
            return {}
        out = {"newton_steps": self.newton_steps / self.solves,
               "m_step_gradient_norm": self.gradient_norm / self.solves}  # fmt: skip
        self.reset()
        return out

    def state(self) -> dict[str, Any]:
        return {"solves": self.solves, "newton_steps": self.newton_steps,
                "gradient_norm": self.gradient_norm}  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        self.solves, self.newton_steps = int(state["solves"]), int(state["newton_steps"])
        self.gradient_norm = float(state["gradient_norm"])


def _checked(model: DeepRenderingModel, x: Tensor, y: Tensor, reduce: Reduce | None) -> None:
    check_labelled_batch(model, x, y)
    if x.shape[0] == 0 and reduce is None:
        raise ValueError("x must hold at least one image, got an empty batch")


class ExactTopEM:
    """Discriminative EM whose M-step solves the class level exactly ("exact-top").

    Per batch: the E-step (max-sum, latents frozen, the class level's input h_top recorded);
    h_top and the labels join a cache of the last `cache` batches; the class level minimises
    J_top over the whole cache (multinomial logistic regression on the cached features plus the
    proximal term, every cached image weighted alike) by `newton_cg`; then one optimizer step for
    every lower level on the gradient of this batch's frozen-latent cross-entropy with the new
    class level (block Gauss-Seidel, one E-step). The cache's features were computed by lower
    levels up to `cache` - 1 optimizer steps old; a cache of one batch solves on the batch alone
    (unstable on MNIST: the class level jumps to each batch's optimum).

    Args:
        model: the DRM, trained in place; it needs parameters below the class level.
        eta: the proximal step length of the class level's solve.
        optimizer, lr: the lower levels' optimizer (the loop's lr schedule applies to it).
        cache: the batches whose features the class level is solved on (this one included).
        reduce: sums a tensor over the data-parallel processes; None: one process. Every
            process caches its own shards; the solve sums over the processes.
        newton: the solve's stopping rules (default: |grad J| <= 1e-5, above float32's noise,
            or 20 Newton steps of <= 25 CG steps).
    """

    name = "exact-top"

    def __init__(
        self,
        model: DeepRenderingModel,
        eta: float = DEFAULT_ETA,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        cache: int = 16,
        reduce: Reduce | None = None,
        newton: NewtonSettings | None = None,
    ) -> None:
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if cache < 1:
            raise ValueError(f"cache must be >= 1, got {cache}")
        self.model, self.eta, self.cache, self.reduce = model, eta, cache, reduce
        self.newton = newton or NewtonSettings(iterations=20, grad_tol=1e-5)
        self.top = len(model.levels) - 1
        self.lower = [p for level in list(model.levels)[: self.top] for p in level.parameters()]
        if not self.lower:
            raise ValueError("--m-step exact-top needs levels with parameters below the classes")
        self.optimizer = make_optimizer(self.lower, optimizer, lr)
        self.counts = _SolveCounts()
        # the cached batches, oldest first: (h_top, the class level's latent or None, labels)
        self.features: list[tuple[Tensor, Tensor | None, Tensor]] = []

    def _solve_top(self) -> None:
        """newton_cg on J_top over every cached image (of every process)."""
        features = torch.cat([f for f, _, _ in self.features])
        top_latents = [z for _, z, _ in self.features if z is not None]
        latent = torch.cat(top_latents) if top_latents else None
        labels = torch.cat([y for _, _, y in self.features])
        local = features.shape[0]
        count = torch.tensor([float(local)], dtype=torch.float64)
        total = local if self.reduce is None else float(self.reduce(count)[0])
        latents = (None,) * self.top + (latent,)
        objective = LevelObjective(self.model, self.top, features, latents, labels,
                                   share=local / total if total else 0.0, eta=self.eta,
                                   reduce=self.reduce)  # fmt: skip
        self.counts.add(newton_cg(objective, self.newton))

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        _checked(self.model, x, y, self.reduce)
        empty = x.shape[0] == 0
        walk = walk_up(self.model, x, record_inputs=True)  # E-step, with the lower graph
        features = walk.inputs[self.top]
        loss = 0.0 if empty else float(F.cross_entropy(walk.output.detach(), y))
        top_latent = walk.latents[self.top]
        self.features.append((features.detach(),
                              None if top_latent is None else top_latent.detach(), y))  # fmt: skip
        del self.features[: -self.cache]
        self._solve_top()
        scores = walk_up(self.model, features, walk.latents, start=self.top).output
        lower = scores.sum() * 0.0 if empty else F.cross_entropy(scores, y)
        self.optimizer.zero_grad(set_to_none=True)
        (lower if share == 1.0 else lower * share).backward(inputs=self.lower)
        if self.reduce is not None:
            sum_gradients(self.lower, self.reduce)
        self.optimizer.step()
        return loss  # the loss at the E-step, as DiscriminativeEM reports it

    def end_epoch(self) -> dict[str, float]:
        return self.counts.summary()

    def current_model(self) -> DeepRenderingModel:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "counts": self.counts.state(),
            "features": [f for f, _, _ in self.features],
            "top_latents": [z for _, z, _ in self.features],
            "labels": [y for _, _, y in self.features],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.counts.load(state["counts"])
        self.features = list(zip(state["features"], state["top_latents"], state["labels"],
                                 strict=True))  # fmt: skip


class BlockEM:
    """Discriminative EM with per-level convex M-steps, cycling coarse to fine ("block").

    Per batch, `cycles` times: the E-step (max-sum, latents frozen, every level's input
    recorded), then for each level with parameters, from the class level down, `newton_cg` on
    its J_l (the levels below it unchanged so far, so its recorded input is still exact). No
    optimizer and no learning rate: eta sets the step (the loop's lr schedule does not apply).

    Args:
        model: the DRM, trained in place.
        eta: the proximal step length of every level's solve.
        cycles: E-step + sweep over the levels, per batch.
        reduce: sums a tensor over the data-parallel processes; None: one process.
        newton: each level's stopping rules (default: 3 Newton steps of <= 10 CG steps).
    """

    name = "block"

    def __init__(
        self,
        model: DeepRenderingModel,
        eta: float = DEFAULT_ETA,
        cycles: int = 1,
        reduce: Reduce | None = None,
        newton: NewtonSettings | None = None,
    ) -> None:
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {cycles}")
        self.model, self.eta, self.cycles, self.reduce = model, eta, cycles, reduce
        self.newton = newton or NewtonSettings(iterations=3, cg_iterations=10)
        levels = list(model.levels)
        self.blocks = [i for i in reversed(range(len(levels))) if list(levels[i].parameters())]
        self.counts = _SolveCounts()

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        _checked(self.model, x, y, self.reduce)
        loss = 0.0
        for cycle in range(self.cycles):
            with torch.no_grad():
                walk = walk_up(self.model, x, record_inputs=True)  # E-step
            if cycle == 0 and x.shape[0]:
                loss = float(F.cross_entropy(walk.output, y))
            for index in self.blocks:
                objective = LevelObjective(self.model, index, walk.inputs[index], walk.latents,
                                           y, share=share, eta=self.eta,
                                           reduce=self.reduce)  # fmt: skip
                self.counts.add(newton_cg(objective, self.newton))
        return loss

    def end_epoch(self) -> dict[str, float]:
        return self.counts.summary()

    def current_model(self) -> DeepRenderingModel:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts.load(state["counts"])


class LargeBatchEM:
    """Large-batch discriminative EM ("large-batch"): the E-step and exact M-steps on many images.

    `step` stores its minibatch and returns its loss at the current parameters (a no-grad
    max-sum pass); every `accumulate` minibatches, and at `end_epoch` for the rest, the stored
    images of every process make one large batch of N images: `sweeps` times, the E-step over all
    of them and a `BlockEM` sweep (each level with parameters, coarse to fine, Newton-CG on its
    J_l summed over the large batch, every image weighted 1 / N). No optimizer and no learning
    rate (the loop's schedule does not apply): eta is the only step setting.

    Args:
        model: the DRM, trained in place.
        eta: the proximal step length of every level's solve.
        accumulate: minibatches per large batch.
        sweeps: E-step + sweep over the levels, per large batch.
        reduce: sums a tensor over the data-parallel processes; None: one process. Every
            process stores its own shards; N is summed over the processes.
        newton: each level's stopping rules (default: 5 Newton steps of <= 20 CG steps).
    """

    name = "large-batch"

    def __init__(
        self,
        model: DeepRenderingModel,
        eta: float = DEFAULT_ETA,
        accumulate: int = 16,
        sweeps: int = 2,
        reduce: Reduce | None = None,
        newton: NewtonSettings | None = None,
    ) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        settings = newton or NewtonSettings(iterations=5, cg_iterations=20)
        self.block = BlockEM(model, eta=eta, cycles=sweeps, reduce=reduce, newton=settings)
        self.model, self.accumulate, self.reduce = model, accumulate, reduce
        self._x: list[Tensor] = []  # the stored minibatches (this process's shards)
        self._y: list[Tensor] = []

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        """Store the minibatch (`share` is not needed: N is counted); solve every `accumulate`."""
        _checked(self.model, x, y, self.reduce)
        loss = 0.0
        if x.shape[0]:
            with torch.no_grad():
                loss = float(F.cross_entropy(walk_up(self.model, x).output, y))
        self._x.append(x)
        self._y.append(y)
        if len(self._x) == self.accumulate:
            self._solve()
        return loss

    def _solve(self) -> None:
        """E-steps and block sweeps on the stored minibatches, which are then dropped."""
        x, y = torch.cat(self._x), torch.cat(self._y)
        self._x, self._y = [], []
        local = x.shape[0]
        count = torch.tensor([float(local)], dtype=torch.float64)
        total = local if self.reduce is None else round(float(self.reduce(count)[0]))
        if total:
            self.block.reduce = self.reduce
            self.block.step(x, y, share=local / total)

    def end_epoch(self) -> dict[str, float]:
        if self._x:
            self._solve()
        return self.block.end_epoch()

    def current_model(self) -> DeepRenderingModel:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {**self.block.state_dict(), "x": list(self._x), "y": list(self._y)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.block.load_state_dict(state)
        self._x, self._y = list(state["x"]), list(state["y"])


def discriminative_em(
    model: DeepRenderingModel,
    m_step: MStepName = "gradient",
    *,
    m_steps: int = 1,
    optimizer: OptimizerName = "adam",
    lr: float = 1e-3,
    eta: float | None = None,
    reduce: Reduce | None = None,
) -> Trainer:
    """The discriminative-EM trainer with the M-step named `m_step` (`M_STEPS`).

    "gradient" is `DiscriminativeEM(model, m_steps, optimizer, lr, reduce)`, unchanged; `eta`
    (None: DEFAULT_ETA) applies to the exact M-steps only, `m_steps` to "gradient" only.
    """
    if m_step not in M_STEPS:
        raise ValueError(f"m_step must be one of {list(M_STEPS)}, got {m_step!r}")
    if m_step == "gradient":
        if eta is not None:
            raise ValueError("eta applies to the exact M-steps, not to m_step 'gradient'")
        return DiscriminativeEM(model, m_steps=m_steps, optimizer=optimizer, lr=lr, reduce=reduce)
    if m_steps != 1:
        raise ValueError(f"m_steps applies to m_step 'gradient', not {m_step!r}")
    eta = DEFAULT_ETA if eta is None else eta
    if m_step == "exact-top":
        return ExactTopEM(model, eta=eta, optimizer=optimizer, lr=lr, reduce=reduce)
    if m_step == "block":
        return BlockEM(model, eta=eta, reduce=reduce)
    return LargeBatchEM(model, eta=eta, reduce=reduce)


__all__ = [
    "DEFAULT_ETA",
    "M_STEPS",
    "BlockEM",
    "ExactTopEM",
    "LargeBatchEM",
    "LevelObjective",
    "MStepName",
    "NewtonSettings",
    "SolveReport",
    "discriminative_em",
    "newton_cg",
]
