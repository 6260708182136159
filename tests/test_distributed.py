"""Data-parallel training: N processes make the one-process update of the union of their shards.

Oracles:
* in one process, float64: every trainer (SGD and EM) run as several "ranks" in threads whose
  `reduce` sums over the threads, against one trainer on the whole batch (unequal and empty
  shards);
* the real command, float32: `torchrun --nproc_per_node 2 -m experiments.train` against the
  one-process run of the same arguments, for sgd, dem, deep em and shallow em, with a global
  batch of 15 (shards of 8 and 7) and a last batch of one image (an empty shard);
* a rank SIGKILLed after the first epoch: the run fails with one line per surviving rank, and
  `--resume` under torchrun then gives, bit for bit, the uninterrupted two-process run;
* a hung rank: the other fails after --dist-timeout with one line, instead of hanging;
* bf16 autocast (SGD) trains.

Everything runs on CPU with gloo, one thread per process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import drm
from cnn_equiv import SGDTrainer
from drm import distributed
from drm.checkpoint import load_checkpoint
from drm.em import DiscriminativeEM, GenerativeEM, sum_gradients
from drm.semisupervised import UNLABELLED, LossWeights, SemiSupervisedEM
from drm.shallow_em import ShallowEM
from experiments import train
from experiments.training import launch
from tests.architectures import ARCHITECTURES, TRAIN_ALGORITHMS, build, images

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")

# float64, threads vs one trainer: the sums differ only in their order (relative rounding
# ~1e-16 per sum); Adam's normalised steps and a few CG iterations keep that below 1e-12.
THREADS_F64_TOL = 1e-12

# float32, two processes vs one, max |a - b| relative to max |a| of each tensor. The shards'
# gradients (or normal equations) are summed in another order than the whole batch's, so each
# step differs by a few float32 ulps (unit roundoff 6e-8); measured after 2 epochs (22 steps):
# sgd and dem 5e-7, shallow em 0 (float64 statistics, then rounded to float32). Deep EM solves
# linear systems by CG, which scales the rounding by the conditioning of the Gram matrix, and a
# switch latent at the edge of 0 can flip (measured 4e-6). The exact M-steps (drm.m_steps) solve
# by Newton-CG, which scales the rounding by each level's Hessian conditioning: exact-top 3e-5,
# large-batch 2e-6, block 4e-4 after its first batch; one of block's solver decisions (CG's
# residual test, the line search) then falls the other way on a rounding-level tie within 7
# batches (5e-2), so its run is 3 batches long (BLOCK_ARGS).
# Each tolerance leaves >= 20x margin.
F32_TOL = {"sgd": 1e-5, "dem": 1e-5, "em-deep": 1e-4, "em-shallow": 1e-6, "ssl": 1e-5,
           "dem-exact-top": 1e-3, "dem-block": 1e-2, "dem-large-batch": 1e-4}  # fmt: skip

# 151 images in batches of 15: shards of 8 and 7, and a last batch of 1 (rank 1's shard empty).
DATA = ["--data", "digits", "--limit-train", "151", "--limit-test", "100", "--batch-size", "15"]
ARGS = [*DATA, "--epochs", "2", "--threads", "1", "--no-progress"]
# 31 images in batches of 15, one epoch: shards of 8 and 7 twice, then rank 1's shard empty
BLOCK_ARGS = [*DATA[:2], "--limit-train", "31", *DATA[4:], "--epochs", "1", "--threads", "1",
              "--no-progress"]  # fmt: skip
LAUNCH_TIMEOUT = 120  # seconds for one torchrun launch; a hang fails the test instead
HANG_TIMEOUT = 3  # --dist-timeout of the hung-rank test, seconds


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the helpers -----------------------------------------------------------------------------


def test_shard_splits_a_batch_into_contiguous_near_equal_parts() -> None:
    index = torch.arange(15)
    parts = [distributed.shard(index, r, 2) for r in range(2)]
    assert [p.tolist() for p in parts] == [list(range(8)), list(range(8, 15))]
    tiny = [distributed.shard(torch.arange(2), r, 3) for r in range(3)]
    assert [len(p) for p in tiny] == [1, 1, 0]
    assert torch.equal(distributed.shard(index), index)  # one process: the whole batch
    with pytest.raises(ValueError, match="part must lie"):
        distributed.shard(index, 2, 2)


def test_helpers_without_a_process_group_are_one_process() -> None:
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    t = torch.arange(3.0)
    assert distributed.all_reduce_(t) is t and torch.equal(t, torch.arange(3.0))
    assert distributed.all_reduce_float(2.5) == 2.5
    assert distributed.all_reduce_floats({"a": 1.0, "b": -2.0}) == {"a": 1.0, "b": -2.0}
    assert distributed.gather_errors("boom") == ["boom"]
    distributed.barrier()
    with pytest.raises(RuntimeError, match="not launched by torchrun"):
        distributed.init(torch.device("cpu"), 10.0)


def test_one_process_group_and_its_reduce_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gloo group of one (torchrun --nproc_per_node 1): the helpers and `reduce` are exact."""
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(name, value)  # fmt: skip
    distributed.init(torch.device("cpu"), 30.0)
    try:
        assert distributed.is_distributed() and distributed.world_size() == 1
        assert distributed.all_reduce_floats({"a": 1.5}) == {"a": 1.5}
        assert distributed.gather_errors(None) == [None]
        config = ARCHITECTURES["leaky"]
        plain = SGDTrainer(build(config, seed=5), lr=0.05)
        wrapped = SGDTrainer(build(config, seed=5), lr=0.05, reduce=distributed.all_reduce_)
        for batch in range(3):
            x = images(plain._reference, 8, seed=6 + batch)
            y = torch.arange(8) % 3
            assert plain.step(x, y) == wrapped.step(x, y, share=1.0)
        for a, b in zip(plain.cnn.parameters(), wrapped.cnn.parameters(), strict=True):
            assert torch.equal(a, b)
    finally:
        distributed.teardown()
    assert not distributed.is_distributed()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the trainers' sums, in threads (float64) ------------------------------------------------


