"""A cross-process file lock: one zoo build at a time, one perf measurement at a time (pytest-xdist workers)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@dataclass
class _ProcessLockState:
    # The thread lock makes serial_lock re-entrant for the owning thread (a plugin holding the lock around a
    # test that calls compare(lock=True)) while still excluding other threads; flock alone would deadlock on
    # itself there, since a second open() of the same file is a second, conflicting lock holder.
    thread_lock: threading.RLock = field(default_factory=threading.RLock)
    depth: int = 0
    fd: int | None = None


_LOCK_STATES: dict[tuple[int, str], _ProcessLockState] = {}
_LOCK_STATES_GUARD = threading.Lock()


def _acquire_file_lock(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's file: flock works on a read-only descriptor too
        fd = os.open(path, os.O_RDONLY)
    if fcntl is None:  # pragma: no cover - Windows
        logger.warning("no fcntl on this platform: timed sections of different processes are not serialised")
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release_file_lock(fd: int) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[float]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block; yield the seconds waited.

    ``fcntl.flock`` on POSIX (released by the kernel when a holder dies); a logged no-op where there is no
    ``fcntl`` (Windows): correctness never depends on it, only the avoidance of duplicate work (one zoo build at a
    time) and of overlapping timings. Re-entrant within one thread, exclusive across threads and processes.
    """
    target = os.path.realpath(os.fspath(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    key = (os.getpid(), target)  # keyed by pid: a forked child must take the file lock itself
    with _LOCK_STATES_GUARD:
        state = _LOCK_STATES.setdefault(key, _ProcessLockState())
    started = time.monotonic()  # real time on purpose: the wait is real even when a test fakes the timer
    with state.thread_lock:
        if state.depth == 0:
            state.fd = _acquire_file_lock(target)
        state.depth += 1
        waited = time.monotonic() - started
        if waited > 0.01:
            logger.info("waited %.2f s for the lock %s", waited, target)
        try:
            yield waited
        finally:
            state.depth -= 1
            if state.depth == 0 and state.fd is not None:
                fd, state.fd = state.fd, None
                _release_file_lock(fd)
