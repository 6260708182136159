"""Learning the deep model: SGD, batch discriminative EM and generative hard EM, one loop shape.

Every trainer is driven the same way, like a torch optimizer:

    for epoch in range(epochs):
        for x, y in batches:
            loss = trainer.step(x, y)    # one update (batch EM: one E-step's statistics)
        summary = trainer.end_epoch()    # batch EM's M-step; a no-op for gradient methods
    model = trainer.current_model()      # the current parameters (DRM or shallow)

Algorithms (DESIGN section 5):
* `cnn_equiv.SGDTrainer` (in the neural-net package): trains the equivalent torch CNN with SGD or
  Adam on the cross-entropy and maps it back with `to_drm`; the baseline.
* `DiscriminativeEM`: the paper's batch discriminative EM. E-step: bottom-up max-sum (`max_sum`),
  latents frozen. M-step: `m_steps` gradient steps on the conditional log-likelihood
  log p(c | x, z*) = log_softmax of the frozen-latent scores (`frozen_scores`). With one M-step it
  is SGD exactly (E9): the cross-entropy gradient of the CNN is the gradient through the linear
  network with latents frozen at the E-step.
* `GenerativeEM`: hard EM on the rendering model with the factorized prior (the "full EM" row
  of the lecture's table). E-step: bottom-up max-sum latents, the class fixed to the label. M-step:
  with every latent fixed the rendering mu(c, z) is linear in the templates of each level, so the
  reconstruction least-squares problem for one level has a closed-form solution, computed by
  conjugate gradients on its normal equations; the class prior, the switch priors and sigma^2 come
  from frequencies and residuals.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Dempster, Laird, Rubin, Maximum Likelihood from Incomplete Data via the EM Algorithm, 1977.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drm.inference import frozen_scores, max_sum
from drm.model import DeepRenderingModel, check_classes, check_images
from drm.shallow import ShallowRenderingModel

OptimizerName = Literal["adam", "sgd"]


class Trainer(Protocol):
    """The loop shape shared by every learning algorithm of the library."""

    def step(self, x: Tensor, y: Tensor) -> float:
        """One update on the batch x (B, C0, H, W) with labels y (B,); returns the batch loss."""
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


def check_batch(model: DeepRenderingModel, x: Tensor, y: Tensor) -> None:
    """Raise a clear error unless x (B, C0, H, W) and labels y (B,) fit the model."""
    check_images(model, x)
    check_classes(model, y, x.shape[0])


class DiscriminativeEM:
    """Batch discriminative EM: max-sum E-step, then `m_steps` gradient steps with latents frozen.

    Args:
        model: the DRM, trained in place.
        m_steps: gradient steps per E-step; 1 is SGD exactly (E9).
        optimizer, lr: the M-step's optimizer.
    """

    def __init__(
        self,
        model: DeepRenderingModel,
        m_steps: int = 1,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
    ) -> None:
        if m_steps < 1:
            raise ValueError(f"m_steps must be >= 1, got {m_steps}")
        self.model = model
        self.m_steps = m_steps
        self.optimizer = make_optimizer(model.parameters(), optimizer, lr)

    def e_step(self, x: Tensor) -> tuple[Tensor | None, ...]:
        """Bottom-up max-sum latents, no gradient: the fine-to-coarse E-step."""
        with torch.no_grad():
            return max_sum(self.model, x)[1]

    def step(self, x: Tensor, y: Tensor) -> float:
        check_batch(self.model, x, y)
        latents = self.e_step(x)
        loss = x.new_zeros(())
        for _ in range(self.m_steps):
            # log p(c | x, z*) is the softmax of the frozen-latent scores (E1).
            loss = F.cross_entropy(frozen_scores(self.model, x, latents), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return float(loss.detach())

    def end_epoch(self) -> dict[str, float]:
        return {}

    def current_model(self) -> DeepRenderingModel:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def accuracy(
    model: DeepRenderingModel | nn.Module, x: Tensor, y: Tensor, batch: int = 1000
) -> float:
    """Fraction of images whose max-sum (CNN) class is the label."""
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb = x[start : start + batch]
            scores = max_sum(model, xb)[0] if isinstance(model, DeepRenderingModel) else model(xb)
            correct += int((scores.argmax(1) == y[start : start + batch]).sum())
    return correct / max(1, x.shape[0])
