"""Compare the two views of a trained CNN: visualise it and break it, the neural-net way and the
DRM way side by side, in one HTML report with PNG figures and the numbers.

Sections (the second half of the lecture):
  1. top-down projections of a class and of a unit: the DRM rendering, the input gradient
     (saliency), Zeiler's deconvnet and guided backpropagation;
  2. images that maximise a class score (gradient ascent with an L2 penalty) next to the DRM's
     most probable rendering of the class (coordinate ascent over the latents);
  3. individual units: the dataset patches that activate them most, and their rendered templates;
  4. feature inversion, layer by layer: by optimisation (Mahendran and Vedaldi) and by the DRM's
     top-down rendering with the inferred latents, with their reconstruction errors;
  5. breaking the CNN: FGSM, an iterative attack, adding another class's rendered template, and
     fooling images from noise; how the DRM sees each, and how well its statistics detect them
     (ROC AUC);
  6. inference beyond the CNN: the coordinate-ascent refinement of the latents (a top-down E-step):
     how much of the exact inference gap it closes on a tiny model, and how often it changes the
     prediction of the trained model;
  7. renderings: what the model draws, mu(c, z*) of its predicted class at the max-sum latents,
     every class rendered through one image's latents, and draws from the factorized prior; with
     --compare-model DIR (e.g. a semi-supervised run, `--algo ssl`) the second model's beside the
     first's on the same images, with their reconstruction errors, generative classifiers and
     inference gaps.

The model is a training run directory or checkpoint (`experiments.train`) or a torch LeNet
state_dict file (`--torch-cnn FILE`, loaded with `torch.load(weights_only=True)`: no unpickling of
code); without either, a LeNet is trained first (`experiments.train`, 2 epochs, about 40 s).
The sections are the functions of experiments/_views_report.py; this script loads the model and
the data, runs them in order and writes the page.

Command:
    python -m experiments.compare_views --model runs/sgd_2epochs --out runs/views
    python -m experiments.compare_views --model runs/sgd --compare-model runs/ssl --out runs/views
    python -m experiments.compare_views --smoke       # digits, small sizes, seconds (tests)

Expected output: runs/views/index.html with 9 figures and the tables; the line printed last gives
its path and the headline numbers (docs/views.md shows a full report). One progress line per
section goes to stderr. Time: about 2 minutes on 2 CPU cores (measured: 124 s for the second
command with --threads 1, on 2026-12-02, while two training runs shared the machine).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import drm
from cnn_equiv import to_cnn, to_drm
from drm.checkpoint import read_metadata
from drm.data import Dataset
from experiments import training
from experiments._cli import Parser, Progress, one_line, positive_int, run_command
from experiments._html import Report
from experiments._views_report import (
    first_images_per_class,
    section_attacks,
    section_class_models,
    section_inversion,
    section_projections,
    section_refinement,
    section_renderings,
    section_units,
)
from experiments.training.data import data_name as resolve_data
from experiments.training.data import data_source, load_data
from experiments.training.rundir import CHECKPOINT


class ReportError(Exception):
    """A problem with the command line's inputs, reported in one line."""


# --- the model --------------------------------------------------------------------------------


def load_any(path: Path | None, torch_cnn: Path | None, data: Dataset, out: Path, smoke: bool,
             data_name: str = "mnist") -> tuple[drm.DeepRenderingModel, str]:  # fmt: skip
    """The model to report on, and a sentence saying where it came from."""
    if path is not None:
        file = path / CHECKPOINT if path.is_dir() else path
        try:
            model = drm.load_model(file)
        except (FileNotFoundError, ValueError) as err:
            raise ReportError(f"--model {path}: {err}") from err
        if not isinstance(model, drm.DeepRenderingModel):
            raise ReportError(f"--model {path} holds a shallow model; the report needs a deep one")
        return model, f"checkpoint {file}"
    if torch_cnn is not None:
        shape, classes = data.image_shape, data.num_classes
        cnn = to_cnn(drm.DeepRenderingModel.from_config(drm.lenet_config(shape, classes)))
        try:
            state = torch.load(torch_cnn, map_location="cpu", weights_only=True)
            cnn.load_state_dict(state)
        except (OSError, RuntimeError, KeyError, ValueError, EOFError,
                pickle.UnpicklingError) as err:  # fmt: skip
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ReportError(
                f"--torch-cnn {torch_cnn}: not a LeNet state_dict: {first_line}"
            ) from err
        return to_drm(cnn.eval()), f"torch LeNet state_dict {torch_cnn}"
    directory = out / "model"
    settings: dict[str, Any] = (
        {"smoke": True} if smoke else {"algo": "sgd", "data": data_name, "epochs": 2}
    )
    training.run(training.RunConfig(out=directory, progress=False, overwrite=True, **settings))
    argv = ["--out", str(directory), "--no-progress", "--overwrite"]
    argv += ["--smoke"] if smoke else ["--algo", "sgd", "--data", data_name, "--epochs", "2"]
    return drm.load_model(directory / CHECKPOINT), f"trained here: {' '.join(argv)}"  # type: ignore[return-value]


# --- main -------------------------------------------------------------------------------------


SIZES = {
    "full": {"projection_images": 6, "ascent_steps": 200, "map_steps": 30, "unit_images": 2000,
             "units_per_level": 4, "top_k": 8, "inversion_images": 8, "inversion_steps": 200,
             "attack_images": 500, "fooling_steps": 100, "refine_images": 200,
             "rendering_images": 8, "rendering_pool": 1000},
    "smoke": {"projection_images": 3, "ascent_steps": 5, "map_steps": 2, "unit_images": 50,
              "units_per_level": 1, "top_k": 3, "inversion_images": 2, "inversion_steps": 5,
              "attack_images": 20, "fooling_steps": 3, "refine_images": 10,
              "rendering_images": 3, "rendering_pool": 30},
}  # fmt: skip


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="views_") as tmp:
            return {**build(args, Path(tmp)), "out": "a temporary folder, removed"}
    return build(args, args.out)


