"""The comparison report: agreement of the two views, the exactness condition, the gap."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import cnn_equiv
import drm
from cnn_equiv import comparison_report, to_drm
from tests.architectures import ARCHITECTURES, TINY_ARCHITECTURES, build, images

REPORT_TOL = 1e-10


def test_report_on_an_exact_tiny_model() -> None:
    model = build(TINY_ARCHITECTURES["padding-stride"], seed=51, nonnegative=True)
    report = comparison_report(model, images(model, 5, seed=52))
    assert report.max_abs_logit_difference <= REPORT_TOL
    assert report.logit_shift == 0.0
    assert report.prediction_agreement == 1.0
    assert report.switch_agreement == 1.0 and report.translation_agreement == 1.0
    assert report.exactness_condition and report.violations == []
    assert report.inference_gap is not None and report.inference_gap.shape == (5, 3)
    assert float(report.inference_gap.abs().max()) <= REPORT_TOL
    text = report.to_text()
    assert re.search(r"exactness condition \(E3\) holds +yes", text) and "inference gap" in text


def test_report_on_a_signed_tiny_model_shows_the_gap_and_names_the_violation() -> None:
    model = build(TINY_ARCHITECTURES["two-levels"], seed=53)
    report = comparison_report(model, images(model, 5, seed=54))
    assert not report.exactness_condition
    assert any("negative" in v for v in report.violations)
    assert report.inference_gap is not None
    assert float(report.inference_gap.min()) >= -REPORT_TOL
    assert float(report.inference_gap.max()) > 0


def test_report_on_a_large_model_skips_enumeration() -> None:
    model = build(ARCHITECTURES["lenet"])
    report = comparison_report(model, images(model, 4))
    assert report.inference_gap is None and report.num_configurations > 10**100
    assert "~10^" in report.to_text()  # a count too large for a float still prints
    assert report.max_abs_logit_difference <= REPORT_TOL


def test_report_on_a_user_cnn_measures_the_prior_constant_and_the_latents() -> None:
    torch.manual_seed(55)
    cnn = (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Dropout(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3),
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        cnn[6].bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    model = to_drm(cnn, input_shape=(1, 8, 8))
    report = comparison_report(model, images(model, 6, seed=56), cnn=cnn)
    expected_shift = float(torch.logsumexp(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 0))
    assert abs(report.logit_shift - expected_shift) <= REPORT_TOL
    assert report.max_abs_logit_difference <= REPORT_TOL
    assert report.switch_agreement == 1.0 and report.translation_agreement == 1.0
    assert not report.exactness_condition  # random signed class templates
    assert cnn.training is False  # the report leaves the CNN's mode alone


def test_agreement_detects_a_cnn_that_differs() -> None:
    model = build(ARCHITECTURES["leaky"], seed=57)
    other = build(ARCHITECTURES["leaky"], seed=58)
    from cnn_equiv import to_cnn

    report = comparison_report(model, images(model, 8, seed=59), cnn=to_cnn(other))
    assert report.switch_agreement < 1.0
    assert report.max_abs_logit_difference > 1e-3
    assert isinstance(report.rows(), list) and drm.num_configurations(model) > 0


def test_inference_gap_is_the_one_rule_of_the_report_and_of_detection() -> None:
    from cnn_equiv.detection import drm_view

    model = build(TINY_ARCHITECTURES["two-levels"], seed=60)
    x = images(model, 4, seed=61)
    scores = drm.max_sum(model, x)[0]
    gap = cnn_equiv.inference_gap(model, x, scores)
    assert gap is not None and gap.shape == (4, model.num_classes)
    exact, _ = drm.exact_map(model, x)  # oracle: enumeration, on the scale of the scores
    expected = exact + drm.logit_offset(model, x)[:, None] - scores
    torch.testing.assert_close(gap, expected, atol=REPORT_TOL, rtol=0)
    report = comparison_report(model, x)
    assert report.inference_gap is not None and torch.equal(report.inference_gap, gap)
    view = drm_view(model, x)
    assert view.exact_gap is not None
    assert torch.equal(view.exact_gap, gap.gather(1, view.classes[:, None])[:, 0])
    assert cnn_equiv.inference_gap(model, x, scores, exact=False) is None
    assert drm_view(model, x, exact=False).exact_gap is None
    with pytest.raises(ValueError, match="scores must be the"):
        cnn_equiv.inference_gap(model, x, scores[:, :1])
    with pytest.raises(TypeError, match="exact must be a bool"):
        cnn_equiv.inference_gap(model, x, scores, exact=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_configurations must be >= 1"):
        cnn_equiv.inference_gap(model, x, scores, max_configurations=0)


def test_the_old_name_warns_and_is_the_report() -> None:
    with pytest.warns(DeprecationWarning, match="comparison_report"):
        old = cnn_equiv.compare_views
    assert old is comparison_report
