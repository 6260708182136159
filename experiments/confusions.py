"""Which classes a trained run confuses: its test errors, counted by (true class, predicted class).

For each run directory (`python -m experiments.train --out DIR`), the final model classifies the
whole test set of the run's own data by its max-sum scores (the CNN's rule; `drm.max_sum`), and
the command prints the error count, the `--top` most frequent confusions and, with `--figure`,
the test images of each run's most frequent confusion beside its labelled training images of the
true class (the run's labelled subset, when it has one). A run whose data have
changed since it was trained (another SHA-256 or package version) is refused, as is a shallow
model.

Command:
    python -m experiments.confusions runs/ssl runs/stretch/nn0-mt --top 5 --figure confusions.png
    python -m experiments.confusions --smoke      # a throw-away digits run, seconds (tests)

Expected output (MNIST, 100 labels; docs/semisupervised.md, "What the remaining errors are"):
one row per run, e.g. `runs/stretch/nn0-mt  108 errors  9->3: 24, 4->9: 9, 5->3: 8, ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import drm
from drm.checkpoint import load_checkpoint
from drm.data import Dataset
from experiments import training
from experiments._cli import Parser, positive_int, run_command
from experiments.training.config import RunError
from experiments.training.data import data_source, load_data
from experiments.training.rundir import CHECKPOINT, FORMAT, write_json

FIGURE_IMAGES = 10  # misclassified test images drawn per run (and labelled images beside them)


class ConfusionError(Exception):
    """A run directory this command cannot report on (one line)."""


def confusion_matrix(model: drm.DeepRenderingModel, x: Tensor, y: Tensor,
                     batch: int = 1000) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(counts (K, K): row = true class, column = the max-sum prediction; predictions (N,))."""
    with torch.no_grad():
        predicted = torch.cat(
            [drm.max_sum(model, x[i : i + batch])[0].argmax(1) for i in range(0, len(x), batch)]
        )
    classes = model.num_classes
    counts = torch.zeros(classes * classes, dtype=torch.long)
    counts.index_add_(0, y * classes + predicted, torch.ones_like(y))
    return counts.view(classes, classes), predicted


def top_confusions(counts: Tensor, top: int) -> list[tuple[int, int, int]]:
    """The `top` largest off-diagonal entries as (true class, predicted class, count), count > 0,
    largest first (ties: by true then predicted class)."""
    classes = counts.shape[0]
    pairs = [(int(counts[t, p]), t, p) for t in range(classes) for p in range(classes)
             if t != p and counts[t, p] > 0]  # fmt: skip
    pairs.sort(key=lambda e: (-e[0], e[1], e[2]))
    return [(t, p, n) for n, t, p in pairs[:top]]


def run_model_and_data(directory: Path) -> tuple[drm.DeepRenderingModel, Dataset, list[int] | None]:
    """The run's final model, its data (checked against the record) and its labelled indices
    (None: every image labelled), all read from the checkpoint."""
    file = directory / CHECKPOINT
    if not file.is_file():
        raise ConfusionError(f"{directory}: no {CHECKPOINT} (not a training run's directory)")
    model, _, metadata = load_checkpoint(file)
    try:
        if metadata.get("run_format") != FORMAT:
            raise KeyError("run_format")
        config = json.loads(metadata["run_config"])
        name, recorded = config["args"]["data"], config.get("data", {})
        labelled = json.loads(metadata.get("labelled", "null"))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfusionError(f"{file} was not written by experiments.train ({err})") from err
    if not isinstance(model, drm.DeepRenderingModel):
        raise ConfusionError(f"{directory} holds a shallow model; this command reads deep ones")
    now = data_source(name)
    changed = [f"{key} {recorded[key]!r} then, {now.get(key)!r} now" for key in now
               if key in recorded and recorded[key] != now[key]]  # fmt: skip
    if changed:
        raise ConfusionError(f"{directory}: the data {name} have changed since the run was "
                             f"trained ({'; '.join(changed)})")  # fmt: skip
    data = load_data(name, None, None, config["args"].get("num_classes"))
    if data.image_shape != model.input_shape or data.num_classes != model.num_classes:
        raise ConfusionError(f"{directory}: the model does not fit its data {name}")
    return model.eval(), data, labelled


def labelled_examples(data: Dataset, labelled: list[int] | None, label: int) -> Tensor:
    """The run's labelled training images of class `label` (its --labels or --labelled-indices
    subset), or, with every image labelled, the first training images of that class."""
    indices = torch.arange(len(data.y_train)) if labelled is None else torch.tensor(labelled)
    chosen = indices[data.y_train[indices] == label][:FIGURE_IMAGES]
    return data.x_train[chosen]


