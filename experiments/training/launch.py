"""Running under torchrun: the device of each rank, failures every rank hears of, SIGTERM.

`torchrun --nproc_per_node N -m experiments.train ...` starts N processes (ranks) that join one
process group (`drm.distributed`: gloo for --device cpu, nccl for cuda, each rank on
cuda:LOCAL_RANK; a collective that a dead or hung rank never joins fails after --dist-timeout
seconds). A failure that one rank sees (DIR in use, a write) must stop every rank (`agreed`),
each with one line (`say`); torchrun stops the others with SIGTERM when one rank dies, which
`on_sigterm` turns into `Terminated` so that the command can report it in one line too.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from drm import distributed
from experiments._cli import one_line
from experiments.training.config import RunError

T = TypeVar("T")


class Terminated(BaseException):
    """SIGTERM under torchrun (it stops every rank when one fails); not an Exception, so that
    nothing swallows it on the way out."""


def nothing() -> None:
    """What the ranks other than 0 do while rank 0 writes DIR."""


def agreed(action: Callable[[], T]) -> T:
    """Run `action` on every rank; if it fails on any rank, fail on every rank (a collective).

    Without it a failure that only one rank sees (DIR locked, a write) would leave the others
    blocked in their next collective until --dist-timeout. The failing rank re-raises its own
    error; the others raise a RunError naming it.
    """
    error: Exception | None = None
    result: Any = None
    try:
        result = action()
    except Exception as err:  # re-raised below, after every rank has heard of it
        error = err
    if distributed.is_distributed():
        messages = distributed.gather_errors(None if error is None else one_line(error))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if error is None and failed:
            who, message = failed[0]
            raise RunError(f"rank {who} failed: {message}")
    if error is not None:
        raise error
    return result


def resolve_device(name: str) -> torch.device:
    """The torch device of --device; under torchrun with CUDA, cuda:LOCAL_RANK."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: CUDA is not available on this machine")
    if name == "cuda" and distributed.launched_by_torchrun():
        index, count = distributed.local_rank(), torch.cuda.device_count()
        if index >= count:
            raise RunError(
                f"--device cuda: local rank {index} needs a GPU of its own, this machine has "
                f"{count} (use --nproc_per_node {count} or fewer)"
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def say(line: str) -> None:
    """One line on stderr in one write, so that the lines of several ranks never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def on_sigterm(signum: int, frame: Any) -> None:
    """The SIGTERM handler under torchrun: raise Terminated."""
    # raise once: a second SIGTERM must not interrupt the one-line report of the first
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def deaf_to_sigterm_once_failing(launched: bool) -> Iterator[None]:
    """Once a rank is failing, a later SIGTERM from torchrun must not raise again: it could land
    in a finaliser (tqdm's __del__ as the traceback is freed) and print a stray report."""
    try:
        yield
    except BaseException:
        if launched:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise


def looks_like_communication(err: BaseException) -> bool:
    """A collective that failed: a dead or hung peer, a timeout, a lost connection."""
    text = str(err)
    return isinstance(err, torch.distributed.DistError) or any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection", "Timed out", "timed out")
    )
