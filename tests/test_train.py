"""The training script: every algorithm end to end, exact resume, SIGKILL safety, clear errors.

Everything runs on the 8x8 digits with a few hundred training images and the small model, on one
CPU thread (so a subprocess and this process compute bit-identical tensors).
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import drm
from cnn_equiv.mapping import to_cnn
from drm.averaging import ParameterAverage
from drm.checkpoint import load_checkpoint, save_checkpoint
from drm.config import ModelConfig, small_config
from drm.data import labelled_subset
from drm.inference import generative_scores
from drm.refine import inference_gap_lower_bound
from drm.semisupervised import ON_DEMAND, TERMS
from drm.shallow import ShallowRenderingModel
from experiments import train
from experiments.training import RunConfig
from experiments.training import run as run_training
from experiments.training.config import SSL_WEIGHTS
from experiments.training.data import check_same_data, load_data
from experiments.training.evaluation import GAP_SWEEPS, cluster_labels
from experiments.training.loop import check_finite, minibatches, semisupervised_batches
from experiments.training.rundir import CHECKPOINT, CONFIG, METRICS, PREVIOUS
from experiments.training.trainers import build_trainer
from tests.architectures import ARCHITECTURES, TRAIN_ALGORITHMS, single_thread

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--data", "digits", "--limit-train", "160", "--limit-test", "100", "--batch-size", "32"]
REQUIRED_KEYS = {"epoch", "train_loss", "test_accuracy", "seconds", "elapsed"}


ALGORITHMS = [pytest.param(argv, id=name) for name, argv in TRAIN_ALGORITHMS.items()]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(out: Path, *extra: str, epochs: int = 2) -> dict[str, Any]:
    argv = [*SMALL, "--epochs", str(epochs), "--out", str(out), "--no-progress", *extra]
    return train.main(train.parse_args(argv))


def forget_settings(out: Path, *keys: str) -> None:
    """Remove settings from a run's stored configuration (the checkpoint's header, which resume
    reads, and config.json), as if the run was written before they existed."""
    model, state, metadata = load_checkpoint(out / CHECKPOINT)
    run_config = json.loads(metadata["run_config"])
    for key in keys:
        del run_config["args"][key]
    save_checkpoint(
        out / CHECKPOINT, model, state, {**metadata, "run_config": json.dumps(run_config)}
    )
    config = json.loads((out / "config.json").read_text())
    for key in keys:
        del config["args"][key]
    (out / "config.json").write_text(json.dumps(config))


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts / lists / tensors equal exactly (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"keys differ at {where}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_same(u, v, f"{where}/{i}")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


def untimed(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in train.TIMING_KEYS} for m in metrics]


def assert_same_run(a: Path, b: Path) -> None:
    """Same model tensors, same trainer state, same metrics apart from timings."""
    ca, cb = load_checkpoint(a / "model.safetensors"), load_checkpoint(b / "model.safetensors")
    assert_same(ca.model.state_dict(), cb.model.state_dict(), "model")
    assert_same(ca.trainer_state, cb.trainer_state, "trainer_state")
    assert ca.metadata["epoch"] == cb.metadata["epoch"]
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert untimed(ma) == untimed(mb)


# --- every algorithm, end to end -------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_algorithm_runs_end_to_end(tmp_path: Path, algo: list[str]) -> None:
    result = run(tmp_path, *algo)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert result["metrics"] == metrics
    for m in metrics:
        assert set(m) >= REQUIRED_KEYS, sorted(m)
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["seconds"] > 0 and m["elapsed"] >= m["seconds"]
    assert metrics[1]["elapsed"] > metrics[0]["elapsed"]

    checkpoint = load_checkpoint(tmp_path / "model.safetensors")
    assert checkpoint.metadata["epoch"] == "2"
    assert json.loads(checkpoint.metadata["metrics"]) == metrics
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["args"]["algo"] == algo[1]
    model = checkpoint.model
    data = load_data("digits", 160, 100)
    if isinstance(model, ShallowRenderingModel):
        assert "shallow" in algo and config["model"]["kind"] == "shallow"
        assert model.config_dict() == config["model"]["config"]
        # oracle: the model's own MAP classes and log-likelihood
        with torch.no_grad():
            correct = (model.map_classes(data.x_test) == data.y_test).double().mean()
            loglik = model.log_likelihood(data.x_test).double().mean()
        assert metrics[-1]["test_accuracy"] == float(correct)
        assert metrics[-1]["test_log_likelihood"] == pytest.approx(float(loglik), rel=1e-5)
    else:
        assert config["model"]["kind"] == "deep"
        assert model.config == ModelConfig.from_dict(config["model"]["config"])
        # oracle: the equivalent CNN's logits on the checkpointed model (not max-sum's code path)
        with torch.no_grad():
            correct = (to_cnn(model)(data.x_test).argmax(1) == data.y_test).sum()
        assert metrics[-1]["test_accuracy"] == int(correct) / len(data.y_test)
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    table = train.format_table(result)
    assert len(table.splitlines()) == 3 + len(metrics)


def test_sgd_learns_the_digits(tmp_path: Path) -> None:
    """The defaults learn: the small model, batch 16, about 0.93 on the digits after 4 epochs."""
    argv = ["--data", "digits", "--epochs", "4", "--out", str(tmp_path), "--no-progress"]
    result = train.main(train.parse_args(argv))
    assert result["model"] == "small"
    assert result["final"]["test_accuracy"] > 0.85
    assert [m["lr"] for m in result["metrics"]] == pytest.approx([2e-3 * 0.7**e for e in range(4)])


def test_unsupervised_clusters_are_scored_by_their_majority_label(tmp_path: Path) -> None:
    data = load_data("digits", None, None)
    means = torch.stack([data.x_train[data.y_train == c].mean(0) for c in range(10)])
    model = ShallowRenderingModel(means, translation="none", sigma2=0.05)
    # oracle: templates that are the class means form clusters whose majority label is the class
    assert torch.equal(cluster_labels(model, data.x_train, data.y_train, 500),
                       torch.arange(10))  # fmt: skip
    shuffled = ShallowRenderingModel(means[torch.tensor([3, 1, 4, 0, 5, 9, 2, 6, 8, 7])],
                                     translation="none", sigma2=0.05)  # fmt: skip
    assert torch.equal(cluster_labels(shuffled, data.x_train, data.y_train, 500),
                       torch.tensor([3, 1, 4, 0, 5, 9, 2, 6, 8, 7]))  # fmt: skip
    result = run(tmp_path, "--algo", "em", "--model", "shallow", "--unsupervised")
    assert 0.2 < result["final"]["test_accuracy"] <= 1.0  # clusters of digits beat chance (0.1)


# --- resume ----------------------------------------------------------------------------------


DEEP_ALGORITHMS = ALGORITHMS[:3]
CHANNELS_LAST_ATOL = 1e-4  # float32: only the summation order of the convolutions differs
SSL_AVERAGE = ["--algo", "ssl", "--labels", "20", "--average-decay", "0.9"]
RESUME_RUNS = [
    *ALGORITHMS,
    # parameter averaging (drm.averaging): the saved model is the average, the state the iterate
    pytest.param(SSL_AVERAGE, id="ssl-average"),
    # the mean teacher: the consistency target is the average, restored on resume
    # and the deformations of its consistency term, drawn from the images and the step number
    pytest.param(
        [*SSL_AVERAGE, "--consistency-target", "average", "--consistency-deformation", "1"],
        id="ssl-mean-teacher-deformed",
    ),
    # channels_last resumes: slow (test_channels_last_trains_the_same_model keeps the layout fast)
    *(
        pytest.param([*p.values[0], "--channels-last"], id=f"{p.id}-cl", marks=pytest.mark.slow)
        for p in DEEP_ALGORITHMS
    ),
]


@pytest.mark.parametrize("algo", RESUME_RUNS)
def test_resume_gives_the_uninterrupted_run(tmp_path: Path, algo: list[str]) -> None:
    run(tmp_path / "straight", *algo, epochs=2)
    run(tmp_path / "resumed", *algo, epochs=1)
    run(tmp_path / "resumed", *algo, "--resume", epochs=2)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("algo", DEEP_ALGORITHMS)
def test_channels_last_trains_the_same_model(tmp_path: Path, algo: list[str]) -> None:
    """--channels-last changes strides, not the mathematics: same parameters up to rounding."""
    run(tmp_path / "nchw", *algo, epochs=1)
    run(tmp_path / "cl", *algo, "--channels-last", epochs=1)
    a = load_checkpoint(tmp_path / "nchw" / "model.safetensors").model.state_dict()
    b = load_checkpoint(tmp_path / "cl" / "model.safetensors").model.state_dict()
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=CHANNELS_LAST_ATOL, msg=name)


def write_architecture(path: Path, config: ModelConfig) -> str:
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


@pytest.mark.parametrize("algo", [["--algo", "sgd"], ["--algo", "ssl", "--labels", "20"]])
def test_an_architecture_file_trains_that_model_and_binds_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algo: list[str]
) -> None:
    """--model PATH.json: the file's architecture is the run's model (the preset's file gives
    the preset's run, bit for bit), resume gives the uninterrupted run, and a file edited since
    the run began is refused on resume."""
    preset = small_config((1, 8, 8), 10)
    path = write_architecture(tmp_path / "small.json", preset)
    run(tmp_path / "preset", *algo, "--model", "small", epochs=1)
    run(tmp_path / "file", *algo, "--model", path, epochs=1)
    assert_same_run(tmp_path / "preset", tmp_path / "file")
    wider = ModelConfig.from_dict(
        {**preset.to_dict(), "levels": [{**level, "out_features": 32} if level["kind"] == "dense"
                                        else level for level in preset.to_dict()["levels"]]}
    )  # fmt: skip
    wide = write_architecture(tmp_path / "wide.json", wider)
    run(tmp_path / "straight", *algo, "--model", wide, epochs=2)
    run(tmp_path / "resumed", *algo, "--model", wide, epochs=1)
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT).model.config == wider
    stored = json.loads((tmp_path / "resumed" / CONFIG).read_text())
    assert (
        stored["args"]["model"] == wide
        and ModelConfig.from_dict(stored["model"]["config"]) == wider
    )
    run(tmp_path / "resumed", *algo, "--model", wide, "--resume", epochs=2)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    write_architecture(tmp_path / "wide.json", preset)  # edited after the run began
    line = cli_error(capsys, [*SMALL, *algo, "--model", wide, "--epochs", "3", "--out",
                              str(tmp_path / "resumed"), "--resume"])  # fmt: skip
    assert "now describes another architecture" in line
    line = cli_error(capsys, [*SMALL, *algo, "--model", path, "--epochs", "3", "--out",
                              str(tmp_path / "resumed"), "--resume"])  # fmt: skip
    assert "--model" in line and "small.json" in line  # another file: another model


def test_a_bad_architecture_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--epochs", "1", "--out", str(tmp_path / "out")]
    line = cli_error(capsys, [*SMALL, "--model", str(tmp_path / "missing.json"), *out])
    assert "missing.json" in line and "cannot read" in line
    (tmp_path / "garbage.json").write_text("{not json")
    line = cli_error(capsys, [*SMALL, "--model", str(tmp_path / "garbage.json"), *out])
    assert "garbage.json is not a drm.ModelConfig" in line
    (tmp_path / "list.json").write_text("[1, 2]")
    line = cli_error(capsys, [*SMALL, "--model", str(tmp_path / "list.json"), *out])
    assert "list.json is not a drm.ModelConfig" in line
    (tmp_path / "fields.json").write_text(json.dumps({"levels": [{"kind": "conv"}]}))
    line = cli_error(capsys, [*SMALL, "--model", str(tmp_path / "fields.json"), *out])
    assert "fields.json is not a drm.ModelConfig" in line
    mnist_sized = write_architecture(tmp_path / "lenet.json", drm.lenet_config())
    line = cli_error(capsys, [*SMALL, "--model", mnist_sized, *out])
    assert "describes images (1, 28, 28) in 10 classes" in line and "(1, 8, 8)" in line
    with pytest.raises(SystemExit):  # the command line's own check
        train.parse_args([*SMALL, "--model", "resnet", *out])
    assert "--model must be one of lenet, small, shallow or a PATH.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--model must be one of"):
        RunConfig(smoke=True, model="lenet.yaml")
    assert not (tmp_path / "out" / CHECKPOINT).exists()


def test_channels_last_is_refused_for_the_shallow_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--smoke", "--model", "shallow", "--algo", "em", "--channels-last"])
    assert "--channels-last applies to the deep models" in capsys.readouterr().err


def test_refine_sweeps_trains_a_deep_em_run_and_is_refused_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = run(tmp_path / "plain", "--algo", "em", epochs=1)
    refined = run(tmp_path / "refined", "--algo", "em", "--refine-sweeps", "2", epochs=1)
    assert math.isfinite(refined["metrics"][-1]["train_loss"])
    stored = json.loads((tmp_path / "refined" / "config.json").read_text())
    assert stored["args"]["refine_sweeps"] == 2
    a = load_checkpoint(tmp_path / "plain" / "model.safetensors").model.state_dict()
    b = load_checkpoint(tmp_path / "refined" / "model.safetensors").model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # other latents, other templates
    assert plain["metrics"][-1]["epoch"] == refined["metrics"][-1]["epoch"] == 1
    for argv in (["--algo", "sgd"], ["--algo", "em", "--model", "shallow"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--smoke", *argv, "--refine-sweeps", "1"])
        assert "--refine-sweeps applies to --algo em" in capsys.readouterr().err


def test_minibatch_order_depends_only_on_seed_and_epoch() -> None:
    a = minibatches(100, 32, seed=3, epoch=2)
    assert [len(b) for b in a] == [32, 32, 32, 4]
    assert torch.equal(torch.cat(a).sort().values, torch.arange(100))
    assert all(torch.equal(u, v) for u, v in zip(a, minibatches(100, 32, 3, 2), strict=True))
    assert not torch.equal(torch.cat(a), torch.cat(minibatches(100, 32, 3, 1)))
    assert not torch.equal(torch.cat(a), torch.cat(minibatches(100, 32, 4, 2)))


def test_resume_of_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    run(tmp_path, epochs=1)
    before = (tmp_path / "model.safetensors").read_bytes()
    result = run(tmp_path, "--resume", epochs=1)
    assert len(result["metrics"]) == 1
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_existing_run_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    run(tmp_path, epochs=1)
    with pytest.raises(train.RunError, match="--resume"):
        run(tmp_path, epochs=1)
    run(tmp_path, "--overwrite", "--seed", "1", epochs=1)
    assert json.loads((tmp_path / "config.json").read_text())["args"]["seed"] == 1


def test_a_run_config_is_the_command_line(tmp_path: Path) -> None:
    """The library call `run(RunConfig(...))` is the command's run: same settings, same run."""
    argv = [*SMALL, "--algo", "ssl", "--labels", "50", "--epochs", "1", "--no-progress"]
    parsed = train.parse_args([*argv, "--out", str(tmp_path / "cli")])
    built = RunConfig(data="digits", limit_train=160, limit_test=100, batch_size=32, algo="ssl",
                      labels=50, epochs=1, progress=False, out=tmp_path / "library")  # fmt: skip
    assert built == parsed.replace(out=tmp_path / "library")
    assert built.lr == 1e-3 and built.entropy_weight == SSL_WEIGHTS.entropy  # ssl's defaults
    train.main(parsed)
    run_training(built)
    assert_same_run(tmp_path / "cli", tmp_path / "library")
    with pytest.raises(ValueError, match="--amp applies to --algo sgd"):
        RunConfig(algo="dem", amp="bf16", smoke=True)
    with pytest.raises(ValueError, match="--entropy-weight applies to --algo ssl"):
        RunConfig(algo="sgd", entropy_weight=1.0, out=tmp_path)
    # the command line's value checks hold for a config made in Python
    for bad, message in [
        ({"epochs": 0}, "--epochs must be >= 1, got 0"),
        ({"batch_size": True}, "--batch-size must be an int, got bool"),
        ({"lr": -1e-3}, "--lr must be > 0"),
        ({"lr_decay": float("nan")}, "--lr-decay"),
        ({"optimizer": "adamw"}, "--optimizer must be one of"),
        ({"algo": "ssl", "class_balance_target": "flat"}, "--class-balance-target must be one"),
        ({"algo": "ssl", "class_guess": "label"}, "--class-guess must be one"),
        ({"algo": "ssl", "entropy_weight": -0.5}, "--entropy-weight must be >= 0"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            RunConfig(**{"out": tmp_path, **bad})


# --- --labels and the semi-supervised algorithm ----------------------------------------------


def test_semisupervised_batches_pair_every_image_with_labelled_ones() -> None:
    labelled = torch.tensor([3, 8, 20, 41, 77])
    batches = semisupervised_batches(100, labelled, 32, 4, seed=5, epoch=2)
    assert len(batches) == 4  # one pass over the 100 images as unlabelled ones
    unlabelled = torch.cat([index[~known] for index, known in batches])
    assert torch.equal(unlabelled.sort().values, torch.arange(100))  # labelled ones included
    stream = torch.cat([index[known] for index, known in batches])
    assert [int(known.sum()) for _, known in batches] == [4, 4, 4, 4]
    assert set(stream.tolist()) <= set(labelled.tolist())
    counts = torch.bincount(stream, minlength=100)[labelled]
    assert int(counts.max() - counts.min()) <= 1  # permutations of the labelled set, in turn
    again = semisupervised_batches(100, labelled, 32, 4, seed=5, epoch=2)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, again, strict=True))


def test_labelled_subset_is_balanced_seeded_and_saved(tmp_path: Path) -> None:
    run(tmp_path / "a", "--algo", "ssl", "--labels", "50", epochs=1)
    saved = json.loads((tmp_path / "a" / "labelled.json").read_text())
    data = load_data("digits", 160, 100)
    indices = torch.tensor(saved["indices"])
    assert saved["labels"] == 50 and len(indices) == 50 and saved["seed"] == 0
    assert torch.bincount(data.y_train[indices], minlength=10).tolist() == [5] * 10
    assert torch.equal(indices, labelled_subset(data.y_train, 50, 10, seed=0))
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["data"]["labelled_images"] == 50 and config["data"]["train_images"] == 160
    run(tmp_path / "a", "--algo", "ssl", "--labels", "50", "--resume", epochs=2)
    assert json.loads((tmp_path / "a" / "labelled.json").read_text()) == saved  # same on resume
    stored = load_checkpoint(tmp_path / "a" / "model.safetensors").metadata["labelled"]
    assert json.loads(stored) == saved["indices"]  # and in the checkpoint, under its SHA-256
    run(tmp_path / "b", "--algo", "ssl", "--labels", "50", "--seed", "1", epochs=1)
    other = json.loads((tmp_path / "b" / "labelled.json").read_text())["indices"]
    assert other != saved["indices"]  # another seed, another draw


@pytest.mark.parametrize("algo", [["--algo", "ssl"], ["--algo", "sgd"]])
def test_named_labelled_images_are_the_drawn_ones_when_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algo: list[str]
) -> None:
    """--labelled-indices FILE: a run's labelled.json (or the plain list) as the file gives that
    run bit for bit; the file binds the run on resume; a changed file is refused."""
    run(tmp_path / "drawn", *algo, "--labels", "20", epochs=2)
    saved = json.loads((tmp_path / "drawn" / "labelled.json").read_text())
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps(saved["indices"][::-1]))  # any order: a set of images
    for name, path in (("from-run", tmp_path / "drawn" / "labelled.json"), ("from-list", listed)):
        run(tmp_path / name, *algo, "--labelled-indices", str(path), epochs=2)
        assert_same_run(tmp_path / "drawn", tmp_path / name)
    named = json.loads((tmp_path / "from-list" / "labelled.json").read_text())
    assert named["indices"] == saved["indices"] and named["labelled_indices"] == str(listed)
    run(tmp_path / "resumed", *algo, "--labelled-indices", str(listed), epochs=1)
    run(tmp_path / "resumed", *algo, "--labelled-indices", str(listed), "--resume", epochs=2)
    assert_same_run(tmp_path / "drawn", tmp_path / "resumed")
    other = next(i for i in range(160) if i not in saved["indices"])
    listed.write_text(json.dumps([other, *saved["indices"][1:]]))  # as many, one other image
    line = cli_error(capsys, [*SMALL, *algo, "--labelled-indices", str(listed), "--epochs", "3",
                              "--out", str(tmp_path / "resumed"), "--resume"])  # fmt: skip
    assert f"the labelled subset named by {listed} now differs" in line
    line = cli_error(capsys, [*SMALL, *algo, "--labels", "20", "--epochs", "3",
                              "--out", str(tmp_path / "resumed"), "--resume"])  # fmt: skip
    assert "--labelled-indices" in line  # the drawn subset is another setting


