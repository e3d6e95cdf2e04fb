"""The orchestrator behind ``ryzen-opt run``: setup -> training -> validation -> testing -> final report.

Each stage is a function of the run context that returns what it measured. A failed stage marks the final report
INCOMPLETE with the reason, later stages are SKIPPED, and the report still holds everything measured before. Ctrl-C
is a failure too ("interrupted"): the final report is written (atomically, as every report is) before the run exits,
so no report is ever left half-written.

The config is :mod:`ryzen_opt.run.config`; each stage is a module of its own (``setup``, ``training``, ``validation``,
``testing``) and :mod:`ryzen_opt.run.report` writes the final report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.run.config import RunConfig
from ryzen_opt.run.context import RunContext, StageResult, StageStatus
from ryzen_opt.run.report import write_final_report
from ryzen_opt.run.setup import run_setup
from ryzen_opt.run.testing import run_testing
from ryzen_opt.run.training import run_training
from ryzen_opt.run.validation import run_validation
from ryzen_opt.training import distributed

logger = logging.getLogger(__name__)


StageFn = Callable[[RunContext], dict[str, Any]]
STAGES: list[tuple[str, StageFn]] = [
    ("setup", run_setup),
    ("training", run_training),
    ("validation", run_validation),
    ("testing", run_testing),
]


def run_pipeline(
    config: RunConfig,
    progress: Callable[[StageResult], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every stage in order and write ``phase2_final_report.json`` (and its Markdown summary with plots).

    Returns the final report as a dict. Its ``status`` is COMPLETE only when every stage ran and succeeded and every
    validated gate passed. A KeyboardInterrupt is recorded as the running stage's failure, the report is written,
    and the interrupt is re-raised.
    """
    ctx = RunContext(config=config, progress=say)
    try:
        ctx.dist = distributed.env_info()  # the rank is known before the group is joined: rank 0 alone writes
    except ConfigError:
        pass  # setup's distributed.start raises it again, as that stage's failure
    failed = False
    interrupted: KeyboardInterrupt | None = None
    outcome: dict[str, Any] = {"status": "FAILED", "reason": "rank 0 stopped before its final report"}
    try:
        for name, fn in STAGES:
            start = time.perf_counter()
            if failed or interrupted is not None:
                result = StageResult(name, StageStatus.SKIPPED, reason="an earlier stage failed or was interrupted")
            elif name in _MAIN_ONLY and not ctx.dist.is_main:
                result = StageResult(name, StageStatus.SKIPPED, reason=f"rank {ctx.dist.rank}: rank 0 runs {name}")
            else:
                try:
                    data = fn(ctx)
                    result = StageResult(name, StageStatus.DONE, time.perf_counter() - start, data=data)
                except RyzenOptError as exc:
                    failed = True
                    result = StageResult(name, StageStatus.FAILED, time.perf_counter() - start, reason=str(exc))
                    logger.error("stage %s failed: %s", name, exc)
                except KeyboardInterrupt as exc:
                    interrupted = exc
                    result = StageResult(
                        name, StageStatus.FAILED, time.perf_counter() - start, reason="interrupted (Ctrl-C)"
                    )
                if ctx.dist.active and name not in _MAIN_ONLY and interrupted is None:
                    # Every rank joins training's collectives: all must have got through this stage, or none goes on.
                    failed = _ranks_disagree(ctx, name, result) or failed
            ctx.results[name] = result
            if progress is not None and ctx.dist.is_main:
                progress(result)
        if not ctx.dist.is_main:
            return _wait_for_main(ctx)
        report = write_final_report(ctx)
        outcome = {
            "status": report["status"],
            "failed": [s["name"] for s in report["stages"] if s["status"] == "FAILED"],
        }
    finally:
        if ctx.dist.active and ctx.dist.is_main and distributed.joined():
            try:
                distributed.release(ctx.dist, outcome)
            except distributed.RankFailedError as exc:  # a rank that died is not waiting any more
                logger.warning("%s", exc)
        distributed.shutdown()
    if interrupted is not None:
        raise interrupted
    return report


# Stages rank 0 runs alone under torchrun; the other ranks wait for its outcome.
_MAIN_ONLY = frozenset(("validation", "testing"))


def _ranks_disagree(ctx: RunContext, name: str, result: StageResult) -> bool:
    """Whether any rank failed ``name`` (then this one fails it too, with the reason), after one collective."""
    ok = result.status is StageStatus.DONE
    try:
        every = distributed.agree(ctx.dist, ok, f"checking that every rank finished {name}")
    except distributed.RankFailedError as exc:
        every, reason = False, str(exc)
    else:
        reason = f"another rank failed its {name} (its log says why)"
    if ok and not every:
        result.status, result.reason = StageStatus.FAILED, reason
    return not every


def _wait_for_main(ctx: RunContext) -> dict[str, Any]:
    """Ranks 1..: wait while rank 0 validates, tests and writes the final report; return its outcome (no files)."""
    logger.info("rank %d: waiting for rank 0's validation and testing", ctx.dist.rank)
    try:
        outcome = distributed.wait_for_main(ctx.dist)
    except distributed.RankFailedError as exc:
        outcome = {"status": "FAILED", "reason": str(exc)}
    stages = [r.to_dict() for r in ctx.results.values()]
    failed = [s["name"] for s in stages if s["status"] == "FAILED"] + list(outcome.get("failed", []))
    return {
        "status": outcome.get("status", "FAILED"),
        "rank": ctx.dist.rank,
        "stages": stages,
        "failed": failed,
        "path": None,
        "incomplete_reasons": [outcome["reason"]] if outcome.get("reason") else [],
    }
