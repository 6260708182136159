"""Exact EM for the shallow rendering model (DESIGN section 5 "Full EM, shallow model", E10).

This module holds:

* `ShallowEM`: batch EM on a `drm.shallow.ShallowRenderingModel`, driven by the library's
  `drm.em.Trainer` loop shape (`step(x, y)` per batch = one E-step's sufficient statistics,
  `end_epoch()` = the closed-form M-step). Soft EM (exact posterior responsibilities) or hard EM
  (one-hot at the joint MAP: the k-means / classification-EM limit); unsupervised, supervised
  (a label fixes the class) or semi-supervised (label -1 = unknown).
* `floored_prior`: the M-step's water-filling maximiser of the class prior.

Its starting points (`kmeans`, `init_from_kmeans`, `init_from_class_means`) live in
`drm.shallow_init` and are re-exported here.

The model (see `drm.shallow`): x = a T_g mu_c + eps, eps ~ N(0, sigma^2 I), c ~ pi,
g ~ uniform over G placements, a ~ Bernoulli(pi_on) (a = 1 always without a switch). Every T_g is
an isometry of the template space into the image (a circular shift, an interior placement, or the
identity), so T_g^T T_g = I.

E-step (exact, log-sum-exp, float64): for image n,

    r_n(c, g, a) = p(c, g, a | x_n)                 (unlabelled),
    r_n(c, g, a) = p(c, g, a | x_n, c = y_n)        (labelled: zero for every c != y_n),

and in hard EM r_n is one-hot at argmax_{c, g, a} log p(x_n, c, g, a) (same restriction).
With rho_n(c, g) = r_n(c, g, a = 1) (the mass that actually renders a template), the statistics,
summed over the epoch with no Python loop over images or pixels, are

    N      = number of images,               X2   = sum_n ||x_n||^2,
    M_c    = sum_n sum_{g,a} r_n(c, g, a),   A_on = sum_n sum_{c,g} rho_n(c, g),
    W_c    = sum_n sum_g rho_n(c, g),        S_c  = sum_n sum_g rho_n(c, g) T_g^T x_n.

S_c "undoes the translation": T_g^T x_n is x_n cropped at (or rolled back by) placement g, and the
sum over g is one cross-correlation of x with the responsibility map rho (an `F.conv2d` whose
input channels are the batch; circular padding for circular shifts; an einsum for "none").

M-step (closed form; each is the exact maximiser of the expected complete-data log-likelihood
Q(theta) = sum_n sum_{c,g,a} r_n(c,g,a) log p(x_n, c, g, a; theta), under the guards below):

    mu_c    = S_c / W_c                                 (weighted least squares, T_g^T T_g = I),
    pi      = argmax_{pi >= floor, sum pi = 1} sum_c M_c log pi_c   (= M_c / N when no floor binds),
    pi_on   = clip(A_on / N, floor, 1 - floor),
    sigma^2 = max(R / (N D), min_variance),
    R       = X2 - 2 sum_c <mu_c, S_c> + sum_c W_c ||mu_c||^2   (expected squared residual),

with D = C0 * H * W and `prior_logits` set to log pi.

Guards (no NaN, ever): a component with W_c <= `empty_weight` (it explains essentially no image
with its template on) keeps its previous template; we do NOT re-seed it from a badly explained
image, because keeping it leaves its term of Q unchanged, so the update is still a generalised
EM step and the likelihood stays monotone. The class prior and pi_on are the exact maximisers on
the floored set (water-filling), and sigma^2 is floored at `min_variance` against variance
collapse; both are constrained maximisers of Q, so monotonicity holds whenever the starting
parameters already satisfy the floors.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Dempster, Laird, Rubin, Maximum Likelihood from Incomplete Data via the EM Algorithm,
    Journal of the Royal Statistical Society B 39(1), 1977.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from drm.checks import (
    check_count,
    check_flag,
    check_positive,
    check_real,
    check_shallow_labels,
)
from drm.distributed import Reduce, reduce_together
from drm.shallow import ShallowRenderingModel
from drm.shallow_init import init_from_class_means, init_from_kmeans, kmeans

__all__ = [
    "ShallowEM",
    "floored_prior",
    "init_from_class_means",
    "init_from_kmeans",
    "kmeans",
]

_STAT = torch.float64  # every sufficient statistic is accumulated in float64
_STATE_KEYS = frozenset(
    {"hard", "supervised", "min_variance", "prior_floor", "empty_weight", "epochs", "stats"}
)


# ----------------------------------------------------------------------------------------------
# The M-step's constrained maximisers
# ----------------------------------------------------------------------------------------------


def floored_prior(counts: Tensor, floor: float) -> Tensor:
    """argmax_{p >= floor, sum p = 1} sum_c counts_c log p_c, by water-filling.

    KKT: p_c = max(floor, counts_c / lam), with lam set so that p sums to 1. The floored set only
    grows from one pass to the next, so at most C passes (a loop over classes, not images).

    Args:
        counts: (C,) non-negative expected counts (float64), not all zero.
        floor: in (0, 1 / C).

    Returns:
        (C,) probabilities, each >= floor.
    """
    floored = torch.zeros_like(counts, dtype=torch.bool)
    prior = counts / counts.sum()
    for _ in range(counts.numel()):
        free_mass = 1.0 - floor * float(floored.sum())
        free_counts = counts.masked_fill(floored, 0.0).sum()
        prior = torch.where(floored, counts.new_tensor(floor), counts * free_mass / free_counts)
        newly = (prior < floor) & ~floored
        if not bool(newly.any()):
            break
        floored |= newly
    return prior.clamp(min=floor)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class ShallowEM:
    """Exact batch EM on a `ShallowRenderingModel`, with the `drm.em.Trainer` loop shape.

        trainer = ShallowEM(model, supervised=False)
        for epoch in range(epochs):
            for x, y in batches:              # the whole data set, in any batch size
                nll = trainer.step(x, y)      # E-step statistics, parameters unchanged
            summary = trainer.end_epoch()     # M-step; summary["log_likelihood"] is before it

    The parameters change only in `end_epoch`, so the result does not depend on the batching.
    The model is trained in place; its dtype may be float32 or float64 (the statistics are
    float64 either way).

    Args:
        model: the shallow rendering model, updated in place.
        hard: hard EM (responsibilities one-hot at the joint MAP: the k-means limit) instead of
            soft EM.
        supervised: a label y[n] >= 0 fixes the class of image n (y[n] = -1: unknown, so mixed
            batches are semi-supervised); with False every label is ignored (unsupervised).
        min_variance: floor of sigma^2 (guards against variance collapse), > 0.
        prior_floor: floor of every class prior pi_c and of pi_on and 1 - pi_on, in
            (0, 1 / max(C, 2)).
        empty_weight: a component whose template carries at most this expected number of images
            (W_c, see the module docstring) in an epoch is empty and keeps its template, >= 0.
        reduce: sums a tensor over the data-parallel processes (`drm.distributed.all_reduce_`);
            None: one process. Every process accumulates the statistics of its own images, and
            `end_epoch` sums them (one collective) before the M-step, so every process takes
            the M-step of the whole epoch. With it, `step` accepts an empty shard.

    Raises:
        TypeError, ValueError: invalid arguments.
    """

    def __init__(
        self,
        model: ShallowRenderingModel,
        hard: bool = False,
        supervised: bool = True,
        min_variance: float = 1e-6,
        prior_floor: float = 1e-8,
        empty_weight: float = 1e-8,
        reduce: Reduce | None = None,
    ) -> None:
        if not isinstance(model, ShallowRenderingModel):
            raise TypeError(f"model must be a ShallowRenderingModel, got {type(model).__name__}")
        self.model = model
        self.hard, self.supervised, self.min_variance, self.prior_floor, self.empty_weight = (
            self._check_options(model, hard, supervised, min_variance, prior_floor, empty_weight)
        )
        self.reduce: Reduce | None = reduce
        self.epochs: int = 0  # completed M-steps
        self._reset()

    @staticmethod
    def _check_options(
        model: ShallowRenderingModel,
        hard: object,
        supervised: object,
        min_variance: object,
        prior_floor: object,
        empty_weight: object,
    ) -> tuple[bool, bool, float, float, float]:
        """The validated (hard, supervised, min_variance, prior_floor, empty_weight)."""
        hard_ = check_flag(hard, "hard")
        supervised_ = check_flag(supervised, "supervised")
        min_variance_ = check_positive(min_variance, "min_variance")
        prior_floor_ = check_positive(prior_floor, "prior_floor")
        limit = 1.0 / max(model.num_classes, 2)
        if not prior_floor_ < limit:
            raise ValueError(
                f"prior_floor must be < 1 / max(C, 2) = {limit:.4g} so the floored priors can "
                f"sum to 1, got {prior_floor_}"
            )
        if isinstance(empty_weight, Tensor):  # check_real would take a one-element tensor
            raise TypeError("empty_weight must be a real number, got Tensor")
        empty_weight_ = check_real(empty_weight, "empty_weight")
        if not (math.isfinite(empty_weight_) and empty_weight_ >= 0):
            raise ValueError(f"empty_weight must be finite and >= 0, got {empty_weight}")
        return hard_, supervised_, min_variance_, prior_floor_, empty_weight_

    # ------------------------------------------------------------------------------------------
    # Accumulators
    # ------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        m = self.model
        device = m.templates.device
        zero = torch.zeros((), dtype=_STAT, device=device)
        self._stats: dict[str, Tensor] = {
            "images": zero.clone(),  # N
            "sum_sq": zero.clone(),  # X2 = sum_n ||x_n||^2
            "counts": torch.zeros(m.num_classes, dtype=_STAT, device=device),  # M_c
            "on_weight": zero.clone(),  # A_on
            "weights": torch.zeros(m.num_classes, dtype=_STAT, device=device),  # W_c
            "sums": torch.zeros(m.templates.shape, dtype=_STAT, device=device),  # S_c
            "log_lik": zero.clone(),  # sum_n log p(x_n [, y_n])
            "map_lik": zero.clone(),  # sum_n max_{c,g,a} log p(x_n, c, g, a) (restricted)
        }

    # ------------------------------------------------------------------------------------------
    # E-step
    # ------------------------------------------------------------------------------------------

    def _check_labels(self, y: object, batch: int) -> Tensor | None:
        """Validate y (B,) long; returns the labels to use (None: all unlabelled)."""
        device = self.model.templates.device
        labels = check_shallow_labels(y, batch, self.model.num_classes, device, self.supervised)
        return labels if self.supervised else None

    def log_joint_table(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x_n, c, g, a) in float64 for every (c, g, a), -inf where a label forbids c.

        Args:
            x: (B, C0, H, W) in the model's dtype.
            y: (B,) long labels in [-1, C) (-1: unlabelled), or None; ignored unless
                `supervised`.

        Returns:
            (B, C, G, A) float64; A = 2 with a switch (index 1 is a = 1), else 1.
        """
        m = self.model
        with torch.no_grad():
            scores = m.joint_scores(x)  # validates x; (B, C, G, A) = log p(x, c, g, a) + K(x)
            labels = self._check_labels(y, x.shape[0])
            x64 = x.detach().to(_STAT)
            sigma2 = m.sigma2.detach().to(_STAT)
            k_x = x64.pow(2).flatten(1).sum(1) / (2 * sigma2) + 0.5 * m.num_pixels * torch.log(
                2 * math.pi * sigma2
            )  # (B,)
            table = scores.detach().to(_STAT) - k_x[:, None, None, None]
            if labels is not None:
                classes = torch.arange(m.num_classes, device=x.device)
                forbidden = (labels[:, None] >= 0) & (classes[None, :] != labels[:, None])  # (B, C)
                table = table.masked_fill(forbidden[:, :, None, None], -math.inf)
        return table

    def _responsibilities(self, table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(responsibilities (B, C, G, A), log p per image (B,), MAP log-joint per image (B,))."""
        flat = table.flatten(1)  # (B, C * G * A)
        log_lik = flat.logsumexp(dim=1)  # (B,)
        map_lik, best = flat.max(dim=1)  # (B,), (B,)
        if self.hard:
            resp = torch.zeros_like(flat).scatter_(1, best[:, None], 1.0)
        else:
            resp = torch.exp(flat - log_lik[:, None])
        return resp.view_as(table), log_lik, map_lik

    def responsibilities(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The E-step's responsibilities r_n(c, g, a), float64.

        Soft EM: the exact posterior (restricted to c = y[n] for labelled images when
        `supervised`); hard EM: one-hot at the (restricted) joint MAP.

        Args:
            x: (B, C0, H, W).
            y: (B,) long labels in [-1, C), or None.

        Returns:
            (B, C, G, A) float64, each image's entries summing to 1.
        """
        return self._responsibilities(self.log_joint_table(x, y))[0]

    def _template_sums(self, x64: Tensor, rho: Tensor) -> Tensor:
        """S_c = sum_n sum_g rho_n(c, g) T_g^T x_n: a cross-correlation of x with rho.

        Args:
            x64: (B, C0, H, W) float64.
            rho: (B, C, G) float64, the a = 1 responsibilities.

        Returns:
            (C, C0, h, w) float64.
        """
        m = self.model
        hg, wg = m.translation_grid
        if m.translation == "none":
            return torch.einsum("nc,nkhw->ckhw", rho[:, :, 0], x64)
        if m.translation == "circular":
            # T_g^T x (p, q) = x((p + i) mod H, (q + j) mod W): pad circularly, then correlate
            x64 = F.pad(x64, (0, wg - 1, 0, hg - 1), mode="circular")  # (B, C0, 2H-1, 2W-1)
        # the batch becomes the conv's input channels, so the conv sums over images:
        # out[k, c, p, q] = sum_n sum_{i,j} x[n, k, p + i, q + j] rho[n, c, i, j]
        kernel = rho.view(rho.shape[0], rho.shape[1], hg, wg).transpose(0, 1)  # (C, B, Hg, Wg)
        return F.conv2d(x64.transpose(0, 1), kernel).transpose(0, 1)  # (C, C0, h, w)

    def step(self, x: Tensor, y: Tensor | None = None, *, share: float = 1.0) -> float:
        """The E-step on one batch: accumulate the M-step's statistics (parameters unchanged).

        Args:
            x: (B, C0, H, W) images in the model's dtype and device.
            y: (B,) long labels in [-1, C) (-1: unlabelled), or None (all unlabelled). With
                `supervised=False` they are ignored (only their shape is checked).
            share: the fraction of the global minibatch that x is (the `drm.em.Trainer`
                protocol); not needed, the statistics are sums.

        Returns:
            The batch's mean negative log-likelihood per image in nats: -log p(x) for unlabelled
            images, -log p(x, y) for labelled ones (the objective that EM increases), under the
            current parameters. Hard EM returns the same quantity (its own objective, the MAP
            log-joint, is reported by `end_epoch` as "map_log_joint").

        Raises:
            TypeError, ValueError: x or y does not fit the model.
        """
        if isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == 0:
            if self.reduce is not None:  # an empty shard of a data-parallel batch
                return 0.0
            raise ValueError("x must hold at least one image, got an empty batch")
        table = self.log_joint_table(x, y)  # (B, C, G, A)
        resp, log_lik, map_lik = self._responsibilities(table)
        rho = resp[..., -1]  # (B, C, G): a = 1 is the last index with or without a switch
        x64 = x.detach().to(_STAT)
        s = self._stats
        s["images"] += x.shape[0]
        s["sum_sq"] += x64.pow(2).sum()
        s["counts"] += resp.sum(dim=(0, 2, 3))
        s["on_weight"] += rho.sum()
        s["weights"] += rho.sum(dim=(0, 2))
        s["sums"] += self._template_sums(x64, rho)
        s["log_lik"] += log_lik.sum()
        s["map_lik"] += map_lik.sum()
        return -float(log_lik.mean())

    # ------------------------------------------------------------------------------------------
    # M-step
    # ------------------------------------------------------------------------------------------

    def end_epoch(self) -> dict[str, float]:
        """The closed-form M-step from the epoch's statistics; resets them.

        Returns:
            "log_likelihood": mean log p(x [, y]) per image over the epoch's E-steps (parameters
            BEFORE this M-step); "map_log_joint": mean max_{c,g,a} log p(x, c, g, a) (hard EM's
            objective, same parameters); "sigma2", "switch_prior_on" (nan without a switch) and
            "min_class_prior" after the update; "empty_components": how many kept their
            template; "images": N.

        Raises:
            RuntimeError: no `step` since the last M-step.
        """
        m = self.model
        if self.reduce is not None:  # sum every process's statistics, in one collective
            summed = reduce_together(list(self._stats.values()), self.reduce)
            self._stats = {k: v.clone() for k, v in zip(self._stats, summed, strict=True)}
        s = self._stats
        n_images = float(s["images"])
        if n_images == 0:
            raise RuntimeError("end_epoch() needs at least one step() since the last M-step")
        old = m.templates.detach().to(_STAT)
        weights = s["weights"]
        empty = weights <= self.empty_weight  # (C,)
        safe = torch.where(empty, torch.ones_like(weights), weights)
        templates = torch.where(
            empty[:, None, None, None], old, s["sums"] / safe[:, None, None, None]
        )  # (C, C0, h, w)
        # expected squared residual sum_n E ||x_n - a T_g mu_c||^2 at the new templates
        residual = (
            s["sum_sq"]
            - 2 * (templates * s["sums"]).sum()
            + (weights * templates.pow(2).flatten(1).sum(1)).sum()
        ).clamp(min=0.0)
        sigma2 = max(float(residual) / (n_images * m.num_pixels), self.min_variance)
        prior = floored_prior(s["counts"], self.prior_floor)
        with torch.no_grad():
            m.templates.copy_(templates.to(m.templates.dtype))
            m.prior_logits.copy_(prior.log().to(m.prior_logits.dtype))
            m.sigma2.fill_(sigma2)
        switch_on = math.nan
        if m.switch_prior_on is not None:
            switch_on = min(
                max(float(s["on_weight"]) / n_images, self.prior_floor), 1.0 - self.prior_floor
            )
            m.switch_prior_on = switch_on
        summary = {
            "log_likelihood": float(s["log_lik"]) / n_images,
            "map_log_joint": float(s["map_lik"]) / n_images,
            "sigma2": sigma2,
            "switch_prior_on": switch_on,
            "min_class_prior": float(prior.min()),
            "empty_components": float(empty.sum()),
            "images": n_images,
        }
        self.epochs += 1
        self._reset()
        return summary

    # ------------------------------------------------------------------------------------------
    # Trainer protocol: model and state
    # ------------------------------------------------------------------------------------------

    def current_model(self) -> ShallowRenderingModel:
        """The model being trained (the same object, updated in place)."""
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Flags, epoch count and the (possibly partial) epoch's statistics.

        Nested dicts of tensors, numbers and strings: `drm.checkpoint.save_checkpoint` stores it.
        """
        return {
            "hard": self.hard,
            "supervised": self.supervised,
            "min_variance": self.min_variance,
            "prior_floor": self.prior_floor,
            "empty_weight": self.empty_weight,
            "epochs": self.epochs,
            "stats": {k: v.detach().clone() for k, v in self._stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (validated; the model's shapes must match).

        Raises:
            TypeError, ValueError: a malformed state.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if set(state) != _STATE_KEYS:
            raise ValueError(
                f"state must have keys {sorted(_STATE_KEYS)}, got {sorted(map(str, state))}"
            )
        stats = state["stats"]
        if not isinstance(stats, dict) or set(stats) != set(self._stats):
            raise ValueError(f"state['stats'] must be a dict with keys {sorted(self._stats)}")
        restored: dict[str, Tensor] = {}
        for key, want in self._stats.items():
            value = stats[key]
            if not isinstance(value, Tensor):
                raise TypeError(f"state['stats'][{key!r}] must be a tensor")
            if value.shape != want.shape:
                raise ValueError(
                    f"state['stats'][{key!r}] has shape {tuple(value.shape)}, the model needs "
                    f"{tuple(want.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"state['stats'][{key!r}] contains NaN or inf")
            restored[key] = value.to(dtype=_STAT, device=want.device).clone()
        epochs = check_count(state["epochs"], "state['epochs']", 0)
        # the constructor's checks on the flags, then commit everything at once
        options = self._check_options(
            self.model,
            state["hard"],
            state["supervised"],
            state["min_variance"],
            state["prior_floor"],
            state["empty_weight"],
        )
        self.hard, self.supervised, self.min_variance, self.prior_floor, self.empty_weight = options
        self.epochs = epochs
        self._stats = restored
