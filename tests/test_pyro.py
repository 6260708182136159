"""E5: the DRM as a Pyro program agrees with brute-force enumeration (`drm.exact_map`).

On tiny models (at most 16 latent units, a few thousand configurations) covering conv padding
and stride, overlapping and padded max-pooling (windows with fewer valid cells), LeakyReLU, average
pooling and a dense level with a switch, with signed upper templates and with non-negative ones:
  * Pyro's max-product contraction (`torch_map` ring) gives exactly the brute-force max-marginals;
  * `infer_discrete(temperature=0)` returns a joint MAP: its log-joint is the brute-force maximum,
    its class the brute-force class, and its top-down rendering that of the brute-force latents;
  * the program's log-density is `drm.log_joint` plus the uniform proposals' constant;
  * with non-negative upper templates Pyro equals the CNN (E3), with signed ones it exceeds it
    somewhere (E4), so the agreement above is not the CNN's agreement in disguise.
"""

from __future__ import annotations

import pytest
import torch
from pyro import poutine

import drm
from drm.model import top_down
from drm.pyro_model import (
    CLASS_SITE,
    DEFAULT_MAX_LATENT_UNITS,
    IMAGE_SITE,
    PRIOR_SITE,
    proposal_log_prob,
    pyro_map,
    pyro_max_marginals,
    pyro_program,
    unit_site,
)
from drm.reference import num_configurations
from tests.architectures import images, make_nonnegative

# float64 identities between two exact computations of the same max (sums of ~100 terms).
PYRO_TOL = 1e-9
# The best class must beat the runner-up by this much for "same MAP class" to be well posed.
CLASS_MARGIN = 1e-6
# Each signed model must show max-sum strictly below the exact max somewhere (observed: 0.8-3.6).
MIN_GAP = 0.1
BATCH = 3

PYRO_ARCHITECTURES = {
    # conv with padding and stride, a non-overlapping pool, a LeakyReLU dense level; 2 channels.
    "conv_pad_stride": drm.ModelConfig(
        input_shape=(2, 4, 4),
        num_classes=3,
        levels=(
            drm.ConvSpec(1, (3, 3), stride=(2, 2), padding=(1, 1)),
            drm.SwitchSpec(),
            drm.MaxPoolSpec((2, 2)),
            drm.FlattenSpec(),
            drm.DenseSpec(2),
            drm.SwitchSpec(negative_slope=0.1),
        ),
    ),
    # overlapping windows (kernel 2, stride 1): two pooled units may render onto one cell.
    "overlapping_pool_leaky": drm.ModelConfig(
        input_shape=(1, 3, 4),
        num_classes=3,
        sigma2=0.5,
        levels=(
            drm.ConvSpec(1, (2, 2)),
            drm.SwitchSpec(negative_slope=0.1),
            drm.MaxPoolSpec((2, 2), stride=(1, 1)),
            drm.FlattenSpec(),
        ),
    ),
    # padded overlapping pool: corner windows hold 1 valid cell, edges 2, the centre 4.
    "padded_pool": drm.ModelConfig(
        input_shape=(1, 3, 3),
        num_classes=2,
        levels=(
            drm.ConvSpec(1, (2, 2)),
            drm.SwitchSpec(),
            drm.MaxPoolSpec((2, 2), stride=(1, 1), padding=(1, 1)),
            drm.FlattenSpec(),
        ),
    ),
    # average pooling (a latent-free linear rendering) between two switched levels.
    "avgpool_dense": drm.ModelConfig(
        input_shape=(1, 4, 4),
        num_classes=3,
        sigma2=2.0,
        levels=(
            drm.ConvSpec(2, (3, 3)),
            drm.SwitchSpec(),
            drm.AvgPoolSpec((2, 2)),
            drm.FlattenSpec(),
            drm.DenseSpec(3),
            drm.SwitchSpec(),
        ),
    ),
}
SIGNS = ("signed", "nonnegative")


def make_model(name: str, sign: str, seed: int = 0) -> drm.DeepRenderingModel:
    """A float64 model; "nonnegative" takes |W| for every template above the first latent level."""
    model = drm.DeepRenderingModel.from_config(
        PYRO_ARCHITECTURES[name], seed=seed, dtype=torch.float64
    )
    # Scale the class templates up so the classes are well separated on random images.
    with torch.no_grad():
        model.classes.weight.mul_(3.0)
    if sign == "nonnegative":
        make_nonnegative(model)  # includes the class templates
    return model


