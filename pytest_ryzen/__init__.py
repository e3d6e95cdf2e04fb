"""pytest-ryzen: threshold markers that turn performance and accuracy claims into CI gates.

``from pytest_ryzen import speedup`` gives the same decorator as ``pytest.mark.speedup``::

    @speedup(3.0)
    @accuracy_loss(0.01)
    def test_int8_decode(ryzen): ...

The measuring helpers (:mod:`pytest_ryzen.helpers`) are here too, imported on first use: they need torch, and the
plugin loads in every ``pytest`` run (``pytest --help`` included), which must not pay for it::

    from pytest_ryzen import decode_path, decode_workload, heldout_blocks, model_bytes
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports them on first use
    from pytest_ryzen.helpers import decode_path, decode_workload, heldout_blocks, model_bytes

speedup = pytest.mark.speedup
accuracy_loss = pytest.mark.accuracy_loss
compression_ratio = pytest.mark.compression_ratio
memory_reduction = pytest.mark.memory_reduction
acceptance_rate = pytest.mark.acceptance_rate
perf = pytest.mark.perf
gpu = pytest.mark.gpu
slow = pytest.mark.slow

# The names pytest_ryzen.helpers gives, imported lazily by __getattr__ (PEP 562).
_HELPERS = ("decode_path", "decode_workload", "heldout_blocks", "model_bytes")

__all__ = [
    "acceptance_rate",
    "accuracy_loss",
    "compression_ratio",
    "decode_path",
    "decode_workload",
    "gpu",
    "heldout_blocks",
    "memory_reduction",
    "model_bytes",
    "perf",
    "slow",
    "speedup",
]


def __getattr__(name: str) -> Any:
    """``pytest_ryzen.decode_workload`` and the other helpers, imported on first use (they import torch)."""
    if name in _HELPERS:
        # lazy: the helpers import torch, and the plugin (which imports this package) must load without it
        from pytest_ryzen import helpers

        return getattr(helpers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HELPERS})
