"""The session's view: gate evaluation per test, and the four JSON reports at the end.

Gates run where the test ran (an xdist worker, or the only process), and their results travel on the test report
(``user_properties``), so the controller sees every worker's gates without any side channel. Only the controller
writes files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from ryzen_opt.measure.stats import SpeedupMeasurement
from ryzen_opt.training.metrics import TrainingMetricsCollector
from ryzen_opt.validation.gates import METRICS
from ryzen_opt.validation.reports import SCHEMA_VERSION
from ryzen_opt.validation.validator import (
    OptimizationValidator,
    ValidationResult,
    ValidationStatus,
    check,
    is_failing,
    threshold_kind,
)

GATES_PROPERTY = "ryzen_gates"
RECORDS_PROPERTY = "ryzen_records"
TRACKED_PROPERTY = "ryzen_tracked"
# The status of a measurement no gate judges.
TRACKED = "TRACKED"
# The final report's file name is the project's (ini ``ryzen_final_report``); these are the other three.
REPORT_NAMES = ("validation_report", "integration_test_report", "training_metrics_report")
FINAL_REPORT = "final_report"

# The group of a gate recorded without ``optimizer=``.
UNGROUPED = "ungrouped"
# Keys a gate dict carries beyond its ValidationResult.
_GATE_ONLY = ("metric", "optimizer", "threshold_key", "baseline_compare", "xfail")


def marker_threshold(marker: pytest.Mark, thresholds: Any | None) -> float:
    """The number a threshold marker carries: ``@speedup(3.0)``, ``@speedup(min=3.0)`` or a profile key.

    Raises:
        pytest.UsageError: wrong arguments; the message names the marker and what it accepts.
    """
    name = marker.name
    key = "max" if METRICS[name].comparison == "max" else "min"
    kwargs = dict(marker.kwargs)
    unknown = sorted(set(kwargs) - {key})
    if unknown:
        raise pytest.UsageError(f"@{name}: unknown argument(s) {unknown}; use @{name}(<number>) or @{name}({key}=...)")
    args = list(marker.args)
    if key in kwargs:
        args.append(kwargs[key])
    if len(args) != 1:
        raise pytest.UsageError(
            f"@{name} takes exactly one threshold, got {len(args)} ({marker.args!r}, {marker.kwargs!r}); "
            f"e.g. @{name}({'0.01' if key == 'max' else '3.0'}) or a thresholds-profile key"
        )
    value = args[0]
    if isinstance(value, str) and _is_number(value):
        raise pytest.UsageError(
            f"@{name}({value!r}): a number in quotes; write @{name}({value}) (a string names a thresholds-profile key)"
        )
    if isinstance(value, str):
        if thresholds is None:
            raise pytest.UsageError(f"@{name}({value!r}): a profile key needs a thresholds profile")
        if thresholds.get(value) is None:
            allowed = ", ".join(thresholds.to_dict())
            raise pytest.UsageError(f"@{name}({value!r}): no such threshold; the profile has {allowed}")

        kind = threshold_kind(value)
        if kind != name:
            raise pytest.UsageError(
                f"@{name}({value!r}): that profile key is a {kind} threshold, not a {name} one; "
                f"use a key of the {name} kind"
            )
        value = thresholds.get(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise pytest.UsageError(f"@{name}({value!r}): the threshold must be a positive finite number")
    if name in ("accuracy_loss", "memory_reduction") and value >= 1:
        # 1 would mean 100%: almost always a percentage written as a number ("1" for 1%), so refused.
        raise pytest.UsageError(f"@{name}({value!r}): a fraction below 1, and 0.01 means 1%")
    if name == "acceptance_rate" and value > 1:
        raise pytest.UsageError(f"@{name}({value!r}): a fraction, so at most 1 (0.6 means 60%)")
    return float(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def threshold_markers(item: pytest.Item) -> list[pytest.Mark]:
    return [m for name in METRICS for m in [item.get_closest_marker(name)] if m is not None]


def evaluate_gates(
    item: pytest.Item,
    records: list[dict[str, Any]],
    thresholds: Any | None,
    device: str | None,
    *,
    disabled: bool = False,
) -> list[dict[str, Any]]:
    """Check each threshold marker of ``item`` against the matching records; one result dict per check. Under
    ``disabled`` (``--ryzen-disable``) a speedup gate is SKIPPED: nothing was timed."""
    results: list[dict[str, Any]] = []
    for marker in threshold_markers(item):
        threshold = marker_threshold(marker, thresholds)
        matching = [r for r in records if r["metric"] == marker.name]
        if not matching:
            skipped = disabled and marker.name == "speedup"
            comparison, unit = METRICS[marker.name].comparison, METRICS[marker.name].unit
            result = ValidationResult(
                name=item.nodeid,
                status=ValidationStatus.SKIPPED if skipped else ValidationStatus.FAIL,
                actual=None,
                expected=threshold,
                tolerance=None,
                ci_low=None,
                ci_high=None,
                n=None,
                unit=unit,
                comparison=comparison,
                baseline=None,
                device=device,
                message=(
                    f"@{marker.name}({threshold:g}) not timed: --ryzen-disable runs each arm once"
                    if skipped
                    else f"@{marker.name}({threshold:g}) but the test recorded no {marker.name} measurement: call "
                    f"{_how_to_record(marker.name)} in the test"
                ),
                reason="--ryzen-disable" if skipped else "no measurement recorded",
                details={"metric": marker.name},
            )
            results.append(result.to_dict() | {"metric": marker.name, "optimizer": UNGROUPED})
            continue
        for record in matching:
            if record.get("finite") is False:
                measurement: Any = float("nan")
            elif "measurement" in record and marker.name == "speedup":
                measurement = SpeedupMeasurement.from_dict(record["measurement"])
            elif record.get("ci_low") is not None:
                measurement = {k: record.get(k) for k in ("value", "ci_low", "ci_high", "n")}
            else:
                measurement = record["value"]
            result = check(
                item.nodeid, marker.name, measurement, threshold, baseline=record.get("baseline"), device=device
            )
            data = result.to_dict()
            if isinstance(measurement, SpeedupMeasurement) and measurement.oversubscribed:
                data["message"] = f"{data['message']} [oversubscribed: {measurement.oversubscribed}]"
            data["metric"] = marker.name
            data["optimizer"] = record.get("optimizer") or UNGROUPED
            key = profile_key(marker)
            if key is not None:
                data["threshold_key"] = key
            if record.get("details"):
                data["details"] = {**(data.get("details") or {}), **record["details"]}
            results.append(data)
    return results


def tracked_entries(item: pytest.Item, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The measurements no threshold marker of ``item`` judges: kept as TRACKED entries (the reports list them,
    baselines store and compare them) instead of vanishing because no gate asked for them."""
    gated = {m.name for m in threshold_markers(item)}
    return [
        {
            "name": item.nodeid,
            "metric": r["metric"],
            "status": TRACKED,
            "actual": r.get("value"),
            "expected": None,
            "ci_low": r.get("ci_low"),
            "ci_high": r.get("ci_high"),
            "n": r.get("n"),
            "unit": r.get("unit") or METRICS[r["metric"]].unit,
            "comparison": METRICS[r["metric"]].comparison,
            "baseline": r.get("baseline"),
            "optimizer": r.get("optimizer") or UNGROUPED,
            "details": r.get("details") or {},
            "message": f"tracked (no @{r['metric']} gate): {r.get('value')}",
        }
        for r in records
        if r["metric"] not in gated
    ]


