"""Train a rendering model with SGD, discriminative EM or generative EM, resumably.

The command line of `experiments.training`: the options are the fields of its `RunConfig`, and
`main(args)` is `run(args)`, the one loop for every algorithm (`experiments.training.loop`):
per epoch, `trainer.step(x, y)` over the minibatches (a tqdm bar on stderr), `end_epoch()`, the
test metrics, then the run directory DIR (--out) is rewritten, each file atomically:
model.safetensors (the truth: model, trainer state, metrics, configuration, under a SHA-256),
metrics.json, config.json, labelled.json (with --labels), curves.png, and a .lock held while a
process trains (`experiments.training.rundir` lists them and the write order that makes a
SIGKILL at any moment safe). `--resume` continues the run in DIR, refusing other essential
settings or changed data, and gives the same tensors and metrics, timings aside, as an
uninterrupted run.

Algorithms: `sgd` (cnn_equiv.SGDTrainer: cross-entropy on the equivalent CNN), `dem`
(drm.em.DiscriminativeEM: max-sum E-step, --m-steps gradient steps with latents frozen; --m-step
exact-top, block or large-batch: the exact M-steps of drm.m_steps), `em`
(drm.em.GenerativeEM on a deep model; drm.shallow_em.ShallowEM, supervised, on --model shallow),
`ssl` (drm.semisupervised.SemiSupervisedEM: max-sum E-step, one Adam step on cross-entropy +
reconstruction + entropy + non-negativity, ...; docs/semisupervised.md). `--labels N` labels only
N training images (balanced, drawn from --seed, saved in DIR/labelled.json): the supervised
algorithms train on those alone, ssl on every image with those labelled. `--amp bf16` (sgd
only) runs the CNN's forward pass under bfloat16 autocast. `--channels-last` stores a deep
model's conv templates in NHWC strides (same values, same results up to float rounding; 1.2-1.4x
faster training steps on CPU, as `experiments/bench_all.py` measures; on by default for ssl
on 28x28 or larger images).

Data-parallel training: `torchrun --nproc_per_node N -m experiments.train ...` starts N ranks
that each train on their shard of every minibatch and make the update of the whole minibatch
(`experiments.training.launch`, `drm.distributed`). Only rank 0 writes DIR; a failure that one
rank sees stops every rank with one line each; under torchrun a SIGTERM (torchrun stops the
others when one rank dies) is one line too, and DIR keeps its last complete epoch.

Command:
    python -m experiments.train --algo sgd --data mnist --epochs 2 --out runs/sgd
    python -m experiments.train --algo sgd --data mnist --epochs 4 --out runs/sgd --resume
    python -m experiments.train --algo dem --m-steps 3 --data mnist --epochs 2 --out runs/dem
    python -m experiments.train --algo dem --m-step exact-top --data digits --out runs/exact
    python -m experiments.train --algo em --model shallow --data digits --epochs 10 --out runs/em
    python -m experiments.train --algo ssl --labels 100 --data mnist --out runs/ssl
    python -m experiments.train --smoke       # digits, 256 images, 1 epoch; used by the tests
    torchrun --nproc_per_node 2 -m experiments.train --algo sgd --data mnist --threads 1 \
        --epochs 2 --out runs/sgd2            # two processes, same result as one (to rounding)

Expected output: one row per epoch (train loss, test accuracy, seconds). LeNet with the defaults
(Adam, lr 2e-3 decayed by 0.7 per epoch, batch 64) on MNIST: test accuracy 0.982 then 0.988
after 2 epochs (seeds 0-1: 0.988-0.990), 15-25 s per epoch on 2 CPU cores; DEM with --m-steps 1
is the same cost and close to SGD (E9), --m-steps 3 about three times the cost. The small model
on the 8x8 digits (batch 16): about 0.94 after 5 epochs, well under a second per epoch.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from drm import distributed
from drm.m_steps import DEFAULT_ETA, M_STEPS
from drm.semisupervised import BALANCE_TARGETS, CLASS_GUESSES, CONSISTENCY_TARGETS
from drm.semisupervised_terms import DEFORMATION_SCALES
from experiments._cli import EXPECTED_ERRORS, Parser, one_line, positive_float, positive_int
from experiments.training.config import (
    DEFAULTS,
    DIST_TIMEOUT,
    ESSENTIAL,
    SSL_WEIGHTS,
    TIMING_KEYS,
    RunConfig,
    RunError,
)
from experiments.training.launch import (
    Terminated,
    deaf_to_sigterm_once_failing,
    looks_like_communication,
    on_sigterm,
    say,
)
from experiments.training.loop import format_table, run

# what the command reports in one line (anything else is a bug and keeps its traceback)
EXPECTED: tuple[type[BaseException], ...] = (RunError, *EXPECTED_ERRORS)


def main(args: RunConfig) -> dict[str, Any]:
    """Train (or resume) the run of `args` (`experiments.training.loop.run`)."""
    return run(args)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _decay(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """The command line as a RunConfig (the defaults of --algo filled in); usage errors exit 2."""
    parser = Parser(prog="python -m experiments.train", description=__doc__.split("\n")[0])
    parser.add_argument("--algo", choices=("sgd", "dem", "em", "ssl"), default="sgd")
    parser.add_argument(
        "--data", default=None, help="mnist, digits, or PATH.npz (default mnist; digits w/ smoke)"
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"default 2 (ssl: {DEFAULTS['ssl']['epochs']})",
    )
    parser.add_argument("--out", type=Path, default=None, help="the run directory")
    parser.add_argument("--seed", type=int, default=0, help="model init and minibatch order")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--overwrite", action="store_true", help="start again even if --out holds a run"
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="{lenet,small,shallow,PATH.json}",
        help="the architecture: a preset, or a JSON file holding a deep model's "
        "drm.ModelConfig.to_dict() (docs/training.md); default: lenet for 28x28 or larger "
        "images, small otherwise",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="default 64 (16 below 10k images)"
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"the first epoch's; default 2e-3 (ssl: {DEFAULTS['ssl']['lr']:g})",
    )
    parser.add_argument(
        "--lr-decay",
        type=positive_float,
        default=None,
        help=f"lr factor per epoch (sgd, dem, ssl); default 0.7 (ssl: "
        f"{DEFAULTS['ssl']['lr_decay']:g})",
    )
    parser.add_argument(
        "--average-decay",
        type=_decay,
        default=None,
        help="dem, ssl: evaluate and save the moving average of the parameters, "
        "theta_avg <- d theta_avg + (1 - d) theta after every step (drm.averaging); "
        f"default {DEFAULTS['ssl']['average_decay']:g} for ssl, 0 (off) otherwise",
    )
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--m-steps", type=positive_int, default=1, help="DEM gradient steps")
    parser.add_argument(
        "--m-step",
        choices=tuple(M_STEPS),
        default=None,
        help="dem: the M-step design (drm.m_steps); "
        + "; ".join(f"{name}: {line}" for name, line in M_STEPS.items()),
    )
    parser.add_argument(
        "--m-step-eta",
        type=positive_float,
        default=None,
        help=f"dem, exact M-steps: the proximal step length eta of each level's solve "
        f"(default {DEFAULT_ETA:g})",
    )
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        default=None,
        help="the class count K (labels in [0, K)); default: max label + 1, refusing a class "
        "with no or a stray few training images or one seen only in the test set",
    )
    parser.add_argument(
        "--labels",
        type=positive_int,
        default=None,
        help="label only N training images (balanced: N / classes each, drawn from --seed; "
        "indices saved in DIR/labelled.json); sgd, dem, em then train on those alone, ssl on "
        "all the images with these labelled; default: every image labelled",
    )
    parser.add_argument(
        "--labelled-indices",
        default=None,
        metavar="PATH.json",
        help="label only these training images: a JSON list of their indices, or a run's "
        "DIR/labelled.json (instead of --labels)",
    )
    parser.add_argument(
        "--labelled-batch-size",
        type=positive_int,
        default=None,
        help=f"ssl: labelled images added to each batch of --batch-size unlabelled ones "
        f"(default {DEFAULTS['ssl']['labelled_batch_size']})",
    )
    parser.add_argument(
        "--consistency-shift",
        type=positive_int,
        default=None,
        help=f"ssl: the consistency term's largest translation in pixels (default "
        f"{DEFAULTS['ssl']['consistency_shift']})",
    )
    parser.add_argument(
        "--consistency-deformation",
        type=_non_negative_float,
        default=None,
        metavar="STRENGTH",
        help="ssl: also rotate, scale, shear and elastically displace the consistency term's "
        "images with this strength (1: up to {rotation_degrees:g} degrees, {percent:g}%%, "
        "{shear:g} shear, a {elastic_pixels:g}-pixel elastic field; default {default:g}: "
        "translations only)".format(
            **DEFORMATION_SCALES,
            percent=100 * DEFORMATION_SCALES["scale"],
            default=DEFAULTS["ssl"]["consistency_deformation"],
        ),
    )
    parser.add_argument(
        "--class-balance-target",
        choices=BALANCE_TARGETS,
        default=None,
        help="ssl: what the class_balance term pulls the batch's mean posterior toward: the "
        "model's learned class prior or the uniform distribution (default: uniform; "
        "docs/semisupervised.md)",
    )
    parser.add_argument(
        "--class-guess",
        choices=CLASS_GUESSES,
        default=None,
        help="ssl: an unlabelled image's class in the E-step: the arg max of the CNN's (max-sum) "
        "scores or of the generative scores log p(x, c, z*) (default: cnn)",
    )
    parser.add_argument(
        "--consistency-target",
        choices=CONSISTENCY_TARGETS,
        default=None,
        help="ssl: the posterior the consistency term asks a translated image's to match: the "
        "image's own under the trained model, or under the moving average of the iterates "
        "(mean teacher; needs --average-decay > 0) (default: self)",
    )
    for term, weight in SSL_WEIGHTS.items():
        parser.add_argument(
            f"--{term.replace('_', '-')}-weight",
            type=_non_negative_float,
            default=None,
            help=f"ssl: weight of the {term.replace('_', ' ')} term (default {weight:g})",
        )
    parser.add_argument(
        "--translation",
        choices=("none", "circular", "interior"),
        default="none",
        help="shallow model: the translation nuisance",
    )
    parser.add_argument(
        "--template-size", type=positive_int, default=None, help="shallow, interior: template side"
    )
    parser.add_argument(
        "--init", choices=("kmeans", "class-means"), default="kmeans", help="shallow model start"
    )
    parser.add_argument("--hard", action="store_true", help="shallow EM: hard (MAP) E-step")
    parser.add_argument(
        "--unsupervised",
        action="store_true",
        help="shallow EM: ignore the labels (accuracy: each cluster's majority label)",
    )
    parser.add_argument(
        "--cg-iterations",
        type=positive_int,
        default=3,
        help="deep EM: CG steps per level and batch",
    )
    parser.add_argument(
        "--em-step-size",
        type=positive_float,
        default=0.5,
        help="deep EM: step towards the CG solution",
    )
    parser.add_argument(
        "--refine-sweeps",
        type=positive_int,
        default=None,
        help="deep EM: top-down refinement sweeps after the bottom-up E-step; default none",
    )
    parser.add_argument(
        "--amp",
        choices=("bf16",),
        default=None,
        help="sgd: bfloat16 autocast of the forward pass (CPU or CUDA); default off",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="deep model: store conv templates channels_last (1.2-1.4x faster training on CPU, "
        "docs/performance.md); default on for ssl on 28x28 or larger images, off otherwise",
    )
    parser.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=DIST_TIMEOUT,
        help=f"torchrun: seconds before a collective that a rank never joins fails "
        f"(default {DIST_TIMEOUT:g})",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--limit-train", type=positive_int, default=None, help="first N train")
    parser.add_argument("--limit-test", type=positive_int, default=None, help="first N test")
    parser.add_argument("--eval-batch-size", type=positive_int, default=1000)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--smoke", action="store_true", help="digits, 256 images, 1 epoch (for the tests)"
    )
    namespace = parser.parse_args(argv)
    try:
        return RunConfig(**vars(namespace))
    except ValueError as err:  # a combination of options that makes no sense
        parser.error(str(err))


def cli(argv: list[str] | None = None) -> int:
    """The command: every expected failure is one line on stderr and exit status 1.

    Under torchrun each failing rank prints its own line, prefixed with "rank R/N"; a
    communication failure (a rank died or hung past --dist-timeout) is one line too, and so is
    the SIGTERM with which torchrun stops the other ranks (exit status 143).
    """
    args = parse_args(argv)
    launched = distributed.launched_by_torchrun()
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    rank = int(os.environ.get("RANK", "0")) if launched else 0
    who = f"rank {rank}/{world}: " if world > 1 else ""
    previous = signal.signal(signal.SIGTERM, on_sigterm) if launched else None
    try:
        with deaf_to_sigterm_once_failing(launched):
            result = main(args)
    except EXPECTED as err:
        say(f"error: {who}{one_line(err)}")
        return 1
    except RuntimeError as err:
        if not launched:
            raise
        message = one_line(err)
        if looks_like_communication(err):
            message = message.split(". ")[0].rstrip(".")  # gloo appends advice, then "GLHF!"
            message = (
                "lost contact with the other ranks (one died, or hung past --dist-timeout "
                f"{args.dist_timeout:g} s): {message}; {args.out} holds the last completed "
                "epoch; continue with --resume"
            )
        else:
            message = f"{type(err).__name__}: {message}"
        say(f"error: {who}{message}")
        return 1
    except Terminated:
        say(
            f"error: {who}stopped by SIGTERM (torchrun stops every rank when one fails); "
            f"{args.out} holds the last completed epoch; continue with --resume"
        )
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        say(f"interrupted: {who}{args.out} holds the last completed epoch; continue with --resume")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if rank == 0:
        print(format_table(result))
    return 0


__all__ = [
    "ESSENTIAL",
    "TIMING_KEYS",
    "RunConfig",
    "cli",
    "format_table",
    "main",
    "parse_args",
    "run",
]

if __name__ == "__main__":
    code = cli()
    if distributed.launched_by_torchrun():
        # Skip the interpreter's finalisation: gloo's worker threads can abort it (SIGABRT,
        # "terminate called without an active exception"), which would turn a clean exit, or
        # a one-line error, into a crash report.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
