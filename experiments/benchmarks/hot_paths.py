"""Section 2 of experiments/bench_all.py, continued: where the time of the learning steps goes.

`hot_paths(args, data, device)`: the torch.profiler breakdown (`op_profile`) of a discriminative
EM step, a generative EM step and `drm.exact_map` on a tiny model.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from functools import partial
from typing import Any

import torch

import drm
from drm.em import DiscriminativeEM, GenerativeEM
from experiments._bench import lenet, op_profile, tiny_model, tiny_patches, train_batches


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
