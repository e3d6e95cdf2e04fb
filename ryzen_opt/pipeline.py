"""The orchestrator behind ``ryzen-opt run``: setup -> training -> validation -> testing -> final report.

Each stage is a function that takes the run context and returns what it measured. A stage that is not built yet is
reported as NOT_BUILT with that reason; it never pretends to have run. A failed stage marks the final report
INCOMPLETE and the report still holds everything measured before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.reports import SCHEMA_VERSION, atomic_write_json, environment

logger = logging.getLogger(__name__)


class StageStatus(str, Enum):
    DONE = "DONE"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    NOT_BUILT = "NOT_BUILT"


@dataclass(frozen=True)
class RunConfig:
    """What ``ryzen-opt run`` does. Every field has a default, so the embedded default needs no file.

    Attributes:
        device: ``auto``, ``cpu``, ``cuda``, ``rocm`` or ``mps`` (see ``ryzen_opt.device.resolve_device``).
        output_dir: where the four JSON reports go.
        zoo_recipe: the reference-model recipe the training stage trains (``default`` or ``tiny``).
    """

    device: str = "auto"
    output_dir: str = "ryzen_results"
    zoo_recipe: str = "default"

    def __post_init__(self) -> None:
        from ryzen_opt.device import DEVICE_CHOICES

        if self.device.split(":")[0] not in DEVICE_CHOICES:
            raise ConfigError(f"config key 'device' = {self.device!r}: allowed values are {', '.join(DEVICE_CHOICES)}")
        if not self.output_dir:
            raise ConfigError("config key 'output_dir' must be a non-empty path")
        if self.zoo_recipe not in ("default", "tiny"):
            raise ConfigError(f"config key 'zoo_recipe' = {self.zoo_recipe!r}: allowed values are 'default', 'tiny'")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from a parsed TOML table; unknown keys and wrong types are errors that name the key."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}: allowed keys are {', '.join(known)}"
            )
        for key, value in data.items():
            if not isinstance(value, str):
                raise ConfigError(f"config key {key!r} must be a string, got {type(value).__name__} {value!r}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a TOML file; a syntax error names the file and the line."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageResult:
    name: str
    status: StageStatus
    duration_s: float = 0.0
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "duration_s": round(self.duration_s, 3),
            "reason": self.reason,
            "data": self.data,
        }


@dataclass
class RunContext:
    config: RunConfig
    device: Any = None
    results: dict[str, StageResult] = field(default_factory=dict)


def _setup(ctx: RunContext) -> dict[str, Any]:
    from ryzen_opt.device import resolve_device

    ctx.device = resolve_device(ctx.config.device)
    return {"device": str(ctx.device)}


def _training(ctx: RunContext) -> dict[str, Any]:
    """Train (or load from cache) the zoo recipe; its training metrics land in the output directory."""
    import json
    import shutil

    from ryzen_opt import zoo

    path = zoo.build(ctx.config.zoo_recipe)
    out = Path(ctx.config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The metrics were measured when the zoo was trained (possibly in an earlier run: then the report says when).
    shutil.copyfile(path / "training_metrics_report.json", out / ".training_metrics_report.json.tmp")
    (out / ".training_metrics_report.json.tmp").replace(out / "training_metrics_report.json")
    build = json.loads((path / "build.json").read_text())
    return {"zoo": str(path), "recipe": ctx.config.zoo_recipe, "build": build}


StageFn = Callable[[RunContext], dict[str, Any]]
# Stages in order. ``None`` marks a stage that is not built yet: it is reported as NOT_BUILT, never faked.
STAGES: list[tuple[str, StageFn | None, str]] = [
    ("setup", _setup, ""),
    ("training", _training, ""),
    ("validation", None, "the validation stage measures the optimizers, which are not built yet (issues #5-#9)"),
    ("testing", None, "the testing stage is not built yet (issue #9)"),
]


def run_pipeline(config: RunConfig, progress: Callable[[StageResult], None] | None = None) -> dict[str, Any]:
    """Run every stage in order and write ``phase2_final_report.json`` into ``config.output_dir``.

    Returns the final report as a dict. Its ``status`` is COMPLETE only when every stage ran and succeeded.
    """
    ctx = RunContext(config=config)
    failed = False
    for name, fn, reason in STAGES:
        start = time.perf_counter()
        if fn is None:
            result = StageResult(name, StageStatus.NOT_BUILT, reason=reason)
        elif failed:
            result = StageResult(name, StageStatus.SKIPPED, reason="an earlier stage failed")
        else:
            try:
                data = fn(ctx)
                result = StageResult(name, StageStatus.DONE, time.perf_counter() - start, data=data)
            except RyzenOptError as exc:
                failed = True
                result = StageResult(name, StageStatus.FAILED, time.perf_counter() - start, reason=str(exc))
                logger.error("stage %s failed: %s", name, exc)
        ctx.results[name] = result
        if progress is not None:
            progress(result)
    return write_final_report(ctx)


def write_final_report(ctx: RunContext) -> dict[str, Any]:
    stages = [r.to_dict() for r in ctx.results.values()]
    incomplete = [r for r in ctx.results.values() if r.status is not StageStatus.DONE]
    report = {
        "schema_version": SCHEMA_VERSION,
        "phase": "Phase 2: Core Optimizations",
        "status": "INCOMPLETE" if incomplete else "COMPLETE",
        "incomplete_reasons": [f"{r.name}: {r.status.value}: {r.reason}" for r in incomplete],
        "completion_timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": ctx.config.to_dict(),
        "stages": stages,
        "optimization_results": {},
        "e2e_results": {},
        "environment": environment(ctx.device),
    }
    path = Path(ctx.config.output_dir) / "phase2_final_report.json"
    atomic_write_json(path, report)
    report["path"] = str(path)
    return report