def test_architectures_are_tiny_and_varied() -> None:
    for name in PYRO_ARCHITECTURES:
        for sign in SIGNS:
            model = make_model(name, sign)
            units = sum(model.levels[i].latent_counts().numel() for i in model.latent_levels)
            assert units <= 16, name
            assert num_configurations(model) <= 4096, name
            assert (model.exactness_violations() == []) == (sign == "nonnegative"), name


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("name", list(PYRO_ARCHITECTURES))
def test_max_marginals_equal_brute_force(name: str, sign: str) -> None:
    model = make_model(name, sign)
    x = images(model, BATCH, seed=1)
    expected, _ = drm.exact_map(model, x)
    scores = pyro_max_marginals(model, x)
    assert scores.shape == (BATCH, model.num_classes)
    torch.testing.assert_close(scores, expected, rtol=0.0, atol=PYRO_TOL)
    # One image: Pyro packs the size-1 plate away, a different code path.
    torch.testing.assert_close(
        pyro_max_marginals(model, x[:1]), expected[:1], rtol=0.0, atol=PYRO_TOL
    )


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("name", list(PYRO_ARCHITECTURES))
def test_map_achieves_brute_force_maximum(name: str, sign: str) -> None:
    model = make_model(name, sign)
    x = images(model, BATCH, seed=1)
    scores, _ = drm.exact_map(model, x)
    best = scores.topk(2, dim=1).values
    assert bool((best[:, 0] - best[:, 1] > CLASS_MARGIN).all()), "class tie: pick another seed"

    classes, latents = pyro_map(model, x)
    drm.checks.check_latents(model, latents, BATCH)
    assert torch.equal(classes, scores.argmax(1))
    with torch.no_grad():
        torch.testing.assert_close(
            drm.log_joint(model, x, classes, latents), best[:, 0], rtol=0.0, atol=PYRO_TOL
        )
        # Latents may differ from the brute-force arg-max only where they change nothing (a
        # switch or a window that receives no signal): the rendering at every level is the same.
        _, brute_latents = drm.exact_map(model, x, classes)
        for ours, theirs in zip(
            top_down(model, classes, latents), top_down(model, classes, brute_latents), strict=True
        ):
            torch.testing.assert_close(ours, theirs, rtol=0.0, atol=PYRO_TOL)


@pytest.mark.parametrize("name", list(PYRO_ARCHITECTURES))
def test_nonnegative_pyro_equals_cnn(name: str) -> None:
    """E3 through Pyro: with non-negative top-down signals, max-sum (the CNN) is exact."""
    model = make_model(name, "nonnegative")
    x = images(model, BATCH, seed=1)
    cnn_scores, _ = drm.max_sum(model, x)
    with torch.no_grad():
        expected = cnn_scores - drm.logit_offset(model, x)[:, None]
    torch.testing.assert_close(pyro_max_marginals(model, x), expected, rtol=0.0, atol=PYRO_TOL)


@pytest.mark.parametrize("name", list(PYRO_ARCHITECTURES))
def test_signed_models_have_an_inference_gap(name: str) -> None:
    """E4 through Pyro, and the power of the tests above: with signed upper templates the CNN is
    a strict lower bound on these images, so agreeing with brute force is not agreeing with it."""
    model = make_model(name, "signed")
    x = images(model, BATCH, seed=1)
    cnn_scores, _ = drm.max_sum(model, x)
    with torch.no_grad():
        gap = pyro_max_marginals(model, x) - (cnn_scores - drm.logit_offset(model, x)[:, None])
    assert float(gap.min()) >= -PYRO_TOL
    assert float(gap.max()) > MIN_GAP


@pytest.mark.parametrize("name", list(PYRO_ARCHITECTURES))
def test_program_density_is_log_joint_plus_constant(name: str) -> None:
    """Conditioned on any (c, z), the program's log-density is log_joint + the proposals."""
    model = make_model(name, "signed")
    x = images(model, BATCH, seed=1)
    generator = torch.Generator().manual_seed(2)
    classes = torch.randint(model.num_classes, (BATCH,), generator=generator)
    data = {CLASS_SITE: classes}
    latents: list[torch.Tensor | None] = [None] * len(model.levels)
    for i in model.latent_levels:
        level = model.levels[i]
        counts = level.latent_counts()  # (U,)
        digits = (torch.rand(BATCH, counts.numel(), generator=generator) * counts).long()
        latents[i] = level.latent_from_digits(digits)
        data.update({unit_site(i, u): digits[:, u] for u in range(counts.numel())})
    conditioned = poutine.condition(pyro_program(model), data=data)
    with torch.no_grad():
        trace = poutine.trace(conditioned).get_trace(x)
        trace.compute_log_prob()
        sites = [CLASS_SITE, PRIOR_SITE, IMAGE_SITE, *(n for n in data if n != CLASS_SITE)]
        density = sum(trace.nodes[n]["log_prob"] for n in sites)
        expected = drm.log_joint(model, x, classes, tuple(latents)) + proposal_log_prob(model)
    assert isinstance(density, torch.Tensor)
    torch.testing.assert_close(density, expected, rtol=0.0, atol=PYRO_TOL)


def test_refuses_too_many_latent_units() -> None:
    config = drm.ModelConfig(
        input_shape=(1, 6, 6),
        num_classes=2,
        levels=(drm.ConvSpec(1, (2, 2)), drm.SwitchSpec(), drm.FlattenSpec()),
    )
    model = drm.DeepRenderingModel.from_config(config, dtype=torch.float64)
    assert DEFAULT_MAX_LATENT_UNITS < 25
    x = images(model, 1, seed=1)
    with pytest.raises(ValueError, match="25 latent units"):
        pyro_program(model)
    with pytest.raises(ValueError, match="25 latent units"):
        pyro_map(model, x)
    with pytest.raises(ValueError, match="25 latent units"):
        pyro_max_marginals(model, x)
    # Raising the limit is allowed; then the configuration count is the next guard.
    with pytest.raises(ValueError, match="33554432 latent configurations"):
        pyro_program(model, max_latent_units=25)


def test_refuses_too_many_configurations() -> None:
    model = make_model("padded_pool", "signed")
    total = num_configurations(model)
    with pytest.raises(ValueError, match=f"{total} latent configurations"):
        pyro_max_marginals(model, images(model, BATCH, seed=1), max_configurations=total - 1)


def test_rejects_unbatched_image() -> None:
    model = make_model("padded_pool", "signed")
    with pytest.raises(ValueError, match="must have shape"):
        pyro_map(model, images(model, BATCH, seed=1)[0])
