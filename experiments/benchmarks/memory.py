"""Section 3 of experiments/bench_all.py: memory.

`memory(args, device)`: the analytic size per image of the input, of every level's output and of
the latents max_sum returns (checked against the tensors it returns), and the measured peak
increase of one call of each `--memory-kinds` kind, each in a fresh process running
`experiments._bench.memory_probe`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from typing import Any

import torch

import drm
from experiments._bench import ROOT, lenet


def run_probe(kind: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    code = (
        "import json, sys\nfrom experiments._bench import memory_probe\n"
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
        run_probe(kind, batch, args) for batch in args.memory_batches for kind in args.memory_kinds
    ]
    return {
        "method": probes[0]["method"] if probes else "",
        "per_image_bytes": per_image,
        "probes": probes,
    }