def _how_to_record(metric: str) -> str:
    return {
        "speedup": "ryzen.compare(baseline, candidate)",
        "accuracy_loss": "ryzen.record_accuracy(reference, candidate, data)",
        "compression_ratio": "ryzen.record_compression(original_bytes, compressed_bytes)",
        "memory_reduction": "ryzen.record_memory(baseline_bytes, optimized_bytes)",
        "acceptance_rate": "ryzen.record_acceptance(accepted, proposed)",
    }[metric]


def profile_key(marker: pytest.Mark) -> str | None:
    """The thresholds-profile key a marker names (``@speedup("kernel_speedup")``), or ``None`` for a number."""
    return next((a for a in (*marker.args, *marker.kwargs.values()) if isinstance(a, str)), None)


@dataclass
class TestCase:
    name: str
    module: str
    status: str = "PASSED"
    duration_sec: float = 0.0
    gates: list[dict[str, Any]] = field(default_factory=list)
    tracked: list[dict[str, Any]] = field(default_factory=list)
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "status": self.status,
            "duration_sec": round(self.duration_sec, 6),
            "gates": self.gates,
            "tracked": self.tracked,
            "message": self.message,
        }


class RyzenSession:
    """Everything the session measured, assembled from test reports (which xdist forwards to the controller)."""

    def __init__(self, gate_mode: str) -> None:
        self.gate_mode = gate_mode
        self.cases: dict[str, TestCase] = {}
        self.training: list[dict[str, Any]] = []
        self.used = False  # any ryzen fixture or gate seen: only then are reports written by default
        self.started = datetime.now(timezone.utc)
        self.written: Path | None = None
        self.history: Path | None = None  # this run's numbered copy of the reports
        self.write_error: str | None = None  # why the reports could not be written, said in the terminal summary
        self.saved: Path | None = None

    def add_report(self, report: pytest.TestReport) -> None:
        case = self.cases.get(report.nodeid)
        if case is None:
            module = report.nodeid.split("::")[0]
            case = self.cases[report.nodeid] = TestCase(name=report.nodeid, module=module)
        case.duration_sec += float(getattr(report, "duration", 0.0) or 0.0)
        for key, value in report.user_properties:
            if key == GATES_PROPERTY:
                case.gates.extend(value)
                self.used = True
            elif key == TRACKED_PROPERTY:
                case.tracked.extend(value)
                self.used = True
            elif key == RECORDS_PROPERTY:
                self.used = True
        wasxfail = hasattr(report, "wasxfail")
        if report.when == "call" and wasxfail and report.skipped:
            for gate in case.gates:  # an expected failure the project accepted: listed, not counted against it
                gate["xfail"] = str(report.wasxfail) or "xfail"
        if report.when == "setup":
            if report.failed:
                case.status, case.message = "ERROR", _short(report)
            elif report.skipped:
                case.status = "SKIPPED"
        elif report.when == "call":
            if wasxfail:
                case.status = "XFAILED" if report.skipped else "XPASSED"
            elif report.failed:
                case.status, case.message = "FAILED", _short(report)
            elif report.skipped:
                case.status = "SKIPPED"
        elif report.when == "teardown" and report.failed and case.status in ("PASSED", "SKIPPED"):
            case.status, case.message = "ERROR", _short(report)

    def gates(self) -> list[dict[str, Any]]:
        return [g for case in self.cases.values() for g in case.gates]

    def tracked(self) -> list[dict[str, Any]]:
        return [t for case in self.cases.values() for t in case.tracked]

    # -- reports -----------------------------------------------------------------------------------------------
    def build_reports(
        self, environment: dict[str, Any], thresholds: Any | None, parts: list[str], final_name: str = FINAL_REPORT
    ) -> dict[str, dict[str, Any]]:
        """Every report this session has content for, by name: no training report unless a test recorded training
        metrics. ``thresholds`` is the profile when one was given or named by a gate, else ``None`` (and the reports
        carry none); ``parts`` are the groups the final report needs measured (the ``ryzen_parts`` ini value and
        every ``pytest_ryzen_report_parts`` hook); ``final_name`` is its file name (ini ``ryzen_final_report``)."""
        built = {
            "validation_report": self._validation_report(environment, thresholds),
            "integration_test_report": self._integration_report(environment),
        }
        if self.training:
            built["training_metrics_report"] = self._training_report(environment)
        built[final_name] = self._final_report(environment, thresholds, parts)
        return built

    def _validation_report(self, environment: dict[str, Any], thresholds: Any | None) -> dict[str, Any]:
        validator = OptimizationValidator(thresholds)
        for gate in self.gates():
            result = ValidationResult.from_dict({k: v for k, v in gate.items() if k not in _GATE_ONLY})
            # Metric, group and any baseline comparison stay with the result: `ryzen-opt report merge` reads them.
            kept = ("metric", "optimizer", "baseline_compare", "xfail")
            extra = {k: gate[k] for k in kept if gate.get(k) is not None}
            result.details = {**result.details, **extra}
            validator.add(result)
        report = validator.report_dict(environment=environment)
        report["gate_mode"] = self.gate_mode
        report["tracked"] = self.tracked()
        if thresholds is None:  # no profile in play: the gates' own numbers are the thresholds
            report["thresholds"] = None
        return report

    def _integration_report(self, environment: dict[str, Any]) -> dict[str, Any]:
        cases = list(self.cases.values())
        counts = {s: sum(c.status == s for c in cases) for s in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
        ran = len(cases) - counts["SKIPPED"]
        return {
            "schema_version": _schema_version(),
            "summary": {
                "total_tests": len(cases),
                "passed": counts["PASSED"],
                "failed": counts["FAILED"],
                "skipped": counts["SKIPPED"],
                "errors": counts["ERROR"],
                "pass_rate": (counts["PASSED"] / ran) if ran else None,
                "total_duration_sec": round(sum(c.duration_sec for c in cases), 6),
                "gates": len(self.gates()),
            },
            "test_cases": [c.to_dict() for c in sorted(cases, key=lambda c: c.name)],
            "gate_mode": self.gate_mode,
            "environment": environment,
        }

    def _training_report(self, environment: dict[str, Any]) -> dict[str, Any]:
        merged = TrainingMetricsCollector(experiment_id="pytest-session")
        for data in self.training:
            merged.merge(TrainingMetricsCollector.from_dict(data))
        report = merged.to_dict()
        report["environment"] = environment
        return report

    def _final_report(self, environment: dict[str, Any], thresholds: Any | None, parts: list[str]) -> dict[str, Any]:
        """COMPLETE when at least one gate was measured, every declared part has a gate, and no gate or test failed.

        ``results`` groups the gates by the ``optimizer=`` their measurement was recorded with (``"ungrouped"``
        without one), then by metric. Gates that recorded nothing (a FAIL, or a SKIPPED verdict under
        ``--ryzen-gate=report``) are listed in ``unmeasured``."""
        gates = self.gates()
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for gate in gates:
            entry = {
                "value": gate.get("actual"),
                "target": gate.get("expected"),
                "comparison": gate.get("comparison"),
                "status": gate.get("status"),
                "ci_low": gate.get("ci_low"),
                "ci_high": gate.get("ci_high"),
                "n": gate.get("n"),
                "baseline": gate.get("baseline"),
                "test": gate.get("name"),
            }
            group = gate.get("optimizer") or UNGROUPED
            results.setdefault(group, {}).setdefault(gate["metric"], []).append(entry)
        reasons = [
            f"{g.get('name')}: {g.get('metric')} {g.get('status')}: {g.get('message')}"
            for g in gates
            if g.get("status") not in ("PASS", "WARNING") and not g.get("xfail")
        ]
        reasons += [f"{c.name}: {c.status}" for c in self.cases.values() if c.status in ("FAILED", "ERROR")]
        measured = {g.get("optimizer") for g in gates if g.get("actual") is not None}
        reasons += [f"no {part} gate was measured in this session" for part in parts if part not in measured]
        if not gates:
            reasons.append("no gate was measured in this session (mark a test with a threshold marker)")
        report: dict[str, Any] = {
            "schema_version": _schema_version(),
            "status": "INCOMPLETE" if reasons else "COMPLETE",
            "incomplete_reasons": reasons,
            "completion_timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parts": list(parts) or sorted(results),
            "results": results,
            "unmeasured": [
                {"test": g.get("name"), "metric": g.get("metric"), "status": g.get("status")}
                for g in gates
                if g.get("actual") is None
            ],
            "expected_failures": [
                {"test": g.get("name"), "metric": g.get("metric"), "status": g.get("status"), "reason": g["xfail"]}
                for g in gates
                if g.get("xfail")
            ],
            "tracked": [
                {
                    "test": t["name"],
                    "metric": t["metric"],
                    "value": t["actual"],
                    "ci_low": t["ci_low"],
                    "ci_high": t["ci_high"],
                    "optimizer": t["optimizer"],
                }
                for t in self.tracked()
            ],
            "gate_mode": self.gate_mode,
            "environment": environment,
        }
        if thresholds is not None:
            report["thresholds"] = thresholds.to_dict()
        return report


def _short(report: pytest.TestReport) -> str:
    text = str(report.longrepr) if report.longrepr is not None else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else report.outcome


def _schema_version() -> str:
    return SCHEMA_VERSION


def iter_gate_failures(gates: Iterable[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    return [
        g
        for g in gates
        if is_failing(ValidationResult.from_dict({k: v for k, v in g.items() if k not in _GATE_ONLY}), mode)
    ]
