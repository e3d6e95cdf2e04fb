"""docs/gate-your-own.md's worked example, run as a user's project would run it: so the page cannot drift.

The example gates optimizations ryzen-opt did not write (PyTorch's dynamic int8, HF's static cache) on the real
SmolLM2-135M-Instruct; what is checked here is that each of its tests ends the way the page says, and that the
reports agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ryzen_opt.models.cache import cache_root

DOC = Path(__file__).resolve().parents[2] / "docs" / "gate-your-own.md"


def _example(name: str) -> str:
    """The ```python block after the ``<!-- example: NAME -->`` comment."""
    text = DOC.read_text()
    found = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert found is not None, f"{DOC} has no example {name}"
    return found.group(1)


def test_the_gate_your_own_example_runs_as_documented(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_my_optimizations=_example("test_my_optimizations.py"))
    # pytester gives the run a fresh HOME; the model cache stays the user's, as it would for a user's own project.
    monkeypatch.setenv("RYZEN_OPT_CACHE", str(cache_root()))
    # A subprocess, as a user's run: its own warning filters and its own process state.
    result = pytester.runpytest_subprocess("--device=cpu", "--ryzen-report-dir=out", "-rfxX")
    result.assert_outcomes(passed=2, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            "*ryzen gates*",
            "PASS*test_dynamic_int8_decodes_faster: speedup *x (95% CI *) >= required 1.2x*",
            "FAIL*test_dynamic_int8_keeps_accuracy: accuracy_loss *xfail: accepted*",
            "*median/call*IQR*calls/sample*pairs",
            "*ryzen tracked*",
            "TRACKED*test_static_cache: speedup = *",
        ]
    )
    cases = json.loads((pytester.path / "out" / "integration_test_report.json").read_text())["test_cases"]
    assert {c["name"].rsplit("::", 1)[-1]: c["status"] for c in cases} == {
        "test_dynamic_int8_decodes_faster": "PASSED",
        "test_dynamic_int8_keeps_accuracy": "XFAILED",
        "test_static_cache": "PASSED",
    }
    final = json.loads((pytester.path / "out" / "final_report.json").read_text())
    assert final["status"] == "COMPLETE", final["incomplete_reasons"]
