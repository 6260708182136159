"""Learning the deep model: SGD, batch discriminative EM and generative hard EM, one loop shape.

Every trainer is driven the same way, like a torch optimizer:

    for epoch in range(epochs):
        for x, y in batches:
            loss = trainer.step(x, y)    # one update (batch EM: one E-step's statistics)
        summary = trainer.end_epoch()    # batch EM's M-step; a no-op for gradient methods
    model = trainer.current_model()      # the current parameters (DRM or shallow)

Data-parallel training (`drm.distributed`, the CLI's `torchrun` mode): every process holds a
shard of the same global minibatch and calls `trainer.step(x_shard, y_shard, share=b / B)`, where
`share` is the shard's fraction of the global batch (b of its B images; 1.0, the default, is the
whole batch). Every trainer takes the same keyword for it, `reduce` (a `drm.distributed.Reduce`:
a tensor -> its sum over processes, e.g. `drm.distributed.all_reduce_`; None, the default, is
the exact single-process behaviour), and with it computes the single-process update on the
whole batch: the gradient methods (SGD, discriminative and semi-supervised EM) weight their
shard's mean loss by `share` and sum the gradients over processes (`sum_gradients`); generative
EM sums its normal equations (the starting residual b - A W and every Gram matrix-vector
product) and its epoch counts; shallow EM sums its sufficient statistics before the M-step.
With `reduce`, an empty shard (b = 0, when B < the number of processes) is allowed: it
contributes nothing, takes part in the collectives and returns 0.0. Every process must start
from the same parameters (the training loop broadcasts rank 0's model).
`step` returns the shard's own mean loss; the caller sums `loss * b` over processes.

Algorithms (DESIGN section 5):
* `cnn_equiv.SGDTrainer` (in the neural-net package): trains the equivalent torch CNN with SGD or
  Adam on the cross-entropy and maps it back with `to_drm`; the baseline.
* `DiscriminativeEM`: the paper's batch discriminative EM. E-step: bottom-up max-sum (`max_sum`),
  latents frozen. M-step: `m_steps` gradient steps on the conditional log-likelihood
  log p(c | x, z*) = log_softmax of the frozen-latent scores (`frozen_scores`). With one M-step it
  is SGD exactly (E9): the cross-entropy gradient of the CNN is the gradient through the linear
  network with latents frozen at the E-step.
* `GenerativeEM`: hard EM on the rendering model with the factorized prior (the "full EM" row
  of the lecture's table). E-step: bottom-up max-sum latents, the class fixed to the label,
  optionally followed by a top-down refinement pass (`drm.refine.refine_latents`). M-step:
  with every latent fixed the rendering mu(c, z) is linear in the templates of each level, so the
  reconstruction least-squares problem for one level has a closed-form solution, computed by
  conjugate gradients on its normal equations; the class prior and the switch priors come from
  latent frequencies. sigma^2 is kept (it also scales the first level's rendering); the epoch's
  mean squared residual, the maximum-likelihood sigma^2 at its latents, is reported as
  `reconstruction_mse`.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Dempster, Laird, Rubin, Maximum Likelihood from Incomplete Data via the EM Algorithm, 1977.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drm.checks import check_labelled_batch
from drm.distributed import Reduce, reduce_together
from drm.inference import propagate_up, walk_up
from drm.model import (
    DeepRenderingModel,
    Latents,
    propagate_down,
    walk_down,
)
from drm.refine import coordinate_ascent
from drm.shallow import ShallowRenderingModel

OptimizerName = Literal["adam", "sgd"]


class Trainer(Protocol):
    """The loop shape shared by every learning algorithm of the library.

    `reduce`: sums a tensor over the data-parallel processes (`drm.distributed.Reduce`); None:
    one process. Every trainer takes it as a keyword argument of the same name and meaning (see
    the module docstring) and reads the attribute at each step.
    """

    reduce: Reduce | None

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        """One update on the batch x (B, C0, H, W) with labels y (B,); returns the batch loss.

        `share`: the fraction of the global minibatch that this process holds (data-parallel
        training; 1.0 is the whole batch). Returns the mean loss over x's images.
        """
        ...

    def end_epoch(self) -> dict[str, float]:
        """Finish an epoch (batch EM's M-step); returns what it measured."""
        ...

    def current_model(self) -> DeepRenderingModel | ShallowRenderingModel:
        """The current parameters, as a rendering model (deep or shallow)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model needed to resume (optimizer state)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_optimizer(
    parameters: Any, name: OptimizerName, lr: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


class DiscriminativeEM:
    """Batch discriminative EM: max-sum E-step, then `m_steps` gradient steps with latents frozen.

    Args:
        model: the DRM, trained in place.
        m_steps: gradient steps per E-step; 1 is SGD exactly (E9).
        optimizer, lr: the M-step's optimizer.
        reduce: sums a tensor over the data-parallel processes (`drm.distributed.all_reduce_`);
            None: one process. The E-step is per image and stays local; before every optimizer
            step the share-weighted gradients are summed, so every process takes the
            whole-batch step.
    """

    def __init__(
        self,
        model: DeepRenderingModel,
        m_steps: int = 1,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        reduce: Reduce | None = None,
    ) -> None:
        if m_steps < 1:
            raise ValueError(f"m_steps must be >= 1, got {m_steps}")
        self.model = model
        self.m_steps = m_steps
        self.optimizer = make_optimizer(model.parameters(), optimizer, lr)
        self.reduce = reduce

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        check_labelled_batch(self.model, x, y)
        empty = x.shape[0] == 0
        if empty and self.reduce is None:
            raise ValueError("x must hold at least one image, got an empty batch")
        # E-step: the fine-to-coarse max-sum pass. Its scores are the frozen-latent scores at its
        # own latents, with the same gradients (E9), so the pass doubles as the first M-step's
        # forward pass; the later M-steps rerun the network with the latents frozen.
        # bool / int64 latents: nothing to detach; x is checked above, once
        scores, latents, _ = walk_up(self.model, x)
        losses = []
        for m_step in range(self.m_steps):
            if m_step:
                scores = propagate_up(self.model, x, latents)
            # log p(c | x, z*) is the log-softmax of the frozen-latent scores (E1).
            loss = scores.sum() * 0.0 if empty else F.cross_entropy(scores, y)
            self.optimizer.zero_grad(set_to_none=True)
            # the whole batch's mean is the sum over shards of share * the shard's mean
            (loss if share == 1.0 else loss * share).backward()
            if self.reduce is not None:
                sum_gradients(list(self.model.parameters()), self.reduce)
            self.optimizer.step()
            losses.append(loss.detach())
        return float(losses[0])  # the loss at the E-step, as SGD reports its batch loss

    def end_epoch(self) -> dict[str, float]:
        return {}

    def current_model(self) -> DeepRenderingModel:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def sum_gradients(parameters: list[nn.Parameter], reduce: Reduce) -> None:
    """Replace every parameter's gradient by its sum over processes, in one collective.

    A gradient that is None on every process stays None (the optimizer then skips the
    parameter, as it would in one process); None on some processes only counts as zero.
    """
    if not parameters:
        return
    reference = parameters[0]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in parameters]
    present = torch.tensor(
        [p.grad is not None for p in parameters], dtype=reference.dtype, device=reference.device
    )  # (P,): how many processes have each gradient, after the sum
    *summed, present = reduce_together([*grads, present], reduce)
    for p, total, count in zip(parameters, summed, present.tolist(), strict=True):
        p.grad = None if count == 0 else total.clone()


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor | None,
    x0: Tensor,
    iterations: int,
    tol: float = 1e-12,
    *,
    residual: Tensor | None = None,
) -> Tensor:
    """Solve A x = b for a symmetric positive semi-definite A given as `matvec`, from x0.

    Each iteration minimises the quadratic 0.5 x'Ax - b'x over a growing Krylov space, so the
    objective never increases; stops early when the residual's norm falls below tol * |b|.
    `residual`, when given, is b - A x0 computed by the caller (b may then be None, and the
    stopping rule is relative to |b - A x0|): it spares one matvec when the caller can get the
    residual as cheaply as b.
    """
    x = x0.clone()
    if residual is None:
        if b is None:
            raise ValueError("conjugate_gradient needs b or the residual b - A x0")
        r = b - matvec(x)
        scale = b.norm()
    else:
        r = residual.clone()
        scale = r.norm() if b is None else b.norm()
    p = r.clone()
    rs = (r * r).sum()
    threshold = (tol * scale) ** 2
    for _ in range(iterations):
        if rs <= threshold:
            break
        ap = matvec(p)
        curvature = (p * ap).sum()
        if curvature <= 0:  # a direction of zero curvature: the quadratic is flat along it
            break
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs_next = (r * r).sum()
        p = r + (rs_next / rs) * p
        rs = rs_next
    return x


class GenerativeEM:
    """Hard EM on the rendering model with the factorized prior, one level's templates at a time.

    E-step (per batch): the bottom-up max-sum latents z*, the class fixed to the label; with
    `refine_sweeps` > 0, then up to that many coarse-to-fine coordinate-ascent sweeps
    (`drm.refine.refine_latents`) that re-choose lower latents given the upper ones and the
    label, each raising log p(x, c, z) (the top-down pass the CNN's bottom-up E-step lacks).
    M-step for the templates W of one level (per batch): with z* and every other level fixed the
    rendered image is linear in W, mu_n = sigma^2 L_n(W), so minimising the reconstruction error
    sum_n ||x_n - mu_n||^2 is a linear least-squares problem with normal equations

        (sum_n L_n^T L_n) W = sum_n L_n^T x_n / sigma^2,

    solved by `cg_iterations` conjugate-gradient steps warm-started at the current W (a
    generalized-EM step: the batch's reconstruction error never increases), then W moves a
    fraction `step_size` of the way to the solution (stochastic EM over batches). Levels are
    visited coarse to fine, `levels_per_step` of them per batch, cycling.
    M-step at the end of each epoch: log pi_c and every switch level's prior_on from the latent
    frequencies of the epoch (the factorized prior). sigma^2 itself is kept, because it also
    scales the first level's rendering; `end_epoch` reports the epoch's mean squared residual as
    `reconstruction_mse` (the maximum-likelihood sigma^2 at the epoch's latents).
    The biases (the CNN prior's switch parameters) are not part of the factorized prior and stay.

    Args:
        model: the DRM, trained in place.
        cg_iterations: conjugate-gradient steps per level and batch.
        step_size: in (0, 1]; 1 takes the batch's least-squares solution.
        levels_per_step: template levels updated per batch (None: all of them).
        refine_sweeps: top-down refinement sweeps after the bottom-up E-step (0: none).
        reduce: sums a tensor over the data-parallel processes (`drm.distributed.all_reduce_`);
            None: one process. The normal equations are sums over images, so the starting
            residual b - A W and every Gram matrix-vector product are summed (every process
            then runs the same conjugate-gradient iterations), and so are the epoch's counts
            and residuals.
    """

    def __init__(
        self,
        model: DeepRenderingModel,
        cg_iterations: int = 3,
        step_size: float = 0.5,
        levels_per_step: int | None = None,
        reduce: Reduce | None = None,
        refine_sweeps: int = 0,
    ) -> None:
        if cg_iterations < 1:
            raise ValueError(f"cg_iterations must be >= 1, got {cg_iterations}")
        if not 0 < step_size <= 1:
            raise ValueError(f"step_size must lie in (0, 1], got {step_size}")
        if refine_sweeps < 0:
            raise ValueError(f"refine_sweeps must be >= 0, got {refine_sweeps}")
        self.model = model
        self.refine_sweeps = refine_sweeps
        self.cg_iterations = cg_iterations
        self.step_size = step_size
        # template levels, coarse to fine
        self.template_levels = [
            i for i in reversed(range(len(model.levels))) if model.levels[i].has_templates
        ]
        # the latent levels whose prior is learned (each level says what it counts; a level
        # kind that cannot say is refused here, not skipped)
        self.prior_levels = [
            i
            for i in model.latent_levels
            if model.levels[i].prior_statistics(model.levels[i].default_latent(1, model.device))
            is not None
        ]
        count = len(self.template_levels)
        if levels_per_step is not None and not 1 <= levels_per_step <= count:
            raise ValueError(f"levels_per_step must lie in [1, {count}], got {levels_per_step}")
        self.levels_per_step = levels_per_step or count
        self.reduce = reduce
        self._cursor = 0
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._class_counts = torch.zeros(self.model.num_classes, dtype=torch.float64)
        # level index -> the epoch's summed prior statistics, from zero (every process holds
        # every level's, so that the sum over processes lines up)
        self._prior_statistics: dict[int, Tensor] = {}
        for i in self.prior_levels:
            level = self.model.levels[i]
            statistics = level.prior_statistics(level.default_latent(0, self.model.device))
            assert statistics is not None
            self._prior_statistics[i] = statistics
        self._squared_residual = 0.0
        self._pixels = 0

    def e_step(self, x: Tensor, y: Tensor) -> Latents:
        """The latents of the batch's images with their labels: bottom-up, then refined."""
        check_labelled_batch(self.model, x, y)
        return self._e_step(x, y)

    def _e_step(self, x: Tensor, y: Tensor) -> Latents:
        """`e_step` for a checked batch."""
        with torch.no_grad():
            latents = walk_up(self.model, x).latents
            if self.refine_sweeps and x.shape[0]:
                latents, _, _ = coordinate_ascent(self.model, x, y, latents, self.refine_sweeps)
        return latents

    def level_objective(self, x: Tensor, y: Tensor, latents: Latents) -> Tensor:
        """sum_n ||x_n - mu(y_n, z_n)||^2 for the batch: the quantity each M-step lowers."""
        with torch.no_grad():
            mu = self.model.sigma2 * propagate_down(self.model, y, latents)[0]
            return ((x - mu) ** 2).sum()

    def solve_level(self, index: int, x: Tensor, y: Tensor, latents: Latents) -> Tensor:
        """The conjugate-gradient least-squares templates of level `index` for this batch."""
        model = self.model
        level = model.levels[index]
        with torch.no_grad():  # the top-down signal at the level's output, fixed
            arriving = propagate_down(model, y, latents, stop=index + 1)[0]

        def render(weight: Tensor) -> Tensor:
            """h^(0) with the level's templates replaced: linear in `weight`."""
            h = level.render_with_templates(arriving, weight)
            return walk_down(model, h, latents, index - 1)[0]

        def gram(weight: Tensor) -> Tensor:  # (sum_n L_n^T L_n) weight
            with torch.enable_grad():
                w = weight.detach().requires_grad_()
                (grad,) = torch.autograd.grad(0.5 * (render(w) ** 2).sum(), w)
            return grad if self.reduce is None else self.reduce(grad)

        # The starting residual b - A W = L^T x / sigma^2 - L^T L W in one render and its
        # adjoint: the gradient of <L w, x / sigma^2> - |L w|^2 / 2 at w = W (b alone would cost
        # the same, and A W as much again).
        with torch.enable_grad():
            w = level.templates.detach().clone().requires_grad_()
            h = render(w)
            (residual,) = torch.autograd.grad((h * (x / model.sigma2 - 0.5 * h)).sum(), w)
        if self.reduce is not None:  # sums over every process's images
            residual = self.reduce(residual)
        return conjugate_gradient(
            gram, None, level.templates.detach(), self.cg_iterations, residual=residual
        )

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        """E-step and one M-step per visited level; `share` is not needed (sums over images)."""
        check_labelled_batch(self.model, x, y)
        if x.shape[0] == 0 and self.reduce is None:
            raise ValueError("x must hold at least one image, got an empty batch")
        model = self.model
        latents = self._e_step(x, y)
        with torch.no_grad():
            for _ in range(self.levels_per_step):
                index = self.template_levels[self._cursor % len(self.template_levels)]
                self._cursor += 1
                solution = self.solve_level(index, x, y, latents)
                templates = model.levels[index].templates
                templates.add_(self.step_size * (solution - templates))
            residual = float(self.level_objective(x, y, latents))
            self._squared_residual += residual
            self._pixels += x.numel()
            self._class_counts += torch.bincount(y.cpu(), minlength=model.num_classes)
            for i in self.prior_levels:
                latent = latents[i]
                assert latent is not None
                statistics = model.levels[i].prior_statistics(latent)
                assert statistics is not None
                self._prior_statistics[i] = self._prior_statistics[i] + statistics
        return residual / x.numel() if x.numel() else 0.0

    def _sum_counts(self) -> None:
        """Sum the epoch's counts and residuals over the processes (one collective)."""
        if self.reduce is None:
            return
        levels = list(self._prior_statistics)
        scalars = torch.tensor([self._squared_residual, float(self._pixels)], dtype=torch.float64)
        summed = reduce_together(
            [self._class_counts, scalars, *(self._prior_statistics[i] for i in levels)],
            self.reduce,
        )
        self._class_counts = summed[0].clone()
        self._squared_residual, pixels = summed[1].tolist()
        self._pixels = round(pixels)
        self._prior_statistics = {i: t.clone() for i, t in zip(levels, summed[2:], strict=True)}

    def end_epoch(self) -> dict[str, float]:
        model = self.model
        summary: dict[str, float] = {}
        self._sum_counts()
        if self._pixels:
            with torch.no_grad():
                frequencies = (self._class_counts + 1.0) / (
                    self._class_counts.sum() + len(self._class_counts)
                )  # add-one smoothing: no class gets probability 0
                model.classes.bias.copy_(frequencies.log().to(model.dtype))
            for i, statistics in self._prior_statistics.items():
                for name, value in model.levels[i].learn_prior(statistics).items():
                    summary[f"{name}_level{i}"] = value
            summary["reconstruction_mse"] = self._squared_residual / self._pixels
        self._reset_counts()
        return summary

    def current_model(self) -> DeepRenderingModel:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self._cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cursor = int(state["cursor"])
