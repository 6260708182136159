"""The neural-net view of the Deep Rendering Model: the equivalent CNN and the parameter mapping.

    to_cnn(model) -> EquivalentCNN       the CNN whose forward pass is max-sum in `model`
    to_drm(cnn, sigma2=1.0) -> model     the rendering model of a torch CNN (any traceable chain)
    compare_views(model, x) -> report    agreement of the two views and the inference gap
    cnn_equiv.visualize, cnn_equiv.attacks  visualising and breaking a CNN through both views

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

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
