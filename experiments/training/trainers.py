"""The model and the trainer of a run: built from its `RunConfig`, stepped by the loop.

Algorithms: `sgd` (cnn_equiv.SGDTrainer: cross-entropy on the equivalent CNN), `dem`
(drm.em.DiscriminativeEM: max-sum E-step, `m_steps` gradient steps with latents frozen; or
another M-step design of drm.m_steps, `m_step`), `em`
(drm.em.GenerativeEM on a deep model; drm.shallow_em.ShallowEM, supervised, on the shallow
model), `ssl` (drm.semisupervised.SemiSupervisedEM; docs/semisupervised.md). Under torchrun the
trainers sum their statistics over the ranks (`drm.distributed.all_reduce_`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import drm
from cnn_equiv import SGDTrainer
from drm import distributed
from drm.averaging import ParameterAverage
from drm.config import ModelConfig, small_config
from drm.data import Dataset
from drm.em import GenerativeEM, Trainer
from drm.m_steps import discriminative_em
from drm.semisupervised import SemiSupervisedEM
from drm.shallow import ShallowRenderingModel
from drm.shallow_em import ShallowEM, init_from_class_means, init_from_kmeans
from experiments.training.config import RunConfig, RunError, is_model_file


def build_model(config: RunConfig, data: Dataset) -> drm.DeepRenderingModel | ShallowRenderingModel:
    """A fresh float32 model (on CPU) for the data, initialised from `config.seed`."""
    shape, classes = data.image_shape, data.num_classes
    if config.model == "shallow":
        return shallow_init(config, data)
    try:
        if config.model is not None and is_model_file(config.model):
            architecture = model_file_config(config.model, shape, classes)  # RunError if not
        else:
            preset = drm.lenet_config if config.model == "lenet" else small_config
            architecture = preset(shape, classes)
        return drm.DeepRenderingModel.from_config(
            architecture, seed=config.seed, dtype=torch.float32
        )
    except ValueError as err:
        raise RunError(f"--model {config.model} does not fit images {shape}: {err}") from err


def model_file_config(path: str, shape: tuple[int, int, int], classes: int) -> ModelConfig:
    """The architecture in the JSON file `path` (`drm.ModelConfig.to_dict()`), checked against
    the data's image shape and class count (RunError naming the difference)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"--model {path}: cannot read the file ({err})") from err
    try:
        entries = json.loads(text)
        if not isinstance(entries, dict):
            raise ValueError("expected a JSON object, as drm.ModelConfig.to_dict() writes")
        architecture = ModelConfig.from_dict(entries)
    except (ValueError, TypeError) as err:
        raise RunError(f"--model {path} is not a drm.ModelConfig: {err}") from err
    if architecture.input_shape != shape or architecture.num_classes != classes:
        raise RunError(
            f"--model {path} describes images {architecture.input_shape} in "
            f"{architecture.num_classes} classes, but the data has images {shape} in "
            f"{classes} classes"
        )
    return architecture


def shallow_init(config: RunConfig, data: Dataset) -> ShallowRenderingModel:
    """A shallow model started from k-means (seeded) or from the class means of the train set."""
    side = config.template_size
    size = None if side is None else (side, side)
    translation, classes = config.translation, data.num_classes
    if config.init == "class-means":
        model = init_from_class_means(
            data.x_train, data.y_train, classes, translation=translation, template_size=size
        )
    else:
        generator = torch.Generator().manual_seed(config.seed)
        model = init_from_kmeans(
            data.x_train, classes, generator=generator, translation=translation, template_size=size
        )
    assert isinstance(model, ShallowRenderingModel)
    return model


def build_trainer(config: RunConfig, model: Any) -> Trainer:
    """The trainer of `config.algo` for `model` (trained in place, except SGD's CNN copy).

    With `average_decay` > 0 (dem, ssl) it is wrapped in `drm.averaging.ParameterAverage`: the
    run's model is then the moving average of the iterates (and with `consistency_target`
    "average", ssl's consistency target).
    """
    trainer = _algorithm_trainer(config, model)
    if config.average_decay:
        averaged = ParameterAverage(trainer, config.average_decay)
        if config.consistency_target == "average":
            assert isinstance(trainer, SemiSupervisedEM)  # RunConfig: an ssl setting
            trainer.teacher = averaged.average  # the mean teacher
        return averaged
    return trainer


def _algorithm_trainer(config: RunConfig, model: Any) -> Trainer:
    shallow = isinstance(model, ShallowRenderingModel)
    if config.algo in ("sgd", "dem", "ssl") and shallow:
        raise RunError(f"--algo {config.algo} trains a deep model: use --model lenet or small")
    # filled in by RunConfig for every algorithm (ssl: its three settings too)
    assert config.lr is not None
    parallel = distributed.is_distributed()
    reduce = distributed.all_reduce_ if parallel else None  # sum over ranks; None: one process
    if config.algo == "sgd":
        return SGDTrainer(
            model, optimizer=config.optimizer, lr=config.lr, reduce=reduce, amp=config.amp
        )
    if config.algo == "dem":
        assert config.m_step is not None  # filled in by RunConfig for dem
        return discriminative_em(
            model,
            config.m_step,
            m_steps=config.m_steps,
            optimizer=config.optimizer,
            lr=config.lr,
            eta=config.m_step_eta,
            reduce=reduce,
        )
    if config.algo == "ssl":
        assert config.consistency_shift is not None and config.class_balance_target is not None
        assert config.class_guess is not None  # filled in by RunConfig
        return SemiSupervisedEM(
            model,
            config.loss_weights(),
            optimizer=config.optimizer,
            lr=config.lr,
            reduce=reduce,
            max_shift=config.consistency_shift,
            deformation=config.consistency_deformation or 0.0,
            seed=config.seed,
            balance_target=config.class_balance_target,
            class_guess=config.class_guess,
        )
    if shallow:
        return ShallowEM(model, hard=config.hard, supervised=not config.unsupervised, reduce=reduce)
    return GenerativeEM(
        model,
        cg_iterations=config.cg_iterations,
        step_size=config.em_step_size,
        reduce=reduce,
        refine_sweeps=config.refine_sweeps or 0,
    )


def epoch_lr(lr: float, decay: float, epoch: int) -> float:
    """The step-decayed learning rate of epoch `epoch` (1-based): lr * decay^(epoch - 1).

    A function of the epoch alone (no scheduler state), so a resumed run gets the same rates
    whatever --epochs says.
    """
    return lr * decay ** (epoch - 1)


def has_optimizer(trainer: Trainer) -> bool:
    """Whether the trainer is a gradient method (SGD, DEM) with a torch optimizer."""
    return isinstance(getattr(trainer, "optimizer", None), torch.optim.Optimizer)


def set_learning_rate(trainer: Trainer, lr: float) -> None:
    """Set the rate of a gradient trainer's optimizer (SGD, DEM); EM trainers have none."""
    if has_optimizer(trainer):
        for group in trainer.optimizer.param_groups:  # type: ignore[attr-defined]
            group["lr"] = lr