class ThreadGroup:
    """`size` threads that sum tensors over each other: all_reduce inside one process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[Tensor | None] = [None] * size

    def reducer(self, rank: int) -> Callable[[Tensor], Tensor]:
        def reduce(t: Tensor) -> Tensor:
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            total = torch.zeros_like(t)
            for part in self.slots:  # the same order in every thread: identical sums
                assert part is not None
                total += part
            self.barrier.wait()  # everyone has read the slots before the next call
            return total

        return reduce

    def run(self, work: Callable[[int], None]) -> None:
        errors: list[BaseException] = []

        def guarded(rank: int) -> None:
            try:
                work(rank)
            except BaseException as err:  # reported below, in the test's thread
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=guarded, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        if errors:
            raise errors[0]


# global batches of 7, 5 and 1 images: shards (3, 2, 2), (2, 2, 1) and (1, 0, 0) over 3 ranks
BATCH_SIZES = (7, 5, 1)


def batches(model: drm.DeepRenderingModel, seed: int) -> list[tuple[Tensor, Tensor]]:
    out = []
    for i, size in enumerate(BATCH_SIZES):
        x = images(model, size, seed=seed + i)
        out.append((x, (torch.arange(size) + i) % model.num_classes))
    return out


def sharded(trainers: list[Any], data: list[tuple[Tensor, Tensor | None]], epochs: int) -> None:
    """Every trainer (one per rank, in threads) steps on its shard of every batch."""
    group = ThreadGroup(len(trainers))
    for r, trainer in enumerate(trainers):
        trainer.reduce = group.reducer(r)

    def work(rank: int) -> None:
        for _ in range(epochs):
            for x, y in data:
                part = distributed.shard(torch.arange(x.shape[0]), rank, len(trainers))
                ys = None if y is None else y[part]
                trainers[rank].step(x[part], ys, share=len(part) / x.shape[0])
            trainers[rank].end_epoch()

    group.run(work)


def whole(trainer: Any, data: list[tuple[Tensor, Tensor | None]], epochs: int) -> None:
    for _ in range(epochs):
        for x, y in data:
            trainer.step(x, y)
        trainer.end_epoch()


def assert_same_parameters(reference: torch.nn.Module, others: list[Any], tol: float) -> None:
    for other in others:
        for (name, a), b in zip(
            reference.state_dict().items(), other.model.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_discriminative_em_shards_sum_to_the_whole_batch(optimizer: str) -> None:
    model = build(ARCHITECTURES["leaky"], seed=11)
    data: list[tuple[Tensor, Tensor | None]] = list(batches(model, seed=12))
    one = DiscriminativeEM(copy.deepcopy(model), m_steps=2, optimizer=optimizer, lr=0.05)  # type: ignore[arg-type]
    ranks = [DiscriminativeEM(copy.deepcopy(model), m_steps=2, optimizer=optimizer, lr=0.05)  # type: ignore[arg-type]
             for _ in range(3)]  # fmt: skip
    whole(one, data, epochs=2)
    sharded(ranks, data, epochs=2)
    assert_same_parameters(one.model, ranks, THREADS_F64_TOL)
    changed = (one.model.levels[0].weight - model.levels[0].weight).detach()
    assert float(changed.abs().max()) > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_sgd_shards_sum_to_the_whole_batch(optimizer: str) -> None:
    """SGD takes the same `reduce` as the EM trainers, with the same meaning."""
    model = build(ARCHITECTURES["leaky"], seed=41)
    data: list[tuple[Tensor, Tensor | None]] = list(batches(model, seed=42))
    one = SGDTrainer(copy.deepcopy(model), optimizer=optimizer, lr=0.05)  # type: ignore[arg-type]
    ranks = [SGDTrainer(copy.deepcopy(model), optimizer=optimizer, lr=0.05)  # type: ignore[arg-type]
             for _ in range(3)]  # fmt: skip
    whole(one, data, epochs=2)
    sharded(ranks, data, epochs=2)
    for rank in ranks:
        for (name, a), b in zip(
            one.cnn.state_dict().items(), rank.cnn.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(a, b, atol=THREADS_F64_TOL, rtol=THREADS_F64_TOL, msg=name)
    changed = (one.current_model().levels[0].weight - model.levels[0].weight).detach()
    assert float(changed.abs().max()) > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize("refine_sweeps", [0, 2])
def test_generative_em_shards_sum_to_the_whole_batch(refine_sweeps: int) -> None:
    model = build(ARCHITECTURES["leaky"], seed=13)
    data: list[tuple[Tensor, Tensor | None]] = list(batches(model, seed=14))
    # the default 3 CG steps: more of them on so few images drive the class templates towards
    # the ill-posed least-squares solution (|w| ~ 500), which amplifies rounding to ~1e-11
    one = GenerativeEM(copy.deepcopy(model), cg_iterations=3, refine_sweeps=refine_sweeps)
    ranks = [GenerativeEM(copy.deepcopy(model), cg_iterations=3, refine_sweeps=refine_sweeps)
             for _ in range(3)]  # fmt: skip
    whole(one, data, epochs=2)
    sharded(ranks, data, epochs=2)
    assert_same_parameters(one.model, ranks, THREADS_F64_TOL)
    # the end-of-epoch M-step saw the counts of every rank: the class prior of all the labels
    counts = torch.bincount(torch.cat([y for _, y in data if y is not None]), minlength=3)
    expected = ((counts.double() + 1.0) / (counts.sum() + 3)).log()
    for r in ranks:
        torch.testing.assert_close(r.model.class_log_prior, expected, atol=THREADS_F64_TOL, rtol=0)


SHARDED_SSL = [("adam", False, 0.0), ("sgd", False, 0.0), ("adam", True, 1.0)]


@pytest.mark.parametrize(("optimizer", "mean_teacher", "deformation"), SHARDED_SSL)
def test_semisupervised_em_shards_sum_to_the_whole_batch(
    optimizer: str, mean_teacher: bool, deformation: float
) -> None:
    """Every term on (the class-balance term: a function of the whole batch's mean posterior);
    with a mean teacher, every process's consistency target is the same model's; a process
    deforms its images as one process deforms them."""
    model = build(ARCHITECTURES["leaky"], seed=31)
    teacher = build(ARCHITECTURES["leaky"], seed=33).requires_grad_(False) if mean_teacher else None
    data: list[tuple[Tensor, Tensor | None]] = []
    for x, y in batches(model, seed=32):
        y = y.clone()
        y[1::2] = UNLABELLED  # labelled and unlabelled images in every shard of 3
        data.append((x, y))
    weights = LossWeights(class_balance=0.7, path_normalization=0.3, min_cross_entropy=0.5,
                          consistency=0.5, generative_cross_entropy=0.5)  # fmt: skip
    one = SemiSupervisedEM(copy.deepcopy(model), weights, optimizer=optimizer, lr=0.05,  # type: ignore[arg-type]
                           teacher=teacher, deformation=deformation)  # fmt: skip
    ranks = [SemiSupervisedEM(copy.deepcopy(model), weights, optimizer=optimizer, lr=0.05,  # type: ignore[arg-type]
                              teacher=teacher, deformation=deformation)
             for _ in range(3)]  # fmt: skip
    whole(one, data, epochs=2)
    sharded(ranks, data, epochs=2)
    assert_same_parameters(one.model, ranks, THREADS_F64_TOL)
    changed = (one.model.levels[0].weight - model.levels[0].weight).detach()
    assert float(changed.abs().max()) > 1e-3  # the comparison is not vacuous


def test_semisupervised_losses_and_summaries_add_up_over_shards() -> None:
    """Each shard's returned loss * share sums to the whole batch's; end_epoch agrees."""
    model = build(ARCHITECTURES["leaky"], seed=33)
    x, y = batches(model, seed=34)[0]
    y = y.clone()
    y[::3] = UNLABELLED
    weights = LossWeights(class_balance=0.7, path_normalization=0.3, min_cross_entropy=0.5,
                          consistency=0.5, generative_cross_entropy=0.5)  # fmt: skip
    one = SemiSupervisedEM(copy.deepcopy(model), weights, lr=0.05, class_guess="generative")
    expected = one.step(x, y)
    summary = one.end_epoch()
    ranks = [SemiSupervisedEM(copy.deepcopy(model), weights, lr=0.05, class_guess="generative")
             for _ in range(3)]  # fmt: skip
    group = ThreadGroup(3)
    losses: dict[int, float] = {}
    summaries: dict[int, dict[str, float]] = {}
    for r, trainer in enumerate(ranks):
        trainer.reduce = group.reducer(r)

    def work(rank: int) -> None:
        part = distributed.shard(torch.arange(x.shape[0]), rank, 3)
        share = len(part) / x.shape[0]
        losses[rank] = ranks[rank].step(x[part], y[part], share=share) * share
        summaries[rank] = ranks[rank].end_epoch()

    group.run(work)
    assert sum(losses.values()) == pytest.approx(expected, rel=THREADS_F64_TOL)
    for rank in range(3):
        assert summaries[rank].keys() == summary.keys()
        for key, value in summary.items():
            assert summaries[rank][key] == pytest.approx(value, rel=1e-10, abs=1e-12), key


@pytest.mark.parametrize("hard", [False, True])
def test_shallow_em_shards_sum_to_the_whole_batch(hard: bool) -> None:
    templates = torch.randn(3, 1, 3, 4, generator=torch.Generator().manual_seed(15),
                            dtype=torch.float64)  # fmt: skip
    model = drm.ShallowRenderingModel(templates, (1, 5, 6), translation="interior", sigma2=0.5,
                                      switch_prior_on=0.6)  # fmt: skip
    x, classes, _, _ = model.sample(13, torch.Generator().manual_seed(16))
    y = classes.clone()
    y[::3] = -1  # semi-supervised
    data: list[tuple[Tensor, Tensor | None]] = [
        (x[:7], y[:7]),
        (x[7:12], y[7:12]),
        (x[12:], y[12:]),
    ]
    one = ShallowEM(copy.deepcopy(model), hard=hard)
    ranks = [ShallowEM(copy.deepcopy(model), hard=hard) for _ in range(3)]
    whole(one, data, epochs=3)
    sharded(ranks, data, epochs=3)
    assert_same_parameters(one.model, ranks, THREADS_F64_TOL)
    for r in ranks:
        assert r.model.switch_prior_on == pytest.approx(one.model.switch_prior_on,
                                                        rel=THREADS_F64_TOL)  # fmt: skip


def test_sum_gradients_keeps_none_only_where_every_rank_has_none() -> None:
    group = ThreadGroup(2)
    params = [[torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(3)]
              for _ in range(2)]  # fmt: skip
    params[0][0].grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    params[1][0].grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
    params[0][1].grad = torch.tensor([3.0, 4.0], dtype=torch.float64)  # rank 1 has none

    def work(rank: int) -> None:
        sum_gradients(params[rank], group.reducer(rank))

    group.run(work)
    for rank in range(2):
        first, second, third = (p.grad for p in params[rank])
        assert first is not None and first.tolist() == [1.5, 1.0]
        assert second is not None and second.tolist() == [3.0, 4.0]
        assert third is None  # no rank had one: the optimizer skips it, as in one process


def test_an_empty_shard_needs_a_reduce() -> None:
    """One process never gets an empty batch; with `reduce` it is a rank's share of nothing."""
    model = build(ARCHITECTURES["leaky"], seed=17)
    empty_x, empty_y = images(model, 0), torch.zeros(0, dtype=torch.long)
    for trainer in (DiscriminativeEM(model), GenerativeEM(model), SGDTrainer(model)):
        with pytest.raises(ValueError, match="empty batch"):
            trainer.step(empty_x, empty_y)
    assert GenerativeEM(model, reduce=lambda t: t).step(empty_x, empty_y, share=0.0) == 0.0
    assert SGDTrainer(model, reduce=lambda t: t).step(empty_x, empty_y, share=0.0) == 0.0


# --- the command under torchrun (float32) ----------------------------------------------------


def torchrun(
    tmp: Path, argv: list[str], script: str | None = None, timeout: float = LAUNCH_TIMEOUT
) -> tuple[subprocess.CompletedProcess[str], dict[int, str]]:
    """Run the command with 2 processes; returns the result and each rank's own stderr."""
    logs = tmp / f"logs-{time.monotonic_ns()}"
    target = ["-m", "experiments.train"] if script is None else [script]
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs),
               "--redirects", "2", *target, *argv]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    ranks = {}
    for path in logs.rglob("stderr.log"):  # <logs>/<run>/attempt_0/<rank>/stderr.log
        ranks[int(path.parent.name)] = path.read_text()
    return done, ranks


