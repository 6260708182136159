"""SGD/Adam training of the equivalent CNN: the neural-net baseline of the learning algorithms.

`SGDTrainer` follows the loop shape of `drm.em.Trainer` (`step`, `end_epoch`, `current_model`), so a
script switches between SGD and the EM algorithms only where the trainer is built.

Data-parallel training: the keyword every trainer of the library takes, `reduce` (a
`drm.distributed.Reduce`: a tensor -> its sum over the processes, e.g.
`drm.distributed.all_reduce_`; None: one process), with the semantics of `drm.em.Trainer`. Each
process weights its shard's mean loss by `share` (its fraction b / B of the global batch) and
the gradients are summed over the processes (`drm.em.sum_gradients`, one collective) before the
optimizer step, so every process takes the whole batch's step even when the shards are unequal,
exactly as `drm.DiscriminativeEM` does. Every process must start from the same parameters (the
training loop broadcasts rank 0's model, `drm.distributed.broadcast_module_`).

Mixed precision: `amp="bf16"` runs the CNN's forward pass under `torch.autocast` with bfloat16
(CPU or CUDA); the parameters, the optimizer state and the loss stay float32.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Kingma, Ba, Adam: A Method for Stochastic Optimization, ICLR 2015.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cnn_equiv.mapping import to_cnn, to_drm
from drm.checks import check_labelled_batch
from drm.distributed import Reduce
from drm.em import OptimizerName, make_optimizer, sum_gradients
from drm.model import DeepRenderingModel

AmpName = Literal["bf16"]


class SGDTrainer:
    """Cross-entropy training of the equivalent CNN (the neural-net view), mapped back by to_drm.

    Args:
        model: the starting point; its parameters are copied into the CNN.
        optimizer: "adam" or "sgd" (with momentum 0.9).
        lr: learning rate.
        reduce: sums a tensor over the data-parallel processes (`drm.distributed.all_reduce_`);
            None: one process. The share-weighted gradients are summed before every optimizer
            step, so every process takes the whole-batch step; with it, `step` accepts an empty
            shard.
        amp: "bf16" for a bfloat16 autocast forward pass; None: the model's dtype.
    """

    def __init__(
        self,
        model: DeepRenderingModel,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        *,
        reduce: Reduce | None = None,
        amp: AmpName | None = None,
    ) -> None:
        if amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
        self.sigma2 = float(model.sigma2)
        self.cnn = to_cnn(model)
        self.cnn.train()
        self.amp = amp
        self.reduce = reduce
        self.optimizer = make_optimizer(self.cnn.parameters(), optimizer, lr)
        self._reference = model  # for input checks (shape, dtype) only

    def _autocast(self, x: Tensor) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        check_labelled_batch(self._reference, x, y)
        empty = x.shape[0] == 0
        if empty and self.reduce is None:
            raise ValueError("x must hold at least one image, got an empty batch")
        with self._autocast(x):
            logits = self.cnn(x)
        logits = logits.float() if self.amp is not None else logits
        # an empty shard still runs forward and backward: it joins the gradient sum with zeros
        loss = logits.sum() * 0.0 if empty else F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        # the whole batch's mean is the sum over shards of share * the shard's mean
        (loss if share == 1.0 else loss * share).backward()
        if self.reduce is not None:
            sum_gradients(list(self.cnn.parameters()), self.reduce)
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
