"""Where a training step's time goes (issue 13): Adam against every discriminative-EM M-step.

Each design trains the default model of `experiments.train` on the same real minibatches (the
trainer `build_trainer` makes for `--algo sgd` or `--algo dem --m-step NAME`, default settings);
after `--warmup` untimed steps, `--steps` steps run under cProfile, and the table splits the
mean wall time per minibatch into the phases the step's code calls (cumulative times of the
functions named in PHASES, each counted once however deeply it nests):

    forward      the bottom-up pass the step takes itself: the CNN's forward (Adam), the E-step
                 walk_up and the frozen pass above the class level (DEM), large-batch's
                 loss pass over each stored minibatch
    newton       drm.level_objective.newton_cg: the exact M-steps' solves, all inside
      hvp        of which the Hessian-vector products (double backward)
      linearize  of which gradients with their graph, at the start and at every line-search trial
    backward     torch.Tensor.backward: the gradient of the loss (Adam, DEM's lower levels)
    optimizer    the optimizer's update (Adam)
    other        the rest (argument checks, the cache, profiler overhead)

cProfile adds a few microseconds per Python call, the same for every design; the total column is
the profiled time, `--steps` large-batch minibatches include `--steps` / 16 of its solves.

Command:
    python -m experiments.profile_m_steps --threads 2 --steps 64 --json runs/profile_m_steps.json
    python -m experiments.profile_m_steps --smoke               # digits, a few steps (tests)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path
from typing import Any, Literal, cast

import torch

from drm.checkpoint import atomic_write
from drm.m_steps import MStepName
from experiments._cli import Parser, positive_int, run_command
from experiments.training import RunConfig, RunError
from experiments.training.data import default_model, load_data
from experiments.training.trainers import build_model, build_trainer

DESIGNS = ("sgd", "gradient", "exact-top", "block", "large-batch")  # sgd: Adam on the CNN
# phase -> (file name ending, function name, caller names or None for any caller)
PHASES: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    "forward": ("", "", None),  # several functions: `forward_seconds`
    "newton": ("drm/level_objective.py", "newton_cg", None),
    "hvp": ("drm/level_objective.py", "hvp", None),
    "linearize": ("drm/level_objective.py", "linearize", None),
    "backward": ("torch/_tensor.py", "backward", None),
    "optimizer": ("torch/optim/adam.py", "step", None),
}
TOP_PHASES = ("forward", "newton", "backward", "optimizer")  # disjoint: "other" is the rest


def _cumulative(stats: pstats.Stats, ending: str, name: str, callers: tuple[str, ...] | None
                ) -> float:  # fmt: skip
    """Cumulative seconds of the function `name` in a file ending with `ending`, counting only
    the calls from functions named in `callers` (None: from anywhere)."""
    total = 0.0
    for (filename, _, function), entry in stats.stats.items():  # type: ignore[attr-defined]
        if function != name or not filename.replace("\\", "/").endswith(ending):
            continue
        if callers is None:
            total += entry[3]
        else:
            total += sum(c[3] for (_, _, caller), c in entry[4].items() if caller in callers)
    return total


def forward_seconds(stats: pstats.Stats) -> float:
    """The step's own bottom-up passes: walk_up called by a trainer's step, the CNN called by
    SGDTrainer.step (nn.Module's call wrapper)."""
    walk = _cumulative(stats, "drm/inference.py", "walk_up", ("step",))
    cnn = _cumulative(stats, "torch/nn/modules/module.py", "_wrapped_call_impl", ("step",))
    return walk + cnn


def profile_design(design: str, data_name: str, data: Any, steps: int, warmup: int, batch: int
                   ) -> dict[str, Any]:  # fmt: skip
    """One design's mean seconds per minibatch, in total and per phase."""
    algo: Literal["sgd", "dem"] = "sgd" if design == "sgd" else "dem"
    # the config only builds the model and the trainer: nothing is written to `out`
    config = RunConfig(algo=algo, data=data_name, out=Path("unused"),
                       m_step=None if design == "sgd" else cast(MStepName, design)
                       ).replace(model=default_model(data.image_shape))  # fmt: skip
    trainer = build_trainer(config, build_model(config, data))
    needed = (warmup + steps) * batch
    if data.x_train.shape[0] < needed:
        raise RunError(f"{needed} training images needed, the data has {data.x_train.shape[0]}")
    batches = [(data.x_train[i : i + batch], data.y_train[i : i + batch])
               for i in range(0, needed, batch)]  # fmt: skip
    for x, y in batches[:warmup]:
        trainer.step(x, y)
    profiler = cProfile.Profile()
    profiler.enable()
    for x, y in batches[warmup:]:
        trainer.step(x, y)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = float(stats.total_tt)  # type: ignore[attr-defined]
    seconds = {phase: _cumulative(stats, *PHASES[phase]) for phase in PHASES if phase != "forward"}
    seconds["forward"] = forward_seconds(stats)
    seconds["other"] = total - sum(seconds[p] for p in TOP_PHASES)
    return {"design": design, "steps": steps, "batch_size": batch,
            "ms_per_step": 1e3 * total / steps,
            "phases_ms": {p: 1e3 * s / steps for p, s in seconds.items()}}  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    adam = next((r for r in rows if r["design"] == "sgd"), None)
    phases = (*TOP_PHASES[:2], "hvp", "linearize", *TOP_PHASES[2:], "other")
    lines = [
        f"{result['data']}, batch {result['batch_size']}, {result['steps']} profiled steps after "
        f"{result['warmup']}, {result['threads']} threads; ms per minibatch (share of the step)",
        "| design | ms/step | x Adam | " + " | ".join(phases) + " |",
        "|---|---:|---:|" + "---:|" * len(phases),
    ]
    for r in rows:
        ratio = f"{r['ms_per_step'] / adam['ms_per_step']:.1f}" if adam else "n/a"
        cells = [f"{r['phases_ms'][p]:.1f} ({r['phases_ms'][p] / r['ms_per_step']:.0%})"
                 for p in phases]  # fmt: skip
        name = "Adam (sgd)" if r["design"] == "sgd" else r["design"]
        lines.append(f"| {name} | {r['ms_per_step']:.1f} | {ratio} | " + " | ".join(cells) + " |")
    lines.append("hvp and linearize are parts of newton; forward, newton, backward, optimizer and "
                 "other add up to the step")  # fmt: skip
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.json is not None and args.json.is_dir():  # before minutes of profiling
        raise ValueError(f"--json {args.json} is a directory")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(args.data, None, 1)
    rows = [profile_design(d, args.data, data, args.steps, args.warmup, args.batch_size)
            for d in args.designs]  # fmt: skip
    result = {"data": args.data, "batch_size": args.batch_size, "steps": args.steps,
              "warmup": args.warmup, "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
    if args.json is not None:
        text = json.dumps(result, indent=1) + "\n"
        atomic_write(args.json, lambda tmp: tmp.write_text(text))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m experiments.profile_m_steps",
                    description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    parser.add_argument("--steps", type=positive_int, default=64, help="profiled minibatches")
    parser.add_argument("--warmup", type=int, default=8, help="untimed minibatches first")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the result dict here")
    parser.add_argument("--smoke", action="store_true", help="digits, 16 steps of 8 (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.steps, args.warmup, args.batch_size = "digits", 16, 2, 8
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def cli(argv: list[str] | None = None) -> int:
    """The command: the table, or one line on stderr (exit status 1)."""
    return run_command(lambda: format_table(main(parse_args(argv))), RunError)


if __name__ == "__main__":
    sys.exit(cli())
