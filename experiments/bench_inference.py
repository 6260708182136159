"""Benchmark: bottom-up max-sum against the CNN forward pass, and the exact oracles' cost.

Measures, in one run and with the same thread count,
  * images/s of `drm.max_sum` (scores AND latents), of `to_cnn(model)` forward, and of a plain
    hand-written `nn.Sequential` LeNet with the same weights, on real MNIST test images (a
    LeNet-5-sized model, float32, inference mode); the three are timed in interleaved rounds and
    the median is reported, so drift of the machine hits all three alike;
  * images/s of the brute-force `drm.exact_map` and of Pyro's `infer_discrete` MAP on a tiny model
    (16 switches, 65,536 configurations: the largest the Pyro program accepts by default) and of
    `exact_map` on the largest tiny model it accepts by default (18 switches), on real MNIST
    patches;
  * the speed-ups as ratios.

Command:
    python -m experiments.bench_inference            # about a minute on 2 CPU cores
    python -m experiments.bench_inference --smoke    # seconds; used by the tests

Expected output: a table whose "max_sum / plain CNN" ratio is about 0.95-1.0 (the latents cost a
cheap bool cast per ReLU and the pool indices torch computes anyway), and exact inference
thousands of times slower than max-sum on a model a million times smaller.
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
from torch import nn

import drm
from cnn_equiv import to_cnn
from drm.checkpoint import atomic_write
from drm.data import load_mnist
from drm.pyro_model import pyro_map
from experiments._bench import interleaved, tiny_model, tiny_patches
from experiments._cli import Parser, positive_int, run_command


def plain_lenet(widths: tuple[int, int, int], inplace: bool = False) -> nn.Sequential:
    """The same architecture written by hand, as a user would (optionally with in-place ReLU,
    as torchvision's models are)."""
    c1, c2, hidden = widths
    return nn.Sequential(
        nn.Conv2d(1, c1, 5), nn.ReLU(inplace), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(inplace), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 4 * 4, hidden), nn.ReLU(inplace), nn.Linear(hidden, 10),
    )  # fmt: skip


