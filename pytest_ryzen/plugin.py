"""The pytest plugin, registered as the ``ryzen`` pytest11 entry point.

Options, markers and fixtures live here. The device is resolved once at start-up when ``--device`` is given, so
``pytest -m perf --device=rocm`` on a machine without ROCm stops with one clear message instead of fifty skips.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "rocm", "mps")

# name -> (help text). Threshold markers take one positional number.
MARKERS: dict[str, str] = {
    "speedup(min)": "gate: measured speedup (baseline time / candidate time) must be at least min",
    "accuracy_loss(max)": "gate: relative top-1 accuracy loss against the reference must be at most max",
    "compression_ratio(min)": "gate: original bytes / compressed bytes must be at least min",
    "memory_reduction(min)": "gate: 1 - optimized/baseline memory must be at least min",
    "acceptance_rate(min)": "gate: speculative draft acceptance rate must be at least min",
    "perf": "a performance test: times code, runs serialized, selected with -m perf",
    "gpu": "needs a GPU device (--device=cuda or --device=rocm)",
    "slow": "takes more than a few seconds",
}

_DEVICE_KEY = pytest.StashKey["torch.device | None"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ryzen", "ryzen-opt performance gates")
    group.addoption(
        "--device",
        "--ryzen-device",
        dest="ryzen_device",
        default=None,
        choices=None,
        metavar="{auto,cpu,cuda,rocm,mps}",
        help="device for the ryzen fixtures (default: auto, i.e. a GPU if present, else the CPU)",
    )
    parser.addini("ryzen_device", "default device for the ryzen fixtures when --device is not given", default="auto")


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {text}")
    config.stash[_DEVICE_KEY] = None
    requested = config.getoption("ryzen_device")
    if requested is not None:
        # Resolve eagerly: a wrong --device is a usage error of the whole run, reported once.
        config.stash[_DEVICE_KEY] = _resolve(requested)


def _resolve(spec: str) -> torch.device:
    from ryzen_opt.device import resolve_device
    from ryzen_opt.errors import RyzenOptError

    try:
        return resolve_device(spec)
    except RyzenOptError as exc:
        raise pytest.UsageError(f"ryzen: {exc}") from exc


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The ``torch.device`` chosen with ``--device`` (or the ``ryzen_device`` ini value, default ``auto``)."""
    resolved = pytestconfig.stash.get(_DEVICE_KEY, None)
    if resolved is None:
        resolved = _resolve(str(pytestconfig.getini("ryzen_device")))
        pytestconfig.stash[_DEVICE_KEY] = resolved
    return resolved
