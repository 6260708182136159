"""SGD/Adam training of the equivalent CNN: the neural-net baseline of the learning algorithms.

`SGDTrainer` follows the loop shape of `drm.em.Trainer` (`step`, `end_epoch`, `current_model`), so a
script switches between SGD and the EM algorithms only where the trainer is built.

Data-parallel training: with `distributed=True` (inside an initialised torch.distributed process
group, see `drm.distributed`) the CNN is wrapped in `DistributedDataParallel`, which averages the
gradients over the processes. Each process weights its shard's mean loss by `share * world_size`
(`share`: its fraction b / B of the global batch), so the average is the gradient of the whole
batch's mean loss even when the shards are unequal.

Mixed precision: `amp="bf16"` runs the CNN's forward pass under `torch.autocast` with bfloat16
(CPU or CUDA); the parameters, the optimizer state and the loss stay float32.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Kingma, Ba, Adam: A Method for Stochastic Optimization, ICLR 2015.
    Li et al., PyTorch Distributed: Experiences on Accelerating Data Parallel Training,
    VLDB 2020.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from cnn_equiv.mapping import to_cnn, to_drm
from drm.em import OptimizerName, check_batch, make_optimizer
from drm.model import DeepRenderingModel

AmpName = Literal["bf16"]


class SGDTrainer:
    """Cross-entropy training of the equivalent CNN (the neural-net view), mapped back by to_drm.

    Args:
        model: the starting point; its parameters are copied into the CNN.
        optimizer: "adam" or "sgd" (with momentum 0.9).
        lr: learning rate.
        distributed: wrap the CNN in DistributedDataParallel (needs an initialised default
            process group; the parameters are broadcast from rank 0). False: one process.
        amp: "bf16" for a bfloat16 autocast forward pass; None: the model's dtype.
    """

    def __init__(
        self,
        model: DeepRenderingModel,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        *,
        distributed: bool = False,
        amp: AmpName | None = None,
    ) -> None:
        if amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised torch.distributed group")
        self.sigma2 = float(model.sigma2)
        self.cnn = to_cnn(model)
        self.cnn.train()
        self.amp = amp
        self.distributed = distributed
        self.world_size = dist.get_world_size() if distributed else 1
        self._forward: nn.Module = self.cnn
        if distributed:
            device = next(self.cnn.parameters()).device
            self._forward = DistributedDataParallel(
                self.cnn, device_ids=[device] if device.type == "cuda" else None
            )
        self.optimizer = make_optimizer(self.cnn.parameters(), optimizer, lr)
        self._reference = model  # for input checks (shape, dtype) only

    def _autocast(self, x: Tensor) -> contextlib.AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        check_batch(self._reference, x, y)
        empty = x.shape[0] == 0
        if empty and not self.distributed:
            raise ValueError("x must hold at least one image, got an empty batch")
        with self._autocast(x):
            logits = self._forward(x)
        logits = logits.float() if self.amp is not None else logits
        # an empty shard still runs forward and backward: DDP's gradient sum needs every process
        loss = logits.sum() * 0.0 if empty else F.cross_entropy(logits, y)
        # DDP averages over processes; share * world_size turns the average into the sum of
        # share-weighted shard means, the whole batch's mean
        weight = share * self.world_size
        self.optimizer.zero_grad(set_to_none=True)
        (loss if weight == 1.0 else loss * weight).backward()
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