def test_bad_labelled_indices_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--algo", "ssl", "--epochs", "1", "--out", str(tmp_path / "out")]
    cases = {
        "missing": (None, "cannot read the file"),
        "garbage": ("[1, 2", "not JSON"),
        "empty": ("[]", "expected a non-empty list"),
        "object": ('{"labels": 3}', "expected a non-empty list"),
        "floats": ("[1, 2.5]", "every index must be an integer"),
        "booleans": ("[1, true]", "every index must be an integer"),
        "outside": ("[0, 160, -1]", "indices [160, -1] lie outside the 160 training images"),
        "repeated": ("[3, 4, 3]", "1 indices are repeated"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.json"
        if text is not None:
            path.write_text(text)
        line = cli_error(capsys, [*SMALL, *out, "--labelled-indices", str(path)])
        assert message in line and f"{name}.json" in line, (name, line)
    assert not (tmp_path / "out" / CHECKPOINT).exists()
    with pytest.raises(SystemExit):
        train.parse_args([*SMALL, *out, "--labels", "20", "--labelled-indices", "x.json"])
    assert "pass one" in capsys.readouterr().err


def test_supervised_baselines_train_on_the_labelled_images_alone(tmp_path: Path) -> None:
    """Oracle: the same run on an .npz that holds only the labelled images."""
    run(tmp_path / "labels", "--labels", "50", epochs=2)
    indices = json.loads((tmp_path / "labels" / "labelled.json").read_text())["indices"]
    data = load_data("digits", 160, 100)
    path = tmp_path / "subset.npz"
    np.savez(path, x_train=data.x_train[indices].numpy(), y_train=data.y_train[indices].numpy(),
             x_test=data.x_test.numpy(), y_test=data.y_test.numpy())  # fmt: skip
    argv = ["--data", str(path), "--batch-size", "32", "--epochs", "2", "--no-progress"]
    train.main(train.parse_args([*argv, "--out", str(tmp_path / "npz")]))
    a = load_checkpoint(tmp_path / "labels" / "model.safetensors").model.state_dict()
    b = load_checkpoint(tmp_path / "npz" / "model.safetensors").model.state_dict()
    assert_same(a, b)
    metrics = json.loads((tmp_path / "labels" / "metrics.json").read_text())
    assert [m["steps"] for m in metrics] == [2, 2]  # 50 images in batches of 32


def test_ssl_records_every_term_and_the_generative_view(tmp_path: Path) -> None:
    result = run(tmp_path, "--algo", "ssl", "--labels", "50", epochs=1)
    record = result["metrics"][-1]
    for term in TERMS:  # those that cost a pass of their own only when weighted
        if term not in ON_DEMAND:
            assert math.isfinite(record[f"train_{term}"]), term
    assert record["steps"] == 5  # 160 unlabelled images in batches of 32
    model = load_checkpoint(tmp_path / "model.safetensors").model
    data = load_data("digits", 160, 100)
    with torch.no_grad():  # oracle: the library's generative classifier on the same images
        predicted = generative_scores(model, data.x_test).argmax(1)
        gaps = inference_gap_lower_bound(model, data.x_test, max_sweeps=GAP_SWEEPS)
    assert record["test_generative_accuracy"] == float((predicted == data.y_test).double().mean())
    assert record["test_inference_gap"] == pytest.approx(float(gaps.double().mean()), rel=1e-5)
    assert record["test_inference_gap"] >= 0


def test_resume_refuses_changed_data(tmp_path: Path) -> None:
    """The run is bound to its data: the .npz rewritten between epochs is refused, by name."""
    data = load_data("digits", 160, 100)
    path = tmp_path / "data.npz"
    arrays = {"x_train": data.x_train.numpy(), "y_train": data.y_train.numpy(),
              "x_test": data.x_test.numpy(), "y_test": data.y_test.numpy()}  # fmt: skip
    np.savez(path, **arrays)
    for name, change in {
        "labels": {"y_train": np.roll(arrays["y_train"], 1)},  # another balanced draw, too
        "pixels": {"x_train": arrays["x_train"] * 0.5},  # same sizes, shape and classes
        "size": {"x_test": arrays["x_test"][:90], "y_test": arrays["y_test"][:90]},
    }.items():
        np.savez(path, **arrays)
        out = tmp_path / name
        argv = ["--data", str(path), "--algo", "ssl", "--labels", "50", "--no-progress", "--out",
                str(out)]  # fmt: skip
        train.main(train.parse_args([*argv, "--epochs", "1"]))
        stored = json.loads((out / CONFIG).read_text())["data"]
        assert stored["source"] == "file" and len(stored["sha256"]) == 64
        before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
        np.savez(path, **{**arrays, **change})
        with pytest.raises(train.RunError, match="the data of the run .* have changed: sha256"):
            train.main(train.parse_args([*argv, "--epochs", "2", "--resume"]))
        after = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
        assert after == before, name  # the run directory is untouched


def test_runs_record_the_bundled_data_source(tmp_path: Path) -> None:
    run(tmp_path / "r", epochs=1)
    stored = json.loads((tmp_path / "r" / CONFIG).read_text())["data"]
    assert stored["source"].startswith("scikit-learn ") and "sha256" not in stored
    assert stored["num_classes"] == 10 and stored["image_shape"] == [1, 8, 8]
    # a version change of the package that ships the data is a change of data
    config = dict(stored, source="scikit-learn 0.0")
    with pytest.raises(train.RunError, match=r"source 'scikit-learn 0.0' \(stored\)"):
        check_same_data(config, stored, tmp_path / "r")


@pytest.mark.parametrize(
    ("labels", "message"), [("55", "multiple of the 10 classes"), ("170", "[1, 160]")]
)
def test_bad_label_counts_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], labels: str, message: str
) -> None:
    for algo in ("ssl", "sgd"):
        line = cli_error(capsys, [*SMALL, "--algo", algo, "--labels", labels, "--out",
                                  str(tmp_path / algo)])  # fmt: skip
        assert message in line and "--labels" in line


