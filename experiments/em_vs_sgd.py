"""Benchmark: the same LeNet trained by SGD, discriminative EM and generative EM, side by side.

Each algorithm is one training run (`experiments.training.run`, so every run is also a
resumable run directory with metrics.json and curves.png under --out): SGD (Adam) on the
equivalent CNN; batch discriminative EM with one M-step per E-step (E9: the same algorithm as SGD)
and with three; generative hard EM (per-level least squares). The table gives, per algorithm,
the epochs and wall seconds to first reach 98% and 99% test accuracy, the final accuracy, and the
training images per second.

Command:
    python -m experiments.em_vs_sgd --out runs/em_vs_sgd      # full MNIST, about 25 min on 2 cores
    python -m experiments.em_vs_sgd --out runs/em_vs_sgd --only gem gem_ce   # two rows
    python -m experiments.em_vs_sgd --smoke                    # digits subset, seconds (tests)

Expected output: SGD and DEM(1) reach 99% within a few epochs at the same cost per epoch; DEM(3)
spends three gradient steps per E-step (about 3x the time per epoch); generative EM lowers the
reconstruction error but does not learn a CNN classifier (max-sum test accuracy near chance), and
its own generative classifier (arg max_c log p(x, c, z*), factorized prior; on the first 500 test
images) stays far below the CNN's; the same reconstruction objective with the cross-entropy added
(`--algo ssl`, every image labelled, for --gem-epochs) learns both.
The NIPS 2016 abstract claims EM trains 2-3x faster than back-propagation: docs/results.md
reports what this script measures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from experiments._cli import Parser, positive_int, run_command
from experiments.training import RunConfig, RunError, run
from experiments.training.rundir import CHECKPOINT

# (table name, run directory, settings of its RunConfig)
ALGORITHMS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("SGD (Adam)", "sgd", {"algo": "sgd"}),
    ("DEM, 1 M-step", "dem1", {"algo": "dem", "m_steps": 1}),
    ("DEM, 3 M-steps", "dem3", {"algo": "dem", "m_steps": 3, "lr": 1e-3}),
    ("generative EM", "gem", {"algo": "em"}),
    # generative EM's reconstruction objective with the cross-entropy it lacks: the
    # semi-supervised trainer with every image labelled and no unlabelled-only terms
    (
        "reconstruction + cross-entropy",
        "gem_ce",
        {"algo": "ssl", "entropy_weight": 0.0, "class_balance_weight": 0.0},
    ),
)
TARGETS = (0.98, 0.99)


def first_reaching(metrics: list[dict[str, Any]], target: float) -> tuple[int, float] | None:
    """(epoch, elapsed seconds) of the first epoch whose test accuracy reaches `target`."""
    for m in metrics:
        if m["test_accuracy"] >= target:
            return int(m["epoch"]), float(m["elapsed"])
    return None


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="em_vs_sgd_") as tmp:
            return {**run_all(args, Path(tmp)), "out": "a temporary folder, removed"}
    return run_all(args, args.out)


def run_all(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train every algorithm into out/<name> and summarise the metrics."""
    rows = []
    for name, directory, extra in ALGORITHMS:
        if args.only and directory not in args.only:
            continue
        epochs = args.gem_epochs if directory.startswith("gem") else args.epochs
        config = RunConfig(
            data=args.data,
            epochs=epochs,
            seed=args.seed,
            out=out / directory,
            progress=False,
            threads=args.threads or None,
            limit_train=args.limit_train or None,
            # a rerun continues where an interrupted one stopped
            resume=(out / directory / CHECKPOINT).is_file(),
            **extra,
        )
        result = run(config)
        metrics = result["metrics"]
        rows.append(
            {
                "algorithm": name,
                "epochs": len(metrics),
                **{f"reach_{t}": first_reaching(metrics, t) for t in TARGETS},
                "final_accuracy": metrics[-1]["test_accuracy"],
                "generative_accuracy": metrics[-1]["test_generative_accuracy"],
                "images_per_second": sum(m["images_per_second"] for m in metrics) / len(metrics),
                "seconds_per_epoch": sum(m["train_seconds"] for m in metrics) / len(metrics),
                "accuracy_by_epoch": [m["test_accuracy"] for m in metrics],
            }
        )
    return {"data": args.data, "out": str(out), "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    def reach(value: tuple[int, float] | None) -> str:
        return "not reached" if value is None else f"epoch {value[0]}, {value[1]:.0f} s"

    lines = [
        f"{result['data']}, the default model of experiments.train (runs in {result['out']})",
        "| algorithm | epochs | to 98% | to 99% | final accuracy | generative classifier "
        "| train images/s | s/epoch | accuracy by epoch |",
        "|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['algorithm']} | {r['epochs']} | {reach(r['reach_0.98'])} "
            f"| {reach(r['reach_0.99'])} | {r['final_accuracy']:.4f} "
            f"| {r['generative_accuracy']:.3f} "
            f"| {r['images_per_second']:,.0f} | {r['seconds_per_epoch']:.1f} "
            f"| {', '.join(f'{a:.4f}' for a in r['accuracy_by_epoch'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m experiments.em_vs_sgd", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--epochs", type=int, default=6, help="for SGD and DEM")
    parser.add_argument("--gem-epochs", type=int, default=2, help="for generative EM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--limit-train", type=positive_int, default=None)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[directory for _, directory, _ in ALGORITHMS],
        default=None,
        help="run only these rows (by run directory name)",
    )
    parser.add_argument("--out", type=Path, default=None, help="run directories go here")
    parser.add_argument("--smoke", action="store_true", help="digits subset, 1 epoch (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.epochs, args.gem_epochs, args.limit_train = "digits", 1, 1, 256
    if args.epochs < 1 or args.gem_epochs < 1:
        parser.error("--epochs and --gem-epochs must be >= 1")
    return args


def cli(argv: list[str] | None = None) -> int:
    """The command: the table, or one line on stderr (exit status 1)."""
    return run_command(lambda: format_table(main(parse_args(argv))), RunError)


if __name__ == "__main__":
    sys.exit(cli())