def one_process(out: Path, argv: list[str]) -> dict[str, Any]:
    return train.main(train.parse_args([*argv, "--out", str(out)]))


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The 2-process run of an algorithm (made once, shared by the tests)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp(f"torchrun-{name}")
            argv = [*TRAIN_ALGORITHMS[name], *run_args(name), "--out", str(out / "run")]
            done, _ = torchrun(out, argv)
            assert done.returncode == 0, done.stderr[-3000:]
            assert out.joinpath("run", "model.safetensors").is_file()
            runs[name] = out / "run"
        return runs[name]

    return get


def run_args(name: str) -> list[str]:
    return BLOCK_ARGS if name == "dem-block" else ARGS


def relative_gap(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp(min=1e-3))


@pytest.mark.parametrize("name", list(TRAIN_ALGORITHMS))
@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_two_processes_make_the_one_process_run(
    tmp_path: Path, two_process_runs: Callable[[str], Path], name: str
) -> None:
    two = two_process_runs(name)
    one_process(tmp_path / "one", [*TRAIN_ALGORITHMS[name], *run_args(name)])
    a = load_checkpoint(tmp_path / "one" / "model.safetensors")
    b = load_checkpoint(two / "model.safetensors")
    tol = F32_TOL[name]
    for key, tensor in a.model.state_dict().items():
        assert relative_gap(tensor, b.model.state_dict()[key]) <= tol, key
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "one", two))
    epochs, steps = ([1], [3]) if name == "dem-block" else ([1, 2], [11, 11])
    assert [m["epoch"] for m in mb] == epochs and [m["steps"] for m in mb] == steps
    for x, y in zip(ma, mb, strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=tol)
        assert abs(y["test_accuracy"] - x["test_accuracy"]) <= 0.011  # one image of 100 at most
        loss = "test_log_likelihood" if "shallow" in name else "test_loss"
        assert y[loss] == pytest.approx(x[loss], rel=tol)
    config = json.loads((two / "config.json").read_text())
    assert config["world_size"] == 2


