"""The plugin as a user of pytest expects it: xfail on gates, xdist that cannot change a verdict, measurements kept
without a gate, a history of runs, a quick mode without timing, and clear errors for the small mistakes.

Each test builds a scratch project with pytester and runs it as a user would; verdicts that must be exact use
deterministic records (``record_compression``) or arms whose ratio is known by construction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ryzen_opt.validation.reports import validate_report


def _report(path: Path, name: str) -> dict[str, Any]:
    return json.loads((path / f"{name}.json").read_text())


def _statuses(path: Path) -> dict[str, str]:
    cases = _report(path, "integration_test_report")["test_cases"]
    return {c["name"].rsplit("::", 1)[-1]: c["status"] for c in cases}


XFAIL_TESTS = """
import pytest
from pytest_ryzen import compression_ratio

@pytest.mark.xfail(strict=True, reason="known: this table compresses 2x, not 3x")
@compression_ratio(3.0)
def test_strict_known_failure(ryzen):
    ryzen.record_compression(100, 50)

@pytest.mark.xfail(reason="known")
@compression_ratio(3.0)
def test_lax_known_failure(ryzen):
    ryzen.record_compression(100, 50)

@pytest.mark.xfail(strict=True, reason="fixed since")
@compression_ratio(1.5)
def test_strict_but_passes(ryzen):
    ryzen.record_compression(100, 50)

@compression_ratio(1.5)
def test_plain_pass(ryzen):
    ryzen.record_compression(100, 50)
"""


def test_xfail_sees_a_failing_gate(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_xfail=XFAIL_TESTS)
    result = pytester.runpytest("--device=cpu", "--ryzen-report-dir=out", "-rfxX")
    result.assert_outcomes(passed=1, xfailed=2, failed=1)  # strict xfail whose gate passes: XPASS(strict)
    result.stdout.fnmatch_lines(["*FAILED*test_strict_but_passes*XPASS(strict)*", "*XFAIL*test_strict_known_failure*"])
    # The JSON agrees with the terminal.
    assert _statuses(pytester.path / "out") == {
        "test_strict_known_failure": "XFAILED",
        "test_lax_known_failure": "XFAILED",
        "test_strict_but_passes": "FAILED",
        "test_plain_pass": "PASSED",
    }
    final = _report(pytester.path / "out", "final_report")
    validate_report("final_report", final)
    accepted = {e["test"].rsplit("::", 1)[-1] for e in final["expected_failures"]}
    assert accepted == {"test_strict_known_failure", "test_lax_known_failure"}
    # Accepted failures are listed, not counted against completeness; the XPASS(strict) test is.
    assert not any("known_failure" in r for r in final["incomplete_reasons"])
    assert any("test_strict_but_passes: FAILED" in r for r in final["incomplete_reasons"])


def test_runxfail_makes_a_failing_gate_fail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_xfail=XFAIL_TESTS)
    result = pytester.runpytest("--device=cpu", "--ryzen-report-dir=out", "--runxfail")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*ryzen gate failed: compression_ratio 2.00x < required 3.0x*"])


def test_a_crashing_test_is_judged_by_its_exception_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_ryzen import speedup

        @speedup(2.0)
        def test_candidate_crashes(ryzen):
            def candidate():
                raise RuntimeError("candidate exploded")
            ryzen.compare(lambda: None, candidate)
        """
    )
    result = pytester.runpytest("--device=cpu", "--ryzen-report-dir=out")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: candidate exploded*"])
    assert "recorded no" not in result.stdout.str()


TRACKED_TESTS = """
from pytest_ryzen import accuracy_loss

def test_only_tracked(ryzen):
    ryzen.record_compression(300, 100, optimizer="embeddings")

@accuracy_loss(0.5)
def test_gated_and_tracked(ryzen):
    ryzen.record("accuracy_loss", 0.1)
    ryzen.record_memory(1000, 400)
"""


def test_measurements_without_a_gate_are_tracked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_tracked=TRACKED_TESTS)
    result = pytester.runpytest("--device=cpu", "--ryzen-report-dir=out", "--ryzen-save=main")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*ryzen tracked*", "TRACKED*test_only_tracked: compression_ratio = 3.0"])
    validation = _report(pytester.path / "out", "validation_report")
    validate_report("validation_report", validation)
    tracked = {(t["name"].rsplit("::", 1)[-1], t["metric"]): t for t in validation["tracked"]}
    assert set(tracked) == {("test_only_tracked", "compression_ratio"), ("test_gated_and_tracked", "memory_reduction")}
    assert tracked["test_only_tracked", "compression_ratio"]["status"] == "TRACKED"
    assert tracked["test_gated_and_tracked", "memory_reduction"]["actual"] == pytest.approx(0.6)
    assert [r["status"] for r in validation["results"]] == ["PASS"]  # tracked entries are no gates
    final = _report(pytester.path / "out", "final_report")
    assert {t["metric"] for t in final["tracked"]} == {"compression_ratio", "memory_reduction"}
    stored = json.loads((pytester.path / ".ryzen" / "main.json").read_text())
    assert {(e["metric"], e["status"]) for e in stored["entries"]} == {
        ("accuracy_loss", "PASS"),
        ("compression_ratio", "TRACKED"),
        ("memory_reduction", "TRACKED"),
    }


