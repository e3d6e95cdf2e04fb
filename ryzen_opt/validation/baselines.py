"""Baselines across runs: a session's gate measurements saved under a name, compared with a later session's.

pytest-benchmark's ``--benchmark-autosave`` / ``--benchmark-compare`` for gates, with two differences that matter
for optimizations:

- What is compared is the gate's own measurement, a *ratio measured in one process* (a speedup against its baseline
  arm, a compression ratio, an accuracy loss), never raw seconds: a runner that is 20% slower today slows both arms
  and leaves the speedup where it was, so machine drift does not read as a regression.
- A regression is decided with both confidence intervals: a measurement with an interval regressed when the new
  interval lies entirely on the worse side of the stored one (they do not overlap). That is conservative on purpose:
  two runs of the same code almost never produce disjoint 95% intervals, while a real 3x regression always does.
  A measurement without an interval (bytes counted, not timed) regressed when it is worse by more than 1% of the
  stored value (or 0.001, for values near zero).

Baselines live in ``.ryzen/<name>.json`` at the project's root, written atomically, with the machine and the commit
they were measured on. A comparison against a baseline from another machine still runs (ratios travel better than
times), and says that the machines differ.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ryzen_opt.errors import ConfigError
from ryzen_opt.validation.reports import SCHEMA_VERSION, atomic_write_json

BASELINE_DIR = ".ryzen"
FORMAT = "ryzen-baseline/1"
LATEST = "latest"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Without intervals: worse by more than this fraction of the stored value (or _ABS_TOLERANCE) is a regression.
REL_TOLERANCE = 0.01
_ABS_TOLERANCE = 1e-3
# The facts that make two machines "the same" for a comparison (the rest of the environment is informative).
MACHINE_KEYS = ("device", "device_name", "cpu_capability", "usable_cpus", "threads", "torch")

REGRESSED, IMPROVED, SAME, NEW, GONE = "REGRESSED", "IMPROVED", "SAME", "NEW", "GONE"


def check_name(name: str) -> str:
    """A baseline name is a file name: letters, digits, ``.``, ``_``, ``-``; ``latest`` is reserved for loading."""
    if not _NAME.match(name) or name == LATEST or name.endswith(".json"):
        raise ConfigError(
            f"baseline name {name!r}: use letters, digits, '.', '_' and '-' (e.g. main, v0.3.0, pr-123); "
            f"'{LATEST}' is reserved for --ryzen-compare"
        )
    return name


def machine_facts(environment: Mapping[str, Any]) -> dict[str, Any]:
    """What a baseline records about the machine (from :func:`ryzen_opt.validation.reports.environment`)."""
    cpu = environment.get("cpu") or {}
    return {
        "device": environment.get("device"),
        "device_name": environment.get("device_name"),
        "cpu_capability": cpu.get("torch_cpu_capability"),
        "usable_cpus": cpu.get("usable_cpus"),
        "threads": (environment.get("threads") or {}).get("torch_intra_op"),
        "torch": (environment.get("versions") or {}).get("torch"),
        "platform": environment.get("platform"),
    }


def machine_mismatch(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["device_name: 'AMD EPYC' then, 'Intel Xeon' now", ...]`` for each fact in :data:`MACHINE_KEYS` that
    differs; empty when the machines match."""
    return [
        f"{key}: {stored.get(key)!r} then, {current.get(key)!r} now"
        for key in MACHINE_KEYS
        if stored.get(key) != current.get(key)
    ]


def entry_from_gate(gate: Mapping[str, Any]) -> dict[str, Any]:
    """One stored measurement: a gate result (the plugin's gate dict, or a validation report's result)."""
    details = gate.get("details") or {}
    return {
        "test": gate.get("name"),
        "metric": gate.get("metric") or details.get("metric"),
        "group": gate.get("optimizer") or details.get("optimizer"),
        "value": gate.get("actual"),
        "ci_low": gate.get("ci_low"),
        "ci_high": gate.get("ci_high"),
        "n": gate.get("n"),
        "comparison": gate.get("comparison", "min"),
        "threshold": gate.get("expected"),
        "status": gate.get("status"),
        "unit": gate.get("unit", ""),
    }


def save(root: str | Path, name: str, gates: Iterable[Mapping[str, Any]], environment: Mapping[str, Any]) -> Path:
    """Write ``<root>/.ryzen/<name>.json`` atomically: every measured gate, the machine and the commit."""

    check_name(name)
    entries = [entry_from_gate(g) for g in gates]
    data = {
        "format": FORMAT,
        "name": name,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": environment.get("git_sha"),
        "machine": machine_facts(environment),
        "entries": [e for e in entries if e["value"] is not None],
    }
    return atomic_write_json(Path(root) / BASELINE_DIR / f"{name}.json", data)


