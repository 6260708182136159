"""The neural-net view of the Deep Rendering Model: the equivalent CNN and the parameter mapping.

    to_cnn(model) -> EquivalentCNN       the CNN whose forward pass is max-sum in `model`
    to_drm(cnn, sigma2=1.0) -> model     the rendering model of a torch CNN (any traceable chain)
    compare_views(model, x) -> report    agreement of the two views and the inference gap
    cnn_equiv.visualize, cnn_equiv.attacks  visualising and breaking a CNN through both views

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

import importlib

from cnn_equiv.cnn import CNNLatents, EquivalentCNN, record_latents
from cnn_equiv.compare import ComparisonReport, compare_views
from cnn_equiv.mapping import SUPPORTED_LAYERS, to_cnn, to_drm
from cnn_equiv.sgd import SGDTrainer

__all__ = [
    "SUPPORTED_LAYERS",
    "CNNLatents",
    "ComparisonReport",
    "EquivalentCNN",
    "SGDTrainer",
    "compare_views",
    "record_latents",
    "to_cnn",
    "to_drm",
]

# The submodules are attributes of the package once asked for (`cnn_equiv.attacks` after
# `import cnn_equiv`), imported on first use so that `import cnn_equiv` stays light (pyro is loaded
# only by drm.pyro_model).
SUBMODULES = ("attacks", "cnn", "compare", "mapping", "sgd", "tracing", "visualize")


def __getattr__(name: str) -> object:
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