# A torchrun worker that fails at the start of epoch 2 on rank 1: SIGKILL, or a hang.
FAULT = """
import os, signal, sys, time
import experiments.train as train
from experiments.training import loop

how = sys.argv[1]
real = loop.train_epoch

def faulty(trainer, data, args, epoch, *rest):
    if epoch == 2 and os.environ["RANK"] == "1":
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    return real(trainer, data, args, epoch, *rest)

loop.train_epoch = faulty
code = train.cli(sys.argv[2:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


def assert_one_line(text: str, *needles: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: rank ") and "Traceback" not in text, text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_killed_rank_fails_the_run_and_resume_finishes_it(
    tmp_path: Path, two_process_runs: Callable[[str], Path]
) -> None:
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    out = tmp_path / "run"
    # a rank's death ends the run well before the launch timeout (torchrun raises past it)
    done, ranks = torchrun(tmp_path, ["kill", *TRAIN_ALGORITHMS["sgd"], *ARGS, "--out", str(out)],
                           script=str(script), timeout=LAUNCH_TIMEOUT / 2)  # fmt: skip
    assert done.returncode != 0
    assert ranks.get(1, "") == ""  # SIGKILL: no last words
    # the survivor saw the connection drop, or torchrun's SIGTERM first
    assert_one_line(ranks[0], "rank 0/2", "--resume")
    assert json.loads((out / "metrics.json").read_text())[-1]["epoch"] == 1
    # without --resume, rank 0 refuses the directory and rank 1 hears of it: one line each
    done, ranks = torchrun(tmp_path, [*TRAIN_ALGORITHMS["sgd"], *ARGS, "--out", str(out)])
    assert done.returncode != 0
    assert_one_line(ranks[0], "already holds a run")
    assert_one_line(ranks[1], "rank 0 failed", "already holds a run")
    done, _ = torchrun(tmp_path, [*TRAIN_ALGORITHMS["sgd"], *ARGS, "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_checkpoint(two_process_runs("sgd") / "model.safetensors")
    b = load_checkpoint(out / "model.safetensors")
    for key, tensor in a.model.state_dict().items():  # same world size: the same sums, exactly
        assert torch.equal(tensor, b.model.state_dict()[key]), key
    assert (
        a.trainer_state["optimizer"]["state"][0]["step"]
        == b.trainer_state["optimizer"]["state"][0]["step"]
    )


@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_hung_rank_times_out_instead_of_hanging(tmp_path: Path) -> None:
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    argv = ["hang", *TRAIN_ALGORITHMS["dem"], *ARGS, "--out", str(tmp_path / "run"),
            "--dist-timeout", str(HANG_TIMEOUT)]  # fmt: skip
    done, ranks = torchrun(tmp_path, argv, script=str(script), timeout=60)  # raises if it hangs
    assert done.returncode != 0
    assert_one_line(ranks[0], "rank 0/2", f"--dist-timeout {HANG_TIMEOUT}", "--resume")
    # torchrun then stops the hung rank with SIGTERM: one line too
    assert_one_line(ranks[1], "rank 1/2", "SIGTERM")


@pytest.mark.parametrize(
    "failure",
    [ValueError("bad data"), RuntimeError("Connection reset by peer"), train.Terminated(15)],
)
@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_a_failing_rank_ignores_later_sigterms(
    failure: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun's SIGTERM may arrive while the failing rank reports: it must not raise again
    (in a finaliser it would print a stray "Exception ignored" report after the one line)."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)

    def fail(args: Any) -> Any:
        raise failure

    handlers: list[Any] = []
    monkeypatch.setattr(train, "main", fail)
    monkeypatch.setattr(
        train, "say", lambda line: handlers.append(signal.getsignal(signal.SIGTERM))
    )
    before = signal.getsignal(signal.SIGTERM)
    code = train.cli(["--algo", "sgd", "--data", "digits", "--out", "unused"])
    assert code != 0
    assert handlers == [signal.SIG_IGN]  # deaf before the line is written
    assert signal.getsignal(signal.SIGTERM) == before  # and restored on return


def test_the_sigterm_handler_raises_once() -> None:
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(train.Terminated):
            launch.on_sigterm(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


# --- mixed precision -------------------------------------------------------------------------


def test_bf16_autocast_trains_sgd(tmp_path: Path) -> None:
    trainer = SGDTrainer(build(ARCHITECTURES["leaky"]).float(), amp="bf16")
    seen: list[torch.dtype] = []
    trainer.cnn[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = images(trainer._reference, 4).float()
    assert math.isfinite(trainer.step(x, torch.arange(4) % 3))
    assert seen == [torch.bfloat16]  # the conv ran in bfloat16 ...
    assert all(p.dtype == torch.float32 for p in trainer.cnn.parameters())  # ... on fp32 weights
    argv = ["--data", "digits", "--epochs", "2", "--no-progress", "--amp", "bf16"]
    result = one_process(tmp_path, argv)
    assert result["final"]["test_accuracy"] > 0.5  # chance is 0.1
    stored = load_checkpoint(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in stored.model.state_dict().values())
    with pytest.raises(SystemExit):
        train.parse_args(["--algo", "dem", "--amp", "bf16", "--out", str(tmp_path)])


def test_amp_is_an_essential_setting(tmp_path: Path) -> None:
    assert "amp" in train.ESSENTIAL
    one_process(tmp_path, [*DATA, "--epochs", "1", "--no-progress"])
    with pytest.raises(train.RunError, match="--amp"):
        one_process(
            tmp_path, [*DATA, "--epochs", "2", "--no-progress", "--resume", "--amp", "bf16"]
        )
