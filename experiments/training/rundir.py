"""The run directory DIR (--out): what is in it, how it is written, and when a run may resume.

    DIR/model.safetensors  the model and the trainer's state (optimizer moments, EM statistics)
                           (`drm.checkpoint.save_checkpoint`); its header also holds the epoch,
                           the metrics so far and the run configuration, all covered by the
                           SHA-256 that `drm.checkpoint` checks on load
    DIR/model.previous.safetensors  the checkpoint of the epoch before (a resume falls back to
                           it, with a warning, when the latest is damaged)
    DIR/metrics.json       a list, one dict per completed epoch: epoch, train_loss (mean over the
                           epoch's images), test_accuracy, test_loss (deep: cross-entropy of the
                           max-sum scores) or test_log_likelihood (shallow: mean log p(x)),
                           deep models: test_generative_accuracy (the generative classifier)
                           and test_inference_gap (a certified lower bound) on the first 500
                           test images (`evaluation.diagnostics`), lr
                           (gradient methods), what end_epoch() reported (as train_*), steps,
                           seconds (training + evaluation of the epoch), train_seconds,
                           eval_seconds, images_per_second, elapsed (running sum of seconds)
    DIR/config.json        the run configuration: every setting (`RunConfig.settings`), the
                           model architecture, the data sizes and source, the versions
    DIR/labelled.json      with --labels N: the indices of the N labelled training images
    DIR/curves.png         loss and accuracy against epoch and against wall time
    DIR/.lock              flock-ed while a process trains: two runs never share DIR

Write order: config.json before the first epoch; then after every epoch the checkpoint FIRST,
then metrics.json, config.json, curves.png. The checkpoint is the single source of truth (the
others are derived from it, and `--resume` rewrites them from it), and each file is replaced by
one atomic rename (`drm.checkpoint.atomic_write`: temporary file, fsync, os.replace), so a
SIGKILL at any moment leaves the previous or the new version of each file, never a torn one;
metrics.json is at most one epoch behind the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from drm import distributed
from drm.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from drm.data import Dataset
from drm.shallow import ShallowRenderingModel
from experiments._cli import one_line
from experiments.training.config import ESSENTIAL, LEGACY_SETTINGS, RunConfig, RunError
from experiments.training.data import data_description
from experiments.training.plots import plot_curves

CHECKPOINT = "model.safetensors"
# the checkpoint of the epoch before, kept for a resume when the latest is damaged
PREVIOUS = "model.previous.safetensors"
METRICS = "metrics.json"
CONFIG = "config.json"
CURVES = "curves.png"
LABELLED = "labelled.json"
LOCK = ".lock"
FORMAT = "drm-train-run/1"


def write_json(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path`, atomically."""
    text = json.dumps(value, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_labelled(out: Path, config: RunConfig, labelled: Tensor) -> None:
    """DIR/labelled.json: the indices (into the training set) of the labelled images, and where
    they came from (drawn from the seed, or named by --labelled-indices)."""
    origin = ({"seed": config.seed} if config.labelled_indices is None
              else {"labelled_indices": config.labelled_indices})  # fmt: skip
    write_json(
        out / LABELLED,
        {"labels": int(labelled.shape[0]), **origin, "data": config.data,
         "indices": labelled.tolist()},
    )  # fmt: skip


def write_outputs(out: Path, run_config: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    """The files derived from the checkpoint; each is atomic, their order does not matter."""
    write_json(out / METRICS, metrics)
    write_json(out / CONFIG, run_config)
    if metrics:
        plot_curves(out / CURVES, metrics)


def model_description(model: Any) -> dict[str, Any]:
    """The model's kind and architecture, as config.json records them."""
    if isinstance(model, ShallowRenderingModel):
        return {"kind": "shallow", "config": model.config_dict()}
    return {"kind": "deep", "config": model.config.to_dict()}


def run_config_of(
    config: RunConfig, model: Any, data: Dataset, labelled: Tensor | None = None
) -> dict[str, Any]:
    """What config.json holds (and the checkpoint's header, under its SHA-256)."""
    return {
        "format": FORMAT,
        "args": config.settings(),
        "out": str(config.out),
        "model": model_description(model),
        "data": data_description(str(config.data), data, labelled),
        "parameters": sum(p.numel() for p in model.parameters()),
        "world_size": distributed.world_size(),  # processes (ranks) of the latest (re)start
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
    }


def save_run(
    out: Path,
    model: Any,
    state: dict[str, Any],
    run_config: dict[str, Any],
    metrics: list[dict[str, Any]],
    labelled: Tensor | None = None,
) -> None:
    """The checkpoint first (the truth), then the files derived from it."""
    run_config["model"] = model_description(model)  # EM may move priors kept in the config
    metadata = {
        "run_format": FORMAT,
        "epoch": str(len(metrics)),
        "metrics": json.dumps(metrics),
        "run_config": json.dumps(run_config),
        "labelled": json.dumps(None if labelled is None else labelled.tolist()),
    }
    if (out / CHECKPOINT).is_file():  # keep the epoch before (a copy: both stay loadable)
        atomic_write(out / PREVIOUS, lambda tmp: shutil.copyfile(out / CHECKPOINT, tmp))
    save_checkpoint(out / CHECKPOINT, model, state, metadata)
    write_outputs(out, run_config, metrics)


def load_run(
    out: Path,
) -> tuple[Any, dict[str, Any], dict[str, Any], list[dict[str, Any]], list[int] | None]:
    """(model, trainer state, run config, metrics, labelled indices) of DIR/model.safetensors.

    A damaged latest checkpoint falls back, with a warning, to the previous epoch's (which then
    replaces it): the run resumes one epoch earlier, to the same result.
    """
    path = out / CHECKPOINT
    if not path.is_file():
        raise RunError(f"--resume: no checkpoint {path} (run without --resume)")
    try:
        model, state, metadata = load_checkpoint(path)
    except ValueError as err:
        previous = out / PREVIOUS
        try:
            model, state, metadata = load_checkpoint(previous)
        except (ValueError, FileNotFoundError) as second:
            reason = "absent" if isinstance(second, FileNotFoundError) else "unreadable too"
            raise RunError(
                f"--resume: cannot load {path}: {one_line(err)}; the previous epoch's {previous} "
                f"is {reason}: restore the file from a backup, or start again with --overwrite "
                "(the run's epochs are lost)"
            ) from err
        print(
            f"warning: {path} cannot be loaded ({one_line(err)}); resuming from the previous "
            f"epoch's {previous}",
            file=sys.stderr,
        )
        if distributed.rank() == 0:
            atomic_write(path, lambda tmp: shutil.copyfile(previous, tmp))
    if metadata.get("run_format") != FORMAT:
        raise RunError(f"--resume: {path} was not written by experiments.train")
    try:
        metrics = json.loads(metadata["metrics"])
        run_config = json.loads(metadata["run_config"])
        epoch = int(metadata["epoch"])
        labelled = json.loads(metadata.get("labelled", "null"))
    except (KeyError, ValueError) as err:
        raise RunError(f"--resume: {path} has a malformed header: {err}") from err
    if not isinstance(metrics, list) or len(metrics) != epoch or not isinstance(run_config, dict):
        raise RunError(f"--resume: {path} has inconsistent metadata")
    if labelled is not None and not (
        isinstance(labelled, list) and all(isinstance(i, int) for i in labelled)
    ):
        raise RunError(f"--resume: {path} has a malformed labelled subset")
    return model, state, run_config, metrics, labelled


def check_resumable(run_config: dict[str, Any], config: RunConfig, out: Path) -> None:
    """Raise RunError naming every essential setting that differs from the stored run."""
    stored = run_config.get("args", {})
    stored = {**LEGACY_SETTINGS.get(stored.get("algo"), {}), **stored}
    differ = [
        f"--{key.replace('_', '-')} {stored.get(key)!r} (stored) vs {getattr(config, key)!r}"
        for key in ESSENTIAL
        if stored.get(key) != getattr(config, key)
    ]
    if differ:
        raise RunError(
            f"--resume: the run in {out} was made with other settings: {'; '.join(differ)} "
            "(use the same settings, or another --out)"
        )


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on DIR for this process (released by the OS even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    handle = open(out / LOCK, "a")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise RunError(f"{out} is in use by another training process") from err
        yield
    finally:
        handle.close()


def held_run(out: Path) -> str | None:
    """What in DIR shows a run a fresh start would replace: a checkpoint, or recorded epochs."""
    for name in (CHECKPOINT, PREVIOUS):
        if (out / name).exists():
            return name
    try:
        recorded = json.loads((out / METRICS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"an unreadable {METRICS}"
    return f"{len(recorded)} epochs in {METRICS}" if recorded else None


def remove_stale_temporaries(out: Path) -> None:
    """Temporary files of writes that a kill interrupted (never read; safe to delete)."""
    for name in (CHECKPOINT, PREVIOUS, METRICS, CONFIG, CURVES, LABELLED):
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
