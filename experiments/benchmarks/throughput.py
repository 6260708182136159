"""Section 1 of experiments/bench_all.py: the throughput (images/s) of every algorithm.

`throughput(args, data, device)` times max_sum and the `to_cnn` forward, one training step of
SGD, discriminative EM (1 and 3 M-steps, the exact-top and block M-step designs), generative EM
and semi-supervised EM, each with the model in NCHW and in channels_last memory format; an
epoch-equivalent of shallow EM; and `drm.exact_map` against max_sum on a tiny model. One row per
algorithm.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import drm
from cnn_equiv import SGDTrainer, to_cnn
from drm.em import DiscriminativeEM, GenerativeEM
from drm.m_steps import discriminative_em
from drm.semisupervised import UNLABELLED, SemiSupervisedEM
from drm.shallow_em import ShallowEM, init_from_class_means
from experiments._bench import (
    channels_last,
    interleaved,
    lenet,
    tiny_model,
    tiny_patches,
    train_batches,
)

SSL_STEP = "semi-supervised EM step (a third labelled)"


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
        # the M-step designs that solve levels exactly (drm.m_steps; --m-step)
        for design in ("exact-top", "block"):
            trainers[f"DEM step, {design} M-step/{k}"] = discriminative_em(copy.deepcopy(m), design)
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
