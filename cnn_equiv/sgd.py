"""SGD/Adam training of the equivalent CNN: the neural-net baseline of the learning algorithms.

`SGDTrainer` follows the loop shape of `drm.em.Trainer` (`step`, `end_epoch`, `current_model`), so a
script switches between SGD and the EM algorithms only where the trainer is built.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Kingma, Ba, Adam: A Method for Stochastic Optimization, ICLR 2015.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from cnn_equiv.mapping import to_cnn, to_drm
from drm.em import OptimizerName, check_batch, make_optimizer
from drm.model import DeepRenderingModel


class SGDTrainer:
    """Cross-entropy training of the equivalent CNN (the neural-net view), mapped back by to_drm.

    Args:
        model: the starting point; its parameters are copied into the CNN.
        optimizer: "adam" or "sgd" (with momentum 0.9).
        lr: learning rate.
    """

    def __init__(
        self, model: DeepRenderingModel, optimizer: OptimizerName = "adam", lr: float = 1e-3
    ) -> None:
        self.sigma2 = float(model.sigma2)
        self.cnn = to_cnn(model)
        self.cnn.train()
        self.optimizer = make_optimizer(self.cnn.parameters(), optimizer, lr)
        self._reference = model  # for input checks (shape, dtype) only

    def step(self, x: Tensor, y: Tensor) -> float:
        check_batch(self._reference, x, y)
        loss = F.cross_entropy(self.cnn(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def end_epoch(self) -> dict[str, float]:
        return {}

    def current_model(self) -> DeepRenderingModel:
        return to_drm(self.cnn, sigma2=self.sigma2)

    def state_dict(self) -> dict[str, Any]:
        # The CNN itself, not only its DRM: to_drm normalises the final bias (eq. 12), and an
        # exact resume needs the very tensors the optimizer was updating.
        return {"cnn": self.cnn.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cnn.load_state_dict(state["cnn"])
        self.optimizer.load_state_dict(state["optimizer"])
