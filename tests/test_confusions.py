"""experiments.confusions: the error counts agree with the trainer's accuracy, the confusions with
an independent count, and a run it cannot read honestly is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import drm
from drm.checkpoint import save_checkpoint, save_model
from drm.config import small_config
from experiments import confusions, train
from experiments.training.data import load_data
from experiments.training.rundir import CHECKPOINT, METRICS
from tests.architectures import single_thread

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--data", "digits", "--limit-train", "300", "--batch-size", "32", "--epochs", "1",
         "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An sgd run and an ssl run (20 labels) on the 8x8 digits, whole test set."""
    root = tmp_path_factory.mktemp("confusions")
    with single_thread():
        train.main(train.parse_args([*SMALL, "--out", str(root / "sgd")]))
        train.main(train.parse_args([*SMALL, "--algo", "ssl", "--labels", "20",
                                     "--out", str(root / "ssl")]))  # fmt: skip
    return {"sgd": root / "sgd", "ssl": root / "ssl"}


def test_counts_match_the_trainer_and_an_independent_count(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    figure, table = tmp_path / "c.png", tmp_path / "c.json"
    argv = [str(runs["sgd"]), str(runs["ssl"]), "--top", "3", "--figure", str(figure),
            "--json", str(table)]  # fmt: skip
    result = confusions.main(confusions.parse_args(argv))
    text = confusions.format_table(result)
    rows = json.loads(table.read_text())["runs"]
    assert rows == result["runs"]
    test = load_data("digits", None, None)
    for row, name in zip(rows, ("sgd", "ssl"), strict=True):
        accuracy = json.loads((runs[name] / METRICS).read_text())[-1]["test_accuracy"]
        assert row["test_images"] == len(test.y_test)
        assert row["errors"] == round((1 - accuracy) * len(test.y_test))  # the trainer's count
        # an independent count: the equivalent CNN's predictions, tallied by numpy
        from cnn_equiv import to_cnn
        from drm.checkpoint import load_checkpoint

        cnn = to_cnn(load_checkpoint(runs[name] / CHECKPOINT).model).eval()
        with torch.no_grad():
            predicted = cnn(test.x_test).argmax(1).numpy()
        expected = np.zeros((10, 10), dtype=int)
        np.add.at(expected, (test.y_test.numpy(), predicted), 1)
        assert row["confusion_matrix"] == expected.tolist()
        off = expected - np.diag(np.diag(expected))
        largest = sorted(off.flatten())[::-1][:3]
        assert [c["count"] for c in row["top_confusions"]] == [int(v) for v in largest if v]
        assert str(runs[name]) in text and f"{row['errors']:>5} errors of" in text
    assert figure.read_bytes()[:8] == PNG_MAGIC


def test_top_confusions_are_ordered_and_skip_the_diagonal() -> None:
    counts = torch.tensor([[50, 2, 7], [7, 40, 0], [1, 0, 60]])
    assert confusions.top_confusions(counts, 5) == [(0, 2, 7), (1, 0, 7), (0, 1, 2), (2, 0, 1)]
    assert confusions.top_confusions(counts, 1) == [(0, 2, 7)]
    assert confusions.top_confusions(torch.eye(3, dtype=torch.long), 5) == []


def test_the_command_needs_runs_or_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (([], "name at least one run directory"),
                          (["--smoke", "runs/x"], "name no DIR")):  # fmt: skip
        with pytest.raises(SystemExit):
            confusions.parse_args(argv)
        assert message in capsys.readouterr().err


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert confusions.cli(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_runs_it_cannot_read_honestly_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "no model.safetensors" in one_line_error(capsys, [str(tmp_path)])
    bare = tmp_path / "bare"
    bare.mkdir()
    model = drm.DeepRenderingModel.from_config(small_config(), seed=0)
    save_model(model, bare / CHECKPOINT)  # a model alone: load_checkpoint's own refusal
    assert "no trainer state" in one_line_error(capsys, [str(bare)])
    save_checkpoint(bare / CHECKPOINT, model, {"step": 1}, {"epoch": "1"})  # not a training run
    assert "was not written by experiments.train" in one_line_error(capsys, [str(bare)])
    data = load_data("digits", None, None)
    path = tmp_path / "digits.npz"
    arrays = {"x_train": data.x_train.numpy(), "y_train": data.y_train.numpy(),
              "x_test": data.x_test.numpy(), "y_test": data.y_test.numpy()}  # fmt: skip
    np.savez(path, **arrays)
    argv = [*SMALL, "--data", str(path), "--limit-test", "50"]
    with single_thread():
        train.main(train.parse_args([*argv, "--out", str(tmp_path / "npz")]))
        train.main(train.parse_args([*argv, "--algo", "em", "--model", "shallow",
                                     "--out", str(tmp_path / "shallow")]))  # fmt: skip
    assert "shallow model" in one_line_error(capsys, [str(tmp_path / "shallow")])
    arrays["x_test"] = arrays["x_test"][::-1].copy()  # the same images, another order
    np.savez(path, **arrays)
    line = one_line_error(capsys, [str(tmp_path / "npz")])
    assert "have changed since the run was trained" in line and "sha256" in line
    path.unlink()
    assert "digits.npz" in one_line_error(capsys, [str(tmp_path / "npz")])
