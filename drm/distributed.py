"""Data-parallel training over processes: the few torch.distributed helpers the trainers need.

Every learning algorithm of the library is a sum over images: SGD's and discriminative EM's
gradients, generative EM's normal equations, shallow EM's sufficient statistics. N processes
that each hold a shard of a global minibatch therefore compute the single-process update exactly
(up to the order of floating-point summation) by summing their partial sums across processes.
The trainers take that sum as a callable (`Reduce`: tensor -> its sum over all processes) and
default to the identity, which is the single-process behaviour; `all_reduce_` is the
torch.distributed one.

This module holds:

* `launched_by_torchrun`: whether the environment variables of `torchrun` (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are set.
* `init` / `teardown`: `init_process_group` with "gloo" for CPU and "nccl" for CUDA tensors,
  with a timeout after which a collective that a dead or hung peer never joins raises instead of
  blocking forever; `destroy_process_group`.
* `is_distributed`, `rank`, `world_size`, `local_rank`.
* `all_reduce_` (in place, summed), `all_reduce_float`, `all_reduce_floats` (one collective for
  a dict), `reduce_together` (several tensors through one `Reduce` call), `broadcast_module_`
  (parameters and buffers from rank 0), `barrier`, `gather_errors` (every rank learns which
  ranks failed, and why), `shard` (this process's contiguous part of a global index batch).

Without an initialised process group every helper is the single-process identity (rank 0 of 1),
so callers need no branches.

References:
    PyTorch documentation, torch.distributed and DistributedDataParallel.
    Li et al., PyTorch Distributed: Experiences on Accelerating Data Parallel Training,
    VLDB 2020.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Reduce",
    "all_reduce_",
    "all_reduce_float",
    "all_reduce_floats",
    "backend_for",
    "barrier",
    "broadcast_module_",
    "gather_errors",
    "init",
    "is_distributed",
    "launched_by_torchrun",
    "local_rank",
    "rank",
    "reduce_together",
    "shard",
    "teardown",
    "world_size",
]

Reduce = Callable[[Tensor], Tensor]
"""Sum a tensor over every process (in place is allowed); returns the sum, same shape/dtype."""

Backend = Literal["gloo", "nccl"]

# torchrun (torch.distributed.run) exports these to every worker
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment variables are all set)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def backend_for(device: torch.device) -> Backend:
    """ "nccl" for CUDA devices, "gloo" otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device, timeout: float) -> None:
    """Join the process group that torchrun's environment describes.

    Args:
        device: where the tensors live; picks the backend (`backend_for`). For CUDA, the caller
            should have called `torch.cuda.set_device` (usually with `local_rank()`).
        timeout: seconds after which a collective that some rank never joins raises a
            RuntimeError on the others (gloo; NCCL aborts the process), instead of hanging.

    Raises:
        RuntimeError: torchrun's environment is missing, or the group is already initialised.
        ValueError: timeout is not > 0.
    """
    if not launched_by_torchrun():
        missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
        raise RuntimeError(f"not launched by torchrun: {', '.join(missing)} unset")
    if dist.is_initialized():
        raise RuntimeError("the default process group is already initialised")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    dist.init_process_group(
        backend=backend_for(device), timeout=datetime.timedelta(seconds=timeout)
    )


def teardown() -> None:
    """Leave the process group (no-op without one)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a default process group is initialised (even with a world size of 1)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """The rank on this machine (torchrun's LOCAL_RANK), 0 without it."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _communication_device() -> torch.device:
    """Where the backend wants tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: Tensor) -> Tensor:
    """Sum `tensor` over every process, in place; returns it (identity without a group).

    Every process must call it, in the same order, with tensors of the same shape and dtype. A
    tensor on another device than the backend's (a CPU tensor under NCCL) goes through a copy.
    """
    if not is_distributed():
        return tensor
    device = _communication_device()
    if tensor.device == device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    else:
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved)
    return tensor


def all_reduce_float(value: float) -> float:
    """The sum of a Python float over every process (float64)."""
    return float(all_reduce_(torch.tensor([value], dtype=torch.float64))[0])


def all_reduce_floats(values: Mapping[str, float]) -> dict[str, float]:
    """The sums over every process of a dict of floats, in one collective (float64).

    Every process must pass the same keys in the same order.
    """
    keys = list(values)
    summed = all_reduce_(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) for k, v in zip(keys, summed.tolist(), strict=True)}


def reduce_together(tensors: Sequence[Tensor], reduce: Reduce) -> list[Tensor]:
    """Every tensor's `reduce` (its sum over processes), with one call: one collective.

    The tensors (one dtype and device) are flattened into one fresh tensor, reduced, and split
    back; each result is a view of that tensor with its input's shape (clone a result that
    should own its storage). Every process must pass the same shapes in the same order; no
    tensors: no call.
    """
    if not tensors:
        return []
    flat = reduce(torch.cat([t.reshape(-1) for t in tensors]))
    parts = flat.split([t.numel() for t in tensors])
    return [part.view_as(t) for t, part in zip(tensors, parts, strict=True)]


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer with rank `src`'s (no-op without a group)."""
    if not is_distributed():
        return
    device = _communication_device()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device == device:
                dist.broadcast(tensor, src=src)
            else:
                moved = tensor.to(device)
                dist.broadcast(moved, src=src)
                tensor.copy_(moved)


def barrier() -> None:
    """Wait until every process gets here (no-op without a group)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def gather_errors(error: str | None) -> list[str | None]:
    """Every rank's error message (None: that rank is fine), on every rank; a collective.

    Lets a failure that only one rank sees (a lock, a write) stop every rank at once, instead of
    leaving the others blocked in their next collective until the timeout.
    """
    if not is_distributed():
        return [error]
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    return gathered


def shard(index: Tensor, part: int | None = None, parts: int | None = None) -> Tensor:
    """This process's contiguous part of a global batch of indices (sizes differ by at most 1).

    Args:
        index: (B,) the global minibatch; every process passes the same one.
        part, parts: which part of how many; default to this process's rank and the world size.

    Returns:
        (b,) with b = B // parts or B // parts + 1 (b = 0 when B < parts and part >= B).
    """
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    if not 0 <= part < parts:
        raise ValueError(f"part must lie in [0, {parts}), got {part}")
    return index.tensor_split(parts)[part]
