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
    with pytest.raises(ValueError, match="not a valid .npz"):
        load_npz(_save(tmp_path / "pickled.npz", **objects))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a valid .npz"):
        load_npz(tmp_path / "garbage.npz")
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "absent.npz")


def _digits_like(
    rng: np.random.Generator, n: int = 200, classes: int = 10
) -> dict[str, np.ndarray]:
    """A valid 10-class set: every class well represented in train and test."""
    return {
        "x_train": rng.random((n, 6, 6)),
        "y_train": np.arange(n) % classes,
        "x_test": rng.random((n // 4, 6, 6)),
        "y_test": np.arange(n // 4) % classes,
    }


def test_stray_and_impossible_labels_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    good = _digits_like(rng, n=2000)  # 200 per class: one stray image is under 1% of that
    assert load_npz(_save(tmp_path / "ok.npz", **good)).num_classes == 10
    cases = {
        # one label 10 in a 10-class set: an 11-class model, silently, before
        "stray": (dict(good, y_train=np.where(np.arange(2000) == 7, 10, good["y_train"])),
                  r"stray labels: 10 \(1 training images\)"),
        "million": (dict(good, y_train=np.where(np.arange(2000) == 7, 10**6, good["y_train"])),
                    "1000001 classes"),
        "huge": (dict(good, y_test=np.where(np.arange(500) == 3, 10**10, good["y_test"])),
                 "10000000001 classes"),
        "test only": (dict(good, y_test=np.where(np.arange(500) < 5, 10, good["y_test"])),
                      r"only in the test set: 10 \(5 test images\)"),
        "gap": (dict(good, y_train=np.where(good["y_train"] == 4, 11, good["y_train"]),
                     y_test=np.where(good["y_test"] == 4, 11, good["y_test"])),
                "classes 4, 10 have no image"),
    }  # fmt: skip
    for name, (arrays, message) in cases.items():
        path = _save(tmp_path / f"{name.replace(' ', '_')}.npz", **arrays)
        with pytest.raises(ValueError, match=message) as err:
            load_npz(path)
        assert "--num-classes" in str(err.value) and "\n" not in str(err.value), name
    # declared: the stray class becomes a real (rare) class; labels beyond K are refused
    stray = _save(tmp_path / "declared.npz", **cases["stray"][0])
    assert load_npz(stray, num_classes=11).num_classes == 11
    with pytest.raises(ValueError, match=r"labels 10 lie outside \[0, 10\)"):
        load_npz(stray, num_classes=10)
    assert load_npz(_save(tmp_path / "more.npz", **good), num_classes=12).num_classes == 12


def test_image_layout_and_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    good = _digits_like(rng)
    nhwc = dict(good, x_train=rng.random((200, 32, 32, 3)), x_test=rng.random((50, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"look like \(N, H, W, C\).*transpose\(0, 3, 1, 2\)"):
        load_npz(_save(tmp_path / "nhwc.npz", **nhwc))
    levels = (good["x_train"] * 255).astype(np.uint8)
    data = load_npz(_save(tmp_path / "u8.npz", **dict(good, x_train=levels,
                                                      x_test=levels[:50])))  # fmt: skip
    assert torch.equal(data.x_train, torch.from_numpy(levels[:, None].astype(np.float32) / 256))
    for name, scale in (("f255", 255.0), ("huge", 1e30), ("negative", -1.0)):
        arrays = dict(good, x_train=good["x_train"] * scale)
        with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\]"):
            load_npz(_save(tmp_path / f"{name}.npz", **arrays))
    # within the tolerance: accepted as is
    load_npz(_save(tmp_path / "round.npz", **dict(good, x_train=good["x_train"] * 1.0005)))


def test_corrupt_archives_are_one_line_errors(tmp_path: Path) -> None:
    good = _save(tmp_path / "good.npz", **_digits_like(np.random.default_rng(3)))
    raw = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF  # inside the first arrays' data: a CRC or header error
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    (tmp_path / "text.npz").write_text("x_train,y_train\n1,2\n")
    for name in ("truncated", "flipped", "text"):
        with pytest.raises(ValueError, match="is not a valid .npz") as err:
            load_npz(tmp_path / f"{name}.npz")
        assert "pickled" not in str(err.value) and "\n" not in str(err.value), name
