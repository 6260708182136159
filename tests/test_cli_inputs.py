"""Adversarial inputs to every command: each is refused with exactly one line on stderr, a
non-zero exit status, no traceback, and no change to an existing run directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import (
    bench_all,
    compare_views,
    demo,
    em_vs_sgd,
    profile_m_steps,
    semisupervised,
    train,
)
from tests.architectures import single_thread

SMALL = ["--data", "digits", "--limit-train", "160", "--limit-test", "100", "--batch-size", "32",
         "--no-progress"]  # fmt: skip

Command = Callable[[list[str]], int]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run, a good .npz and bad ones, a plain file."""
    root = tmp_path_factory.mktemp("inputs")
    with single_thread():
        train.main(train.parse_args([*SMALL, "--epochs", "1", "--out", str(root / "run")]))
    rng = np.random.default_rng(0)
    # 200 images per class: one stray label is under 1% of that
    good = {"x_train": rng.random((2000, 8, 8)), "y_train": np.arange(2000) % 10,
            "x_test": rng.random((100, 8, 8)), "y_test": np.arange(100) % 10}  # fmt: skip
    paths = {"run": root / "run", "plain": root / "plain.txt"}
    paths["plain"].write_text("not a directory\n")
    variants = {
        "good": good,
        "nhwc": dict(good, x_train=rng.random((2000, 8, 8, 3)), x_test=rng.random((100, 8, 8, 3))),
        "f255": dict(good, x_train=good["x_train"] * 255),
        "huge": dict(good, x_train=good["x_train"] * 1e30),
        "stray": dict(good, y_train=np.where(np.arange(2000) == 0, 10, good["y_train"])),
        "e10": dict(good, y_train=np.where(np.arange(2000) == 0, 10**10, good["y_train"])),
        "testonly": dict(good, y_test=np.where(np.arange(100) < 3, 10, good["y_test"])),
        "floatlabels": dict(good, y_train=good["y_train"].astype(np.float64)),
    }
    for name, arrays in variants.items():
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], **arrays)  # type: ignore[arg-type]
    raw = paths["good"].read_bytes()
    paths["truncated"] = root / "truncated.npz"
    paths["truncated"].write_bytes(raw[: len(raw) // 2])
    paths["text"] = root / "text.npz"
    paths["text"].write_text("x_train\n")
    paths["npz_run"] = root / "npz_run"
    paths["changing"] = root / "changing.npz"
    paths["changing"].write_bytes(raw)
    with single_thread():
        train.main(train.parse_args(["--data", str(paths["changing"]), "--epochs", "1",
                                     "--no-progress", "--out", str(paths["npz_run"])]))  # fmt: skip
    np.savez(paths["changing"], **dict(good, x_test=good["x_test"] * 0.5))  # type: ignore[arg-type]
    return paths


def _train(argv: list[str]) -> int:
    return train.cli(argv)


# (case, command, argv with {name} standing for files[name], what the line must name)
CASES: list[tuple[str, Command, list[str], str]] = [
    ("missing npz", _train, ["--data", "{root}/absent.npz", "--out", "{new}"], "absent.npz"),
    ("text npz", _train, ["--data", "{text}", "--out", "{new}"], "not a valid .npz"),
    ("truncated npz", _train, ["--data", "{truncated}", "--out", "{new}"], "not a valid .npz"),
    ("NHWC images", _train, ["--data", "{nhwc}", "--out", "{new}"], "transpose"),
    ("0..255 floats", _train, ["--data", "{f255}", "--out", "{new}"], "pixels must lie in [0, 1]"),
    ("pixels x1e30", _train, ["--data", "{huge}", "--out", "{new}"], "pixels must lie in [0, 1]"),
    ("stray label", _train, ["--data", "{stray}", "--out", "{new}"], "stray labels: 10"),
    ("label 1e10", _train, ["--data", "{e10}", "--out", "{new}"], "10000000001 classes"),
    ("test-only class", _train, ["--data", "{testonly}", "--out", "{new}"], "only in the test"),
    ("float labels", _train, ["--data", "{floatlabels}", "--out", "{new}"], "integers"),
    ("labels below the classes", _train, [*SMALL, "--data", "{good}", "--num-classes", "5",
                                          "--out", "{new}"], "outside [0, 5)"),
    ("epochs 0", _train, [*SMALL, "--epochs", "0", "--out", "{new}"], "--epochs"),
    ("negative lr", _train, [*SMALL, "--lr", "-1", "--out", "{new}"], "--lr"),
    ("nan lr", _train, [*SMALL, "--lr", "nan", "--out", "{new}"], "--lr"),
    ("unknown algo", _train, [*SMALL, "--algo", "bogus", "--out", "{new}"], "--algo"),
    ("unknown m-step", _train, [*SMALL, "--algo", "dem", "--m-step", "bogus", "--out", "{new}"],
     "--m-step"),
    ("labels not a multiple", _train, [*SMALL, "--labels", "55", "--out", "{new}"], "--labels"),
    ("labels beyond the set", _train, [*SMALL, "--labels", "1000", "--out", "{new}"], "--labels"),
    ("diverging lr", _train, [*SMALL, "--lr", "1e30", "--out", "{new}"], "--lr"),
    ("resume, other lr", _train, [*SMALL, "--epochs", "2", "--lr", "0.5", "--resume", "--out",
                                  "{run}"], "--lr"),
    ("fresh run over a run", _train, [*SMALL, "--out", "{run}"], "already holds a run"),
    ("resume, changed data", _train, ["--data", "{changing}", "--epochs", "2", "--resume",
                                      "--out", "{npz_run}"], "have changed: sha256"),
    ("out is a file", _train, [*SMALL, "--out", "{plain}"], "plain.txt"),
    ("out under a file", _train, [*SMALL, "--out", "{plain}/run"], "plain.txt"),
    ("threads -1", _train, [*SMALL, "--threads", "-1", "--out", "{new}"], "--threads"),
    ("views: no such model", compare_views.cli, ["--model", "{root}/nope", "--out", "{new}"],
     "nope"),
    ("views: threads -1", compare_views.cli, ["--smoke", "--threads", "-1"], "--threads"),
    ("views: out is a file", compare_views.cli, ["--model", "{run}", "--smoke", "--out",
                                                 "{plain}"], "plain.txt"),
    ("views: wrong data", compare_views.cli, ["--model", "{run}", "--data", "{nhwc}", "--out",
                                              "{new}"], "transpose"),
    ("views: garbage state_dict", compare_views.cli, ["--torch-cnn", "{plain}", "--out",
                                                      "{new}"], "not a LeNet state_dict"),
    ("em_vs_sgd: epochs 0", em_vs_sgd.cli, ["--epochs", "0"], "--epochs"),
    ("em_vs_sgd: out is a file", em_vs_sgd.cli, ["--smoke", "--out", "{plain}"], "plain.txt"),
    ("em_vs_sgd: negative seed", em_vs_sgd.cli, ["--seeds", "0", "-1"], "--seeds"),
    ("em_vs_sgd: repeated seed", em_vs_sgd.cli, ["--seeds", "1", "1"], "--seeds"),
    ("em_vs_sgd: adam lr 0", em_vs_sgd.cli, ["--adam-lrs", "0"], "--adam-lrs"),
    ("em_vs_sgd: adam lr nan", em_vs_sgd.cli, ["--adam-lrs", "1e-3", "nan"], "--adam-lrs"),
    ("em_vs_sgd: adam batch 0", em_vs_sgd.cli, ["--adam-batch-sizes", "0"], "--adam-batch-sizes"),
    ("em_vs_sgd: unknown row", em_vs_sgd.cli, ["--only", "dem2"], "--only"),
    ("em_vs_sgd: json is a directory", em_vs_sgd.cli, ["--smoke", "--only", "dem1", "--json",
                                                       "{root}"], "--json"),
    ("em_vs_sgd: budget 0", em_vs_sgd.cli, ["--budget-seconds", "0"], "--budget-seconds"),
    ("em_vs_sgd: budget nan", em_vs_sgd.cli, ["--budget-seconds", "nan"], "--budget-seconds"),
    ("profile: steps 0", profile_m_steps.cli, ["--steps", "0"], "--steps"),
    ("profile: warmup -1", profile_m_steps.cli, ["--warmup", "-1"], "--warmup"),
    ("profile: unknown design", profile_m_steps.cli, ["--designs", "newton"], "--designs"),
    ("profile: too few images", profile_m_steps.cli, ["--data", "digits", "--steps", "100000",
                                                      "--designs", "sgd"], "training images"),
    ("profile: json is a directory", profile_m_steps.cli, ["--smoke", "--json", "{root}"],
     "--json"),
    ("profile: no such data", profile_m_steps.cli, ["--data", "{root}/nope.npz"], "nope.npz"),
    ("semisupervised: labels 0", semisupervised.cli, ["--labels", "0"], "--labels"),
    ("semisupervised: bad data", semisupervised.cli, ["--data", "{stray}", "--labels", "50",
                                                      "--draws", "1", "--no-ablation", "--out",
                                                      "{new}"], "stray labels"),
    ("bench_all: threads 0", bench_all.cli, ["--threads", "0"], "--threads"),
    ("demo: infinite sigma2", demo.cli, ["--smoke", "--sigma2", "inf"], "sigma2"),
]  # fmt: skip


def refused(capsys: pytest.CaptureFixture[str], command: Command, argv: list[str]) -> str:
    """Run a command in-process; it must fail with one line on stderr and no traceback."""
    try:
        code = command(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(*directories: Path) -> dict[str, bytes]:
    return {str(f): f.read_bytes() for d in directories for f in sorted(d.rglob("*"))
            if f.is_file()}  # fmt: skip


@pytest.mark.parametrize(("case", "command", "argv", "names"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    command: Command,
    argv: list[str],
    names: str,
) -> None:
    places = {k: str(v) for k, v in files.items()}
    places |= {"new": str(tmp_path / "new"), "root": str(files["run"].parent)}
    argv = [a.format(**places) for a in argv]
    before = snapshot(files["run"], files["npz_run"])
    torch.set_num_threads(1)
    line = refused(capsys, command, argv)
    assert names in line, (case, line)
    assert snapshot(files["run"], files["npz_run"]) == before, f"{case} changed a run"