def time_candidates(
    candidates: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, float]:
    """Interleaved medians in inference mode, waiting for the device around each call."""
    with torch.inference_mode():
        return interleaved(candidates, rounds, device)


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_mnist()
    results: dict[str, Any] = {"threads": args.threads, "device": str(device), "rows": []}

    # --- max-sum against the CNN on a LeNet-sized model -------------------------------------
    widths = (20, 50, 500)
    model = drm.DeepRenderingModel.from_config(drm.lenet_config(widths=widths), seed=0).to(device)
    cnn = to_cnn(model)
    plain = plain_lenet(widths).to(device)
    plain.load_state_dict(cnn.state_dict())
    plain_inplace = plain_lenet(widths, inplace=True).to(device)
    plain_inplace.load_state_dict(cnn.state_dict())
    for batch in args.batch_sizes:
        x = data.x_test[:batch].to(device)
        assert torch.equal(drm.max_sum(model, x)[0], plain(x))  # same numbers, not just speed
        seconds = time_candidates(
            {
                "max_sum": partial(drm.max_sum, model, x),
                "to_cnn": partial(cnn, x),
                "plain": partial(plain, x),
                "plain_inplace": partial(plain_inplace, x),
            },
            args.rounds,
            device,
        )
        row = {
            "batch": batch,
            **{f"{k}_images_per_s": batch / v for k, v in seconds.items()},
            "max_sum_over_plain": seconds["plain"] / seconds["max_sum"],
            "to_cnn_over_plain": seconds["plain"] / seconds["to_cnn"],
            "max_sum_over_plain_inplace": seconds["plain_inplace"] / seconds["max_sum"],
        }
        results["rows"].append(row)

    # --- exact oracles on tiny models (real MNIST patches, float64, CPU) --------------------
    tiny = tiny_model(args.tiny_width)
    patches = tiny_patches(data, args.tiny_width, args.tiny_images)
    with torch.inference_mode():
        tiny_seconds = interleaved(
            {
                "max_sum": lambda: drm.max_sum(tiny, patches),
                "exact_map": lambda: drm.exact_map(tiny, patches),
            },
            rounds=max(1, args.rounds // 4),
            device=torch.device("cpu"),
            warmup=1,
        )
    start = time.perf_counter()
    pyro_map(tiny, patches)
    tiny_seconds["pyro_map"] = time.perf_counter() - start
    largest = tiny_model(args.tiny_width + 1)
    wider = tiny_patches(data, args.tiny_width + 1, args.tiny_images)
    start = time.perf_counter()
    with torch.inference_mode():
        drm.exact_map(largest, wider)
    largest_seconds = time.perf_counter() - start
    n = patches.shape[0]
    results["tiny"] = {
        "width": args.tiny_width,
        "configurations": drm.num_configurations(tiny),
        "images": n,
        **{f"{k}_images_per_s": n / v for k, v in tiny_seconds.items()},
        "max_sum_over_exact_map": tiny_seconds["exact_map"] / tiny_seconds["max_sum"],
        "exact_map_over_pyro_map": tiny_seconds["pyro_map"] / tiny_seconds["exact_map"],
        "largest_exact_configurations": drm.num_configurations(largest),
        "largest_exact_map_images_per_s": n / largest_seconds,
    }
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"LeNet-5-sized model (20-50-500), float32, real MNIST test images, "
        f"{results['threads']} threads, {results['device']}",
        "| batch | max_sum (+latents) | to_cnn | plain nn.Sequential | plain, in-place ReLU "
        "| max_sum / plain | max_sum / plain in-place | to_cnn / plain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['batch']} | {r['max_sum_images_per_s']:,.0f} | {r['to_cnn_images_per_s']:,.0f}"
            f" | {r['plain_images_per_s']:,.0f} | {r['plain_inplace_images_per_s']:,.0f}"
            f" | {r['max_sum_over_plain']:.3f} | {r['max_sum_over_plain_inplace']:.3f}"
            f" | {r['to_cnn_over_plain']:.3f} |"
        )
    lines.append("(images/s; medians of interleaved rounds)")
    t = results["tiny"]
    lines += [
        "",
        f"Tiny model (1x3x{t['width']} patches, "
        f"{t['configurations']:,} configurations x 10 classes), float64, "
        f"{t['images']} real MNIST patches",
        "| method | img/s |",
        "|---|---:|",
        f"| max_sum | {t['max_sum_images_per_s']:,.1f} |",
        f"| exact_map (enumeration) | {t['exact_map_images_per_s']:,.2f} |",
        f"| Pyro infer_discrete MAP | {t['pyro_map_images_per_s']:,.2f} |",
        f"| exact_map, largest default ({t['largest_exact_configurations']:,} configurations) "
        f"| {t['largest_exact_map_images_per_s']:,.2f} |",
        "",
        f"max_sum / exact_map speed-up: {t['max_sum_over_exact_map']:,.0f}x; "
        f"exact_map / Pyro speed-up: {t['exact_map_over_pyro_map']:.1f}x",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m experiments.bench_inference", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1000])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per candidate")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny-width", type=int, default=9, help="16 switches at width 9")
    parser.add_argument("--tiny-images", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.rounds, args.tiny_width, args.tiny_images = [8], 2, 4, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def command(argv: list[str] | None) -> str:
    """Measure, write --json if asked, and return the table."""
    arguments = parse_args(argv)
    outcome = main(arguments)
    if arguments.json:
        text = json.dumps(outcome, indent=2)
        atomic_write(arguments.json, lambda tmp: tmp.write_text(text))
    return format_table(outcome)


def cli(argv: list[str] | None = None) -> int:
    """The command: the table, or one line on stderr (exit status 1)."""
    return run_command(lambda: command(argv))


if __name__ == "__main__":
    sys.exit(cli())
