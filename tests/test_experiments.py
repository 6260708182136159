"""Every experiment script runs end to end at smoke size (Pyro's test_examples.py habit)."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
# every module of experiments/ is a script, except private helpers (leading underscore)
SCRIPTS = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("_"))


def test_there_are_scripts() -> None:
    assert {"demo", "bench_inference"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_has_main_and_smoke_flag(name: str) -> None:
    module = importlib.import_module(f"experiments.{name}")
    assert callable(getattr(module, "main", None)), f"experiments/{name}.py has no main(args)"
    assert "--smoke" in (module.__doc__ or ""), f"experiments/{name}.py docs no --smoke command"
    args = module.parse_args(["--smoke"])
    assert args.smoke


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.slow  # a whole script or report at smoke size
def test_script_runs_at_smoke_size(name: str) -> None:
    module = importlib.import_module(f"experiments.{name}")
    result = module.main(module.parse_args(["--smoke"]))
    assert isinstance(result, dict) and result
    text = module.format_table(result)
    assert isinstance(text, str) and text


def test_demo_numbers_are_identities(capsys: pytest.CaptureFixture[str]) -> None:
    from experiments import demo

    r = demo.main(demo.parse_args(["--smoke"]))
    stages = capsys.readouterr().err.splitlines()  # one progress line per stage, then silence
    assert [line.split("] ")[0] for line in stages] == [f"demo: [{i}/3" for i in (1, 2, 3)]
    demo.main(demo.parse_args(["--smoke", "--no-progress"]))
    assert capsys.readouterr().err == ""
    for key in ("e2_max_logit_difference", "e1_max_error", "e6_max_error", "nonnegative_max_gap"):
        assert r[key] < 1e-10, key
    assert r["e2_switch_agreement"] == 1.0 and r["e2_translation_agreement"] == 1.0
    assert r["signed_max_gap"] > 0 and r["signed_min_gap"] > -1e-10
    assert math.isfinite(r["test_accuracy"])


@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_bad_command_line_is_one_line_on_stderr() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "experiments.demo", "--sigma2", "-1"],
        capture_output=True, text=True, cwd=EXPERIMENTS.parent, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "--sigma2" in done.stderr


@pytest.mark.parametrize(
    "config",
    [
        {},  # LeNet-5
        {"input_shape": (1, 40, 36), "widths": (6, 16, 120)},
    ],
    ids=["lenet", "lenet-40x36-narrow"],
)
def test_bench_all_flop_count_matches_torch_flop_counter(config: dict[str, object]) -> None:
    """The analytic FLOPs behind bench_all's GFLOP/s agree with torch's own FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cnn_equiv import to_cnn
    from experiments._bench import flops_per_image, lenet

    model = lenet(torch.device("cpu"), **config)
    batch = 3
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        to_cnn(model)(torch.zeros(batch, *model.input_shape))
    assert counter.get_total_flops() == batch * flops_per_image(model)


@pytest.mark.slow  # times the zoo-shaped networks
def test_bench_all_times_imported_networks_against_their_own_forward(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from experiments import bench_all

    code = bench_all.cli(["--only", "imported", "--rounds", "1", "--warmup", "0",
                          "--zoo-batch", "2", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for name in ("AlexNet-shaped", "VGG-11-BN-shaped"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        assert row.rstrip(" |").endswith("x") and float(row.split("|")[-2].strip()[:-1]) > 0


def test_semisupervised_reports_a_diverged_run_by_its_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loss that stops being finite in epoch 2 (an ablation row can): epoch 1 is reported."""
    from experiments import semisupervised
    from experiments.training import RunError, loop

    real = loop.train_epoch

    def failing(*args: object, **kwargs: object) -> object:
        if args[3] == 2:  # the epoch
            raise RunError("epoch 2, step 1: the loss is nan; try a lower --lr")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "train_epoch", failing)
    args = semisupervised.parse_args(["--smoke"])
    result = semisupervised.run(tmp_path, "run", {"algo": "ssl", "epochs": 2}, args)
    assert result["diverged"] is not None and "loss is nan" in result["diverged"]
    assert result["epochs"] == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["test_error"] == pytest.approx(1 - metrics[0]["test_accuracy"])


def test_semisupervised_ablation_switches_each_term_once() -> None:
    """The ablation removes each weighted term, adds each unweighted one, and runs a term that
    the default weighs below 1 (the reconstruction) at weight 1 too; one setting per row."""
    from drm.semisupervised import TERMS
    from experiments import semisupervised
    from experiments.training.config import SSL_WEIGHTS

    rows = dict(semisupervised.ablations())
    assert rows.pop("default") == {}
    assert all(len(settings) == 1 for settings in rows.values())
    for term in TERMS:
        option, weight = f"{term}_weight", getattr(SSL_WEIGHTS, term)
        values = sorted(s[option] for s in rows.values() if option in s)
        if term == "cross_entropy":
            assert values == []  # the labels are what makes it semi-supervised
        elif weight == 0:
            assert values == [1.0]
        elif weight < 1:
            assert values == [0.0, 1.0]
        else:
            assert values == [0.0]
    assert rows["with reconstruction at weight 1"] == {"reconstruction_weight": 1.0}


def test_semisupervised_ablation_rows_runs_only_the_named_rows(tmp_path: Path) -> None:
    """--ablation-rows runs (and reports) those rows alone, into the directories a full
    ablation uses; an unknown row is refused by the parser."""
    from experiments import semisupervised

    args = semisupervised.parse_args(
        ["--smoke", "--no-table", "--ablation-rows", "without-entropy", "--out", str(tmp_path)]
    )
    result = semisupervised.main(args)
    assert [r["row"] for r in result["ablation"]] == ["without entropy"]
    assert result["ablation"][0]["settings"]["entropy_weight"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation-50-without-entropy"]
    text = semisupervised.format_table(result)
    assert "without entropy" in text and "label draw" not in text  # no empty draws table
    with pytest.raises(SystemExit):
        semisupervised.parse_args(["--ablation-rows", "without-everything"])


def test_semisupervised_refuses_ablation_rows_without_the_ablation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--ablation-rows with --no-ablation would name rows that never run: refused in one line."""
    from experiments import semisupervised

    with pytest.raises(SystemExit):
        semisupervised.parse_args(["--no-ablation", "--ablation-rows", "default"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-ablation" in err
