"""The comparison report: every figure is written, valid, and loads in a real (headless) browser."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import compare_views
from experiments.training.rundir import CHECKPOINT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed CI machine with no network (see the env notes of this workplace).
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    out = tmp_path_factory.mktemp("views")
    result = compare_views.main(compare_views.parse_args(["--smoke", "--out", str(out)]))
    return out, result


@pytest.mark.slow  # a whole script or report at smoke size
def test_every_figure_is_a_png_referenced_by_the_page(
    report: tuple[Path, dict[str, object]],
) -> None:
    out, result = report
    page = (out / "index.html").read_text()
    figures = result["figures"]
    assert isinstance(figures, list) and len(figures) >= 5
    for name in figures:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f'src="{name}"' in page
    headings = ("Top-down projections", "Class models", "Individual units", "Feature inversion",
                "Breaking the CNN", "Inference beyond the CNN", "Renderings")  # fmt: skip
    for heading in headings:
        assert heading in page
    numbers = result["numbers"]
    assert isinstance(numbers, dict) and numbers["projection_max_difference"] < 1e-5  # E6
    # a statistic over an empty set is nan in the numbers and said in words on the page
    assert "<td>nan</td>" not in page
    if any(isinstance(v, float) and math.isnan(v) for v in numbers.values()):
        assert "n/a (no images)" in page


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_the_page_renders_in_headless_chromium(
    report: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    out, result = report
    url = (out / "index.html").resolve().as_uri()
    assert CHROMIUM is not None
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded is not None, "the page's load check did not run"
    good, total = int(loaded.group(1)), int(loaded.group(2))
    assert total == len(result["figures"]) and good == total  # type: ignore[arg-type]
    assert 'data-images-overflowing="0"' in dom
    shot = out / "screenshot.png"
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
         "--window-size=1200,4000", f"--screenshot={shot}", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_a_figure_wider_than_the_page_is_scaled_to_fit(tmp_path: Path) -> None:
    """A 16-column grid is ~2,200 px at its resolution: the page scales it to the column."""
    from experiments._html import Report

    report = Report(tmp_path, "wide")
    report.grid("wide", [[torch.rand(8, 8) for _ in range(16)]], ["row"], [], "16 columns")
    url = report.write().resolve().as_uri()
    assert CHROMIUM is not None
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,800", "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert 'data-images-loaded="1/1"' in dom and 'data-images-overflowing="0"' in dom


def test_a_torch_state_dict_is_loaded_safely(tmp_path: Path) -> None:
    import drm
    from cnn_equiv import to_cnn
    from drm.data import Dataset

    # MNIST-shaped stand-in data: load_any reads only the image shape and the class count
    x, y = torch.zeros(10, 1, 28, 28), torch.arange(10)
    data = Dataset(x, y, x, y)
    cnn = to_cnn(drm.DeepRenderingModel.from_config(drm.lenet_config(data.image_shape, 10)))
    torch.save(cnn.state_dict(), tmp_path / "lenet.pt")
    model, origin = compare_views.load_any(None, tmp_path / "lenet.pt", data, tmp_path, True)
    assert "state_dict" in origin and model.input_shape == data.image_shape
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(compare_views.ReportError, match="not a LeNet state_dict"):
        compare_views.load_any(None, tmp_path / "bad.pt", data, tmp_path, True)


@pytest.mark.slow  # a subprocess (torchrun, a killed run, a browser)
def test_a_bad_model_path_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "experiments.compare_views", "--model", str(tmp_path / "nope"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.slow  # a whole script or report at smoke size
def test_a_second_model_is_rendered_beside_the_first(tmp_path: Path) -> None:
    """--compare-model: both models' renderings and statistics, on the same images."""
    import drm
    from drm.data import load_digits
    from experiments import train

    runs = {}
    for algo in ("sgd", "ssl"):
        runs[algo] = tmp_path / algo
        argv = ["--smoke", "--algo", algo, "--out", str(runs[algo])]
        train.main(train.parse_args(argv))
    argv = ["--smoke", "--model", str(runs["sgd"]), "--compare-model", str(runs["ssl"]),
            "--out", str(tmp_path / "views")]  # fmt: skip
    result = compare_views.main(compare_views.parse_args(argv))
    numbers = result["numbers"]
    assert "renderings.png" in result["figures"]
    data = load_digits()
    pool = compare_views.SIZES["smoke"]["rendering_pool"]
    x = data.x_test[:pool]
    for flag, run in (("--model", runs["sgd"]), ("--compare-model", runs["ssl"])):
        model = drm.load_model(run / "model.safetensors")
        assert isinstance(model, drm.DeepRenderingModel)
        with torch.no_grad():  # oracle: the rendering of the predicted class, by the library
            scores, latents = drm.max_sum(model, x)
            mu = drm.render(model, scores.argmax(1), latents)
        assert numbers[f"rendering_mse {flag}"] == pytest.approx(float(((x - mu) ** 2).mean()))
        accuracy = float((scores.argmax(1) == data.y_test[:pool]).double().mean())
        assert numbers[f"accuracy {flag}"] == pytest.approx(accuracy)


@pytest.mark.slow  # a whole script or report at smoke size
def test_the_report_uses_the_data_of_the_run(tmp_path: Path) -> None:
    """A model trained on a user's .npz is reported on that .npz (not MNIST), at its own size;
    changed data and data of another shape are refused in one line."""
    import numpy as np

    import drm
    from drm.data import load_digits
    from experiments import train

    digits = load_digits()
    # the user's data: the digits mirrored left-right, so a report on the bundled digits differs
    arrays = {"x_train": digits.x_train.flip(-1).numpy(), "y_train": digits.y_train.numpy(),
              "x_test": digits.x_test.flip(-1).numpy(),
              "y_test": digits.y_test.numpy()}  # fmt: skip
    path = tmp_path / "mirrored.npz"
    np.savez(path, **arrays)
    run = tmp_path / "run"
    train.main(train.parse_args(["--data", str(path), "--epochs", "1", "--limit-train", "400",
                                 "--out", str(run), "--no-progress"]))  # fmt: skip
    argv = ["--smoke", "--model", str(run), "--out", str(tmp_path / "views")]
    result = compare_views.main(compare_views.parse_args(argv))
    page = Path(str(result["page"])).read_text()
    assert "mirrored.npz test images" in page
    model = drm.load_model(run / CHECKPOINT)
    pool = compare_views.SIZES["smoke"]["rendering_pool"]
    x, y = digits.x_test.flip(-1)[:pool].to(model.dtype), digits.y_test[:pool]
    with torch.no_grad():  # oracle: the accuracy on the user's (mirrored) images
        accuracy = float((drm.max_sum(model, x)[0].argmax(1) == y).double().mean())
    assert result["numbers"]["accuracy --model"] == pytest.approx(accuracy)

    np.savez(path, **{**arrays, "x_test": arrays["x_test"] * 0.5})
    with pytest.raises(compare_views.ReportError, match="has changed since the run"):
        compare_views.main(compare_views.parse_args(argv))
    with pytest.raises(compare_views.ReportError, match=r"\(1, 28, 28\) images of 10 classes"):
        compare_views.main(compare_views.parse_args([*argv, "--data", "mnist"]))
    # --data on purpose: other data of the model's shape is the user's choice
    result = compare_views.main(compare_views.parse_args([*argv, "--data", "digits"]))
    assert "Data: digits test images" in Path(str(result["page"])).read_text()