def test_ssl_options_apply_to_ssl_only(capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--entropy-weight", "--labelled-batch-size"):
        with pytest.raises(SystemExit):
            train.parse_args(["--smoke", "--algo", "dem", option, "1"])
        assert "applies to --algo ssl" in capsys.readouterr().err
    args = train.parse_args(["--smoke", "--algo", "ssl", "--entropy-weight", "0.5"])
    assert args.entropy_weight == 0.5 and args.reconstruction_weight == SSL_WEIGHTS.reconstruction
    with pytest.raises(SystemExit):
        train.parse_args(["--smoke", "--algo", "sgd", "--class-balance-target", "uniform"])
    assert "applies to --algo ssl" in capsys.readouterr().err


def test_the_class_balance_target_reaches_the_trainer_and_binds_the_run(tmp_path: Path) -> None:
    argv = ["--algo", "ssl", "--labels", "50", "--class-balance-target", "prior"]
    run(tmp_path, *argv, epochs=1)
    args = train.parse_args([*SMALL, *argv, "--out", str(tmp_path)])
    model = load_checkpoint(tmp_path / CHECKPOINT).model
    # the ssl default wraps the trainer in the parameter average (drm.averaging)
    trainer = build_trainer(args, model)
    assert isinstance(trainer, ParameterAverage)
    assert trainer.trainer.balance_target == "prior"  # type: ignore[attr-defined]
    default = train.parse_args([*SMALL, "--algo", "ssl", "--out", str(tmp_path)])
    trainer = build_trainer(default, model)
    assert isinstance(trainer, ParameterAverage)
    assert trainer.trainer.balance_target == "uniform"  # type: ignore[attr-defined]
    with pytest.raises(train.RunError, match="--class-balance-target 'prior' .stored. vs 'unif"):
        run(tmp_path, "--algo", "ssl", "--labels", "50", "--resume", epochs=2)


def trainer_of_a_run(tmp_path: Path, argv: list[str]) -> Any:
    """One epoch of a run with argv, then the trainer that --resume builds from its checkpoint."""
    run(tmp_path, *argv, epochs=1)
    args = train.parse_args([*SMALL, *argv, "--out", str(tmp_path)])
    return build_trainer(args, load_checkpoint(tmp_path / CHECKPOINT).model)


def test_the_mean_teacher_is_the_average_and_binds_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--algo", "ssl", "--labels", "50", "--consistency-target", "average"]
    trainer = trainer_of_a_run(tmp_path, argv)
    assert isinstance(trainer, ParameterAverage)
    assert trainer.trainer.teacher is trainer.average  # type: ignore[attr-defined]
    default = train.parse_args([*SMALL, "--algo", "ssl", "--out", str(tmp_path)])
    trainer = build_trainer(default, load_checkpoint(tmp_path / CHECKPOINT).model)
    assert trainer.trainer.teacher is None  # type: ignore[attr-defined]
    with pytest.raises(train.RunError, match="--consistency-target 'average' .stored. vs 'self'"):
        run(tmp_path, "--algo", "ssl", "--labels", "50", "--resume", epochs=2)
    with pytest.raises(SystemExit):
        train.parse_args(["--smoke", *argv, "--average-decay", "0"])
    assert "--consistency-target average needs --average-decay > 0" in capsys.readouterr().err


def test_the_consistency_deformation_reaches_the_trainer_and_binds_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = trainer_of_a_run(
        tmp_path, ["--algo", "ssl", "--labels", "50", "--consistency-deformation", "1.5"]
    )
    assert trainer.trainer.deformation == 1.5  # type: ignore[attr-defined]
    with pytest.raises(train.RunError, match="--consistency-deformation 1.5 .stored. vs 0.0"):
        run(tmp_path, "--algo", "ssl", "--labels", "50", "--resume", epochs=2)
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit):
            train.parse_args(["--smoke", "--algo", "ssl", "--consistency-deformation", bad])
        assert "--consistency-deformation: must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--smoke", "--algo", "sgd", "--consistency-deformation", "1"])
    assert "--consistency-deformation applies to --algo ssl" in capsys.readouterr().err


