"""Unit tests run torch on one thread: their tensors are tiny, a second thread only adds synchronisation, and under
``pytest -n 2`` (or beside a running job) two-thread OpenMP pools oversubscribe the cores and spin."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
