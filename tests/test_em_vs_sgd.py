"""experiments.em_vs_sgd (issue 13): the medians over seeds, the best-tuned Adam and the ratio
column against hand-computed values; the smoke run's table, plot, --json and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from experiments import em_vs_sgd
from tests.architectures import single_thread

RATIO_TOLERANCE = 1e-12  # a ratio of two medians, each one of the given numbers


def fake_run(seed: int, accuracies: list[float], seconds_per_epoch: float) -> dict[str, Any]:
    """One run's seed summary from its per-epoch test accuracies (evaluation every epoch)."""
    metrics = [{"epoch": e + 1, "test_accuracy": a, "elapsed": (e + 1) * seconds_per_epoch,
                "test_generative_accuracy": 0.5, "images_per_second": 100.0,
                "train_seconds": seconds_per_epoch} for e, a in enumerate(accuracies)]  # fmt: skip
    return em_vs_sgd.seed_summary(seed, Path(f"run{seed}"), metrics)


def fake_row(key: str, algo: str, runs: list[tuple[list[float], float]]) -> dict[str, Any]:
    seeds = [fake_run(s, accuracies, spe) for s, (accuracies, spe) in enumerate(runs)]
    return em_vs_sgd.row_summary(key, key, algo, seeds)


def test_best_adam_is_the_fastest_median_to_99_and_rows_are_ratios_to_it() -> None:
    late, never = [0.97, 0.985, 0.991], [0.97, 0.98, 0.985]
    rows = [
        # 99% at epoch 3 every seed: 30, 45, 60 s -> median 45 s
        fake_row("sgd-a", "sgd", [(late, 10.0), (late, 15.0), (late, 20.0)]),
        # 99% at epoch 1 and 2, never: sorted (10, 24, inf) -> median 24 s, epoch 1 (1, 2, inf)
        fake_row("sgd-b", "sgd", [([0.992], 10.0), ([0.98, 0.995], 12.0), (never, 5.0)]),
        fake_row("sgd-c", "sgd", [(never, 1.0)] * 3),  # never: the median is unreached
        # 99% at 6, 9 s and never: sorted (6, 9, inf) -> median 9 s -> 9 / 24 of the best Adam
        fake_row("dem-x", "dem", [([0.99], 6.0), ([0.97, 0.99], 4.5), (never, 1.0)]),
        fake_row("dem-y", "dem", [(never, 1.0), (never, 1.0), ([0.999], 1.0)]),  # 1 of 3 seeds
    ]
    assert rows[1]["seconds_to_0.99"] == 24.0 and rows[1]["epochs_to_0.99"] == 2
    assert rows[1]["reached_0.99"] == 2 and rows[1]["seconds_to_0.98"] == 10.0
    assert rows[2]["seconds_to_0.99"] is None and rows[4]["seconds_to_0.99"] is None
    assert rows[2]["final_accuracy"] == 0.985 and rows[4]["final_max"] == 0.999
    assert em_vs_sgd.mark_best_adam(rows) == "sgd-b"
    assert [r["best_adam"] for r in rows] == [False, True, False, False, False]
    assert abs(rows[3]["ratio_to_best_adam"] - 9.0 / 24.0) < RATIO_TOLERANCE
    assert abs(rows[0]["ratio_to_best_adam"] - 45.0 / 24.0) < RATIO_TOLERANCE
    assert rows[2]["ratio_to_best_adam"] is None and rows[4]["ratio_to_best_adam"] is None


def test_without_an_adam_at_99_the_best_is_the_highest_median_final_accuracy() -> None:
    rows = [fake_row("sgd-low", "sgd", [([0.95], 1.0), ([0.97], 1.0), ([0.989], 1.0)]),
            fake_row("sgd-high", "sgd", [([0.96], 9.0), ([0.98], 9.0), ([0.98], 9.0)]),
            fake_row("dem", "dem", [([0.995], 1.0)] * 3)]  # fmt: skip
    assert em_vs_sgd.mark_best_adam(rows) == "sgd-high"
    assert rows[2]["ratio_to_best_adam"] is None  # nothing to compare 99% times with
    assert em_vs_sgd.mark_best_adam(rows[2:]) is None  # no Adam row


