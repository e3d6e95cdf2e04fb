"""A cross-process file lock: one zoo build at a time, one perf measurement at a time (pytest-xdist workers)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[float]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Yields:
        The seconds spent waiting for the lock, so callers can record that they waited.

    On platforms without ``fcntl`` the lock is a logged no-op: correctness does not depend on it, only the
    avoidance of duplicate work and of overlapping timings.
    """
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if fcntl is None:  # pragma: no cover
        logger.warning("no fcntl on this platform: %s is not locked", lock_path)
        yield 0.0
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        waited = time.perf_counter() - start
        if waited > 0.05:
            logger.info("waited %.2fs for %s", waited, lock_path)
        try:
            yield waited
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
