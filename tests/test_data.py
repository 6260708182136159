"""The bundled real data sets and a user's .npz, with their validation errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from drm.data import load_digits, load_mnist, load_npz


def test_digits() -> None:
    data = load_digits()
    assert data.x_train.shape == (1348, 1, 8, 8) and data.x_test.shape == (449, 1, 8, 8)
    assert data.num_classes == 10 and data.image_shape == (1, 8, 8)
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    again = load_digits()
    assert torch.equal(data.y_test, again.y_test)  # the seeded split is reproducible


def test_full_mnist_is_the_standard_split() -> None:
    data = load_mnist()
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert float(data.x_test.min()) >= 0.0 and float(data.x_test.max()) < 1.0
    # the standard MNIST label counts of the test set
    counts = torch.bincount(data.y_test, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_user_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = {
        "x_train": rng.random((10, 6, 6)),
        "y_train": rng.integers(0, 3, 10),
        "x_test": rng.random((4, 6, 6)),
        "y_test": rng.integers(0, 3, 4),
    }
    data = load_npz(_save(tmp_path / "ok.npz", **good))
    assert data.x_train.shape == (10, 1, 6, 6) and data.y_test.dtype == torch.int64

    with pytest.raises(ValueError, match=r"lacks arrays \['y_test'\]"):
        load_npz(
            _save(tmp_path / "missing.npz", **{k: v for k, v in good.items() if k != "y_test"})
        )
    nan = dict(good, x_test=np.full((4, 6, 6), np.nan))
    with pytest.raises(ValueError, match="NaN or inf"):
        load_npz(_save(tmp_path / "nan.npz", **nan))
    negative = dict(good, y_train=-np.ones(10, dtype=np.int64))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        load_npz(_save(tmp_path / "neg.npz", **negative))
    mismatch = dict(good, y_train=np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels must be \(10,\)"):
        load_npz(_save(tmp_path / "mismatch.npz", **mismatch))
    float_labels = dict(good, y_test=np.zeros(4))
    with pytest.raises(TypeError, match="labels must be integers"):
        load_npz(_save(tmp_path / "floatlabels.npz", **float_labels))
    objects = dict(good, x_train=np.array([object()] * 10))
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(_save(tmp_path / "pickled.npz", **objects))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(tmp_path / "garbage.npz")
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "absent.npz")