def test_each_run_keeps_a_numbered_copy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_tracked=TRACKED_TESTS)
    for _ in range(2):
        pytester.runpytest("--device=cpu").assert_outcomes(passed=2)
    out = pytester.path / "ryzen_results"
    runs = sorted(p.name for p in (out / "history").iterdir())
    assert [r[:5] for r in runs] == ["0001_", "0002_"]
    for run in runs:
        assert (out / "history" / run / "validation_report.json").is_file()
    # The top level is the latest run, where tools look.
    latest = _report(out, "validation_report")
    assert latest == _report(out / "history" / runs[-1], "validation_report")


def test_a_default_report_dir_that_is_a_file_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_tracked=TRACKED_TESTS)
    (pytester.path / "ryzen_results").write_text("not a directory")
    result = pytester.runpytest("--device=cpu")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*ryzen: reports not written: the report directory *ryzen_results is a file*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in result.stdout.str()


def test_ryzen_disable_runs_each_arm_once_untimed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_ryzen import speedup, compression_ratio

        calls = {"a": 0, "b": 0}

        @pytest.mark.perf
        @speedup(100.0)
        def test_compare(ryzen):
            def arm(name):
                def run():
                    calls[name] += 1
                return run
            assert ryzen.compare(arm("a"), arm("b")) is None
            assert calls == {"a": 1, "b": 1}

        @compression_ratio(2.0)
        def test_other_gates_still_judged(ryzen):
            ryzen.record_compression(100, 80)
        """
    )
    result = pytester.runpytest("--device=cpu", "--ryzen-report-dir=out", "--ryzen-disable")
    result.assert_outcomes(passed=1, failed=1)
    results = {r["name"].rsplit("::", 1)[-1]: r for r in _report(pytester.path / "out", "validation_report")["results"]}
    assert results["test_compare"]["status"] == "SKIPPED"
    assert "--ryzen-disable" in results["test_compare"]["message"]
    assert results["test_other_gates_still_judged"]["status"] == "FAIL"


def test_the_terminal_shows_each_arms_statistics(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_ryzen import speedup

        class Clock:
            t = 0
            def now(self):
                return self.t
            def work(self, us):
                def run():
                    self.t += us * 1000
                return run

        @speedup(1.5)
        def test_fast(ryzen):
            clock = Clock()
            ryzen.compare(clock.work(300), clock.work(100), timer=clock.now, baseline_name="eager",
                          candidate_name="compiled")
        """
    )
    result = pytester.runpytest("--device=cpu", "--ryzen-report-dir=out")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "test*arm*median/call*IQR*calls/sample*pairs",
            "test_fast*baseline: eager*300 us*0 ns*1*10",
            "*candidate: compiled*100 us*0 ns*1*",
        ]
    )


# -- xdist -----------------------------------------------------------------------------------------------------------
# Known ratios by construction (busy-waits on the wall clock), ordinary tests that load the CPU meanwhile, and a log
# of when each test ran: under -n 2 a measuring test must run alone, and its verdict must be the serial one.
XDIST_TESTS = """
import json, os, time
import pytest
from pytest_ryzen import speedup

LOG = os.environ["RYZEN_TEST_LOG"]

def spin(ms):
    def run():
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass
    return run

@pytest.fixture(autouse=True)
def log_span(request):
    start = time.time()
    yield
    kind = "measure" if request.node.get_closest_marker("speedup") else "other"
    with open(LOG, "a") as f:
        f.write(json.dumps([request.node.name, kind, start, time.time()]) + "\\n")

@pytest.mark.parametrize("i", range(6))
def test_busy(i):
    spin(600)()

@speedup(1.3)
def test_2x_against_1_3(ryzen):
    ryzen.compare(spin(0.6), spin(0.3), max_time=20)

@speedup(3.0)
def test_2x_against_3(ryzen):
    ryzen.compare(spin(0.6), spin(0.3), max_time=20)

@speedup(1.5)
def test_aa_against_1_5(ryzen):
    ryzen.compare(spin(0.4), spin(0.4), max_time=20)
"""

# A WARNING is a pass whose arms were noisy: the verdict is the same, the machine's noise is not.
_VERDICT = {"PASS": "pass", "WARNING": "pass", "FAIL": "FAIL", "INCONCLUSIVE": "INCONCLUSIVE"}


def _spans(log: Path) -> list[tuple[str, str, float, float]]:
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]  # type: ignore[misc]


def test_under_xdist_a_measuring_test_runs_alone_and_keeps_its_verdict(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_sched=XDIST_TESTS)
    verdicts = {}
    for label, args in (("serial", ()), ("parallel", ("-n", "2", "-p", "xdist"))):
        log = pytester.path / f"{label}.log"
        monkeypatch.setenv("RYZEN_TEST_LOG", str(log))
        result = pytester.runpytest_subprocess("--device=cpu", f"--ryzen-report-dir={label}", *args)
        result.assert_outcomes(passed=7, failed=2)
        results = _report(pytester.path / label, "validation_report")["results"]
        verdicts[label] = {r["name"].rsplit("::", 1)[-1]: _VERDICT[r["status"]] for r in results}
        if label == "parallel":
            spans = _spans(log)
            measured = [s for s in spans if s[1] == "measure"]
            others = [s for s in spans if s[1] == "other"]
            overlaps = [(m[0], o[0]) for m in measured for o in others if o[2] < m[3] and m[2] < o[3]]
            assert overlaps == []
            # ... while the ordinary tests did run side by side (the run really was parallel).
            assert any(a[2] < b[3] and b[2] < a[3] for a in others for b in others if a is not b)
    assert (
        verdicts["serial"]
        == verdicts["parallel"]
        == {
            "test_2x_against_1_3": "pass",
            "test_2x_against_3": "FAIL",
            "test_aa_against_1_5": "FAIL",
        }
    )
