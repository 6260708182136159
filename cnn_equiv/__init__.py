"""The neural-net view of the Deep Rendering Model: the equivalent CNN and the parameter mapping.

    to_cnn(model) -> EquivalentCNN         the CNN whose forward pass is max-sum in `model`
    to_drm(cnn, sigma2=1.0) -> model       the rendering model of a torch CNN (any traceable chain)
    comparison_report(model, x) -> report  agreement of the two views and the inference gap
    inference_gap(model, x, scores)        exact MAP score minus max-sum score, on tiny models

Visualising a CNN through both views, one module per tool (`cnn_equiv.visualize` re-exports
them all): `cnn_equiv.projections`, `cnn_equiv.class_models`, `cnn_equiv.units`,
`cnn_equiv.inversion`. Breaking it: `cnn_equiv.attacks`; what the DRM sees in the broken images:
`cnn_equiv.detection`.

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
"""

import importlib
import warnings

from cnn_equiv.cnn import CNNLatents, EquivalentCNN, record_latents
from cnn_equiv.compare import ComparisonReport, comparison_report, inference_gap
from cnn_equiv.mapping import (
    SUPPORTED_LAYERS,
    LinearClassifier,
    to_cnn,
    to_drm,
    to_linear_classifier,
)
from cnn_equiv.sgd import SGDTrainer

__all__ = [
    "SUPPORTED_LAYERS",
    "CNNLatents",
    "ComparisonReport",
    "EquivalentCNN",
    "LinearClassifier",
    "SGDTrainer",
    "comparison_report",
    "inference_gap",
    "record_latents",
    "to_cnn",
    "to_drm",
    "to_linear_classifier",
]

# The submodules are attributes of the package once asked for (`cnn_equiv.attacks` after
# `import cnn_equiv`), imported on first use so that `import cnn_equiv` stays light (pyro is loaded
# only by drm.pyro_model).
SUBMODULES = (
    "attacks",
    "class_models",
    "cnn",
    "compare",
    "detection",
    "inversion",
    "mapping",
    "projections",
    "sgd",
    "tracing",
    "units",
    "visualize",
)


def __getattr__(name: str) -> object:
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "compare_views":  # the old name, which experiments/compare_views.py also has
        warnings.warn(
            "cnn_equiv.compare_views is now cnn_equiv.comparison_report",
            DeprecationWarning,
            stacklevel=2,
        )
        return comparison_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
