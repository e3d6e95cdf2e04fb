"""The pytest plugin, registered as the ``ryzen`` pytest11 entry point.

Options, markers and fixtures live here. The device is resolved once at start-up when ``--device`` is given, so
``pytest -m perf --device=rocm`` on a machine without ROCm stops with one clear message instead of fifty skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

    from ryzen_opt.metrics import TrainingMetricsCollector

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
# Serialized collectors (dicts) of every test that used ``training_metrics``; on xdist workers they travel to the
# controller through ``workeroutput``, and only the controller writes files.
_TRAINING_KEY = pytest.StashKey[list[dict[str, Any]]]()
_WORKEROUTPUT_TRAINING = "ryzen_training_metrics"


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
    group.addoption(
        "--ryzen-report-dir",
        dest="ryzen_report_dir",
        default=None,
        metavar="DIR",
        help="where the ryzen JSON reports are written at session end (default: ryzen_results/ under rootdir)",
    )
    parser.addini("ryzen_device", "default device for the ryzen fixtures when --device is not given", default="auto")


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {text}")
    config.stash[_DEVICE_KEY] = None
    config.stash[_TRAINING_KEY] = []
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


def report_dir(config: pytest.Config) -> Path:
    """``--ryzen-report-dir``, or ``ryzen_results/`` under the rootdir."""
    chosen = config.getoption("ryzen_report_dir")
    return Path(chosen) if chosen else Path(config.rootpath) / "ryzen_results"


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.fixture
def training_metrics(request: pytest.FixtureRequest) -> Iterator[TrainingMetricsCollector]:
    """A ``TrainingMetricsCollector`` for this test; at session end all of them merge into
    ``training_metrics_report.json`` in the report directory."""
    from ryzen_opt.metrics import TrainingMetricsCollector

    collector = TrainingMetricsCollector(experiment_id=request.node.nodeid)
    yield collector
    request.config.stash[_TRAINING_KEY].append(collector.to_dict())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: collect what a finished worker measured."""
    payload = getattr(node, "workeroutput", {}).get(_WORKEROUTPUT_TRAINING)
    if payload:
        node.config.stash[_TRAINING_KEY].extend(payload)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    collected = config.stash.get(_TRAINING_KEY, [])
    if _is_xdist_worker(config):
        config.workeroutput[_WORKEROUTPUT_TRAINING] = collected  # type: ignore[attr-defined]
        return
    if collected:
        from ryzen_opt.metrics import TrainingMetricsCollector

        merged = TrainingMetricsCollector(experiment_id="pytest-session")
        for data in collected:
            merged.merge(TrainingMetricsCollector.from_dict(data))
        merged.export_metrics(report_dir(config) / "training_metrics_report.json")
