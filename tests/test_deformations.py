"""The consistency term's deformations (`drm.semisupervised_terms.deform`) against oracles.

Oracles: `translate` (whole-pixel shifts), a loop of explicit bilinear interpolation, the
rotation / scale / shear / elastic formulas one parameter at a time, a uniformity test of the
content hash, and the consistency term's KL written out with the deformed images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

import drm
from drm.semisupervised import UNLABELLED, LossWeights, SemiSupervisedEM
from drm.semisupervised_terms import (
    DEFORMATION_PARAMETERS,
    DEFORMATION_SCALES,
    content_uniforms,
    deform,
    source_coordinates,
    translate,
    warp,
)
from tests.architectures import ARCHITECTURES, build, images

IDENTITY_TOL = 1e-10  # float64 identities
PARAMETERS = DEFORMATION_PARAMETERS  # uniforms per image that `deform` draws


def pixel_grid(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, H, W, 2) float64: each pixel's own (row, col)."""
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    return torch.stack([rows, cols], -1).expand(batch, height, width, 2)


def neutral(batch: int) -> torch.Tensor:
    """Uniforms that map to no transformation at all (a = 2u - 1 = 0)."""
    return torch.full((batch, PARAMETERS), 0.5, dtype=torch.float64)


def test_warp_at_whole_pixels_is_translate() -> None:
    generator = torch.Generator().manual_seed(80)
    x = torch.rand(4, 2, 7, 9, generator=generator, dtype=torch.float64)
    shifts = torch.tensor([[0, 0], [1, -2], [-2, 2], [3, 1]])
    coordinates = pixel_grid(4, 7, 9) - shifts[:, None, None, :].double()
    torch.testing.assert_close(
        warp(x, coordinates), translate(x, shifts), atol=IDENTITY_TOL, rtol=0
    )


def test_warp_is_bilinear_interpolation_with_zeros_outside() -> None:
    """Oracle: the four neighbours of each sample point, weighted by area, zero off the image."""
    generator = torch.Generator().manual_seed(81)
    x = torch.rand(2, 1, 5, 6, generator=generator, dtype=torch.float64)
    coordinates = torch.rand(2, 5, 6, 2, generator=generator, dtype=torch.float64) * 8 - 1.5
    ours = warp(x, coordinates).numpy()
    image, points = x.numpy(), coordinates.numpy()

    def pixel(b: int, r: int, c: int) -> float:
        return float(image[b, 0, r, c]) if 0 <= r < 5 and 0 <= c < 6 else 0.0

    for b, i, j in np.ndindex(2, 5, 6):
        r, c = points[b, i, j]
        r0, c0 = math.floor(r), math.floor(c)
        fr, fc = r - r0, c - c0
        expected = (
            (1 - fr) * (1 - fc) * pixel(b, r0, c0)
            + (1 - fr) * fc * pixel(b, r0, c0 + 1)
            + fr * (1 - fc) * pixel(b, r0 + 1, c0)
            + fr * fc * pixel(b, r0 + 1, c0 + 1)
        )
        assert ours[b, 0, i, j] == pytest.approx(expected, abs=IDENTITY_TOL)


def test_each_parameter_moves_the_pixels_by_its_formula() -> None:
    """One parameter at a time, at its extreme (a = 1), against the written-out map."""
    height, width, strength, shift = 6, 8, 1.7, 2.0
    centre = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=torch.float64)
    grid = pixel_grid(1, height, width)[0]  # (H, W, 2)
    d_row, d_col = grid[..., 0] - centre[0], grid[..., 1] - centre[1]

    def coordinates(index: slice | int) -> torch.Tensor:
        u = neutral(1)
        u[0, index] = 1.0  # a = 1
        return source_coordinates(u, height, width, shift, strength)[0]

    torch.testing.assert_close(  # nothing drawn: every pixel samples itself
        source_coordinates(neutral(1), height, width, shift, strength)[0], grid
    )
    torch.testing.assert_close(coordinates(slice(0, 2)), grid - shift)  # translation
    angle = math.radians(DEFORMATION_SCALES["rotation_degrees"]) * strength
    rotated = torch.stack(
        [
            centre[0] + math.sin(angle) * d_col + math.cos(angle) * d_row,
            centre[1] + math.cos(angle) * d_col - math.sin(angle) * d_row,
        ],
        -1,
    )
    torch.testing.assert_close(coordinates(2), rotated, atol=IDENTITY_TOL, rtol=0)
    scale = 1 + DEFORMATION_SCALES["scale"] * strength
    torch.testing.assert_close(coordinates(3), centre + scale * (grid - centre))
    sheared = torch.stack([grid[..., 0], centre[1] + d_col + DEFORMATION_SCALES["shear"]
                           * strength * d_row], -1)  # fmt: skip
    torch.testing.assert_close(coordinates(4), sheared, atol=IDENTITY_TOL, rtol=0)
    # every control point displaced alike: the bicubic field is that constant everywhere
    displaced = grid + DEFORMATION_SCALES["elastic_pixels"] * strength
    torch.testing.assert_close(coordinates(slice(5, None)), displaced)
    # at strength 0 only the translation is left
    u = torch.rand(3, PARAMETERS, generator=torch.Generator().manual_seed(82), dtype=torch.float64)
    moved = pixel_grid(3, height, width) - (2 * u[:, None, None, 0:2] - 1) * shift
    torch.testing.assert_close(source_coordinates(u, height, width, shift, 0.0), moved)


