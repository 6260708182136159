"""The tables of experiments/bench_all.py: its results (a dict of JSON-ready sections) as the
markdown tables it prints, one function per section, joined by `format_table`."""

from __future__ import annotations

from typing import Any

from experiments.benchmarks.throughput import SSL_STEP

MIB = 1024.0**2


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

    def best_row(key: str) -> dict[str, Any]:
        return max(p["rows"], key=lambda r: r["fraction"][key])

    best = {k: best_row(k) for k in keys}
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
            calls = ", ".join(f"{k} {v:.2f} s" for k, v in firsts.items() if "compiled" in k)
            lines.append(f"  first call at batch {batch} (compile + run, this process): {calls}")
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
