"""The Deep Rendering Model: a CNN's forward pass as exact max-sum inference.

Public entry points:
    max_sum(model, x) -> (scores, latents)      bottom-up inference (the CNN forward pass)
    exact_map(model, x) -> (scores, latents)    brute-force MAP over every latent configuration
    render(model, classes, latents)             top-down rendering mu(c, z)
    log_joint(model, x, classes, latents)       log p(x, c, z) + log Z under the CNN prior
    sample(model, n, prior="factorized")        ancestral sampling of (x, c, z)
    SemiSupervisedEM(model, LossWeights(...))   semi-supervised EM through the rendering path
    save_model(model, path), load_model(path)   safetensors checkpoints (atomic, never unpickled)

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Nguyen, Liu, Perez, Baraniuk, Patel, Semi-Supervised Learning with the Deep Rendering
    Mixture Model, arXiv:1612.01942 (2016).
    Ho, Nguyen, Patel et al., Neural Rendering Model, arXiv:1811.02657 (2018).
"""

import importlib

from drm.checkpoint import load_model, save_model
from drm.config import (
    AvgPoolSpec,
    ConvSpec,
    DenseSpec,
    FlattenSpec,
    MaxPoolSpec,
    ModelConfig,
    SwitchSpec,
    lenet_config,
)
from drm.deep_model import DeepRenderingModel, Latents
from drm.em import DiscriminativeEM, GenerativeEM
from drm.inference import frozen_scores, max_sum
from drm.levels import AvgPool, Classes, Conv, Dense, Flatten, Level, MaxPool, Switch
from drm.model import (
    log_joint,
    logit_offset,
    render,
    rendering_terms,
    top_down,
)
from drm.reference import exact_map, num_configurations
from drm.sampling import Sample, sample
from drm.semisupervised import LossWeights, SemiSupervisedEM
from drm.shallow import ShallowConfig, ShallowRenderingModel
from drm.shallow_em import ShallowEM

__all__ = [
    "AvgPool",
    "AvgPoolSpec",
    "Classes",
    "Conv",
    "ConvSpec",
    "DeepRenderingModel",
    "Dense",
    "DiscriminativeEM",
    "DenseSpec",
    "Flatten",
    "FlattenSpec",
    "GenerativeEM",
    "Latents",
    "Level",
    "LossWeights",
    "MaxPool",
    "MaxPoolSpec",
    "ModelConfig",
    "Sample",
    "SemiSupervisedEM",
    "ShallowConfig",
    "ShallowEM",
    "ShallowRenderingModel",
    "Switch",
    "SwitchSpec",
    "exact_map",
    "frozen_scores",
    "lenet_config",
    "load_model",
    "log_joint",
    "logit_offset",
    "max_sum",
    "num_configurations",
    "render",
    "rendering_terms",
    "sample",
    "save_model",
    "top_down",
]

# The submodules are attributes of the package once asked for (`drm.checkpoint` after
# `import drm`), imported on first use so that `import drm` stays light (pyro is loaded
# only by drm.pyro_model).
SUBMODULES = (
    "averaging",
    "checkpoint",
    "checks",
    "config",
    "data",
    "deep_model",
    "distributed",
    "em",
    "inference",
    "level_objective",
    "levels",
    "m_steps",
    "model",
    "pyro_model",
    "reference",
    "refine",
    "sampling",
    "semisupervised",
    "semisupervised_terms",
    "shallow",
    "shallow_cnn",
    "shallow_config",
    "shallow_em",
    "shallow_init",
)


def __getattr__(name: str) -> object:
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
