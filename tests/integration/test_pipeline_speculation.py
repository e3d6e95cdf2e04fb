"""The validation stage's speculation on chat tasks, as ``ryzen-opt run`` runs it on SmolLM2 (its default target):
a copy-heavy set gated by ``copy_speculative_speedup`` and an open set reported, each naming its workload; a target
without a chat template (the zoo's) skips them with the reason.

Short answers and the fewest pairs: this checks the stage's wiring and its report, not the speed (the perf gate in
``tests/perf/test_speculative_decoding.py`` decides that on the same prompts).
"""

from __future__ import annotations

import copy

import pytest

from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.kernels import KernelOptimizer
from ryzen_opt.optimizers.system import SystemConfig
from ryzen_opt.run.config import RunConfig
from ryzen_opt.run.context import RunContext
from ryzen_opt.run.validation import speculative_workloads
from ryzen_opt.validation.validator import OptimizationValidator, ValidationStatus

pytestmark = pytest.mark.slow


def _context(tokenizer, **validation) -> RunContext:
    return RunContext(config=RunConfig.from_dict({"validation": validation}), tokenizer=tokenizer)


def test_copy_heavy_and_open_sets_are_measured_and_the_copy_set_is_gated() -> None:
    model, tokenizer = zoo.reference_model("smollm2")
    target = KernelOptimizer(SystemConfig().kernels).apply_to_model(copy.deepcopy(model))
    validator = OptimizationValidator()
    ctx = _context(tokenizer, spec_task_prompts=1, spec_new_tokens=16, pairs=3)
    out = speculative_workloads(ctx, validator, target)
    assert set(out) == {"copy-heavy", "open"}
    assert out["copy-heavy"]["prompts"] == len(corpus.COPY_TASKS)
    assert out["copy-heavy"]["identical"] + out["copy-heavy"]["stats"]["near_ties"] >= 1
    for name in out:
        assert out[name]["speedup"]["ratio"] > 0
        assert name in out[name]["workload"]
    (gate,) = [r for r in validator.results if r.name == "speculative_copy_speedup"]
    assert gate.expected == 1.5
    assert gate.status is not ValidationStatus.SKIPPED
    assert "copy-heavy chat requests" in gate.message


def test_a_target_without_a_chat_template_skips_them_with_the_reason() -> None:
    _, tokenizer = zoo.reference_model("target", "tiny")
    validator = OptimizationValidator()
    out = speculative_workloads(_context(tokenizer), validator, target=None)
    assert "chat template" in out["skipped"]
    assert validator.results[-1].status is ValidationStatus.SKIPPED
