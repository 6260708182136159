"""Section 4 of experiments/bench_all.py: how the cost of max_sum grows.

`scaling(args, device)`: max_sum's time per image and GFLOP/s against the image size (LeNet and
`fully_convolutional`), the depth (`deep_model`) and the width (LeNet's channels times k), NCHW
and channels_last; `plot_scaling(result, path)`: the PNG of it, one panel per axis.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

import drm
from drm.checkpoint import atomic_write
from experiments._bench import channels_last, flops_per_image, interleaved, lenet


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