def test_the_class_guess_reaches_the_trainer_and_binds_the_run(tmp_path: Path) -> None:
    argv = ["--algo", "ssl", "--labels", "50", "--class-guess", "generative",
            "--generative-cross-entropy-weight", "1"]  # fmt: skip
    run(tmp_path, *argv, epochs=1)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics[0]["train_generative_cross_entropy"] > 0
    args = train.parse_args([*SMALL, *argv, "--out", str(tmp_path)])
    trainer = build_trainer(args, load_checkpoint(tmp_path / CHECKPOINT).model)
    assert isinstance(trainer, ParameterAverage)
    assert trainer.trainer.class_guess == "generative"  # type: ignore[attr-defined]
    with pytest.raises(train.RunError, match="--class-guess 'generative' .stored. vs 'cnn'"):
        run(tmp_path, "--algo", "ssl", "--labels", "50", "--generative-cross-entropy-weight", "1",
            "--resume", epochs=2)  # fmt: skip
    with pytest.raises(train.RunError, match="--generative-cross-entropy-weight 1.0 .stored"):
        run(tmp_path, "--algo", "ssl", "--labels", "50", "--class-guess", "generative",
            "--resume", epochs=2)  # fmt: skip


def test_an_ssl_run_from_before_the_uniform_default_resumes_with_its_prior_target(
    tmp_path: Path,
) -> None:
    """Runs written when the default target was the prior have no class_balance_target in
    their config: they compare as 'prior', so they resume with it and refuse the new default."""
    argv = ["--algo", "ssl", "--labels", "50", "--class-balance-target", "prior"]
    run(tmp_path, *argv, epochs=1)
    # nor the later settings: they compare as generative_cross_entropy 0 and class guess 'cnn'
    forget_settings(
        tmp_path, "class_balance_target", "generative_cross_entropy_weight", "class_guess"
    )
    with pytest.raises(train.RunError, match="--class-balance-target 'prior' .stored. vs 'unif"):
        run(tmp_path, "--algo", "ssl", "--labels", "50", "--resume", epochs=2)
    run(tmp_path, *argv, "--resume", epochs=2)
    assert len(json.loads((tmp_path / METRICS).read_text())) == 2