def run_data(path: Path | None) -> tuple[str | None, dict[str, Any]]:
    """(the --data of the run that wrote `path`, its recorded data description), or (None, {})."""
    if path is None:
        return None, {}
    file = path / CHECKPOINT if path.is_dir() else path
    try:
        config = json.loads(read_metadata(file).get("run_config", "{}"))
        return config["args"]["data"], config.get("data", {})
    except (OSError, ValueError, KeyError, TypeError):  # not a training run's checkpoint
        return None, {}


def load_report_data(args: argparse.Namespace) -> tuple[Dataset, str]:
    """The data of the report: --data, else the run's own data, else MNIST (digits: --smoke)."""
    recorded, description = run_data(args.model)
    if args.data is not None:
        name = resolve_data(args.data)
    else:
        name = recorded or ("digits" if args.smoke else "mnist")
    try:
        data = load_data(name, None, None)
    except (OSError, ValueError, TypeError) as err:
        where = "--data" if args.data is not None else f"the data of --model {args.model}"
        raise ReportError(f"{where}: {one_line(err)}") from err
    if name == recorded and "sha256" in description:
        now = data_source(name)["sha256"]
        if now != description["sha256"]:
            raise ReportError(
                f"{name} has changed since the run was trained (sha256 {description['sha256']}"
                f" then, {now} now): pass --data to report on other data"
            )
    return data, name


def build(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)
    data, data_label = load_report_data(args)
    model, origin = load_any(args.model, args.torch_cnn, data, out, args.smoke, data_label)
    model.eval()
    data = data.to(model.dtype)
    if model.input_shape != data.image_shape or model.num_classes != data.num_classes:
        raise ReportError(
            f"the model takes {model.input_shape} images and has {model.num_classes} classes, "
            f"the data {data_label} are {data.image_shape} images of {data.num_classes} classes: "
            "pass --data with the model's data"
        )
    cnn = to_cnn(model).eval()
    models = {"--model": model}
    if args.compare_model is not None:
        other, other_origin = load_any(args.compare_model, None, data, out, args.smoke)
        if other.input_shape != model.input_shape or other.num_classes != model.num_classes:
            raise ReportError(
                f"--compare-model {args.compare_model} takes {other.input_shape} images and "
                f"{other.num_classes} classes, --model {model.input_shape} and "
                f"{model.num_classes}: compare models of the same data"
            )
        models["--compare-model"] = other.eval().to(model.dtype)
        origin += f"; compared with {other_origin}"
    sizes = SIZES["smoke" if args.smoke else "full"]
    report = Report(out, "The two views of a CNN: visualising and breaking it")
    report.paragraph(f"Model: {origin}. Data: {data_label} test images.")
    report.code(" ".join(["python -m experiments.compare_views", *sys.argv[1:]]))
    x, _ = first_images_per_class(data, 1)
    numbers: dict[str, float] = {}
    timings: dict[str, float] = {}
    sections = [
        ("projections", lambda: section_projections(report, model, cnn,
                                                     x[: sizes["projection_images"]])),
        ("class models", lambda: section_class_models(report, model, cnn, data, sizes)),
        ("units", lambda: section_units(report, model, data, sizes)),
        ("inversion", lambda: section_inversion(report, model, x[: sizes["inversion_images"]],
                                                sizes)),
        ("attacks", lambda: section_attacks(report, model, data, sizes)),
        ("refinement", lambda: section_refinement(report, model, data, sizes)),
        ("renderings", lambda: section_renderings(report, models, data, sizes)),
    ]  # fmt: skip
    progress = Progress("compare_views", len(sections), args.progress)
    for name, run in sections:
        progress.stage(name)
        start = time.perf_counter()
        numbers.update(run())
        timings[name] = time.perf_counter() - start
    report.table(["section", "seconds"], [[k, v] for k, v in timings.items()])
    page = report.write()
    return {"page": str(page), "figures": report.figures, "numbers": numbers,
            "seconds": timings, "out": str(out)}  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    lines = [f"report: {result['page']} ({len(result['figures'])} figures, out: {result['out']})"]
    lines += [f"  {k}: {v:.4g}" for k, v in result["numbers"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m experiments.compare_views", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="a run directory or a .safetensors checkpoint")
    source.add_argument("--torch-cnn", type=Path, help="a LeNet state_dict saved by torch.save")
    parser.add_argument(
        "--compare-model",
        type=Path,
        default=None,
        help="a second run directory or checkpoint whose renderings stand beside --model's "
        "(section 7), e.g. a semi-supervised run",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="mnist, digits or PATH.npz (default: the data the --model run was trained on; "
        "MNIST for --torch-cnn)",
    )
    parser.add_argument("--out", type=Path, default=None, help="the report folder")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--smoke", action="store_true", help="digits, small sizes (tests)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.out is None and not args.smoke:
        parser.error("--out DIR is required (except with --smoke)")
    return args


def cli(argv: list[str] | None = None) -> int:
    """The command: the report's path and numbers, or one line on stderr (exit status 1)."""
    return run_command(lambda: format_table(main(parse_args(argv))), ReportError, training.RunError)


if __name__ == "__main__":
    sys.exit(cli())
