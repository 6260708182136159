"""Section 2 of experiments/bench_all.py: the LeNet forward against the machine's peak.

`peak_fraction(args, data, device)`: the achieved GFLOP/s of the forward (eager NCHW, eager
channels_last, `torch.compile`d, and max_sum) at several batch sizes as a fraction of a large
float32 `torch.mm` timed in the same rounds; 1 thread against all threads; the op profile of
the forward; and `cold_compile`: the compile time with an empty inductor cache, in a fresh
process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

import drm
from cnn_equiv import to_cnn
from experiments._bench import (
    ROOT,
    channels_last,
    flops_per_image,
    interleaved,
    lenet,
    level_flops,
    op_profile,
    synchronize,
)


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