def available(root: str | Path) -> list[str]:
    """Names of the baselines saved under ``root``, oldest first."""
    folder = Path(root) / BASELINE_DIR
    found = []
    for path in folder.glob("*.json"):
        try:
            found.append((_read(path)["saved_at"], path.stat().st_mtime_ns, path.stem))
        except ConfigError:
            continue
    return [name for *_, name in sorted(found)]


def load(root: str | Path, which: str) -> dict[str, Any]:
    """A saved baseline: by name (under ``<root>/.ryzen``), ``latest`` (the most recently saved), or a path.

    Raises:
        ConfigError: no such baseline (the message lists the saved ones), or a file that is not one.
    """
    if which == LATEST:
        names = available(root)
        if not names:
            raise ConfigError(
                f"no baseline saved under {Path(root) / BASELINE_DIR}: save one first with --ryzen-save=NAME"
            )
        which = names[-1]
    path = Path(which)
    if not (path.suffix == ".json" and path.is_file()):
        path = Path(root) / BASELINE_DIR / f"{which}.json"
    if not path.is_file():
        names = available(root)
        listing = ", ".join(names) if names else "none yet (save one with --ryzen-save=NAME)"
        raise ConfigError(f"no baseline {which!r} under {Path(root) / BASELINE_DIR}; saved: {listing}")
    return _read(path)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable baseline: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise ConfigError(f"{path} is not a ryzen baseline (format {FORMAT!r}); save one with --ryzen-save=NAME")
    return data


@dataclass(frozen=True)
class Comparison:
    """One measurement now against the same test's stored one."""

    test: str
    metric: str
    verdict: str  # REGRESSED, IMPROVED, SAME, NEW (nothing stored), GONE (nothing measured now)
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    how: str  # how the verdict was decided, in words

    @property
    def ratio(self) -> float | None:
        """New value over stored value (``None`` when either is missing or the stored one is 0)."""
        if not self.old or not self.new or not self.old.get("value") or self.new.get("value") is None:
            return None
        return float(self.new["value"]) / float(self.old["value"])

    def message(self, baseline: str) -> str:
        return (
            f"{self.metric} {self.verdict.lower()} against baseline {baseline!r}: now {_fmt(self.new)}, "
            f"then {_fmt(self.old)} ({self.how})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "metric": self.metric,
            "verdict": self.verdict,
            "old": self.old,
            "new": self.new,
            "ratio": self.ratio,
            "how": self.how,
        }


def _fmt(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    text = f"{entry['value']:.4g}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{entry['ci_low']:.4g}, {entry['ci_high']:.4g}]"
    return text


def compare_entry(old: Mapping[str, Any], new: Mapping[str, Any]) -> Comparison:
    """The verdict for one measurement (see the module docstring for the rule)."""
    test, metric = str(new.get("test")), str(new.get("metric"))
    higher_is_better = new.get("comparison", "min") == "min"
    if any(e.get("value") is None for e in (old, new)):
        return Comparison(test, metric, SAME, dict(old), dict(new), "nothing to compare")
    has_ci = all(e.get(k) is not None for e in (old, new) for k in ("ci_low", "ci_high"))
    if has_ci:
        new_worse = new["ci_high"] < old["ci_low"] if higher_is_better else new["ci_low"] > old["ci_high"]
        new_better = new["ci_low"] > old["ci_high"] if higher_is_better else new["ci_high"] < old["ci_low"]
        how = "the 95% intervals do not overlap" if new_worse or new_better else "the 95% intervals overlap"
    else:
        tolerance = max(abs(float(old["value"])) * REL_TOLERANCE, _ABS_TOLERANCE)
        delta = float(new["value"]) - float(old["value"])
        gain = delta if higher_is_better else -delta
        new_worse, new_better = gain < -tolerance, gain > tolerance
        how = f"no intervals: a change beyond {tolerance:.3g} counts"
    verdict = REGRESSED if new_worse else IMPROVED if new_better else SAME
    return Comparison(test, metric, verdict, dict(old), dict(new), how)


def compare(
    stored: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]], *, gone: bool = True
) -> list[Comparison]:
    """Pair stored and current entries by (test, metric, occurrence) and compare each pair; unpaired current entries
    are NEW, unpaired stored ones GONE (when ``gone``: a partial run, ``-k``, should not list what it skipped)."""
    by_key: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for entry in stored:
        by_key.setdefault((str(entry.get("test")), str(entry.get("metric"))), []).append(entry)
    used: dict[tuple[str, str], int] = {}
    out: list[Comparison] = []
    for entry in current:
        key = (str(entry.get("test")), str(entry.get("metric")))
        i = used.get(key, 0)
        used[key] = i + 1
        olds = by_key.get(key, [])
        if i < len(olds):
            out.append(compare_entry(olds[i], entry))
        else:
            out.append(Comparison(key[0], key[1], NEW, None, dict(entry), "not in the baseline"))
    if gone:
        for key, olds in by_key.items():
            for old in olds[used.get(key, 0) :]:
                out.append(Comparison(key[0], key[1], GONE, dict(old), None, "not measured in this run"))
    return out


