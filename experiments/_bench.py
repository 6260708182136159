"""What the benchmark scripts share: timing, the models they time, the memory probe.

* `interleaved(candidates, rounds, device)`: median seconds per call, candidates timed
  round-robin after warm-up rounds, so that drift of the machine hits all of them alike;
  `synchronize(device)` waits for queued CUDA work around each timed sample;
  `op_profile(run, device, calls)`: torch.profiler's self time per op.
* `machine()`: what the numbers were measured on; `cpu_snapshot()` and `others_load(start)`:
  the CPU other processes used since a snapshot (Linux), ~0 on a quiet machine.
* `lenet(device)`, `channels_last(model)`: the LeNet-5 of the throughput tables;
  `tiny_model(width)`, `tiny_patches(data, width, n)`: the tiny models of the exact-inference
  timings, on real MNIST patches; `train_batches(data, b, n, device)`: real minibatches;
  `level_flops(model)`, `flops_per_image(model)`: the analytic FLOPs of a model's forward.
* `memory_probe(kind, batch, device, threads)`: the peak memory increase of one call, run in
  a fresh process (`python -c "from experiments._bench import memory_probe; ..."`).

Used by experiments/bench_inference.py, experiments/bench_all.py and its sections in
experiments/benchmarks/ (docs/performance.md).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import drm
from cnn_equiv import SGDTrainer, to_cnn
from drm.data import Dataset
from drm.em import DiscriminativeEM

CHANNELS_LAST = torch.channels_last
ROOT = Path(__file__).resolve().parent.parent  # the repository: the working folder of probes


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    warmup: int = 2,
    repeat: dict[str, int] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed round-robin.

    Args:
        candidates: name -> a call to time.
        rounds: timed rounds (each candidate once per round).
        device: waited for (`synchronize`) before and after each timed sample.
        warmup: untimed rounds first.
        repeat: name -> calls per timed sample (for calls too short to time one by one).
    """
    repeat = repeat or {}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(warmup + rounds):
        for name, run in candidates.items():
            n = repeat.get(name, 1)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                run()
            synchronize(device)
            elapsed = (time.perf_counter() - start) / n
            if r >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def tiny_model(width: int, seed: int = 0) -> drm.DeepRenderingModel:
    """Conv(2x2, one filter) on (1, 3, width) patches: 2*(width-1) switches, then 10 classes."""
    config = drm.ModelConfig(
        (1, 3, width), 10, (drm.ConvSpec(1, 2), drm.SwitchSpec(), drm.FlattenSpec())
    )
    return drm.DeepRenderingModel.from_config(config, seed=seed, dtype=torch.float64)


def tiny_patches(data: Dataset, width: int, n: int) -> Tensor:
    """The (n, 1, 3, width) test-image patches `tiny_model(width)` takes (rows 12-14, columns
    10 to 10 + width), in float64."""
    return data.x_test[:n, :, 12:15, 10 : 10 + width].to(torch.float64)


def lenet(device: torch.device, **kwargs: Any) -> drm.DeepRenderingModel:
    """LeNet-5 (float32, seed 0) on `device`; kwargs go to `drm.lenet_config`."""
    return drm.DeepRenderingModel.from_config(drm.lenet_config(**kwargs), seed=0).to(device)


def channels_last(model: drm.DeepRenderingModel) -> drm.DeepRenderingModel:
    """A copy whose conv templates are stored channels_last (NHWC strides; same values)."""
    return copy.deepcopy(model).to(memory_format=CHANNELS_LAST)


def train_batches(data: Any, b: int, n: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The first `n` training minibatches of `b` real images and labels, on `device`."""
    return [
        (data.x_train[i : i + b].to(device), data.y_train[i : i + b].to(device))
        for i in range(0, b * n, b)
    ]


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
    """Analytic FLOPs per image of the model's forward: the sum of `level_flops`."""
    return sum(f for _, f in level_flops(model))


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


def cpu_snapshot() -> tuple[float, float, float, float] | None:
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
    end = cpu_snapshot()
    if start is None or end is None:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[3] - start[3])
    return {"wall_s": wall, "other_cores": max(0.0, others) / wall,
            "steal_cores": (end[2] - start[2]) / wall}  # fmt: skip


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
