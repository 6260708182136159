"""The identities on real handwritten digits (scikit-learn's 8x8 digits), with a trained CNN.

A small CNN is trained by plain torch SGD (a few seconds), imported with `to_drm`, and the
identities E1, E2 and E6 are checked on real test digits; E3 is checked on real 4x4 patches.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import drm
from cnn_equiv import comparison_report, record_latents, to_drm
from drm.data import load_digits
from tests.architectures import TINY_ARCHITECTURES, build, fit_digits

IDENTITY_TOL = 1e-10


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Sequential, drm.data.Dataset]:
    data = load_digits().to(torch.float64)
    torch.manual_seed(61)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.LeakyReLU(0.05),
        nn.Linear(32, 10),
    ).double()
    fit_digits(cnn, data, steps=120, seed=62)
    return cnn.eval(), data


def test_trained_cnn_is_a_real_classifier(trained: tuple[nn.Sequential, drm.data.Dataset]) -> None:
    cnn, data = trained
    with torch.no_grad():
        accuracy = (cnn(data.x_test).argmax(1) == data.y_test).double().mean()
    assert accuracy > 0.85  # observed ~0.95; the identities below are about a real classifier


def test_identities_on_real_digits(trained: tuple[nn.Sequential, drm.data.Dataset]) -> None:
    cnn, data = trained
    model = to_drm(cnn, sigma2=0.1, input_shape=(1, 8, 8))
    x = data.x_test[:300]
    shift = torch.logsumexp(cnn[-1].bias.detach(), 0)
    scores, latents = drm.max_sum(model, x)
    seen = record_latents(cnn, x)
    # E2: max-sum is the forward pass (up to the prior constant of eq. 12), same latents
    torch.testing.assert_close(scores.detach() + shift, seen.logits, atol=IDENTITY_TOL, rtol=0)
    switches = [
        z for lv, z in zip(model.levels, latents, strict=True) if isinstance(lv, drm.Switch)
    ]
    assert all(torch.equal(a, b) for a, b in zip(switches, seen.switches, strict=True))
    # E1 at the CNN's latents, for the true class
    lj = drm.log_joint(model, x, data.y_test[:300], latents) + drm.logit_offset(model, x)
    torch.testing.assert_close(
        lj.detach(),
        scores.gather(1, data.y_test[:300, None])[:, 0].detach(),
        atol=IDENTITY_TOL,
        rtol=0,
    )
    # E6: the rendering of the true class divided by sigma^2 is the logit's input gradient
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(cnn(xg).gather(1, data.y_test[:300, None]).sum(), xg)
    rendered = drm.render(model, data.y_test[:300], latents).detach()
    torch.testing.assert_close(rendered / 0.1, grad, atol=IDENTITY_TOL, rtol=0)
    report = comparison_report(model, x, cnn=cnn)
    assert report.prediction_agreement == 1.0 and report.max_abs_logit_difference < IDENTITY_TOL


def test_exact_inference_on_real_digit_patches() -> None:
    """E3 on real pixels: central 4x4 patches of the digits, a tiny non-negative model."""
    data = load_digits().to(torch.float64)
    patches = data.x_test[:8, :, 2:6, 2:6].contiguous()
    model = build(TINY_ARCHITECTURES["padding-stride"], seed=63, nonnegative=True)
    with torch.no_grad():
        scores, _ = drm.max_sum(model, patches)
        exact, _ = drm.exact_map(model, patches)
    torch.testing.assert_close(
        exact + drm.logit_offset(model, patches)[:, None], scores, atol=IDENTITY_TOL, rtol=0
    )