@pytest.mark.parametrize("algo", ["sgd", "dem", "em", "ssl"])
def test_a_run_from_before_parameter_averaging_resumes(tmp_path: Path, algo: str) -> None:
    """Runs written before --average-decay have no such key: they compare as 0 (off), so they
    resume with it (ssl, whose default is now on: only with --average-decay 0)."""
    argv = ["--algo", algo]
    if algo == "ssl":
        argv += ["--labels", "50", "--average-decay", "0"]
    run(tmp_path, *argv, epochs=1)
    forget_settings(tmp_path, "average_decay")
    if algo == "ssl":
        with pytest.raises(train.RunError, match="--average-decay 0.0 .stored. vs 0.999"):
            run(tmp_path, "--algo", "ssl", "--labels", "50", "--resume", epochs=2)
    if algo == "dem":
        with pytest.raises(train.RunError, match="--average-decay 0.0 .stored. vs 0.5"):
            run(tmp_path, *argv, "--average-decay", "0.5", "--resume", epochs=2)
    run(tmp_path, *argv, "--resume", epochs=2)
    assert len(json.loads((tmp_path / METRICS).read_text())) == 2


def test_average_decay_is_refused_outside_dem_and_ssl(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--algo", "sgd", "--average-decay", "0.9"], ["--average-decay", "1"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--smoke", *argv])
    err = capsys.readouterr().err
    assert "--average-decay applies to --algo dem and ssl" in err
    assert "must be a number in [0, 1), got 1" in err
    with pytest.raises(ValueError, match="--average-decay must be in"):
        train.RunConfig(algo="ssl", smoke=True, average_decay=1.5)


