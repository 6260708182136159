"""The Deep Rendering Model as a Pyro program with enumerated discrete latents (E5).

`pyro_program(model)` writes the same tiny DRM as a Pyro model over a batch of images: for every
image (one `pyro.plate`), the class c and every latent unit (one switch a_j or one translation t_u
per sample site) are drawn from UNIFORM categoricals marked for parallel enumeration; the CNN
prior (DESIGN section 3, docs/equivalence.md eq. 4) enters as a factor,

    pyro.factor("cnn_prior", log pi_c + sum_l <b^(l), v^(l)> + ||mu(c, z)||^2 / (2 sigma^2)),

and the image is observed under Normal(mu(c, z), sigma). The uniform proposals add the constant
-log C - sum_u log K_u (K_u = states of unit u) to every configuration, so the log-density of the
program is `drm.log_joint` shifted by a constant: its MAP is the model's MAP.

Pyro enumerates each site in its own tensor dimension (to the left of the plate), so the program
assembles each level's latent from the broadcast unit values, flattens the enumeration batch for
`drm.model.rendering_terms` (the same top-down rendering every other oracle uses), and reshapes
back. Every configuration is materialised at once: tiny models only (about 20 latent units; torch
tensors have at most 64 dimensions).

Two exact inferences check the brute-force oracle `drm.exact_map` from an independent code path:
    pyro_map(model, x)            Viterbi-style MAP by `pyro.infer.infer_discrete(temperature=0)`.
    pyro_max_marginals(model, x)  max_z log p(x, c, z) per class by the max-product contraction
                                  `pyro.ops.contract.einsum` with the backend
                                  "pyro.ops.einsum.torch_map" (forward max-sum).

References:
    Patel, Nguyen, Baraniuk, A Probabilistic Theory of Deep Learning, arXiv:1504.00641 (2015).
    Patel, Nguyen, Baraniuk, A Probabilistic Framework for Deep Learning, NIPS 2016.
    Ho, Nguyen, Patel et al., Neural Rendering Model, arXiv:1811.02657 (2018) (the CNN prior).
    Obermeyer, Bingham, Jankowiak, Chen, Pradhan, Goodman, Tensor Variable Elimination for
    Plated Factor Graphs, ICML 2019 (Pyro's enumeration and `pyro.ops.contract`).
    Pyro documentation: `pyro.infer.discrete.infer_discrete`, `pyro.ops.contract.einsum`,
    https://docs.pyro.ai/en/stable/inference_algos.html#discrete-inference and
    https://docs.pyro.ai/en/stable/ops.html#module-pyro.ops.contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate, infer_discrete
from pyro.ops.contract import einsum
from pyro.poutine.runtime import InferDict
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from drm.checks import check_images
from drm.model import DeepRenderingModel, Latents, unchecked_rendering_terms
from drm.reference import num_configurations

# Pyro puts every enumerated site in its own tensor dimension; with the image plate, the event
# dims of the observation and the enumerated rendering, 20 units is far below torch's 64-dim limit
# and keeps the enumerated tensors (classes x configurations x pixels) small.
DEFAULT_MAX_LATENT_UNITS = 20
# Latent configurations (classes not counted, as `drm.num_configurations`). Every one is rendered
# at once, once for all images (classes x configurations x (pixels + hidden units)); the Gaussian
# term adds classes x configurations x pixels per image.
DEFAULT_MAX_CONFIGURATIONS = 100_000

CLASS_SITE = "c"
PRIOR_SITE = "cnn_prior"
IMAGE_SITE = "x"
PLATE = "images"
# The plate takes dim -1; enumeration uses every dim to its left.
_PLATE_DIM = -1
_FIRST_ENUM_DIM = -2
_MAP_BACKEND = "pyro.ops.einsum.torch_map"

Program = Callable[[Tensor], None]


def unit_site(level: int, unit: int) -> str:
    """The sample-site name of unit `unit` (flat, as in `latent_counts`) of `levels[level]`."""
    return f"level{level}.unit{unit}"


def check_enumerable(
    model: DeepRenderingModel,
    max_latent_units: int = DEFAULT_MAX_LATENT_UNITS,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
) -> dict[int, list[int]]:
    """The states of every latent unit, per latent level; ValueError if too big to enumerate.

    Returns:
        counts: {level index: [K_u for each unit u of that level]}, in `model.latent_levels` order.
    """
    counts = {i: [int(k) for k in model.levels[i].latent_counts()] for i in model.latent_levels}
    units = sum(len(c) for c in counts.values())
    if units > max_latent_units:
        per_level = ", ".join(
            f"levels[{i}] ({type(model.levels[i]).__name__}): {len(c)}" for i, c in counts.items()
        )
        raise ValueError(
            f"the model has {units} latent units ({per_level}), above max_latent_units="
            f"{max_latent_units}: Pyro enumerates each unit in its own tensor dimension, so the "
            "Pyro program is for tiny models only"
        )
    total = num_configurations(model)
    if total > max_configurations:
        raise ValueError(
            f"the model has {total} latent configurations, above max_configurations="
            f"{max_configurations}: the enumerated Pyro program renders every one at once"
        )
    return counts


def pyro_program(
    model: DeepRenderingModel,
    max_latent_units: int = DEFAULT_MAX_LATENT_UNITS,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
) -> Program:
    """The DRM as a Pyro model over images x: (B, C0, H, W), with enumerable discrete latents.

    Sites, inside `pyro.plate("images", B, dim=-1)`: "c" ~ Categorical(uniform over C classes);
    "level{i}.unit{u}" ~ Categorical(uniform over K_u states) for every unit u of every latent
    level i (u indexes `levels[i].latent_counts()`; a window with fewer valid cells has fewer
    states); the factor "cnn_prior" = log pi_c + sum_l <b^(l), v^(l)> + ||mu||^2 / (2 sigma^2);
    and "x" ~ Normal(mu(c, z), sigma), observed. Every discrete site is marked
    ``infer={"enumerate": "parallel"}``; run it under `poutine.enum(first_available_dim=-2)`.

    Args:
        model: a tiny rendering model.
        max_latent_units: refuse (ValueError) models with more latent units.
        max_configurations: refuse (ValueError) models with more latent configurations.

    Returns:
        program: a callable taking x (B, C0, H, W) and returning None.
    """
    return _program(model, check_enumerable(model, max_latent_units, max_configurations))


def _program(model: DeepRenderingModel, counts: dict[int, list[int]]) -> Program:
    """`pyro_program` from the latent units' state counts of `check_enumerable`."""
    num_classes = model.num_classes

    def program(x: Tensor) -> None:
        x = check_images(model, x)
        enumerate_: InferDict = {"enumerate": "parallel"}
        with pyro.plate(PLATE, x.shape[0], dim=_PLATE_DIM):
            c = pyro.sample(
                CLASS_SITE, dist.Categorical(logits=x.new_zeros(num_classes)), infer=enumerate_
            )
            units: dict[int, list[Tensor]] = {
                i: [
                    pyro.sample(
                        unit_site(i, u), dist.Categorical(logits=x.new_zeros(k)), infer=enumerate_
                    )
                    for u, k in enumerate(level_counts)
                ]
                for i, level_counts in counts.items()
            }
            # Enumerated: each value is (K, 1, ..., 1), K in its own dim left of the plate;
            # sampled or replayed by infer_discrete: (B,) (() when B = 1). S broadcasts them all.
            batch_shape = torch.broadcast_shapes(
                c.shape, *(v.shape for values in units.values() for v in values)
            )
            n = math.prod(batch_shape)
            latents: list[Tensor | None] = [None] * len(model.levels)
            for i, values in units.items():
                digits = torch.stack([v.expand(batch_shape) for v in values], -1)  # (*S, U)
                latents[i] = model.levels[i].latent_from_digits(digits.reshape(n, len(values)))
            classes = c.expand(batch_shape).reshape(n)
            mu, log_prior = unchecked_rendering_terms(model, classes, tuple(latents))
            mu = mu.view(*batch_shape, *model.input_shape)  # (*S, C0, H, W)
            energy = (mu**2).sum((-3, -2, -1)) / (2 * model.sigma2)  # (*S,)
            pyro.factor(PRIOR_SITE, log_prior.view(batch_shape) + energy)
            pyro.sample(IMAGE_SITE, dist.Normal(mu, model.sigma2.sqrt()).to_event(3), obs=x)

    return program


