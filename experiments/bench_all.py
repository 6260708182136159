"""Benchmark: every algorithm's speed, the CNN forward against the machine's peak, memory, scaling.

Measures, in one run, on LeNet-5 (`drm.lenet_config()`, 20-50-500, float32) and real MNIST
images (`drm.data.load_mnist()`), with the thread count stated in the output:

1. throughput (images/s) of every algorithm of the library: `drm.max_sum` and the `to_cnn(model)`
   forward pass (inference), one training step of SGD (`SGDTrainer.step`), of discriminative EM
   with 1 and 3 M-steps and with the exact-top and block M-steps (`--m-step`), of generative EM
   (`GenerativeEM.step`, default settings), of semi-supervised EM (`SemiSupervisedEM.step`,
   default terms, a third of the batch labelled; its time per step is also given as a multiple
   of the SGD step's on the same batch), an
   epoch-equivalent of shallow EM (`ShallowEM.step` over the images + `end_epoch`, 28x28 images,
   26x26 templates at the 9 interior placements), and `drm.exact_map` on a tiny model; each deep
   algorithm also with the model in channels_last memory format
   (`model.to(memory_format=torch.channels_last)`, no library change);
2. the achieved GFLOP/s of the LeNet forward pass (analytic FLOPs: 2 * MACs of every conv and
   dense level) at several batch sizes, eager NCHW, eager channels_last and `torch.compile`d, as
   a fraction of the GFLOP/s of a large float32 `torch.mm` timed in the same rounds; compile time
   (cold inductor cache, in a subprocess, and in this process), 1 thread against all threads, and
   a torch.profiler breakdown of which op dominates, in the forward pass, in a discriminative
   and a generative EM step and in `drm.exact_map`;
3. peak memory: the increase of the peak resident set size of a fresh subprocess over one call
   of max_sum, of the CNN forward, of an SGD and of a DEM training step (Linux: VmHWM, reset to
   the current RSS just before the call; CUDA: `torch.cuda.max_memory_allocated`), next to the
   analytic size of the activations and of the latents max_sum returns (bool switch masks, int64
   pool indices);
4. how the cost of max_sum grows with the image size (LeNet and a fully convolutional variant),
   the depth (conv levels) and the width (channels); with --json, also a PNG plot next to it.

Timing: candidates of one table run in interleaved rounds (round-robin, after warm-up rounds) and
the median per call is reported, so a drift of the machine hits every candidate alike; on CUDA
every call is followed by `torch.cuda.synchronize()`. The numbers are only meaningful on a quiet
machine: check `ps aux --sort=-%cpu | head` first; the last line of the output gives the CPU that
other processes used during each section (Linux), which should be about 0.

The sections are the modules of experiments/benchmarks/ (one each, and the tables); the timing
helpers they share are in experiments/_bench.py.

Command:
    python -m experiments.bench_all --json runs/bench_all.json   # about 2.5 minutes on 2 CPU cores
    python -m experiments.bench_all --device cuda                # the same on a GPU
    python -m experiments.bench_all --smoke                      # seconds; used by the tests

Expected output (docs/performance.md holds one run): four numbered sections of tables. On a
2-core AVX-512 CPU the eager NCHW LeNet forward reaches about 0.3 of the float32 matmul rate,
channels_last about 0.55, channels_last + torch.compile about 0.65; max_sum runs at the CNN's
speed in either layout, and a channels_last model trains 1.2-1.4x faster.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from drm.checkpoint import atomic_write
from drm.data import load_mnist
from experiments._bench import MEMORY_KINDS, cpu_snapshot, machine, others_load
from experiments._cli import Parser, positive_int, run_command
from experiments.benchmarks.hot_paths import hot_paths
from experiments.benchmarks.imported import imported
from experiments.benchmarks.memory import memory
from experiments.benchmarks.peak import peak_fraction
from experiments.benchmarks.scaling import plot_scaling, scaling
from experiments.benchmarks.tables import format_table
from experiments.benchmarks.throughput import throughput


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section (or those of --only), each with the CPU other processes used meanwhile."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_mnist()
    started = time.perf_counter()
    results: dict[str, Any] = {"device": str(device), "machine": machine(), "load": {}}
    sections: dict[str, Callable[[], Any]] = {
        "throughput": partial(throughput, args, data, device),
        "peak": partial(peak_fraction, args, data, device),
        "hot_paths": partial(hot_paths, args, data, device),
        "memory": partial(memory, args, device),
        "scaling": partial(scaling, args, device),
        "imported": partial(imported, args, device),
    }
    if args.only:
        sections = {name: run for name, run in sections.items() if name in args.only}
    for name, run in sections.items():
        start = cpu_snapshot()
        results[name] = run()
        results["load"][name] = others_load(start)
    results["seconds"] = time.perf_counter() - started
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m experiments.bench_all", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (inference)")
    parser.add_argument("--zoo-batch", type=positive_int, default=16, help="imported networks")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("throughput", "peak", "hot_paths", "memory", "scaling", "imported"),
        default=None,
        help="run these sections only",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=64, help="train.py's default")
    parser.add_argument("--train-batches", type=int, default=20, help="distinct minibatches")
    parser.add_argument("--train-rounds", type=int, default=20)
    parser.add_argument("--shallow-images", type=int, default=10_000)
    parser.add_argument("--shallow-batch", type=int, default=10_000)
    parser.add_argument("--shallow-rounds", type=int, default=5)
    parser.add_argument("--template-size", type=int, default=26)
    parser.add_argument("--tiny-width", type=int, default=9, help="2*(w-1) switches")
    parser.add_argument("--tiny-images", type=int, default=8)
    parser.add_argument("--tiny-rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256, 1000])
    parser.add_argument("--min-images", type=int, default=256, help="images per timed sample")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--profile-batch", type=int, default=256)
    parser.add_argument("--profile-calls", type=int, default=20)
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile"
    )
    parser.add_argument("--memory-batches", type=int, nargs="+", default=[256, 1000])
    parser.add_argument("--memory-kinds", nargs="+", default=list(MEMORY_KINDS))
    parser.add_argument("--scale-batch", type=int, default=64)
    parser.add_argument("--scale-rounds", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 56, 112])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 1, 2, 4])
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds = args.train_rounds = args.scale_rounds = 1
        args.warmup = 0
        args.infer_batch, args.train_batch, args.train_batches = 8, 8, 2
        args.shallow_images = args.shallow_batch = 64
        args.shallow_rounds, args.tiny_width, args.tiny_images, args.tiny_rounds = 1, 4, 2, 1
        args.batch_sizes, args.min_images, args.matmul_size = [4], 1, 64
        args.profile_batch, args.profile_calls, args.compile = 4, 1, False
        args.memory_batches, args.memory_kinds = [8], ["max_sum"]
        args.scale_batch, args.sizes, args.depths, args.widths = 2, [28], [1], [0.5]
    unknown = set(args.memory_kinds) - set(MEMORY_KINDS)
    if unknown:
        parser.error(f"--memory-kinds: unknown {sorted(unknown)}; choose from {MEMORY_KINDS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if any(s < 16 for s in args.sizes):
        parser.error("--sizes: LeNet needs images of at least 16x16")
    return args


def command(argv: list[str] | None) -> str:
    """Measure, write --json (and its scaling plot) if asked, and return the tables."""
    arguments = parse_args(argv)
    outcome = main(arguments)
    if arguments.json:
        text = json.dumps(outcome, indent=2)
        atomic_write(arguments.json, lambda tmp: tmp.write_text(text))
        if "scaling" in outcome:
            plot_scaling(
                outcome["scaling"], arguments.json.with_name(arguments.json.stem + "_scaling.png")
            )
    return format_table(outcome)


def cli(argv: list[str] | None = None) -> int:
    """The command: the tables, or one line on stderr (exit status 1)."""
    return run_command(lambda: command(argv))


if __name__ == "__main__":
    sys.exit(cli())
