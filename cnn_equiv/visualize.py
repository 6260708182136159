"""Understanding and visualising a CNN, each method computed the neural-net way and the DRM way.

The lecture's section "Understanding and Visualizing CNN" lists four tools; each lives in its own
module, and this module only re-exports their public names (`cnn_equiv.visualize.project` is
`cnn_equiv.projections.project`), so that one import reaches all four:

1. `cnn_equiv.projections`: top-down projection of a class or a unit (`project` with rule "drm",
   "deconvnet" or "guided"; `saliency` by autograd; `Unit`).
2. `cnn_equiv.class_models`: class-score maximisation against the MAP rendering of a class
   (`maximize_class_score`, `map_rendering`, `default_latents`).
3. `cnn_equiv.units`: individual units (`receptive_field`, `receptive_field_support`,
   `bottom_up_to`, `top_patches`, `unit_template`).
4. `cnn_equiv.inversion`: feature inversion (`invert_by_optimization`, `invert_by_rendering`,
   `inversion_report`, `relative_error`, `total_variation`).

The algorithms, their readings in the Deep Rendering Model and the references are in each
module's docstring.
"""

from cnn_equiv.class_models import (
    ClassScoreMaximization,
    MapRendering,
    default_latents,
    map_rendering,
    maximize_class_score,
)
from cnn_equiv.inversion import (
    FeatureInversion,
    InversionTable,
    inversion_report,
    invert_by_optimization,
    invert_by_rendering,
    relative_error,
    total_variation,
)
from cnn_equiv.projections import Unit, project, saliency
from cnn_equiv.units import (
    TopPatches,
    bottom_up_to,
    receptive_field,
    receptive_field_support,
    top_patches,
    unit_template,
)

__all__ = [
    "ClassScoreMaximization",
    "FeatureInversion",
    "InversionTable",
    "MapRendering",
    "TopPatches",
    "Unit",
    "bottom_up_to",
    "default_latents",
    "invert_by_optimization",
    "invert_by_rendering",
    "inversion_report",
    "map_rendering",
    "maximize_class_score",
    "project",
    "receptive_field",
    "receptive_field_support",
    "relative_error",
    "saliency",
    "top_patches",
    "total_variation",
    "unit_template",
]