# --- one-line errors -------------------------------------------------------------------------


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command in-process; it must fail with exactly one line on stderr."""
    code = train.cli([*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = cli_error(capsys, ["--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o")])
    assert "nope.npz" in line
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz archive")
    assert "bad.npz" in cli_error(capsys, ["--data", str(bad), "--out", str(tmp_path / "o")])


def test_stray_labels_need_num_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stray label 10 in a 10-class set: refused in one line; --num-classes 11 accepts it."""
    data = load_data("digits", None, None)
    y_train = data.y_train.numpy().copy()
    y_train[5] = 10
    path = tmp_path / "stray.npz"
    np.savez(path, x_train=data.x_train.numpy(), y_train=y_train, x_test=data.x_test.numpy(),
             y_test=data.y_test.numpy())  # fmt: skip
    argv = ["--data", str(path), "--epochs", "1", "--limit-test", "50"]
    line = cli_error(capsys, [*argv, "--out", str(tmp_path / "a")])
    assert "stray labels: 10 (1 training images)" in line and "--num-classes" in line
    assert not (tmp_path / "a" / CHECKPOINT).exists()
    run(tmp_path / "b", "--data", str(path), "--num-classes", "11", epochs=1)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT).model.num_classes == 11
    with pytest.raises(ValueError, match=r"labels 9 lie outside \[0, 9\)"):
        load_data("digits", None, None, num_classes=9)


