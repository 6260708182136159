"""Benchmark: every algorithm's speed, the CNN forward against the machine's peak, memory, scaling.

Measures, in one run, on LeNet-5 (`drm.lenet_config()`, 20-50-500, float32) and real MNIST
images (`drm.data.load_mnist()`), with the thread count stated in the output:

1. throughput (images/s) of every algorithm of the library: `drm.max_sum` and the `to_cnn(model)`
   forward pass (inference), one training step of SGD (`SGDTrainer.step`), of discriminative EM
   with 1 and 3 M-steps, of generative EM (`GenerativeEM.step`, default settings), of
   semi-supervised EM (`SemiSupervisedEM.step`, default terms, a third of the batch labelled;
   its time per step is also given as a multiple of the SGD step's on the same batch), an
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
import copy
import itertools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import drm
from cnn_equiv import SGDTrainer, to_cnn, to_drm
from drm.checkpoint import atomic_write
from drm.data import load_mnist
from drm.em import DiscriminativeEM, GenerativeEM
from drm.semisupervised import UNLABELLED, SemiSupervisedEM
from drm.shallow_em import ShallowEM, init_from_class_means
from experiments._cli import Parser, positive_int, run_command
from experiments.bench_inference import interleaved, synchronize, tiny_model, tiny_patches

ROOT = Path(__file__).resolve().parent.parent
CHANNELS_LAST = torch.channels_last
MIB = 1024.0**2
SSL_STEP = "semi-supervised EM step (a third labelled)"


# ----------------------------------------------------------------------------------------------
# Timing (`interleaved` and `synchronize` live in experiments.bench_inference)
# ----------------------------------------------------------------------------------------------


def _cpu_snapshot() -> tuple[float, float, float, float] | None:
    """(wall, machine busy CPU s, steal CPU s, this process + its children CPU s); Linux only."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
    busy = (user + nice + system + irq + softirq) / tick
    return time.perf_counter(), busy, steal / tick, own


def others_load(start: tuple[float, float, float, float] | None) -> dict[str, float] | None:
    """Average cores used by OTHER processes (and stolen by the hypervisor) since `start`.

    Near 0 on a quiet machine; a value near 1 means another process held a whole core, and the
    section's timings are not to be trusted.
    """
    end = _cpu_snapshot()
    if start is None or end is None:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[3] - start[3])
    return {"wall_s": wall, "other_cores": max(0.0, others) / wall,
            "steal_cores": (end[2] - start[2]) / wall}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Models and FLOPs
# ----------------------------------------------------------------------------------------------