def proposal_log_prob(model: DeepRenderingModel) -> float:
    """-log C - sum_u log K_u: what the uniform proposals add to every configuration."""
    total = -math.log(model.num_classes)
    for i in model.latent_levels:
        total -= float(model.levels[i].latent_counts().double().log().sum())
    return total


def pyro_map(
    model: DeepRenderingModel,
    x: Tensor,
    max_latent_units: int = DEFAULT_MAX_LATENT_UNITS,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
) -> tuple[Tensor, Latents]:
    """The joint MAP (c, z) of each image by `infer_discrete(temperature=0)` (max-product).

    Args:
        model: a tiny rendering model (see `pyro_program` for the limits).
        x: (B, C0, H, W) images.

    Returns:
        classes: (B,) int64, the MAP class of each image.
        latents: the MAP latents of B images in the library's format (one entry per level, None
            for levels without a latent), maximising `drm.log_joint` jointly with `classes`.
    """
    x = check_images(model, x)
    counts = check_enumerable(model, max_latent_units, max_configurations)
    program = _program(model, counts)
    decoder = infer_discrete(
        config_enumerate(program), first_available_dim=_FIRST_ENUM_DIM, temperature=0
    )
    with torch.no_grad():
        trace = poutine.trace(decoder).get_trace(x)
    batch = x.shape[0]

    def value(name: str) -> Tensor:
        # (B,), or () / (1,) for a plate of one image. A site with ONE state is never gathered
        # (its size-1 enumeration dim is packed away), so it keeps the enumerated (1, ..., 1).
        return trace.nodes[name]["value"].reshape(-1).expand(batch).long()  # (B,)

    latents: list[Tensor | None] = [None] * len(model.levels)
    for i, level_counts in counts.items():
        digits = torch.stack([value(unit_site(i, u)) for u in range(len(level_counts))], -1)
        latents[i] = model.levels[i].latent_from_digits(digits)  # from (B, U)
    return value(CLASS_SITE), tuple(latents)


