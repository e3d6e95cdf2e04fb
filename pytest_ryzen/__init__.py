"""pytest-ryzen: threshold markers that turn performance and accuracy claims into CI gates.

``from pytest_ryzen import speedup`` gives the same decorator as ``pytest.mark.speedup``::

    @speedup(3.0)
    @accuracy_loss(0.01)
    def test_int8_decode(ryzen): ...
"""

from __future__ import annotations

import pytest

speedup = pytest.mark.speedup
accuracy_loss = pytest.mark.accuracy_loss
compression_ratio = pytest.mark.compression_ratio
memory_reduction = pytest.mark.memory_reduction
acceptance_rate = pytest.mark.acceptance_rate
perf = pytest.mark.perf
gpu = pytest.mark.gpu
slow = pytest.mark.slow

__all__ = [
    "acceptance_rate",
    "accuracy_loss",
    "compression_ratio",
    "gpu",
    "memory_reduction",
    "perf",
    "slow",
    "speedup",
]
