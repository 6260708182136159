"""What every command of experiments/ shares: bad input is one line on stderr, never a traceback.

* `Parser`: argparse whose usage errors are one line (`prog: error: ... (see --help)`), exit 2.
* `Progress`: a line per stage of a long command (silenced by --no-progress).
* `run_command(body, *errors)`: runs body() and prints what it returns; an expected error
  (ValueError, TypeError, OSError and the command's own) becomes `error: <one line>`, exit 1.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable
from typing import NoReturn

# what bad input or a bad path raises; anything else is a bug and keeps its traceback
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def one_line(err: BaseException) -> str:
    """The error's message on one line; gloo's '[file.cc:123] ' source prefix dropped."""
    text = " ".join(str(err).split()) or type(err).__name__
    return re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def run_command(body: Callable[[], str | None], *errors: type[BaseException]) -> int:
    """Run a command's body; print its output, or its expected error as one line. Exit status."""
    try:
        text = body()
    except (*EXPECTED_ERRORS, *errors) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    if text:
        print(text)
    return 0


class Progress:
    """One line on stderr as each stage of a long command starts, with the time so far."""

    def __init__(self, prog: str, stages: int, enabled: bool = True) -> None:
        self.prog, self.stages, self.enabled = prog, stages, enabled
        self.done = 0
        self.start = time.perf_counter()

    def stage(self, name: str) -> None:
        self.done += 1
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"{self.prog}: [{self.done}/{self.stages}] {name} ({elapsed:.0f} s so far)",
                  file=sys.stderr, flush=True)  # fmt: skip