def table(comparisons: Sequence[Comparison]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a comparison table (the CLI and the plugin print the same one)."""
    header = ["test", "metric", "then [95% CI]", "now [95% CI]", "now/then", "verdict"]
    rows = [
        [
            c.test,
            c.metric,
            _fmt(c.old),
            _fmt(c.new),
            "-" if c.ratio is None or not math.isfinite(c.ratio) else f"{c.ratio:.3f}",
            c.verdict,
        ]
        for c in comparisons
    ]
    return header, rows


# -- reports from other runs: `ryzen-opt report compare` and `ryzen-opt report merge` --------------------------------


def entries_from_source(root: str | Path, source: str) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """``(label, entries, machine)`` from a saved baseline (name, ``latest`` or path) or a report directory (its
    ``validation_report.json``, as the plugin writes it).

    Raises:
        ConfigError: neither a baseline nor a report directory.
    """
    path = Path(source)
    if path.is_dir():
        report = _validation_report(path)
        entries = [entry_from_gate(r) for r in report.get("results", []) if r.get("actual") is not None]
        return str(path), entries, machine_facts(report.get("environment") or {})
    data = load(root, source)
    return str(data.get("name", source)), list(data["entries"]), dict(data.get("machine") or {})


def _validation_report(folder: Path) -> dict[str, Any]:
    path = folder / "validation_report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{folder} has no readable validation_report.json ({exc}): give a directory the pytest plugin wrote "
            "reports into (--ryzen-report-dir), or a saved baseline"
        ) from exc


def _final_report(folder: Path) -> dict[str, Any] | None:
    """The final report in ``folder``: ``final_report.json``, else any report with a status and results."""
    candidates = [folder / "final_report.json", *sorted(folder.glob("*.json"))]
    for path in candidates:
        if path.name == "validation_report.json" or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "status" in data and "results" in data and "incomplete_reasons" in data:
            return data
    return None


def merge(folders: Sequence[str | Path]) -> tuple[dict[str, Any], list[str], list[list[str]]]:
    """Merge the report directories of a CI matrix (one per runner: cpu, cuda, rocm, ...).

    Returns ``(final_report, header, rows)``: one final report (COMPLETE only when every run's was; each run's groups
    become ``"<run>:<group>"``; ``sources`` says which machine each run was) and one table, a row per test and
    metric, a column per run.

    Raises:
        ConfigError: fewer than one directory, or one without reports.
    """

    if not folders:
        raise ConfigError("report merge needs at least one report directory")
    paths = [Path(f) for f in folders]
    names = [p.name or str(p) for p in paths]
    labels = [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]
    sources, results, reasons, parts = [], {}, [], []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    statuses = []
    for label, folder in zip(labels, paths, strict=True):
        validation = _validation_report(folder)
        final = _final_report(folder)
        env = validation.get("environment") or {}
        status = final["status"] if final else "INCOMPLETE"
        statuses.append(status)
        sources.append(
            {
                "label": label,
                "dir": str(folder),
                "device": env.get("device"),
                "device_name": env.get("device_name"),
                "git_sha": env.get("git_sha"),
                "status": status,
            }
        )
        if final is None:
            reasons.append(f"{label}: no final report in {folder}")
        else:
            reasons += [f"{label}: {r}" for r in final.get("incomplete_reasons", [])]
            for group, metrics in (final.get("results") or {}).items():
                results[f"{label}:{group}"] = metrics
            parts += [f"{label}:{p}" for p in final.get("parts", [])]
        for result in validation.get("results", []):
            metric = (result.get("details") or {}).get("metric") or result.get("unit") or "?"
            entry = entry_from_gate(result)
            cells.setdefault((str(result.get("name")), str(metric)), {})[label] = (
                f"{_fmt(entry)} {result.get('status')}"
            )
    merged = {
        "schema_version": SCHEMA_VERSION,
        "status": "COMPLETE" if statuses and all(s == "COMPLETE" for s in statuses) else "INCOMPLETE",
        "incomplete_reasons": reasons,
        "completion_timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parts": parts,
        "results": results,
        "unmeasured": [],
        "gate_mode": "strict",
        "environment": {"device": ",".join(str(s["device"]) for s in sources), "versions": {}, "merged": True},
        "sources": sources,
    }
    header = ["test", "metric", *labels]
    rows = [[test, metric, *(cells[(test, metric)].get(label, "-") for label in labels)] for test, metric in cells]
    return merged, header, rows