def test_adam_sweep_rows_are_named_by_lr_and_batch() -> None:
    rows = em_vs_sgd.adam_rows([5e-4, 2e-3], [64, 128])
    assert [key for _, key, _ in rows] == ["sgd-lr0.0005-b64", "sgd-lr0.0005-b128",
                                           "sgd-lr0.002-b64", "sgd-lr0.002-b128"]  # fmt: skip
    assert rows[2][2] == {"algo": "sgd", "lr": 2e-3, "batch_size": 64}
    assert rows[2][0].endswith(em_vs_sgd.DEFAULT)  # the Adam row of earlier versions
    args = em_vs_sgd.parse_args(["--seed", "4"])  # the old --seed: a prefix of --seeds
    assert args.seeds == [4] and args.adam_lrs == [5e-4, 1e-3, 2e-3, 4e-3]
    assert args.adam_batch_sizes == [64, 128]


@pytest.mark.slow  # nine smoke-size training runs, twice
def test_smoke_table_has_every_row_the_best_adam_the_ratio_and_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "runs", tmp_path / "result.json"
    argv = ["--smoke", "--threads", "1", "--out", str(out), "--json", str(report)]
    with single_thread():
        assert em_vs_sgd.cli(argv) == 0
    table = capsys.readouterr().out
    keys = ["sgd-lr0.002-b16", *(key for _, key, _ in em_vs_sgd.EM_ROWS)]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()
             if line.startswith("| ")}  # fmt: skip
    assert set(keys) <= set(lines), table
    for key in keys[1:]:  # an EM row gives its ratio to the best Adam (n/a: 99% not reached)
        assert lines[key].split(" | ")[4] in ("n/a",) or float(lines[key].split(" | ")[4]) > 0
    assert "1 (best Adam)" in lines[keys[0]] and "(best-tuned Adam)" in lines[keys[0]]
    # the generative rows give their classifier on the whole test set, the others n/a
    whole = {key: line.rstrip(" |").split(" | ")[-1] for key, line in lines.items()}
    assert {whole[key] == "n/a" for key in keys if not key.startswith("gem")} == {True}
    assert {0.0 <= float(whole[key]) <= 1.0 for key in keys if key.startswith("gem")} == {True}
    assert "time to 99% / best Adam" in table and "best-tuned Adam: sgd-lr0.002-b16" in table
    plot = out / em_vs_sgd.PLOT
    assert f"plot: {plot}" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(report.read_text())
    assert [r["key"] for r in result["rows"]] == keys and result["best_adam"] == keys[0]
    assert {(out / f"{key}-seed0").is_dir() for key in keys} == {True}
    # a rerun resumes the finished runs: same numbers, no new epochs; old --only names work
    with single_thread():
        assert em_vs_sgd.cli([*argv, "--only", "sgd", "dem1", "gem_ce"]) == 0
    again = json.loads(report.read_text())
    assert [r["key"] for r in again["rows"]] == [keys[0], "dem-gradient", "gem_ce"]
    before = {r["key"]: r["seeds"] for r in result["rows"]}
    assert all(r["seeds"] == before[r["key"]] for r in again["rows"])


def test_a_budgeted_run_is_the_first_epochs_of_the_full_run(tmp_path: Path) -> None:
    """--budget-seconds stops each run at the first epoch end past the budget, resuming one epoch
    at a time: the same trajectory as the full run; a larger budget continues it."""
    base = ["--data", "digits", "--limit-train", "64", "--seeds", "0", "--threads", "1",
            "--only", "dem-gradient", "--epochs", "3"]  # fmt: skip
    with single_thread():
        full = em_vs_sgd.main(em_vs_sgd.parse_args([*base, "--out", str(tmp_path / "full")]))
        tiny = ["--out", str(tmp_path / "budget"), "--budget-seconds", "1e-9"]
        short = em_vs_sgd.main(em_vs_sgd.parse_args([*base, *tiny]))
        assert em_vs_sgd.recorded_epochs(tmp_path / "budget" / "dem-gradient-seed0") == 1
        longer = em_vs_sgd.main(em_vs_sgd.parse_args([*base, *tiny[:2], "--budget-seconds",
                                                      "1e9"]))  # fmt: skip
    (whole,), (first,), (rest,) = (r["rows"][0]["seeds"] for r in (full, short, longer))
    assert whole["epochs"] == 3 and first["epochs"] == 1 and rest["epochs"] == 3
    assert first["accuracy_by_epoch"] == whole["accuracy_by_epoch"][:1]
    assert rest["accuracy_by_epoch"] == whole["accuracy_by_epoch"]
    assert "first epoch end past 1e-09 s" in em_vs_sgd.format_table(short)
