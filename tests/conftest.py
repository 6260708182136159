"""Shared pytest configuration: GPU tests skip without CUDA; the one-thread fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.architectures import single_thread


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, as the training subprocesses use (--threads 1), restored afterwards.

    Function-scoped: a module-scoped fixture that needs it sets it itself (`single_thread`).
    """
    with single_thread():
        yield