def test_content_uniforms_do_not_depend_on_the_batch_and_look_uniform() -> None:
    x = images(build(ARCHITECTURES["leaky"], seed=83), 12, seed=84).sigmoid()
    u = content_uniforms(x, offset=77, count=PARAMETERS)
    assert u.shape == (12, PARAMETERS) and u.dtype == torch.float64
    assert float(u.min()) >= 0 and float(u.max()) < 1
    for part in (slice(0, 5), slice(5, 12), slice(3, 4)):  # a shard draws its images' alike
        assert torch.equal(content_uniforms(x[part], offset=77, count=PARAMETERS), u[part])
    assert not torch.equal(content_uniforms(x, offset=78, count=PARAMETERS), u)  # another step
    many = torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(85))
    drawn = content_uniforms(many, offset=5, count=PARAMETERS)
    assert scipy.stats.kstest(drawn.flatten().numpy(), "uniform").pvalue > 1e-3
    columns = np.corrcoef(drawn.T.numpy())
    assert np.abs(columns - np.eye(PARAMETERS)).max() < 0.25  # no two parameters move together


def test_deform_is_a_function_of_each_image_and_changes_it() -> None:
    x = images(build(ARCHITECTURES["leaky"], seed=86), 6, seed=87).sigmoid()
    moved = deform(x, offset=3, max_shift=2, strength=1.0)
    assert moved.shape == x.shape
    torch.testing.assert_close(deform(x[2:5], 3, 2, 1.0), moved[2:5], atol=IDENTITY_TOL, rtol=0)
    assert float((moved - x).abs().max()) > 0.1


def test_the_consistency_term_compares_the_deformed_images() -> None:
    """Value against the KL written out with `deform`'s images; 0 turns the deformation off."""
    model = build(ARCHITECTURES["leaky"], seed=88)
    x = images(model, 6, seed=89)
    y = torch.tensor([0, UNLABELLED, 1, UNLABELLED, UNLABELLED, 2])
    trainer = SemiSupervisedEM(model, LossWeights(consistency=1.0), deformation=1.5)
    with torch.no_grad():
        values, _ = trainer.terms(x, y)
        unlabelled = x[y < 0]
        deformed = deform(unlabelled, trainer.translation_offset(), 2, 1.5)
        q = drm.max_sum(model, unlabelled)[0].softmax(1)
        p = drm.max_sum(model, deformed)[0].softmax(1)
        expected = float((q * (q / p).log()).sum(1).mean())
        plain = SemiSupervisedEM(model, LossWeights(consistency=1.0)).terms(x, y)[0]
    assert float(values["consistency"]) == pytest.approx(expected, rel=IDENTITY_TOL)
    plain = plain["consistency"]
    assert float(plain) != pytest.approx(expected, rel=1e-3)
    for bad in (-1.0, math.inf, "1"):
        with pytest.raises(ValueError, match="deformation must be a finite number >= 0"):
            SemiSupervisedEM(model, deformation=bad)  # type: ignore[arg-type]


def test_content_uniforms_refuse_images_too_large_to_hash_exactly() -> None:
    """Past 2^21 values per image the float64 dot products would round: refused, not wrong."""
    with pytest.raises(ValueError, match="values per image is too many"):
        content_uniforms(torch.zeros(1, 1, 1, 2**21), offset=0, count=3)
    assert content_uniforms(torch.zeros(1, 1, 1, 2**21 - 1), offset=0, count=3).shape == (1, 3)
