"""Checkpoints: a model as one safetensors file, its architecture in the file's metadata.

`save_model` writes the tensors (templates, biases, class prior logits, sigma^2) with safetensors
and the architecture (`ModelConfig.to_dict()`, JSON) in the header's metadata, to a temporary file
in the same folder that is then renamed over the target: a reader sees the old checkpoint or the
new one, never a torn file, even if the writer is killed. `load_model` never unpickles anything:
it parses the safetensors header, validates the config and every tensor's name, shape and dtype,
and raises ValueError naming what is wrong.

References:
    safetensors format: https://huggingface.co/docs/safetensors
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from drm.config import ModelConfig
from drm.model import DeepRenderingModel

FORMAT = "deep-rendering-model/1"
_CONFIG_KEY = "drm_config"
_FORMAT_KEY = "format"
_DTYPE_KEY = "dtype"


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), fsync it, then rename it over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_model(
    model: DeepRenderingModel, path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write `model` to `path` (a .safetensors file) atomically.

    Args:
        metadata: extra string entries for the header (e.g. the training epoch).
    """
    if not isinstance(model, DeepRenderingModel):
        raise TypeError(f"save_model expects a DeepRenderingModel, got {type(model).__name__}")
    header = dict(metadata or {})
    header.update(
        {
            _FORMAT_KEY: FORMAT,
            _CONFIG_KEY: json.dumps(model.config.to_dict()),
            _DTYPE_KEY: str(model.dtype).removeprefix("torch."),
        }
    )
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a checkpoint (raises ValueError if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    if metadata.get(_FORMAT_KEY) != FORMAT:
        raise ValueError(f"{path} is not a Deep Rendering Model checkpoint (format {FORMAT})")
    return dict(metadata)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DeepRenderingModel:
    """Read a model written by `save_model`, validating architecture and tensors."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        config = ModelConfig.from_dict(json.loads(metadata[_CONFIG_KEY]))
        dtype = getattr(torch, metadata[_DTYPE_KEY])
    except (KeyError, json.JSONDecodeError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} holds a malformed model config: {err}") from err
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{path} declares dtype {metadata[_DTYPE_KEY]!r}, not a float dtype")
    model = DeepRenderingModel.from_config(config, dtype=dtype)
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            if names != set(expected):
                raise ValueError(
                    f"{path} holds tensors {sorted(names ^ set(expected))} that do not match "
                    "its architecture"
                )
            state = {name: handle.get_tensor(name) for name in names}
    except SafetensorError as err:
        raise ValueError(f"{path} is a corrupted checkpoint: {err}") from err
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise ValueError(
                f"{path}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, the architecture "
                f"needs {tuple(want.shape)} {want.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name} contains NaN or inf")
    model.load_state_dict(state)
    return model.to(device)
