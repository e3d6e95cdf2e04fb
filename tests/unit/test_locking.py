"""ryzen_opt.locking.file_lock: the lock the zoo build and the perf sampler share."""

from __future__ import annotations

import threading
from pathlib import Path

from ryzen_opt.locking import file_lock


def test_creates_parent_directories_and_is_reentrant(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "x.lock"
    with file_lock(path) as outer:
        with file_lock(path) as inner:  # the same thread may nest (plugin around compare(lock=True))
            assert path.exists()
            assert inner >= 0.0
        assert outer >= 0.0


def test_excludes_other_threads(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    entered = threading.Event()

    def other() -> None:
        with file_lock(path):
            entered.set()

    with file_lock(path):
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.3), "a second thread entered while the lock was held"
    thread.join(timeout=10)
    assert entered.is_set()
