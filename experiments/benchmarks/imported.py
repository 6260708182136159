"""Section 5 of experiments/bench_all.py: networks imported by `to_drm`, timed against their own
forward pass (the AlexNet- and VGG-11-BN-shaped modules of tests/zoo.py, 224x224)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import drm
from cnn_equiv import to_drm
from experiments._bench import interleaved


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
