"""Checkpoints round-trip exactly, are written atomically, and bad files give clear errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import drm
from drm.checkpoint import (
    content_digest,
    load_checkpoint,
    load_model,
    read_metadata,
    save_checkpoint,
    save_model,
)
from tests.architectures import ARCHITECTURES, build, images


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    model = build(ARCHITECTURES[name], seed=81, sigma2=0.3)
    path = tmp_path / "model.safetensors"
    save_model(model, path, metadata={"epoch": "3"})
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.dtype == torch.float64
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                              strict=True):  # fmt: skip
        assert n == m and torch.equal(a, b), n
    x = images(model, 2)
    assert torch.equal(drm.max_sum(model, x)[0], drm.max_sum(loaded, x)[0])
    assert read_metadata(path)["epoch"] == "3"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_checkpoints_get_the_permissions_of_every_other_file(tmp_path: Path) -> None:
    """A checkpoint is readable as a plain open() would make it (not mkstemp's 0600)."""
    model = drm.DeepRenderingModel.from_config(ARCHITECTURES["leaky"], seed=82)
    previous = os.umask(0o022)
    try:
        save_model(model, tmp_path / "m.safetensors")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o644


def test_float32_models_stay_float32(tmp_path: Path) -> None:
    model = drm.DeepRenderingModel.from_config(ARCHITECTURES["leaky"], seed=82)
    save_model(model, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").dtype == torch.float32


def test_a_failed_write_leaves_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    old = build(ARCHITECTURES["leaky"], seed=83)
    save_model(old, path)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("drm.checkpoint.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(build(ARCHITECTURES["leaky"], seed=84), path)
    assert torch.equal(load_model(path).levels[0].weight, old.levels[0].weight)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def _forge(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """A structurally valid file with a correct digest (to reach the checks behind it)."""
    header = dict(metadata, sha256=content_digest(tensors, metadata))
    save_file(tensors, str(path), metadata=header)
    return path


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    model = build(ARCHITECTURES["dense-only"], seed=85)
    good = tmp_path / "good.safetensors"
    save_model(model, good)
    data = good.read_bytes()

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "absent.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted|not a readable"):
        load_model(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a Deep Rendering Model checkpoint"):
        load_model(foreign)
    meta = read_metadata(good)
    state = {f"model/{k}": v.contiguous() for k, v in model.state_dict().items()}
    wrong_shape = dict(state, **{"model/levels.1.weight": torch.zeros(3, 3, dtype=torch.float64)})
    _forge(tmp_path / "shape.safetensors", wrong_shape, meta)
    with pytest.raises(ValueError, match=r"levels.1.weight is \(3, 3\)"):
        load_model(tmp_path / "shape.safetensors")
    missing = {k: v for k, v in state.items() if k != "model/sigma2"}
    _forge(tmp_path / "missing.safetensors", missing, meta)
    with pytest.raises(ValueError, match="do not match its architecture"):
        load_model(tmp_path / "missing.safetensors")
    bad_config = dict(meta, drm_config=json.dumps({"levels": "nope"}))
    _forge(tmp_path / "config.safetensors", state, bad_config)
    with pytest.raises(ValueError, match="malformed model config"):
        load_model(tmp_path / "config.safetensors")
    nan = dict(state, **{"model/sigma2": torch.tensor(float("nan"), dtype=torch.float64)})
    _forge(tmp_path / "nan.safetensors", nan, meta)
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        load_model(tmp_path / "nan.safetensors")


def test_training_checkpoint_round_trips_the_optimizer_state(tmp_path: Path) -> None:
    model = build(ARCHITECTURES["leaky"], seed=86)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = images(model, 4)
    torch.nn.functional.cross_entropy(drm.max_sum(model, x)[0], torch.arange(4) % 3).backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "note": [1, 2.5, None, "text", True]}
    path = tmp_path / "run.safetensors"
    save_checkpoint(path, model, state, metadata={"epoch": "7"})
    loaded = load_checkpoint(path)
    assert loaded.metadata == {"epoch": "7"}
    assert loaded.trainer_state["note"] == [1, 2.5, None, "text", True]
    fresh = torch.optim.Adam(loaded.model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded.trainer_state["optimizer"])
    for key, value in optimizer.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(fresh.state_dict()["state"][key][name], tensor), (key, name)
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert torch.equal(load_model(path).levels[0].weight, model.levels[0].weight)
    save_model(model, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no trainer state"):
        load_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(TypeError, match="cannot store object"):
        save_checkpoint(tmp_path / "bad.safetensors", model, {"x": object()})


def test_shallow_models_round_trip(tmp_path: Path) -> None:
    from drm.shallow import ShallowRenderingModel

    generator = torch.Generator().manual_seed(87)
    model = ShallowRenderingModel(
        torch.randn(3, 1, 3, 3, generator=generator, dtype=torch.float64), (1, 6, 5),
        translation="interior", prior_logits=torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64),
        sigma2=0.4, switch_prior_on=0.7,
    )  # fmt: skip
    save_model(model, tmp_path / "shallow.safetensors")
    loaded = load_model(tmp_path / "shallow.safetensors")
    assert isinstance(loaded, ShallowRenderingModel)
    assert loaded.config_dict() == model.config_dict()
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                              strict=True):  # fmt: skip
        assert n == m and torch.equal(a, b), n


def test_a_flipped_bit_is_caught_by_the_digest(tmp_path: Path) -> None:
    model = build(ARCHITECTURES["dense-only"], seed=88)
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match their SHA-256"):
        load_model(path)


def test_non_finite_models_are_refused_before_they_are_written(tmp_path: Path) -> None:
    """A NaN weight or an infinite sigma^2 is refused at construction, import and save: a run
    never writes a checkpoint that load_model would then refuse."""
    import torch.nn as nn

    from cnn_equiv import to_drm

    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert to_drm(cnn, input_shape=(1, 6, 6)).num_classes == 3
    with pytest.raises(ValueError, match="sigma2 must be finite"):
        to_drm(cnn, input_shape=(1, 6, 6), sigma2=float("inf"))
    with torch.no_grad():
        cnn[3].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"levels\[\d\]\.weight \(\w+\) holds NaN or inf"):
        to_drm(cnn, input_shape=(1, 6, 6))
    model = drm.DeepRenderingModel.from_config(ARCHITECTURES["leaky"], seed=83)
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    with pytest.raises(ValueError, match="holds NaN or inf"):
        save_model(model, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left
