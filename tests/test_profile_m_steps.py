"""experiments.profile_m_steps (issue 13): the per-phase split of a training step is complete
(the phases add up to the profiled time) and puts each design's work where its code does it."""

from __future__ import annotations

import pytest

from experiments import profile_m_steps
from tests.architectures import single_thread

SUM_TOL = 1e-9  # ms; the phases and "other" are differences of the same profiled sums


def test_smoke_profile_splits_every_step_into_its_phases() -> None:
    with single_thread():
        result = profile_m_steps.main(profile_m_steps.parse_args(["--smoke", "--threads", "1"]))
    table = profile_m_steps.format_table(result)
    rows = {r["design"]: r for r in result["rows"]}
    assert list(rows) == list(profile_m_steps.DESIGNS)
    for design, r in rows.items():
        phases = r["phases_ms"]
        parts = sum(phases[p] for p in (*profile_m_steps.TOP_PHASES, "other"))
        assert parts == pytest.approx(r["ms_per_step"], abs=SUM_TOL), design
        assert phases["hvp"] + phases["linearize"] <= phases["newton"] + SUM_TOL, design
        assert phases["forward"] > 0 and phases["other"] >= -SUM_TOL, design
        assert f"| {'Adam (sgd)' if design == 'sgd' else design} |" in table
    for design in ("sgd", "gradient"):  # gradient steps: no Newton solve; Adam's update
        assert rows[design]["phases_ms"]["newton"] == 0 < rows[design]["phases_ms"]["optimizer"]
    for design in ("block", "large-batch"):  # no optimizer: all of the M-step is Newton
        phases = rows[design]["phases_ms"]
        assert phases["optimizer"] == 0 == phases["backward"] and phases["newton"] > 0
    exact = rows["exact-top"]["phases_ms"]  # a solve and an Adam step for the lower levels
    assert exact["newton"] > 0 and exact["optimizer"] > 0 and exact["backward"] > 0