def pyro_max_marginals(
    model: DeepRenderingModel,
    x: Tensor,
    max_latent_units: int = DEFAULT_MAX_LATENT_UNITS,
    max_configurations: int = DEFAULT_MAX_CONFIGURATIONS,
) -> Tensor:
    """max_z log p(x, c, z) (+ log Z) for every class, by Pyro's max-product contraction.

    Traces the enumerated program, packs each site's log-probability with its enumeration dims,
    and contracts every factor down to the class dim (and the image plate) with the forward
    max-sum ring `pyro.ops.einsum.torch_map`. The uniform proposals' constant is added back, so
    the result is on the scale of `drm.log_joint` and compares directly with `drm.exact_map`.

    Args:
        model: a tiny rendering model (see `pyro_program` for the limits).
        x: (B, C0, H, W) images.

    Returns:
        scores: (B, C), max over z of `drm.log_joint(model, x, c, z)`.
    """
    x = check_images(model, x)
    program = pyro_program(model, max_latent_units, max_configurations)
    with torch.no_grad():
        enumerated = poutine.enum(program, first_available_dim=_FIRST_ENUM_DIM)
        # The plate's own (subsample) site carries no factor: drop it, as infer_discrete does.
        trace = prune_subsample_sites(poutine.trace(enumerated).get_trace(x))
        trace.compute_log_prob()
        trace.pack_tensors()
        plate = trace.plate_to_symbol[PLATE]
        class_infer = trace.nodes[CLASS_SITE]["infer"]
        assert class_infer is not None
        target = class_infer["_enumerate_symbol"]
        operands: list[Tensor] = [
            node["packed"]["log_prob"] for node in trace.nodes.values() if node["type"] == "sample"
        ]
        # pack_tensors squeezes size-1 dims and names each remaining dim by a symbol.
        inputs: list[str] = [t._pyro_dims for t in operands]  # type: ignore[attr-defined]
        # A plate of size 1 is packed away: keep its symbol only where it survives.
        output = target + plate if any(plate in dims for dims in inputs) else target
        equation = ",".join(inputs) + "->" + output
        (scores,) = einsum(
            equation, *operands, plates=plate, backend=_MAP_BACKEND, modulo_total=True
        )
    scores = scores.reshape(model.num_classes, -1).T  # (C, B) or (C,) -> (B, C)
    return scores - proposal_log_prob(model)


__all__ = [
    "CLASS_SITE",
    "DEFAULT_MAX_CONFIGURATIONS",
    "DEFAULT_MAX_LATENT_UNITS",
    "IMAGE_SITE",
    "PLATE",
    "PRIOR_SITE",
    "check_enumerable",
    "proposal_log_prob",
    "pyro_map",
    "pyro_max_marginals",
    "pyro_program",
    "unit_site",
]