def test_divergence_stops_the_run_and_keeps_the_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A huge learning rate: one line, non-zero exit, nothing saved; a parameter that is no
    longer finite after an epoch stops the run before the checkpoint is overwritten."""
    line = cli_error(capsys, [*SMALL, "--lr", "1e30", "--epochs", "2", "--out",
                              str(tmp_path / "huge")])  # fmt: skip
    assert "try a lower --lr" in line
    assert not (tmp_path / "huge" / CHECKPOINT).exists()
    model = drm.DeepRenderingModel.from_config(ARCHITECTURES["leaky"], seed=1)
    check_finite(model, 3)  # finite: nothing to say
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(train.RunError, match="no longer finite .*epoch 2 is kept"):
        check_finite(model, 3)
    # the trainer's state too: the live iterate behind a parameter average diverges first
    with torch.no_grad():
        next(model.parameters())[0] = 0.0
    state = {"trainer": {}, "live": {"levels.0.weight": torch.tensor([1.0, float("inf")])}}
    with pytest.raises(train.RunError, match="trainer state's live.levels.0.weight is no longer"):
        check_finite(model, 3, state)


def test_resume_mismatch_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(tmp_path, epochs=1)
    line = cli_error(capsys, [*SMALL, "--epochs", "2", "--out", str(tmp_path), "--resume",
                              "--lr", "0.01"])  # fmt: skip
    assert "--lr" in line and "0.01" in line
    line = cli_error(capsys, [*SMALL, "--epochs", "2", "--out", str(tmp_path), "--resume",
                              "--algo", "dem"])  # fmt: skip
    assert "--algo" in line


def test_resume_without_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = cli_error(capsys, [*SMALL, "--out", str(tmp_path), "--resume"])
    assert "no checkpoint" in line


def test_resume_beyond_epochs_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(tmp_path, epochs=2)
    line = cli_error(capsys, [*SMALL, "--epochs", "1", "--out", str(tmp_path), "--resume"])
    assert "2 epochs" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = cli_error(capsys, [*SMALL, "--out", str(tmp_path), "--device", "cuda"])
    assert "CUDA" in line


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "garbage-header":
        data[8:40] = b"\xff" * 32
        path.write_bytes(bytes(data))
    elif how == "flipped-bit":  # a bit of a tensor: only the checksum notices
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["garbage-header", "empty"])
def test_corrupted_checkpoint_is_one_line_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    run(tmp_path, epochs=1)
    corrupt(tmp_path / "model.safetensors", how)
    line = cli_error(capsys, [*SMALL, "--epochs", "2", "--out", str(tmp_path), "--resume"])
    assert "model.safetensors" in line


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: the uninterrupted 3-epoch run. The damaged epoch-2 file falls back to epoch 1."""
    run(tmp_path / "straight", epochs=3)
    out = tmp_path / "damaged"
    run(out, epochs=2)
    assert load_checkpoint(out / PREVIOUS).metadata["epoch"] == "1"
    corrupt(out / CHECKPOINT, "flipped-bit")
    capsys.readouterr()
    run(out, "--resume", epochs=3)
    warning = capsys.readouterr().err
    assert "warning:" in warning and PREVIOUS in warning
    assert_same_run(tmp_path / "straight", out)
    assert load_checkpoint(out / PREVIOUS).metadata["epoch"] == "2"
    # both damaged: one line that says what to do
    for name in (CHECKPOINT, PREVIOUS):
        corrupt(out / name, "truncated")
    line = cli_error(capsys, [*SMALL, "--epochs", "4", "--out", str(out), "--resume"])
    assert "unreadable too" in line and "--overwrite" in line


