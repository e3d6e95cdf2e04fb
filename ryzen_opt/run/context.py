"""What the stages of ``ryzen-opt run`` share: the run context, and each stage's result."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ryzen_opt.run.config import RunConfig
from ryzen_opt.training import distributed

logger = logging.getLogger(__name__)


class StageStatus(str, Enum):
    DONE = "DONE"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    NOT_BUILT = "NOT_BUILT"


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
    target: Any = None
    draft: Any = None
    tokenizer: Any = None
    variants: Any = (
        None  # ryzen_opt.optimizers.system.Variants of the target as it is now; None once training changed it
    )
    validation: dict[str, Any] = field(default_factory=dict)
    validator: Any = None
    results: dict[str, StageResult] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None
    dist: distributed.DistInfo = distributed.SINGLE  # this process's rank under torchrun (one process: rank 0 of 1)

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    def say(self, message: str) -> None:
        logger.info(message)
        if self.progress is not None:
            self.progress(message)