def level_flops(model: drm.DeepRenderingModel) -> list[tuple[str, int]]:
    """Analytic FLOPs per image of every conv and dense level (the class level included).

    conv: 2 * C_out * H_out * W_out * (C_in / groups) * k_h * k_w; dense: 2 * D_in * D_out
    (2 FLOPs per multiply-accumulate; biases, ReLU and pooling are not counted).
    """
    rows = []
    for i, level in enumerate(model.levels):
        if isinstance(level, drm.Conv):
            s = level.spec
            c_out, h_out, w_out = level.out_shape
            macs = (
                c_out * h_out * w_out * (level.in_shape[0] // s.groups) * math.prod(s.kernel_size)
            )
            rows.append((f"levels[{i}] conv", 2 * macs))
        elif isinstance(level, drm.Dense):
            rows.append((f"levels[{i}] dense", 2 * level.in_shape[0] * level.out_shape[0]))
    return rows


def flops_per_image(model: drm.DeepRenderingModel) -> int:
    return sum(f for _, f in level_flops(model))


def lenet(device: torch.device, **kwargs: Any) -> drm.DeepRenderingModel:
    """LeNet-5 (float32, seed 0) on `device`; kwargs go to `drm.lenet_config`."""
    return drm.DeepRenderingModel.from_config(drm.lenet_config(**kwargs), seed=0).to(device)


def channels_last(model: drm.DeepRenderingModel) -> drm.DeepRenderingModel:
    """A copy whose conv templates are stored channels_last (NHWC strides; same values)."""
    return copy.deepcopy(model).to(memory_format=CHANNELS_LAST)


def fully_convolutional(size: int, device: torch.device) -> drm.DeepRenderingModel:
    """LeNet's two conv levels, then a global average pool instead of the dense level."""
    spatial = ((size - 4) // 2 - 4) // 2  # after conv5, pool2, conv5, pool2
    config = drm.ModelConfig(
        (1, size, size),
        10,
        (
            drm.ConvSpec(20, 5), drm.SwitchSpec(), drm.MaxPoolSpec(2),
            drm.ConvSpec(50, 5), drm.SwitchSpec(), drm.MaxPoolSpec(2),
            drm.AvgPoolSpec(spatial), drm.FlattenSpec(),
        ),
    )  # fmt: skip
    return drm.DeepRenderingModel.from_config(config, seed=0).to(device)


def deep_model(depth: int, width: int, device: torch.device) -> drm.DeepRenderingModel:
    """`depth` levels of conv3x3 (padding 1, `width` channels) + switch on 28x28, then pool 4."""
    levels: list[Any] = []
    for _ in range(depth):
        levels += [drm.ConvSpec(width, 3, padding=1), drm.SwitchSpec()]
    levels += [drm.MaxPoolSpec(4), drm.FlattenSpec()]
    config = drm.ModelConfig((1, 28, 28), 10, tuple(levels))
    return drm.DeepRenderingModel.from_config(config, seed=0).to(device)


def train_batches(data: Any, b: int, n: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The first `n` training minibatches of `b` real images and labels, on `device`."""
    return [
        (data.x_train[i : i + b].to(device), data.y_train[i : i + b].to(device))
        for i in range(0, b * n, b)
    ]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ----------------------------------------------------------------------------------------------
# 1. Throughput of every algorithm
# ----------------------------------------------------------------------------------------------


def throughput(args: argparse.Namespace, data: Any, device: torch.device) -> list[dict[str, Any]]:
    """images/s of every algorithm, default (NCHW) and channels_last model."""
    model = lenet(device)
    models = {"nchw": model, "cl": channels_last(model)}
    rows: list[dict[str, Any]] = []

    # inference: max_sum and the equivalent CNN, in inference mode
    b = args.infer_batch
    x = data.x_test[:b].to(device)
    cnns = {k: to_cnn(m).eval() for k, m in models.items()}
    with torch.inference_mode():
        reference = drm.max_sum(model, x)[0]
        for m in models.values():  # same numbers up to float32 rounding
            assert torch.allclose(drm.max_sum(m, x)[0], reference, atol=1e-4)
        candidates: dict[str, Callable[[], object]] = {}
        for k in models:
            candidates[f"max_sum/{k}"] = partial(drm.max_sum, models[k], x)
            candidates[f"to_cnn forward/{k}"] = partial(cnns[k], x)
        seconds = interleaved(candidates, args.rounds, device, args.warmup)
    for name in ("max_sum", "to_cnn forward"):
        rows.append(_row(name, b, b, seconds[f"{name}/nchw"], seconds.get(f"{name}/cl")))

    # training steps: each candidate trains its own copy, on the same real minibatches
    b = args.train_batch
    batches = train_batches(data, b, args.train_batches, device)
    trainers: dict[str, Any] = {}
    for k, m in models.items():
        trainers[f"SGD step (Adam)/{k}"] = SGDTrainer(copy.deepcopy(m))
        trainers[f"DEM step, 1 M-step/{k}"] = DiscriminativeEM(copy.deepcopy(m), m_steps=1)
        trainers[f"DEM step, 3 M-steps/{k}"] = DiscriminativeEM(copy.deepcopy(m), m_steps=3)
        trainers[f"generative EM step/{k}"] = GenerativeEM(copy.deepcopy(m))
        trainers[f"{SSL_STEP}/{k}"] = SemiSupervisedEM(copy.deepcopy(m))
    # the semi-supervised step on the same images, a third of them labelled (32 + 64 by default)
    partly = [(x, torch.where(torch.arange(len(y), device=y.device) < len(y) // 3, y, UNLABELLED))
              for x, y in batches]  # fmt: skip
    streams = {
        name: itertools.cycle(partly if name.startswith(SSL_STEP) else batches) for name in trainers
    }

    def train_step(name: str) -> None:
        trainers[name].step(*next(streams[name]))

    seconds = interleaved(
        {k: partial(train_step, k) for k in trainers}, args.train_rounds, device, args.warmup
    )
    for name in dict.fromkeys(k.split("/")[0] for k in trainers):
        rows.append(_row(name, b, b, seconds[f"{name}/nchw"], seconds[f"{name}/cl"]))

    # shallow EM: E-steps over an epoch-equivalent of images, then the M-step
    n, sb = args.shallow_images, args.shallow_batch
    xs, ys = data.x_train[:n].to(device), data.y_train[:n].to(device)
    size = args.template_size
    shallow = init_from_class_means(xs, ys, 10, translation="interior", template_size=(size, size))
    trainer = ShallowEM(shallow)

    def shallow_epoch() -> None:
        for i in range(0, n, sb):
            trainer.step(xs[i : i + sb], ys[i : i + sb])
        trainer.end_epoch()

    seconds = interleaved(
        {"shallow": shallow_epoch}, args.shallow_rounds, device, min(1, args.warmup)
    )
    label = (
        f"shallow EM, epoch-equivalent ({size}x{size} templates, "
        f"{shallow.num_translations} placements)"
    )
    rows.append(_row(label, sb, n, seconds["shallow"], None))

    # exact MAP by enumeration on a tiny model (float64): the oracle, not a method
    tiny = tiny_model(args.tiny_width).to(device)
    patches = tiny_patches(data, args.tiny_width, args.tiny_images).to(device)
    with torch.inference_mode():
        seconds = interleaved(
            {
                "exact": partial(drm.exact_map, tiny, patches),
                "max_sum": partial(drm.max_sum, tiny, patches),
            },
            args.tiny_rounds,
            device,
            min(1, args.warmup),
        )
    configs = drm.num_configurations(tiny)
    rows.append(_row(f"exact_map, tiny model ({configs:,} configurations)",
                     args.tiny_images, args.tiny_images, seconds["exact"], None))  # fmt: skip
    rows.append(_row("max_sum, same tiny model", args.tiny_images, args.tiny_images,
                     seconds["max_sum"], None))  # fmt: skip
    return rows


def imported(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """max_sum of networks imported by to_drm against the network's own forward pass.

    The AlexNet- and VGG-11-BN-shaped modules of tests/zoo.py (torchvision's structure, fewer
    channels) at 224x224, float32, in inference mode.
    """
    from tests.zoo import AlexNetShaped, VGGShaped

    rows = []
    batch = args.zoo_batch
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((batch, 3, 224, 224), generator=generator).to(device)
    for name, net in (("AlexNet-shaped", AlexNetShaped()), ("VGG-11-BN-shaped", VGGShaped(True))):
        torch.manual_seed(0)
        net = net.to(device).eval()
        model = to_drm(net, input_shape=(3, 224, 224))
        with torch.inference_mode():
            candidates: dict[str, Callable[[], object]] = {
                "module": partial(net, x),
                "max_sum": partial(drm.max_sum, model, x),
            }
            seconds = interleaved(candidates, args.rounds, device, args.warmup)
        rows.append({"network": name, "batch": batch,
                     "module_seconds": seconds["module"], "max_sum_seconds": seconds["max_sum"],
                     "ratio": seconds["module"] / seconds["max_sum"]})  # fmt: skip
    return rows


def _row(name: str, batch: int, images: int, nchw: float, cl: float | None) -> dict[str, Any]:
    """One throughput row: `images` processed per timed call."""
    return {
        "algorithm": name,
        "batch": batch,
        "images_per_call": images,
        "seconds_per_call": nchw,
        "images_per_s": images / nchw,
        "channels_last_images_per_s": None if cl is None else images / cl,
        "channels_last_speedup": None if cl is None else nchw / cl,
    }


# ----------------------------------------------------------------------------------------------
# 2. Fraction of the machine's matmul rate
# ----------------------------------------------------------------------------------------------


def compile_module(module: nn.Module) -> tuple[Callable[..., Any] | None, str]:
    """torch.compile (inductor, static shapes), or (None, why) when it is unavailable."""
    try:
        return torch.compile(module, dynamic=False), "ok"
    except Exception as err:  # noqa: BLE001 - any failure means "not usable here"
        return None, f"{type(err).__name__}: {err}"


COLD_COMPILE = """
import json, sys, time, torch, drm
from cnn_equiv import to_cnn
torch.set_num_threads({threads})
model = drm.DeepRenderingModel.from_config(drm.lenet_config(), seed=0).to("{device}")
if {cl}:
    model = model.to(memory_format=torch.channels_last)
cnn = to_cnn(model).eval()
x = torch.rand({batch}, 1, 28, 28, device="{device}")
with torch.inference_mode():
    compiled = torch.compile(cnn, dynamic=False)
    start = time.perf_counter(); compiled(x); first = time.perf_counter() - start
    start = time.perf_counter(); compiled(x); second = time.perf_counter() - start
print(json.dumps({{"first_call_s": first, "second_call_s": second}}))
"""


def cold_compile(args: argparse.Namespace, cl: bool) -> dict[str, Any]:
    """Compile time with an empty inductor cache, in a fresh process."""
    cache = tempfile.mkdtemp(prefix="bench_all_inductor_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    code = COLD_COMPILE.format(
        threads=args.threads, device=args.device, cl=cl, batch=args.profile_batch
    )
    try:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return {"ok": False, "error": done.stderr.strip().splitlines()[-1:]}
        return {"ok": True, "process_wall_s": wall, **json.loads(done.stdout.splitlines()[-1])}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def op_profile(run: Callable[[], object], device: torch.device, calls: int) -> list[dict[str, Any]]:
    """torch.profiler: self time per call of each (op, first input shape), largest first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for _ in range(2):
        run()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            run()
        synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages(group_by_input_shape=True) if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events)
    rows = []
    for e in sorted(events, key=lambda e: -getattr(e, attr)):
        shapes = [s for s in (e.input_shapes or []) if s]
        rows.append({
            "op": e.key,
            "input": "x".join(map(str, shapes[0])) if shapes else "",
            "ms_per_call": getattr(e, attr) / calls / 1000.0,
            "share": getattr(e, attr) / total,
        })  # fmt: skip
    return rows


def peak_fraction(args: argparse.Namespace, data: Any, device: torch.device) -> dict[str, Any]:
    """GFLOP/s of the LeNet forward against a large float32 matmul, in the same rounds."""
    model = lenet(device)
    model_cl = channels_last(model)
    flops = flops_per_image(model)
    n = args.matmul_size
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    matmul_flops = 2 * n**3

    eager: dict[str, Callable[..., Any]] = {
        "eager NCHW": to_cnn(model).eval(),
        "eager channels_last": to_cnn(model_cl).eval(),
    }
    sources = {"compiled NCHW": model, "compiled channels_last": model_cl} if args.compile else {}
    compile_status = dict.fromkeys(sources, "ok")
    result: dict[str, Any] = {
        "flops_per_image": flops,
        "level_flops": level_flops(model),
        "matmul_size": n,
        "threads": torch.get_num_threads(),
        "rows": [],
        "first_call_s": {},
        "compile_status": compile_status,
        "max_abs_diff": {},
    }
    nets = dict(eager)
    with torch.inference_mode():
        for batch in args.batch_sizes:
            x = data.x_test[:batch].to(device)
            reference = eager["eager NCHW"](x)
            # A fresh compile per batch size: with static shapes every batch size is a new graph,
            # and dynamo's recompile limit (8 graphs per code object, shared by the forward of
            # every nn.Module) would otherwise send later batch sizes back to eager, silently but
            # for a log line.
            torch._dynamo.reset()
            nets = dict(eager)
            for key, source in sources.items():
                if compile_status[key] == "ok":
                    compiled, compile_status[key] = compile_module(to_cnn(source).eval())
                    if compiled is not None:
                        nets[key] = compiled
            first_call = {}
            for key, net in list(nets.items()):  # compiles happen here, outside the timed rounds
                synchronize(device)
                start = time.perf_counter()
                try:
                    out = net(x)
                except Exception as err:  # noqa: BLE001 - a failed compile: report, go on
                    compile_status[key] = f"{type(err).__name__}: {str(err)[:200]}"
                    del nets[key]
                    continue
                synchronize(device)
                first_call[key] = time.perf_counter() - start
                diff = float((out - reference).abs().max())
                result["max_abs_diff"][key] = max(diff, result["max_abs_diff"].get(key, 0.0))
            result["first_call_s"][batch] = first_call
            candidates: dict[str, Callable[[], object]] = {
                k: partial(net, x) for k, net in nets.items()
            }
            candidates["max_sum NCHW"] = partial(drm.max_sum, model, x)
            candidates["max_sum channels_last"] = partial(drm.max_sum, model_cl, x)
            candidates["matmul"] = partial(torch.mm, a, b)
            reps = max(1, math.ceil(args.min_images / batch))
            repeat = {k: reps for k in candidates if k != "matmul"}
            seconds = interleaved(candidates, args.rounds, device, args.warmup, repeat)
            peak = matmul_flops / seconds.pop("matmul") / 1e9
            row: dict[str, Any] = {"batch": batch, "matmul_gflops": peak, "gflops": {}}
            for k, s in seconds.items():
                row["gflops"][k] = flops * batch / s / 1e9
            row["fraction"] = {k: g / peak for k, g in row["gflops"].items()}
            result["rows"].append(row)

        # thread settings at one batch size: 1 thread against the default
        batch = args.profile_batch
        x = data.x_test[:batch].to(device)
        threads = []
        settings = [torch.get_num_threads()]
        if device.type == "cpu" and torch.get_num_threads() > 1:
            settings.append(1)
        for t in settings:
            torch.set_num_threads(t)
            candidates = {
                "eager NCHW": partial(nets["eager NCHW"], x),
                "eager channels_last": partial(nets["eager channels_last"], x),
                "max_sum channels_last": partial(drm.max_sum, model_cl, x),
                "matmul": partial(torch.mm, a, b),
            }
            seconds = interleaved(candidates, args.rounds, device, args.warmup)
            peak = matmul_flops / seconds.pop("matmul") / 1e9
            threads.append({
                "threads": t,
                "matmul_gflops": peak,
                "gflops": {k: flops * batch / s / 1e9 for k, s in seconds.items()},
                "fraction": {k: flops * batch / s / 1e9 / peak for k, s in seconds.items()},
            })  # fmt: skip
        torch.set_num_threads(settings[0])
        result["thread_rows"] = threads
        result["thread_batch"] = batch

        # which op dominates
        profiled = ["eager NCHW", "eager channels_last"]
        profiled += [k for k in ("compiled channels_last",) if k in nets]
        result["profile_batch"] = batch
        result["profiles"] = {
            k: op_profile(partial(nets[k], x), device, args.profile_calls) for k in profiled
        }
    if args.compile:
        result["cold_compile"] = {
            "NCHW": cold_compile(args, cl=False),
            "channels_last": cold_compile(args, cl=True),
        }
    return result


def hot_paths(args: argparse.Namespace, data: Any, device: torch.device) -> dict[str, Any]:
    """torch.profiler breakdown of a DEM step, a generative EM step and exact_map."""
    model = lenet(device)
    b = args.train_batch
    batches = train_batches(data, b, args.train_batches, device)
    result: dict[str, Any] = {"train_batch": b, "tiny_images": args.tiny_images}
    # generative EM steps are ~20x longer (and hold ~20x more profiler events): fewer of them
    for name, trainer, calls in (
        ("DEM step, 1 M-step", DiscriminativeEM(copy.deepcopy(model)), args.profile_calls),
        ("generative EM step", GenerativeEM(copy.deepcopy(model)), max(1, args.profile_calls // 4)),
    ):
        stream = itertools.cycle(batches)

        def step(trainer: Any = trainer, stream: Any = stream) -> None:
            trainer.step(*next(stream))

        result[name] = op_profile(step, device, calls)
    # a smaller tiny model than section 1's: the profiler keeps an event per op call, and
    # conv_transpose2d's float64 CPU kernel makes a few `select` calls per rendered image (10
    # per configuration), which at 65,536 configurations would need gigabytes of events
    w = min(args.tiny_width, 7)
    tiny = tiny_model(w).to(device)
    result["tiny_configurations"] = drm.num_configurations(tiny)
    patches = tiny_patches(data, w, args.tiny_images).to(device)
    with torch.inference_mode():
        result["exact_map, tiny model"] = op_profile(
            partial(drm.exact_map, tiny, patches), device, 1
        )
    return result


# ----------------------------------------------------------------------------------------------
# 3. Memory
# ----------------------------------------------------------------------------------------------


MEMORY_KINDS = ("max_sum", "max_sum channels_last", "to_cnn forward", "SGD step", "DEM step")


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM (current and peak resident set, bytes) of this process; {} off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return values


def _reset_peak(device: torch.device) -> tuple[int, str]:
    """Set the peak-memory counter to the current usage; returns (current bytes, method)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return _proc_status()["VmRSS"], "VmHWM (peak RSS), reset by /proc/self/clear_refs"
    except (OSError, KeyError):
        return _peak_bytes(device), "ru_maxrss (peak RSS since the process started)"


def _peak_bytes(device: torch.device) -> int:
    """The peak since the last reset: resident set (CPU) or allocated device memory (CUDA)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    # ru_maxrss (KiB on Linux, bytes on macOS) is NOT reset by exec: a child started by a big
    # parent reports the parent's peak, which is why VmHWM is preferred where it exists
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_probe(kind: str, batch: int, device_name: str, threads: int) -> dict[str, Any]:
    """Run in a fresh process: peak memory increase of one `kind` call on `batch` images.

    Set-up (model, images, one warm-up call on 2 images that loads the kernels and the thread
    pool) happens first; then the peak counter is reset to the current usage, the call runs
    twice, and the peak minus the usage before is the extra memory the call needed at its worst
    moment (its outputs included). Images are uniform noise: memory does not depend on the pixel
    values.
    """
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = lenet(device)
    if kind == "max_sum channels_last":
        model = channels_last(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    small_x, small_y = x[:2].clone(), y[:2].clone()
    keep: list[object] = []
    if kind.startswith("max_sum"):
        run: Callable[[Any, Any], object] = lambda xb, yb: drm.max_sum(model, xb)  # noqa: E731
        context: Any = torch.inference_mode
    elif kind == "to_cnn forward":
        cnn = to_cnn(model).eval()
        run, context = (lambda xb, yb: cnn(xb)), torch.inference_mode
    else:
        trainer: Any = SGDTrainer(model) if kind == "SGD step" else DiscriminativeEM(model)
        run, context = trainer.step, torch.enable_grad
    with context():
        run(small_x, small_y)
        synchronize(device)
        before, method = _reset_peak(device)
        for _ in range(2):
            keep.clear()
            keep.append(run(x, y))
            synchronize(device)
        peak = _peak_bytes(device)
    return {"kind": kind, "batch": batch, "before_bytes": before,
            "increase_bytes": peak - before, "method": method}  # fmt: skip


def _run_probe(kind: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    code = (
        "import json, sys\nfrom experiments.bench_all import memory_probe\n"
        "print(json.dumps(memory_probe(*json.loads(sys.argv[1]))))"
    )
    payload = json.dumps([kind, batch, args.device, args.threads])
    done = subprocess.run(
        [sys.executable, "-c", code, payload],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {kind} failed: {done.stderr.strip()[-500:]}")
    return dict(json.loads(done.stdout.splitlines()[-1]))


def memory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Measured peak increases, and the analytic sizes of activations and latents."""
    model = lenet(device)
    per_image: dict[str, int] = {"input": 4 * math.prod(model.input_shape)}
    activations = 0
    masks = 0
    indices = 0
    for level in model.levels:
        if level.output_kind != "view":  # Flatten's output is a view: no memory of its own
            activations += 4 * math.prod(level.out_shape)  # float32 output of every level
        if isinstance(level, drm.Switch):
            masks += math.prod(level.in_shape)  # bool, 1 byte
        elif isinstance(level, drm.MaxPool):
            indices += 8 * math.prod(level.out_shape)  # int64
    per_image.update(activations=activations, masks=masks, indices=indices)
    # check the count against the tensors max_sum really returns
    with torch.inference_mode():
        _, latents = drm.max_sum(model, torch.zeros(2, *model.input_shape, device=device))
    returned = sum(z.numel() * z.element_size() for z in latents if z is not None)
    assert returned == 2 * (masks + indices), (returned, masks, indices)
    probes = [
        _run_probe(kind, batch, args) for batch in args.memory_batches for kind in args.memory_kinds
    ]
    return {
        "method": probes[0]["method"] if probes else "",
        "per_image_bytes": per_image,
        "probes": probes,
    }


# ----------------------------------------------------------------------------------------------
# 4. Scaling
# ----------------------------------------------------------------------------------------------


def scaling(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """max_sum time per image against image size, depth and width (NCHW and channels_last)."""
    b = args.scale_batch
    generator = torch.Generator().manual_seed(0)
    tables: dict[str, list[tuple[str, drm.DeepRenderingModel]]] = {
        "image size, LeNet": [
            (f"{s}x{s}", lenet(device, input_shape=(1, s, s))) for s in args.sizes
        ],
        "image size, fully convolutional": [
            (f"{s}x{s}", fully_convolutional(s, device)) for s in args.sizes
        ],
        "depth (conv3x3 levels, 32 channels, 28x28)": [
            (str(d), deep_model(d, 32, device)) for d in args.depths
        ],
        "width (LeNet channels x k)": [
            (
                f"x{k:g} ({round(20 * k)}-{round(50 * k)}-{round(500 * k)})",
                lenet(device, widths=(round(20 * k), round(50 * k), round(500 * k))),
            )
            for k in args.widths
        ],
    }
    result: dict[str, Any] = {"batch": b}
    for title, entries in tables.items():
        candidates: dict[str, Callable[[], object]] = {}
        for label, model in entries:
            x = torch.rand(b, *model.input_shape, generator=generator).to(device)
            candidates[f"{label}/nchw"] = partial(drm.max_sum, model, x)
            candidates[f"{label}/cl"] = partial(drm.max_sum, channels_last(model), x)
        with torch.inference_mode():
            seconds = interleaved(candidates, args.scale_rounds, device, args.warmup)
        rows = []
        for label, model in entries:
            flops = flops_per_image(model)
            nchw, cl = seconds[f"{label}/nchw"] / b, seconds[f"{label}/cl"] / b
            rows.append({
                "config": label,
                "mflops_per_image": flops / 1e6,
                "us_per_image": nchw * 1e6,
                "gflops": flops / nchw / 1e9,
                "channels_last_us_per_image": cl * 1e6,
                "channels_last_gflops": flops / cl / 1e9,
            })  # fmt: skip
        result[title] = rows
    return result


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    """Time per image against each scaling axis, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = [k for k in result if k != "batch"]
    fig, grid = plt.subplots(2, 2, figsize=(9, 7), squeeze=False)
    axes = list(grid.flat)[: len(titles)]
    for ax, title in zip(axes, titles, strict=True):
        rows = result[title]
        labels = [r["config"].split(" ")[0] for r in rows]
        ax.plot(labels, [r["us_per_image"] for r in rows], "o-", label="NCHW")
        ax.plot(
            labels, [r["channels_last_us_per_image"] for r in rows], "s-", label="channels_last"
        )
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("max_sum, microseconds / image")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"max_sum cost growth (batch {result['batch']}, float32)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# main, tables, arguments
# ----------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
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
        start = _cpu_snapshot()
        results[name] = run()
        results["load"][name] = others_load(start)
    results["seconds"] = time.perf_counter() - started
    return results


def _num(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def profile_lines(title: str, unit: str, ops: list[dict[str, Any]], top: int) -> list[str]:
    """A titled markdown table of the `top` ops of an `op_profile`."""
    total = sum(o["ms_per_call"] for o in ops)
    lines = [f"{title} (total {total:.2f} {unit})", "| op | first input | ms | share |",
             "|---|---|---:|---:|"]  # fmt: skip
    for o in ops[:top]:
        lines.append(f"| {o['op']} | {o['input']} | {o['ms_per_call']:.3f} | {o['share']:.0%} |")
    return lines


def _throughput_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    lines += [
        "",
        "1. Throughput (LeNet-5 20-50-500 float32, real MNIST; images/s, medians of interleaved "
        "rounds)",
        "| algorithm | batch | images/s | ms / call | images/s, channels_last model "
        "| channels_last speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["throughput"]:
        lines.append(
            f"| {r['algorithm']} | {r['batch']} | {_num(r['images_per_s'], 1)} "
            f"| {r['seconds_per_call'] * 1e3:,.2f} | {_num(r['channels_last_images_per_s'], 1)} "
            f"| {_num(r['channels_last_speedup'], 2)}{'x' if r['channels_last_speedup'] else ''} |"
        )
    by_name = {r["algorithm"]: r for r in results["throughput"]}
    if SSL_STEP in by_name and "SGD step (Adam)" in by_name:
        ssl, sgd = by_name[SSL_STEP], by_name["SGD step (Adam)"]
        ratios = [ssl["seconds_per_call"] / sgd["seconds_per_call"]]
        if ssl["channels_last_images_per_s"] and sgd["channels_last_images_per_s"]:
            ratios.append(sgd["channels_last_images_per_s"] / ssl["channels_last_images_per_s"])
        lines.append(
            "semi-supervised step / SGD step, same batch: "
            + " (NCHW), ".join(f"{r:.2f}x" for r in ratios)
            + (" (channels_last)" if len(ratios) > 1 else " (NCHW)")
        )

    return lines


def _peak_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    p = results["peak"]
    keys = list(p["rows"][0]["gflops"])
    lines += [
        "",
        f"2. LeNet forward, achieved GFLOP/s and fraction of a {p['matmul_size']}x"
        f"{p['matmul_size']} float32 torch.mm timed in the same rounds "
        f"({p['flops_per_image'] / 1e6:.3f} MFLOP/image = 2 x MACs of conv1, conv2, dense, "
        f"classes; {p['threads']} threads)",
        "| batch | matmul GFLOP/s | " + " | ".join(keys) + " |",
        "|---:|---:|" + "---:|" * len(keys),
    ]
    for r in p["rows"]:
        cells = [f"{r['gflops'][k]:.1f} ({r['fraction'][k]:.2f})" for k in keys]
        lines.append(f"| {r['batch']} | {r['matmul_gflops']:.1f} | " + " | ".join(cells) + " |")
    lines.append("(GFLOP/s (fraction of the matmul rate); max_sum also returns its latents)")
    best = {k: max(p["rows"], key=lambda r, k=k: r["fraction"][k]) for k in keys}
    lines.append(
        "best fraction: "
        + "; ".join(f"{k} {best[k]['fraction'][k]:.2f} at batch {best[k]['batch']}" for k in keys)
    )
    tkeys = list(p["thread_rows"][0]["gflops"])
    lines += [
        "",
        f"Threads (batch {p['thread_batch']}): GFLOP/s (fraction of the matmul at the same "
        "thread count)",
        "| threads | matmul GFLOP/s | " + " | ".join(tkeys) + " |",
        "|---:|---:|" + "---:|" * len(tkeys),
    ]
    for r in p["thread_rows"]:
        cells = [f"{r['gflops'][k]:.1f} ({r['fraction'][k]:.2f})" for k in tkeys]
        lines.append(f"| {r['threads']} | {r['matmul_gflops']:.1f} | " + " | ".join(cells) + " |")
    if p["compile_status"]:
        lines += ["", "torch.compile (inductor, dynamic=False):"]
        for k, status in p["compile_status"].items():
            lines.append(f"  {k}: {status}")
        for batch, firsts in p["first_call_s"].items():
            cells = ", ".join(f"{k} {v:.2f} s" for k, v in firsts.items() if "compiled" in k)
            lines.append(f"  first call at batch {batch} (compile + run, this process): {cells}")
        for k, c in p.get("cold_compile", {}).items():
            if c["ok"]:
                lines.append(
                    f"  cold inductor cache, fresh process, {k}: first call "
                    f"{c['first_call_s']:.1f} s, second call {c['second_call_s'] * 1e3:.1f} ms"
                )
            else:
                lines.append(f"  cold inductor cache, {k}: failed: {c['error']}")
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in p["max_abs_diff"].items() if k != "eager NCHW")
        lines.append(f"  max |logit - eager NCHW logit| over all batches: {diffs}")
    lines += ["", f"Profile (torch.profiler, batch {p['profile_batch']}): self time per forward"]
    for k, ops in p["profiles"].items():
        lines += profile_lines(k, "ms", ops, 7)

    return lines


def _hot_paths_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    h = results["hot_paths"]
    lines += ["", "Profile of the learning steps and of the exact oracle: self time per call"]
    for k, ops in h.items():
        if not isinstance(ops, list):
            continue
        size = (
            f"{h['tiny_images']} images, {h['tiny_configurations']:,} configurations"
            if "exact" in k
            else f"batch {h['train_batch']}"
        )
        lines += profile_lines(f"{k}, {size}", "ms per call", ops, 5)

    return lines


def _memory_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    mem = results["memory"]
    per = mem["per_image_bytes"]
    lines += [
        "",
        "3. Memory (LeNet-5 float32): analytic sizes per image",
        "| tensor | KiB / image |",
        "|---|---:|",
        f"| input image | {per['input'] / 1024:.1f} |",
        f"| every level's float32 output (activations, Flatten's view excluded) "
        f"| {per['activations'] / 1024:.1f} |",
        f"| max_sum latents: bool switch masks | {per['masks'] / 1024:.1f} |",
        f"| max_sum latents: int64 pool indices | {per['indices'] / 1024:.1f} |",
        f"| max_sum latents, total | {(per['masks'] + per['indices']) / 1024:.1f} |",
        "",
        f"Measured peak increase over one call ({mem['method']}, fresh process per cell; MiB)",
    ]
    batches = sorted({q["batch"] for q in mem["probes"]})
    kinds = list(dict.fromkeys(q["kind"] for q in mem["probes"]))
    lines += [
        "| call | " + " | ".join(f"batch {b}" for b in batches) + " | latents alone, last batch |",
        "|---|" + "---:|" * (len(batches) + 1),
    ]
    latent_mib = (per["masks"] + per["indices"]) * batches[-1] / MIB
    for kind in kinds:
        cells = [
            f"{q['increase_bytes'] / MIB:,.1f}"
            for b in batches
            for q in mem["probes"]
            if q["kind"] == kind and q["batch"] == b
        ]
        extra = f"{latent_mib:,.1f}" if kind.startswith("max_sum") else ""
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {extra} |")

    return lines


def _scaling_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    s = results["scaling"]
    lines += ["", f"4. max_sum cost growth (batch {s['batch']}, float32, random images)"]
    for title, rows in s.items():
        if title == "batch":
            continue
        lines += [
            "",
            f"{title}",
            "| config | MFLOP / image | us / image | GFLOP/s | us / image, channels_last "
            "| GFLOP/s, channels_last |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['config']} | {r['mflops_per_image']:,.2f} | {r['us_per_image']:,.1f} "
                f"| {r['gflops']:.1f} | {r['channels_last_us_per_image']:,.1f} "
                f"| {r['channels_last_gflops']:.1f} |"
            )
    return lines


def _imported_lines(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "5. Imported networks (to_drm of tests/zoo.py, float32, 224x224): max_sum against the "
        "module's own forward",
    ]
    lines += [
        "| network | batch | module ms | max_sum ms | max_sum speed / module speed |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["imported"]:
        lines.append(
            f"| {r['network']} | {r['batch']} | {r['module_seconds'] * 1e3:.1f} "
            f"| {r['max_sum_seconds'] * 1e3:.1f} | {r['ratio']:.2f}x |"
        )
    return lines


def format_table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
        f"{m['threads']} threads (interop {m['interop_threads']}), device {results['device']}"
        + (f" ({m['gpu']})" if "gpu" in m and results["device"].startswith("cuda") else ""),
    ]
    for name, section in (
        ("throughput", _throughput_lines),
        ("peak", _peak_lines),
        ("hot_paths", _hot_paths_lines),
        ("memory", _memory_lines),
        ("scaling", _scaling_lines),
        ("imported", _imported_lines),
    ):
        if name in results:
            lines += section(results)
    lines += ["", f"(whole run: {results['seconds']:.0f} s)"]
    load = results.get("load", {})
    if load and all(load.values()):
        lines.append(
            "Other processes' CPU use during each section (average cores; ~0 on a quiet machine): "
            + ", ".join(
                f"{k} {v['other_cores']:.2f} (steal {v['steal_cores']:.2f})"
                for k, v in load.items()
            )
        )
    return "\n".join(lines)


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