def test_recorded_epochs_are_not_replaced_without_overwrite(tmp_path: Path) -> None:
    """A directory with epochs in metrics.json but no checkpoint is still a run."""
    run(tmp_path, epochs=1)
    for name in (CHECKPOINT, PREVIOUS):
        (tmp_path / name).unlink(missing_ok=True)
    before = (tmp_path / METRICS).read_bytes()
    with pytest.raises(train.RunError, match=r"1 epochs in metrics.json.*--overwrite"):
        run(tmp_path, epochs=1)
    assert (tmp_path / METRICS).read_bytes() == before
    run(tmp_path, "--overwrite", epochs=1)


def test_any_flipped_bit_or_cut_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Random bit flips (header and tensors) and cuts: always one line, never a resume."""
    run(tmp_path, epochs=1)
    path = tmp_path / "model.safetensors"
    good = path.read_bytes()
    header = 8 + int.from_bytes(good[:8], "little")
    generator = random.Random(0)
    positions = [generator.randrange(header) for _ in range(12)]
    positions += [generator.randrange(header, len(good)) for _ in range(12)]
    for i in positions:
        data = bytearray(good)
        data[i] ^= 1 << generator.randrange(8)
        path.write_bytes(bytes(data))
        assert "model.safetensors" in cli_error(
            capsys, [*SMALL, "--out", str(tmp_path), "--resume"]
        )
    for cut in (0, 7, header - 1, header, len(good) - 1):
        path.write_bytes(good[:cut])
        assert "model.safetensors" in cli_error(
            capsys, [*SMALL, "--out", str(tmp_path), "--resume"]
        )


@pytest.mark.parametrize("how", ["truncated", "flipped-bit"])
@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_corrupted_checkpoint_is_one_line(tmp_path: Path, how: str) -> None:
    """The real command (python -m): one line on stderr, no traceback."""
    run(tmp_path, epochs=1)
    corrupt(tmp_path / "model.safetensors", how)
    done = subprocess.run(
        [sys.executable, "-m", "experiments.train", *SMALL, "--epochs", "2", "--out",
         str(tmp_path), "--resume", "--threads", "1", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "model.safetensors" in lines[0]
    if how == "flipped-bit":
        assert "SHA-256" in lines[0]


# --- SIGKILL at any moment -------------------------------------------------------------------

KILL_ARGS = [*SMALL, "--epochs", "3", "--threads", "1", "--no-progress"]

# A run whose write of one file stalls half-way through its temporary file (the test then kills
# it there): the harness patches drm.checkpoint's and experiments.training.rundir's atomic_write.
STALL = """
import os, sys, time
from pathlib import Path
import drm.checkpoint as checkpoint
import experiments.train as train
import experiments.training.rundir as rundir

marker, name, nth = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real = checkpoint.atomic_write
calls = {"n": 0}

def stalling(path, write):
    if path.name == name:
        calls["n"] += 1
        if calls["n"] == nth:
            def half(tmp):
                write(tmp)
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                marker.touch()
                time.sleep(120)
            return real(path, half)
    return real(path, write)

checkpoint.atomic_write = stalling
rundir.atomic_write = stalling
sys.exit(train.cli(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 3-epoch run (in-process, one thread)."""
    out = tmp_path_factory.mktemp("reference")
    with single_thread():
        train.main(train.parse_args([*KILL_ARGS, "--out", str(out)]))
    return out


def wait_for(predicate: Any, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.002)


def check_after_kill(out: Path, reference: Path) -> None:
    """Whatever a kill left is loadable, and resuming (or restarting) finishes the same run."""
    for name in ("metrics.json", "config.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())  # never torn
    if (out / "curves.png").exists():
        assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    if (out / "model.safetensors").exists():
        checkpoint = load_checkpoint(out / "model.safetensors")
        done = int(checkpoint.metadata["epoch"])
        if (out / "metrics.json").exists():  # at most one epoch behind the checkpoint
            assert done - len(json.loads((out / "metrics.json").read_text())) in (0, 1)
        train.main(train.parse_args([*KILL_ARGS, "--out", str(out), "--resume"]))
    else:
        with pytest.raises(train.RunError, match="no checkpoint"):
            train.main(train.parse_args([*KILL_ARGS, "--out", str(out), "--resume"]))
        train.main(train.parse_args([*KILL_ARGS, "--out", str(out)]))
    assert not list(out.glob(".*.tmp")), "stale temporary files were left behind"
    assert_same_run(reference, out)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def launch(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.mark.parametrize("moment", ["at-start", "first-checkpoint"])
@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_sigkill_then_resume(tmp_path: Path, reference: Path, moment: str) -> None:
    out = tmp_path / "run"
    process = launch(["-m", "experiments.train", *KILL_ARGS, "--out", str(out)])
    try:
        if moment == "at-start":  # the run has claimed DIR, long before its first checkpoint
            wait_for(out.exists, process)
        else:  # a moment right after the first checkpoint lands: while the others are written
            wait_for((out / "model.safetensors").exists, process)
    finally:
        kill(process)
    check_after_kill(out, reference)


@pytest.mark.parametrize(
    ("name", "nth"),
    [
        ("model.safetensors", 1),  # the first checkpoint, half written: nothing to resume yet
        ("model.safetensors", 2),  # the second one: the first must survive
        ("metrics.json", 2),  # after the first checkpoint, before its metrics
    ],
)
@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_sigkill_during_a_write_then_resume(
    tmp_path: Path, reference: Path, name: str, nth: int
) -> None:
    out, marker = tmp_path / "run", tmp_path / "stalled"
    process = launch(["-c", STALL, str(marker), name, str(nth), *KILL_ARGS, "--out", str(out)])
    try:
        wait_for(marker.exists, process)
        assert list(out.glob(f".{name}.*.tmp")), "no half-written temporary file"
        # while it runs, no second process may use the directory
        with pytest.raises(train.RunError, match="in use"):
            train.main(train.parse_args([*KILL_ARGS, "--out", str(out), "--overwrite"]))
    finally:
        kill(process)
    check_after_kill(out, reference)
