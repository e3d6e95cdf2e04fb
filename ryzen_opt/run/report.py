"""The final report (``phase2_final_report.json``): every stage, every gate, and whether the run is COMPLETE."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from ryzen_opt.run.context import RunContext, StageStatus
from ryzen_opt.run.summary import write_summary
from ryzen_opt.validation.gates import CHECKS
from ryzen_opt.validation.reports import SCHEMA_VERSION, atomic_write_json, environment
from ryzen_opt.validation.validator import is_failing

logger = logging.getLogger(__name__)


def report_entries(validator: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    optimization: dict[str, dict[str, list[dict[str, Any]]]] = {}
    e2e: dict[str, list[dict[str, Any]]] = {}
    if validator is None:
        return optimization, e2e
    for r in validator.results:
        metric = CHECKS[r.name].metric
        entry = {
            "value": r.actual,
            "target": r.expected,
            "comparison": r.comparison,
            "status": r.status.value,
            "ci_low": r.ci_low,
            "ci_high": r.ci_high,
            "n": r.n,
            "baseline": r.baseline,
            "model": r.details.get("model"),
        }
        optimizer = r.details.get("optimizer", "e2e")
        if optimizer == "e2e":
            e2e.setdefault(metric, []).append(entry)
        else:
            optimization.setdefault(optimizer, {}).setdefault(metric, []).append(entry)
    return optimization, e2e


def write_final_report(ctx: RunContext) -> dict[str, Any]:

    stages = [r.to_dict() for r in ctx.results.values()]
    reasons = [
        f"{r.name}: {r.status.value}: {r.reason}" for r in ctx.results.values() if r.status is not StageStatus.DONE
    ]
    if ctx.validator is not None:
        reasons += [
            f"gate {r.name} ({r.details.get('model')}): {r.status.value}"
            for r in ctx.validator.results
            if is_failing(r, "strict")
        ]
    optimization, e2e = report_entries(ctx.validator)
    report = {
        "schema_version": SCHEMA_VERSION,
        "phase": "Phase 2: Core Optimizations",
        "status": "INCOMPLETE" if reasons else "COMPLETE",
        "incomplete_reasons": reasons,
        "completion_timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": ctx.config.to_dict(),
        "stages": stages,
        "optimization_results": optimization,
        "e2e_results": e2e,
        "environment": environment(ctx.device),
    }
    path = ctx.out / "phase2_final_report.json"
    atomic_write_json(path, report)
    try:
        report["summary_path"] = str(write_summary(report, ctx.out))
    except Exception as exc:  # noqa: BLE001 - the JSON report stands; the human summary says why it is missing
        logger.warning("no Markdown summary: %s", exc)
    report["path"] = str(path)
    return report
