"""Parameter averaging: evaluate and keep an exponential moving average of the training iterates.

A stochastic-gradient trainer's iterates wander around a minimum at the scale of its step size;
their running average sits nearer the minimum and classifies more steadily from one epoch to
the next (Polyak and Juditsky 1992; the exponential form is the "mean teacher" model's, Tarvainen
and Valpola 2017). After every step of the wrapped trainer,

    theta_avg <- decay * theta_avg + (1 - decay) * theta        (buffers: copied)

and the averaged model is the run's model: `current_model()` returns it, so it is what is
evaluated and saved. Training itself is unchanged (the wrapped trainer steps its own
parameters, bit for bit as without averaging). On resume the run directory's model is the
average, and the trainer's state holds the live parameters.

Data-parallel: every process holds the same parameters after every step, so the same average.

References:
    Polyak, Juditsky, Acceleration of Stochastic Approximation by Averaging, SIAM J. Control
    Optim. 30(4), 1992.
    Tarvainen, Valpola, Mean teachers are better role models, NIPS 2017 (arXiv:1703.01780).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from drm.checks import check_real
from drm.deep_model import DeepRenderingModel
from drm.distributed import Reduce
from drm.em import Trainer


class ParameterAverage:
    """A trainer whose model is the exponential moving average of another trainer's iterates.

    Args:
        trainer: a trainer that trains its model in place (`current_model()` returns that same
            module every time: discriminative and semi-supervised EM).
        decay: the average's weight on its past, in [0, 1); 1 / (1 - decay) steps is its memory.
            0 keeps the latest iterate (the wrapped trainer's model, copied).
    """

    def __init__(self, trainer: Trainer, decay: float) -> None:
        decay = check_real(decay, "decay")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        live = trainer.current_model()
        if not isinstance(live, DeepRenderingModel) or trainer.current_model() is not live:
            raise ValueError(
                f"{type(trainer).__name__} does not train one deep model in place; parameter "
                "averaging needs a trainer whose current_model() is its trained module"
            )
        self.trainer = trainer
        self.decay = decay
        self.live = live
        self.average = copy.deepcopy(live).requires_grad_(False)

    @property
    def reduce(self) -> Reduce | None:
        return self.trainer.reduce

    @reduce.setter
    def reduce(self, value: Reduce | None) -> None:
        self.trainer.reduce = value

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped trainer's optimizer (the training loop sets its learning rate)."""
        optimizer = getattr(self.trainer, "optimizer")  # noqa: B009 - not every Trainer has one
        assert isinstance(optimizer, torch.optim.Optimizer)
        return optimizer

    def step(self, x: Tensor, y: Tensor, *, share: float = 1.0) -> float:
        loss = self.trainer.step(x, y, share=share)
        self.update()
        return loss

    @torch.no_grad()
    def update(self) -> None:
        """theta_avg <- decay * theta_avg + (1 - decay) * theta; buffers copied."""
        for averaged, current in zip(
            self.average.parameters(), self.live.parameters(), strict=True
        ):
            averaged.lerp_(current, 1.0 - self.decay)
        for buffer, latest in zip(self.average.buffers(), self.live.buffers(), strict=True):
            buffer.copy_(latest)

    def end_epoch(self) -> dict[str, float]:
        return self.trainer.end_epoch()

    def current_model(self) -> DeepRenderingModel:
        return self.average

    def state_dict(self) -> dict[str, Any]:
        live = {name: t.detach().clone() for name, t in self.live.state_dict().items()}
        return {"trainer": self.trainer.state_dict(), "live": live}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the live parameters; the average is the model this wrapper was built on."""
        self.trainer.load_state_dict(state["trainer"])
        self.live.load_state_dict(state["live"])


__all__ = ["ParameterAverage"]
