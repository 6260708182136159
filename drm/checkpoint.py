"""Checkpoints: a model (and a trainer's state) as one safetensors file, the rest in its metadata.

`save_model` writes the tensors (templates, biases, class prior logits, sigma^2) with safetensors
and the architecture (`ModelConfig.to_dict()`, JSON) in the header's metadata, to a temporary file
in the same folder that is then renamed over the target: a reader sees the old checkpoint or the
new one, never a torn file, even if the writer is killed. `load_model` never unpickles anything:
it parses the safetensors header, checks a SHA-256 of every tensor and metadata entry (stored in
the header), validates the config and every tensor's name, shape and dtype, and raises ValueError
naming what is wrong.

A training checkpoint (`save_checkpoint`) adds a trainer's state (optimizer moments, step counts:
nested dicts and lists of tensors and numbers) to the same file: its tensors under the prefix
"state/", its structure as JSON in the metadata. One file means one atomic rename, so the model
and the optimizer state on disk always belong to the same epoch.

References:
    safetensors format: https://huggingface.co/docs/safetensors
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from drm.config import ModelConfig
from drm.model import DeepRenderingModel
from drm.shallow import ShallowRenderingModel

# Either kind of rendering model can be checkpointed; the header says which.
Model = DeepRenderingModel | ShallowRenderingModel
_KIND_KEY = "model_kind"
_DIGEST_KEY = "sha256"

FORMAT = "deep-rendering-model/1"
_CONFIG_KEY = "drm_config"
_FORMAT_KEY = "format"
_DTYPE_KEY = "dtype"
_STATE_KEY = "trainer_state"
_STATE_PREFIX = "state/"
_MODEL_PREFIX = "model/"


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), fsync it, then rename it over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(tmp))
        # mkstemp creates 0600 files, and a writer may replace the file (safetensors does):
        # set the permissions a plain open() would give once the content is written
        os.chmod(tmp, 0o666 & ~umask)
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


def _config_of(model: Model) -> tuple[str, dict[str, Any]]:
    if isinstance(model, DeepRenderingModel):
        return "deep", model.config.to_dict()
    if isinstance(model, ShallowRenderingModel):
        return "shallow", model.config_dict()
    raise TypeError(
        f"a checkpoint holds a DeepRenderingModel or a ShallowRenderingModel, got "
        f"{type(model).__name__}"
    )


def _model_from(kind: str, config: dict[str, Any], dtype: torch.dtype) -> Model:
    if kind == "deep":
        return DeepRenderingModel.from_config(ModelConfig.from_dict(config), dtype=dtype)
    if kind == "shallow":
        return ShallowRenderingModel.from_config_dict(config, dtype=dtype)
    raise ValueError(f"unknown model kind {kind!r}")


def content_digest(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and every metadata entry.

    safetensors validates a file's structure, not its contents: without this a flipped bit in a
    weight, an optimizer moment or a metadata string would load silently.
    """
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != _DIGEST_KEY:
            digest.update(f"{key}={metadata[key]!r};".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write(path: Path, model: Model, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    kind, config = _config_of(model)
    header = dict(metadata)
    header.update(
        {
            _FORMAT_KEY: FORMAT,
            _KIND_KEY: kind,
            _CONFIG_KEY: json.dumps(config),
            _DTYPE_KEY: str(
                model.templates.dtype if kind == "shallow" else model.dtype
            ).removeprefix("torch."),
        }
    )
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            # it could be written but never loaded back: refuse it now
            raise ValueError(f"save: the model's {name} holds NaN or inf")
        tensors[_MODEL_PREFIX + name] = t
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header[_DIGEST_KEY] = content_digest(tensors, header)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def save_model(model: Model, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `model` to `path` (a .safetensors file) atomically.

    Args:
        metadata: extra string entries for the header (e.g. the training epoch).
    """
    _write(Path(path), model, {}, metadata or {})


def _flatten(value: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON skeleton of nested dicts/lists; tensors move to `tensors` under their path."""
    if isinstance(value, Tensor):
        tensors[prefix] = value
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"state keys must be str or int, at {prefix!r}")
        return {"__dict__": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "__tuple__" if isinstance(value, tuple) else "__list__"
        return {kind: [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {prefix!r} in a checkpoint")


def _unflatten(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [_unflatten(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(_unflatten(v, tensors) for v in skeleton["__tuple__"])
        raise ValueError(f"unknown entry {sorted(skeleton)} in a checkpoint's state")
    return skeleton


def save_checkpoint(
    path: str | Path,
    model: Model,
    trainer_state: dict[str, Any],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the model and a trainer's state to one file, atomically.

    Args:
        trainer_state: nested dicts/lists of tensors, numbers, strings (e.g. an optimizer's
            `state_dict()`).
        metadata: extra string entries (e.g. the epoch), returned by `load_checkpoint`.
    """
    tensors: dict[str, Tensor] = {}
    skeleton = _flatten(trainer_state, _STATE_PREFIX.rstrip("/"), tensors)
    header = dict(metadata or {})
    header[_STATE_KEY] = json.dumps(skeleton)
    _write(Path(path), model, tensors, header)


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


def _read(path: Path) -> tuple[Model, dict[str, Tensor], dict[str, str]]:
    metadata = read_metadata(path)
    try:
        dtype = getattr(torch, metadata[_DTYPE_KEY])
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype {metadata[_DTYPE_KEY]!r} is not a float dtype")
        config = json.loads(metadata[_CONFIG_KEY])
        if not isinstance(config, dict):
            raise ValueError("the config is not a JSON object")
        model = _model_from(metadata[_KIND_KEY], config, dtype)
    except (KeyError, json.JSONDecodeError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} holds a malformed model config: {err}") from err
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise ValueError(f"{path} is a corrupted checkpoint: {err}") from err
    if content_digest(stored, metadata) != metadata.get(_DIGEST_KEY):
        raise ValueError(f"{path} is corrupted: its contents do not match their SHA-256")
    state = {k[len(_MODEL_PREFIX) :]: v for k, v in stored.items() if k.startswith(_MODEL_PREFIX)}
    if set(state) != set(expected):
        raise ValueError(
            f"{path} holds tensors {sorted(set(state) ^ set(expected))} that do not match "
            "its architecture"
        )
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
    others = {k: v for k, v in stored.items() if not k.startswith(_MODEL_PREFIX)}
    return model, others, metadata


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Model:
    """Read the model of a file written by `save_model` or `save_checkpoint`, validated."""
    return _read(Path(path))[0].to(device)


class Checkpoint(NamedTuple):
    """What `load_checkpoint` returns."""

    model: Model
    trainer_state: dict[str, Any]
    metadata: dict[str, str]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a file written by `save_checkpoint`: the model, the trainer's state, the metadata."""
    path = Path(path)
    model, tensors, metadata = _read(path)
    if _STATE_KEY not in metadata:
        raise ValueError(f"{path} holds a model but no trainer state (written by save_model)")
    try:
        state = _unflatten(json.loads(metadata[_STATE_KEY]), tensors)
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path} holds a malformed trainer state: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a malformed trainer state")
    own = (_FORMAT_KEY, _KIND_KEY, _CONFIG_KEY, _DTYPE_KEY, _STATE_KEY, _DIGEST_KEY)
    extra = {k: v for k, v in metadata.items() if k not in own}
    return Checkpoint(model, state, extra)
