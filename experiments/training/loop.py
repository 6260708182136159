"""The training loop: `run(RunConfig) -> dict`, one loop for every algorithm, resumable.

Per epoch: `trainer.step(x, y)` over the minibatches (a tqdm bar on stderr), `trainer.end_epoch()`,
the test metrics (`evaluation`), then the run directory is rewritten (`rundir`: the checkpoint
first, each file atomically).

Determinism: the model starts from `seed`; epoch e visits the minibatches in an order drawn from
a generator seeded with (seed, e), torch's global generator is reseeded from (seed, e) and the
learning rate of epoch e is lr * lr_decay^(e - 1), so no random or scheduler state needs saving:
a resumed run (the essential settings must match the stored run) gives the same tensors and
metrics, timings aside, as an uninterrupted run (on the same device and thread count).

Data-parallel (under torchrun, `launch`): every rank draws the same global minibatch order and
takes its own contiguous shard of each minibatch (`drm.distributed.shard`), then the trainer
makes the update of the whole minibatch. The train loss and the test metrics are summed over
the ranks. Only rank 0 writes DIR (and holds its lock) and shows progress; every rank reads the
checkpoint on resume, which may use another number of ranks.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

import drm
from drm import distributed
from drm.data import Dataset, labelled_subset
from drm.em import Trainer
from drm.semisupervised import UNLABELLED
from drm.shallow import ShallowRenderingModel
from experiments.training import rundir
from experiments.training.config import RunConfig, RunError, is_model_file
from experiments.training.data import (
    check_same_data,
    data_description,
    data_name,
    default_batch_size,
    default_model,
    load_data,
    read_labelled_indices,
)
from experiments.training.evaluation import cluster_labels, diagnostics, evaluate
from experiments.training.launch import agreed, nothing, resolve_device
from experiments.training.rundir import CHECKPOINT, CURVES, LABELLED, METRICS, PREVIOUS
from experiments.training.trainers import (
    build_model,
    build_trainer,
    epoch_lr,
    has_optimizer,
    model_file_config,
    set_learning_rate,
)

# ----------------------------------------------------------------------------------------------
# The minibatches of an epoch
# ----------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch `epoch` of the run seeded `seed` (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> 1)


def minibatches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """The index batches of epoch `epoch`: a permutation seeded by (seed, epoch), cut in order."""
    order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
    return list(order.split(batch_size))


def semisupervised_batches(
    n: int, labelled: Tensor, batch_size: int, labelled_batch_size: int, seed: int, epoch: int
) -> list[tuple[Tensor, Tensor]]:
    """The (indices, labelled mask) batches of a semi-supervised epoch.

    An epoch is one pass over all n training images as unlabelled ones (`minibatches`: the
    labelled images stay in this pool); each batch is `labelled_batch_size` labelled images (a
    stream of permutations of `labelled`, seeded by (seed, epoch)) followed by its unlabelled
    images.
    """
    unlabelled = minibatches(n, batch_size, seed, epoch)
    rng = np.random.default_rng([seed, epoch, 1])
    needed = len(unlabelled) * labelled_batch_size
    laps = -(-needed // labelled.shape[0])
    stream = torch.cat([labelled[torch.from_numpy(rng.permutation(labelled.shape[0]))]
                        for _ in range(laps)])[:needed]  # fmt: skip
    batches = []
    for i, index in enumerate(unlabelled):
        chosen = stream[i * labelled_batch_size : (i + 1) * labelled_batch_size]
        known = torch.cat([torch.ones_like(chosen, dtype=torch.bool),
                           torch.zeros_like(index, dtype=torch.bool)])  # fmt: skip
        batches.append((torch.cat([chosen, index]), known))
    return batches


def epoch_batches(
    data: Dataset, config: RunConfig, epoch: int, labelled: Tensor | None
) -> list[tuple[Tensor, Tensor | None]]:
    """The (indices, labelled mask or None: all labelled) batches of epoch `epoch`."""
    n, size = data.x_train.shape[0], config.batch_size
    assert size is not None  # resolved by run() from the data
    if config.algo != "ssl":
        return [(index, None) for index in minibatches(n, size, config.seed, epoch)]
    pool = torch.arange(n) if labelled is None else labelled
    assert config.labelled_batch_size is not None  # filled in by RunConfig for ssl
    return [
        (index, known)
        for index, known in semisupervised_batches(
            n, pool, size, config.labelled_batch_size, config.seed, epoch
        )
    ]


def learning_rate(config: RunConfig, epoch: int) -> float:
    """The learning rate of epoch `epoch` (`trainers.epoch_lr` of the config's lr, lr_decay)."""
    assert config.lr is not None and config.lr_decay is not None  # filled in by RunConfig
    return epoch_lr(config.lr, config.lr_decay, epoch)


# ----------------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------------


def train_epoch(
    trainer: Trainer,
    data: Dataset,
    config: RunConfig,
    epoch: int,
    device: torch.device,
    labelled: Tensor | None = None,
) -> tuple[float, dict[str, float | None], int]:
    """One pass over the training set; returns (mean loss per image, end_epoch summary, steps).

    With several ranks, each steps on its shard of every global minibatch (`share`: its
    fraction), and the loss is summed over the ranks after every step.

    Args:
        labelled: ssl: the indices of the labelled training images (None: all of them).
    """
    torch.manual_seed(epoch_seed(config.seed, epoch))  # for any trainer that draws at random
    set_learning_rate(trainer, learning_rate(config, epoch))
    batches = epoch_batches(data, config, epoch, labelled)
    world = distributed.world_size()
    total, count = 0.0, 0
    bar = tqdm(
        batches,
        desc=f"epoch {epoch}/{config.epochs}",
        unit="batch",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        disable=not config.progress or distributed.rank() != 0,
    )
    for i, (index, known) in enumerate(bar):
        local = (distributed.shard(index) if world > 1 else index).to(device)
        share = local.shape[0] / index.shape[0]  # 1.0 in one process
        y = data.y_train[local]
        if known is not None:  # ssl: the unlabelled part of the batch has no labels
            known = (distributed.shard(known) if world > 1 else known).to(device)
            y = torch.where(known, y, UNLABELLED)
        loss = trainer.step(data.x_train[local], y, share=share)
        if world > 1:  # the global batch's mean loss (0.0 from an empty shard weighs nothing)
            loss = distributed.all_reduce_float(loss * local.shape[0]) / index.shape[0]
        if not math.isfinite(loss):
            raise RunError(f"epoch {epoch}, step {i + 1}: the loss is {loss}; try a lower --lr")
        total += loss * index.shape[0]
        count += index.shape[0]
        if i % 20 == 0:
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    bar.close()
    # strict JSON has no NaN: a statistic that does not apply (nan) is stored as null
    summary = {
        k: f if math.isfinite(f := float(v)) else None for k, v in trainer.end_epoch().items()
    }
    return total / max(count, 1), summary, len(batches)


def _tensors(value: Any, prefix: str) -> Iterator[tuple[str, Tensor]]:
    """(path, tensor) of every tensor in nested dicts and lists (a trainer's state)."""
    if isinstance(value, Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{index}]")


def check_finite(model: Any, epoch: int, state: dict[str, Any] | None = None) -> None:
    """Raise RunError when a parameter or buffer of `model`, or a tensor of the trainer's `state`
    (e.g. the live iterate behind a parameter average, an optimizer's moments), is NaN or
    infinite (divergence): nothing non-finite is ever checkpointed."""
    tensors = [(f"model's {name}", t) for name, t in model.state_dict().items()]
    if state is not None:
        tensors += [(f"trainer state's {path}", t) for path, t in _tensors(state, "")]
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kept = f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "nothing saved"
            raise RunError(
                f"epoch {epoch}: the {name} is no longer finite (training diverged; "
                f"{kept}); try a lower --lr"
            )


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run(config: RunConfig) -> dict[str, Any]:
    """Train (or resume) the run of `config`; returns the per-epoch metrics and the paths.

    Returns: {"metrics": one dict per epoch (as metrics.json), "final": the last of them,
    "out", "checkpoint": paths, "algo", "model", "data": the resolved settings}.

    Under torchrun (its environment variables set) it joins the process group first, unless
    the caller already did, and leaves it after a successful run (after a failure, leaving can
    block on a dead peer: the process is about to exit anyway).
    """
    if config.out is None:  # smoke without out: a throw-away directory
        with tempfile.TemporaryDirectory(prefix="drm-train-smoke-") as tmp:
            return {**run(config.replace(out=Path(tmp))), "out": f"{tmp} (temporary, removed)"}
    out = Path(config.out)
    device = resolve_device(config.device)
    joined = distributed.launched_by_torchrun() and not distributed.is_distributed()
    if joined:
        distributed.init(device, config.dist_timeout)
    if config.threads:
        torch.set_num_threads(config.threads)
    config = config.replace(data=data_name(str(config.data)))
    with contextlib.ExitStack() as stack:

        def claim() -> None:  # rank 0 owns DIR
            if config.resume and not (out / CHECKPOINT).is_file():  # before creating DIR
                raise RunError(f"--resume: no checkpoint {out / CHECKPOINT} (run without --resume)")
            if distributed.rank() == 0:
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(rundir.locked(out))

        agreed(claim)
        result = _train(config, out, device)
    if joined:
        distributed.teardown()
    return result


def _prepare(
    config: RunConfig, out: Path
) -> tuple[RunConfig, Any, dict[str, Any] | None, list[dict[str, Any]], Dataset, Tensor | None]:
    """(resolved config, model, trainer state or None, metrics so far, data, labelled indices).

    A fresh run or the stored one. With `labels` N the labelled subset is drawn (balanced, from
    the seed); the supervised algorithms then train on it alone (data.x_train is the subset),
    ssl on all the training images with these labelled. The config comes back with `model`,
    `channels_last` and `batch_size` resolved from the data.
    """
    lead = distributed.rank() == 0
    if lead:
        rundir.remove_stale_temporaries(out)
    metrics: list[dict[str, Any]] = []
    state: dict[str, Any] | None = None
    stored_labelled = None
    if config.resume:  # fails fast, before the data
        model, state, stored_config, metrics, stored_labelled = rundir.load_run(out)
    elif lead and (held := rundir.held_run(out)):
        if not config.overwrite:
            raise RunError(
                f"{out} already holds a run ({held}): pass --resume to continue it, "
                "--overwrite to start again, or choose another --out"
            )
        for name in (CHECKPOINT, PREVIOUS):
            (out / name).unlink(missing_ok=True)
    name = str(config.data)
    data = load_data(name, config.limit_train, config.limit_test, config.num_classes)
    labelled = None
    if config.labels is not None:
        labelled = labelled_subset(data.y_train, config.labels, data.num_classes, config.seed)
    elif config.labelled_indices is not None:
        labelled = read_labelled_indices(config.labelled_indices, data.x_train.shape[0])
    if labelled is not None and config.algo != "ssl":  # the supervised baselines: these alone
        data = Dataset(data.x_train[labelled], data.y_train[labelled], data.x_test,
                       data.y_test, data.num_classes)  # fmt: skip
    model_name = config.model or default_model(data.image_shape)
    config = config.replace(
        model=model_name,
        # 1.3x faster LeNet ssl steps on CPU; slower on 8x8 images
        channels_last=config.channels_last
        if config.channels_last is not None
        else config.algo == "ssl"
        and model_name != "small"
        and default_model(data.image_shape) == "lenet",
        batch_size=config.batch_size or default_batch_size(data.x_train.shape[0]),
    )
    assert config.epochs is not None  # filled in by RunConfig
    if config.resume:
        rundir.check_resumable(stored_config, config, out)
        if is_model_file(model_name):  # the file may have been edited since the run began
            architecture = model_file_config(model_name, data.image_shape, data.num_classes)
            if getattr(model, "config", None) != architecture:
                raise RunError(
                    f"--resume: {model_name} now describes another architecture than the run "
                    f"in {out} (restore the file, or start a run in another --out)"
                )
        check_same_data(stored_config.get("data", {}),
                        data_description(name, data, labelled), out)  # fmt: skip
        drawn = None if labelled is None else labelled.tolist()
        if drawn != stored_labelled:
            source = (f"named by {config.labelled_indices} now" if config.labelled_indices
                      else "drawn from the data now")  # fmt: skip
            raise RunError(
                f"--resume: the labelled subset {source} differs from the one stored in "
                f"{out / CHECKPOINT} (has the data set or the file changed?); use another --out"
            )
        if len(metrics) > config.epochs:
            raise RunError(
                f"--resume: {out} already holds {len(metrics)} epochs, more than --epochs "
                f"{config.epochs}"
            )
    else:
        if lead:
            for stale in (METRICS, CURVES, LABELLED):
                (out / stale).unlink(missing_ok=True)
        model = build_model(config, data)
    return config, model, state, metrics, data, labelled


def _train(config: RunConfig, out: Path, device: torch.device) -> dict[str, Any]:
    lead = distributed.rank() == 0  # the only rank that writes DIR and prints
    config, model, state, metrics, data, labelled = agreed(lambda: _prepare(config, out))
    model = model.to(device)
    if config.channels_last:  # same values, NHWC strides: faster CPU convolutions and pooling
        model = model.to(memory_format=torch.channels_last)
    distributed.broadcast_module_(model)  # every rank starts from rank 0's tensors
    trainer = build_trainer(config, model)
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as err:
            path = out / CHECKPOINT
            raise RunError(f"--resume: the trainer state in {path} does not fit: {err}") from err
    run_config = rundir.run_config_of(config, model, data, labelled)
    # Before the first checkpoint config.json says what is being run (and, on resume,
    # metrics.json is rewritten from the checkpoint's own copy); after every checkpoint both are
    # rewritten again.
    agreed(functools.partial(rundir.write_outputs, out, run_config, metrics) if lead else nothing)
    if labelled is not None:
        agreed(functools.partial(rundir.write_labelled, out, config, labelled) if lead else nothing)
    data = Dataset(data.x_train.to(device), data.y_train.to(device), data.x_test.to(device),
                   data.y_test.to(device), data.num_classes)  # fmt: skip

    elapsed = metrics[-1]["elapsed"] if metrics else 0.0
    assert config.epochs is not None  # filled in by RunConfig
    for epoch in range(len(metrics) + 1, config.epochs + 1):
        start = time.perf_counter()
        train_loss, summary, steps = train_epoch(trainer, data, config, epoch, device, labelled)
        trained = time.perf_counter()
        current = trainer.current_model()
        state = trainer.state_dict()  # checked here, then checkpointed below
        check_finite(current, epoch, state)
        relabel = None
        if isinstance(current, ShallowRenderingModel) and config.unsupervised:
            # clusters carry no labels: score each as the majority label of its training images
            relabel = cluster_labels(current, data.x_train, data.y_train, config.eval_batch_size)
        test = evaluate(current, data.x_test, data.y_test, config.eval_batch_size, relabel)
        if isinstance(current, drm.DeepRenderingModel):
            test |= diagnostics(current, data.x_test, data.y_test, config.eval_batch_size)
        seconds = time.perf_counter() - start
        elapsed += seconds
        train_seconds = trained - start
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            **test,
            **{k if k.startswith("train_") else f"train_{k}": v for k, v in summary.items()},
            "steps": steps,
            **({"lr": learning_rate(config, epoch)} if has_optimizer(trainer) else {}),
            "seconds": seconds,
            "train_seconds": train_seconds,
            "eval_seconds": seconds - train_seconds,
            "images_per_second": data.x_train.shape[0] / max(train_seconds, 1e-9),
            "elapsed": elapsed,
        }
        metrics.append(record)
        save = functools.partial(
            rundir.save_run, out, current, state, run_config, metrics, labelled
        )
        agreed(save if lead else nothing)
        if config.progress and lead:
            print(_row(record), file=sys.stderr)
    return {
        "metrics": metrics,
        "final": metrics[-1] if metrics else {},
        "out": str(out),
        "checkpoint": str(out / CHECKPOINT),
        "algo": config.algo,
        "model": config.model,
        "data": config.data,
    }


def _row(m: dict[str, Any]) -> str:
    extra = ""
    if "test_log_likelihood" in m:
        extra = f" {m['test_log_likelihood']:>12.2f}"
    return (
        f"{m['epoch']:>5} {m['train_loss']:>10.4f} {m['test_accuracy']:>9.4f}{extra} "
        f"{m['seconds']:>8.1f} {m['elapsed']:>8.1f}"
    )


def format_table(result: dict[str, Any]) -> str:
    """One row per epoch: train loss, test accuracy, seconds, cumulative seconds."""
    metrics = result["metrics"]
    shallow = bool(metrics) and "test_log_likelihood" in metrics[0]
    header = f"{'epoch':>5} {'train_loss':>10} {'test_acc':>9}"
    header += f" {'test_loglik':>12}" if shallow else ""
    header += f" {'seconds':>8} {'elapsed':>8}"
    lines = [
        f"{result['algo']} / {result['model']} on {result['data']}: {result['out']}",
        header,
        "-" * len(header),
    ]
    lines += [_row(m) for m in metrics]
    return "\n".join(lines)