def draw(figure: Path, rows: list[dict[str, Any]]) -> None:
    """Per run, two rows: its most frequent confusion's test images, then labelled images of
    the true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 * len(rows), FIGURE_IMAGES, squeeze=False,
                             figsize=(FIGURE_IMAGES * 0.9, 2 * len(rows) * 1.05))  # fmt: skip
    for axis in axes.flat:
        axis.axis("off")
    for r, row in enumerate(rows):
        for k, image in enumerate(row["confused_images"]):
            axes[2 * r, k].imshow(image[0].cpu().numpy(), cmap="gray")
        for k, image in enumerate(row["labelled_images"]):
            axes[2 * r + 1, k].imshow(image[0].cpu().numpy(), cmap="gray")
        axes[2 * r, 0].set_title(row["figure_title"], loc="left", fontsize=8)
        axes[2 * r + 1, 0].set_title(row["labelled_title"], loc="left", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.95, hspace=0.45, wspace=0.1)
    fig.savefig(figure, dpi=80)
    plt.close(fig)


def report(directory: Path, top: int) -> dict[str, Any]:
    model, data, labelled = run_model_and_data(directory)
    x_test = data.x_test.to(model.dtype)
    counts, predicted = confusion_matrix(model, x_test, data.y_test)
    confusions = top_confusions(counts, top)
    row: dict[str, Any] = {
        "run": str(directory),
        "test_images": len(data.y_test),
        "errors": int(counts.sum() - counts.trace()),
        "top_confusions": [{"true": t, "predicted": p, "count": n} for t, p, n in confusions],
        "confusion_matrix": counts.tolist(),
    }
    if confusions:
        t, p, n = confusions[0]
        wrong = ((data.y_test == t) & (predicted == p)).nonzero().flatten()[:FIGURE_IMAGES]
        row["confused_images"] = x_test[wrong]
        row["labelled_images"] = labelled_examples(data, labelled, t)
        row["figure_title"] = f"{directory}: test images of class {t} read as {p} ({n} in all)"
        row["labelled_title"] = f"its labelled training images of class {t}"
    return row


def main(args: argparse.Namespace) -> dict[str, Any]:
    """{"runs": one row per run: errors, top confusions, the confusion matrix}; --smoke first
    trains a throw-away smoke run (8x8 digits) and reports on it."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="drm-confusions-smoke-") as tmp:
            training.run(training.RunConfig(smoke=True, out=Path(tmp) / "run"))
            return main(argparse.Namespace(**{**vars(args), "smoke": False,
                                              "runs": [Path(tmp) / "run"]}))  # fmt: skip
    rows = [report(directory, args.top) for directory in args.runs]
    if args.figure is not None:
        drawable = [row for row in rows if "confused_images" in row]
        if drawable:
            draw(args.figure, drawable)
    figure_keys = ("confused_images", "labelled_images", "figure_title", "labelled_title")
    result = {"runs": [{k: v for k, v in row.items() if k not in figure_keys} for row in rows]}
    if args.json is not None:
        write_json(args.json, result)
    return result


def format_table(result: dict[str, Any]) -> str:
    """One line per run: its errors and its most frequent confusions (true->predicted: count)."""
    rows = result["runs"]
    width = max(len(row["run"]) for row in rows)
    lines = []
    for row in rows:
        pairs = ", ".join(f"{c['true']}->{c['predicted']}: {c['count']}"
                          for c in row["top_confusions"])  # fmt: skip
        lines.append(f"{row['run']:<{width}}  {row['errors']:>5} errors of "
                     f"{row['test_images']}  {pairs or '-'}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m experiments.confusions", description=__doc__.split("\n")[0])
    parser.add_argument(
        "runs", type=Path, nargs="*", metavar="DIR", help="training run directories"
    )
    parser.add_argument("--top", type=positive_int, default=5, help="confusions listed per run")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the top confusions")
    parser.add_argument("--json", type=Path, default=None, help="the counts, as JSON")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--smoke", action="store_true", help="a throw-away digits run (tests)")
    args = parser.parse_args(argv)
    if not args.runs and not args.smoke:
        parser.error("name at least one run directory DIR")
    if args.runs and args.smoke:
        parser.error("--smoke reports on its own throw-away run: name no DIR")
    return args


def cli(argv: list[str] | None = None) -> int:
    """The command: one row per run, or one line on stderr (exit status 1)."""
    return run_command(lambda: format_table(main(parse_args(argv))), ConfusionError, RunError)


if __name__ == "__main__":
    sys.exit(cli())
