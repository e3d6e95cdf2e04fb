"""Under pytest-xdist, a test that measures runs alone: every other test of the run waits while it holds the machine.

Timing two arms while another worker quantizes a model or runs a unit test measures the other worker as much as the
arms (on 2 cores, a dynamic-int8 gate went from PASS 1.42x to INCONCLUSIVE with CV 1.8 under ``-n 2``). Holding a lock
around ``compare``'s sampling alone is not enough: the other worker's forwards still run beside it.

So each test of an xdist run holds a readers-writer lock over its whole protocol (setup, call, teardown): an ordinary
test holds it shared, so ordinary tests still run side by side; a test that measures (marked ``perf`` or with a
threshold marker) holds it exclusively, so it starts once the running tests end and nothing of this run starts until
it is done. A turnstile in front keeps a waiting measurement from starving behind a stream of shared holders.

Why not xdist's ``--dist loadgroup`` (every perf test on one worker)? It keeps perf tests apart from each other, but
the other worker's tests still run beside them: the verdicts it was meant to fix still depended on ``-n``.

The lock files are per test run (xdist's ``testrunuid``), so a run nested inside a test (pytester) never waits on
its parent. ``flock`` locks die with their process, so a crashed worker frees the machine. Serial runs take no lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no flock; the tests of an xdist run are not serialized there
    fcntl = None  # type: ignore[assignment]


def lock_path(config: pytest.Config) -> Path | None:
    """The machine lock of this xdist run, or ``None`` outside an xdist worker (nothing runs beside a serial run)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or fcntl is None:
        return None
    run = str(workerinput.get("testrunuid") or "run")
    return Path(tempfile.gettempdir()) / f"ryzen_opt_machine_{run}.lock"


def measures(item: pytest.Item, gate_markers: tuple[str, ...]) -> bool:
    """Whether ``item`` times or gates something: it is marked ``perf`` or carries a threshold marker."""
    return item.get_closest_marker("perf") is not None or any(item.get_closest_marker(m) for m in gate_markers)


@contextlib.contextmanager
def hold_machine(path: Path, *, exclusive: bool) -> Iterator[float]:
    """Hold the run's machine lock, shared or exclusive; yields the seconds spent waiting for it."""
    assert fcntl is not None
    started = time.perf_counter()
    with _opened(path.with_suffix(".turnstile")) as turnstile, _opened(path) as machine:
        fcntl.flock(turnstile, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            fcntl.flock(machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            if not exclusive:  # through the turnstile: a measurement waiting behind it may now take it
                fcntl.flock(turnstile, fcntl.LOCK_UN)
            try:
                yield time.perf_counter() - started
            finally:
                fcntl.flock(machine, fcntl.LOCK_UN)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        yield fd
    finally:
        os.close(fd)
