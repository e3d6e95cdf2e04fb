"""Shared test configuration: hypothesis profiles, pytester, and this project's final report (its Phase 2 parts)."""

from __future__ import annotations

import os
from typing import Any

import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
from hypothesis import HealthCheck, settings

# Preload what the plugin imports lazily. pytester's in-process runs restore sys.modules afterwards, and a C
# extension like torch cannot be imported a second time in one process ("SystemError: bad call flags").
import pytest_ryzen.fixture  # noqa: E402,F401
import ryzen_opt.measure.timing  # noqa: E402,F401
import ryzen_opt.training.metrics  # noqa: E402,F401
import ryzen_opt.validation.validator  # noqa: E402,F401

pytest_plugins = ["pytester"]

# Tensor code has no meaningful per-example deadline on a shared 2-core machine; CI is derandomized so that a
# failure reproduces from the log alone.
settings.register_profile("dev", deadline=None, max_examples=50)
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=30,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# ryzen-opt's own final report, through the plugin's hooks (a third-party project declares its own parts, or none):
# Phase 2 is complete when every optimizer and the combined system were measured and passed; the report keeps the
# seed's shape, optimizer results apart from the end-to-end ones.
PHASE2_PARTS = ["kernel_optimizer", "embedding_compressor", "kv_cache_optimizer", "speculative_decoder", "e2e"]


def pytest_ryzen_report_parts(config: Any) -> list[str]:
    return PHASE2_PARTS


def pytest_ryzen_modify_report(config: Any, name: str, report: dict[str, Any]) -> None:
    if name != str(config.getini("ryzen_final_report")):
        return
    results = report["results"]
    report["phase"] = "Phase 2: Core Optimizations"
    report["optimization_results"] = {group: m for group, m in results.items() if group != "e2e"}
    report["e2e_results"] = results.get("e2e", {})
