"""Where the session's reports go, and the per-arm table the terminal shows.

Every run writes its reports at the top of the report directory (the latest, where tools and CI look) and a copy
into ``history/NNNN_<UTC time>/``, numbered like pytest-benchmark's autosave, so a run never erases the one before.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ryzen_opt.validation.reports import atomic_write_json

HISTORY = "history"
_NUMBERED = re.compile(r"^(\d{4,})_")


def unwritable(out: Path) -> str | None:
    """Why reports cannot be written into ``out`` (a file in the way, no permission), or ``None`` when they can."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe == out and not out.is_dir():
        return f"the report directory {out} is a file"
    if not probe.is_dir():
        return f"cannot create the report directory {out}: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot write into {out} ({probe} is not writable)"
    return None


def write_reports(out: Path, reports: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write each report as ``<out>/<name>.json`` and into the next numbered history folder; return that folder.
    Each file is written atomically (a temporary file renamed into place)."""
    folder = next_history_folder(out)
    for name, report in reports.items():
        atomic_write_json(out / f"{name}.json", report)
        atomic_write_json(folder / f"{name}.json", report)
    return folder


def next_history_folder(out: Path) -> Path:
    """``<out>/history/NNNN_<UTC time>``, one past the highest number there (0001 for the first run)."""
    history = out / HISTORY
    numbers = [int(m.group(1)) for p in history.glob("*") if (m := _NUMBERED.match(p.name))] if history.is_dir() else []
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return history / f"{max(numbers, default=0) + 1:04d}_{stamp}"


def arm_table(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """Per-arm statistics of every speedup measured (gated or tracked): median time per call, interquartile range,
    calls per sample and pairs, so that a ratio can be read against the two times it came from."""
    rows = []
    for entry in entries:
        details = entry.get("details") or {}
        if entry.get("metric") != "speedup" or "baseline_median_s" not in details:
            continue
        for arm in ("baseline", "candidate"):
            name = str(entry.get("baseline") if arm == "baseline" else details.get("candidate") or "candidate")
            rows.append(
                [
                    str(entry.get("name", "")).rsplit("::", 1)[-1] if arm == "baseline" else "",
                    f"{arm}: {name}"[:60],
                    _time(details.get(f"{arm}_median_s")),
                    _time(details.get(f"{arm}_iqr_s")),
                    str(details.get(f"{arm}_calls", "")),
                    str(entry.get("n", "")) if arm == "baseline" else "",
                ]
            )
    if not rows:
        return []
    header = ["test", "arm", "median/call", "IQR", "calls/sample", "pairs"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def _time(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"
