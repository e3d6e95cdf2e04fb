"""The plugin's gates and reports, tested as users meet them: pytester, runpytest, the JSON it wrote.

Timing inside these inner tests uses ``compare(timer=...)`` with a fake clock, so the verdicts are exact and the
tests are fast; what is under test is the plugin's plumbing, not this machine's speed.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from ryzen_opt.validation.reports import REPORT_SCHEMAS, validate_report

FAKE_CLOCK = '''
import random

class FakeClock:
    """Time advances only when a fake workload runs: base * lognormal(10%) nanoseconds."""
    def __init__(self, seed=0):
        self.t = 0
        self.rng = random.Random(seed)
    def now(self):
        return self.t
    def work(self, ms):
        def run():
            self.t += int(ms * 1e6 * self.rng.lognormvariate(0.0, 0.10))
        return run
'''

GATED_TESTS = (
    FAKE_CLOCK
    + """
import pytest
from pytest_ryzen import speedup, compression_ratio, accuracy_loss

@pytest.mark.perf
@speedup(2.0)
def test_kernel_fast(ryzen):
    clock = FakeClock(1)
    ryzen.compare(clock.work(3.0), clock.work(1.0), timer=clock.now, baseline_name="HF generate fp32",
                  optimizer="kernel_optimizer")

@pytest.mark.perf
@speedup(1.5)
def test_kernel_slow(ryzen):
    clock = FakeClock(2)
    ryzen.compare(clock.work(1.0), clock.work(1.0), timer=clock.now, baseline_name="HF generate fp32",
                  optimizer="kernel_optimizer")

@compression_ratio(2.0)
def test_embedding_compression(ryzen):
    ryzen.record_compression(4000, 1000, optimizer="embedding_compressor")

@accuracy_loss(0.01)
def test_missing_measurement(ryzen):
    pass

def test_plain():
    # an ordinary test without gates: it must appear in the integration report with no gate records
    assert sorted([3, 1, 2]) == [1, 2, 3]
"""
)


def _reports(directory: Path) -> dict[str, dict]:
    """Every report the session wrote, by name (each has a schema of its own)."""
    found = {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}
    assert set(found) <= set(REPORT_SCHEMAS), sorted(found)
    return found


def _statuses(report: dict) -> dict[str, str]:
    return {case["name"].split("::")[-1]: case["status"] for case in report["test_cases"]}


@pytest.fixture
def gated(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_gates=GATED_TESTS)
    return pytester


def test_gates_pass_fail_and_explain(gated: pytest.Pytester) -> None:
    result = gated.runpytest("--device=cpu", "--ryzen-report-dir=out")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*ryzen gate failed: speedup 1.0*x (95% CI *, * pairs) < required 1.5x vs HF generate fp32*",
            "*ryzen gate failed: @accuracy_loss(0.01) but the test recorded no accuracy_loss measurement*",
        ]
    )
    result.stdout.fnmatch_lines(["*ryzen gates*", "PASS*test_kernel_fast*", "*ryzen reports written to*out/"])


def test_reports_match_their_schemas(gated: pytest.Pytester) -> None:
    gated.runpytest("--device=cpu", "--ryzen-report-dir=out")
    reports = _reports(gated.path / "out")
    # No training fixture was used: no training report. No profile was named: no thresholds block.
    assert set(reports) == {"validation_report", "integration_test_report", "final_report"}
    for name, report in reports.items():
        validate_report(name, report)
        assert report["schema_version"]
        assert "NaN" not in (gated.path / "out" / f"{name}.json").read_text()
    plain = next(c for c in reports["integration_test_report"]["test_cases"] if c["name"].endswith("test_plain"))
    assert plain["gates"] == []
    assert _statuses(reports["integration_test_report"]) == {
        "test_kernel_fast": "PASSED",
        "test_kernel_slow": "FAILED",
        "test_embedding_compression": "PASSED",
        "test_missing_measurement": "FAILED",
        "test_plain": "PASSED",
    }
    validation = reports["validation_report"]
    assert validation["summary"]["total_checks"] == 4
    assert validation["summary"]["passed"] == 2
    assert validation["summary"]["failed"] == 2
    assert validation["thresholds"] is None
    final = reports["final_report"]
    assert final["status"] == "INCOMPLETE"
    assert "thresholds" not in final
    reasons = "\n".join(final["incomplete_reasons"])
    assert "test_kernel_slow: speedup FAIL" in reasons
    assert "gate was measured" not in reasons  # no parts declared: ryzen-opt's own parts are not this project's
    # Grouped by the optimizer= the measurements were recorded with, never guessed from file names.
    assert final["parts"] == ["embedding_compressor", "kernel_optimizer", "ungrouped"]
    fast = final["results"]["kernel_optimizer"]["speedup"]
    assert {e["status"] for e in fast} == {"PASS", "FAIL"}
    passed = next(e for e in fast if e["status"] == "PASS")
    assert passed["ci_low"] >= 2.0
    assert passed["ci_low"] <= passed["value"] <= passed["ci_high"]
    assert passed["baseline"] == "HF generate fp32"
    assert final["results"]["embedding_compressor"]["compression_ratio"][0]["value"] == 4.0
    assert final["unmeasured"] == [
        {"test": "test_gates.py::test_missing_measurement", "metric": "accuracy_loss", "status": "FAIL"}
    ]
    assert final["environment"]["versions"]["torch"]


THIRD_PARTY = """
import pytest
from pytest_ryzen import compression_ratio, memory_reduction

@compression_ratio(2.0)
def test_weights_pack(ryzen):
    ryzen.record_compression(4000, 1000, optimizer="packing")

@memory_reduction(0.25)
def test_cache_is_smaller(ryzen):
    ryzen.record_memory(1000, 500)
"""


def test_a_third_party_project_that_passes_is_complete(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_theirs=THIRD_PARTY)
    pytester.runpytest("--device=cpu").assert_outcomes(passed=2)
    reports = _reports(pytester.path / "ryzen_results")
    final = reports["final_report"]
    validate_report("final_report", final)
    assert final["status"] == "COMPLETE", final["incomplete_reasons"]
    assert final["parts"] == ["packing", "ungrouped"]
    assert "training_metrics_report" not in reports
    # The same under xdist: the controller builds the final report from the workers' gates.
    pytester.runpytest("--device=cpu", "-n", "2", "-p", "xdist", "--ryzen-report-dir=par").assert_outcomes(passed=2)
    parallel = _reports(pytester.path / "par")["final_report"]
    assert (parallel["status"], parallel["parts"]) == ("COMPLETE", ["packing", "ungrouped"])


def test_declared_parts_keep_the_final_report_incomplete_until_measured(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_theirs=THIRD_PARTY)
    pytester.makeini("[pytest]\nryzen_parts =\n    packing\n    attention\nryzen_final_report = release_report\n")
    pytester.makeconftest("def pytest_ryzen_report_parts(config):\n    return ['decoding', 'packing']\n")
    pytester.runpytest("--device=cpu").assert_outcomes(passed=2)
    final = json.loads((pytester.path / "ryzen_results" / "release_report.json").read_text())
    assert not (pytester.path / "ryzen_results" / "final_report.json").exists()
    assert final["parts"] == ["packing", "attention", "decoding"]
    assert final["status"] == "INCOMPLETE"
    assert final["incomplete_reasons"] == [
        "no attention gate was measured in this session",
        "no decoding gate was measured in this session",
    ]


def test_a_bad_final_report_name_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_theirs=THIRD_PARTY)
    pytester.makeini("[pytest]\nryzen_final_report = out/final.json\n")
    result = pytester.runpytest("--device=cpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ryzen_final_report = 'out/final.json': a file name without directory*"])


def test_xdist_reports_equal_serial(gated: pytest.Pytester) -> None:
    gated.runpytest("--device=cpu", "--ryzen-report-dir=serial")
    result = gated.runpytest("--device=cpu", "--ryzen-report-dir=parallel", "-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=3, failed=2)
    serial, parallel = _reports(gated.path / "serial"), _reports(gated.path / "parallel")
    assert _statuses(serial["integration_test_report"]) == _statuses(parallel["integration_test_report"])

    def gates(report: dict) -> list[tuple]:
        return sorted((r["name"], r["status"], r["actual"]) for r in report["results"])

    # Same fake clocks, same seeds: the same measurements, wherever the test ran.
    assert gates(serial["validation_report"]) == gates(parallel["validation_report"])


def test_inconclusive_follows_gate_mode(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        FAKE_CLOCK
        + """
from pytest_ryzen import speedup

@speedup(1.0)
def test_on_the_line(ryzen):
    clock = FakeClock(3)
    ryzen.compare(clock.work(1.0), clock.work(1.0), timer=clock.now, max_pairs=12, min_pairs=10)
"""
    )
    strict = pytester.runpytest("--device=cpu", "--ryzen-gate=strict", "--ryzen-report-dir=s")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*INCONCLUSIVE*test_on_the_line*"])
    lenient = pytester.runpytest("--device=cpu", "--ryzen-gate=lenient", "--ryzen-report-dir=l")
    lenient.assert_outcomes(passed=1)
    lenient.stdout.fnmatch_lines(
        ["ryzen: --ryzen-gate=lenient let 1 gate(s) through that strict fails:", "  INCONCLUSIVE *test_on_the_line*"]
    )
    report = json.loads((pytester.path / "l" / "validation_report.json").read_text())
    assert report["results"][0]["status"] == "INCONCLUSIVE"


def test_report_mode_never_fails_on_a_gate(gated: pytest.Pytester) -> None:
    result = gated.runpytest("--device=cpu", "--ryzen-gate=report", "--ryzen-report-dir=out")
    result.assert_outcomes(passed=5)
    report = json.loads((gated.path / "out" / "validation_report.json").read_text())
    assert report["summary"]["failed"] == 2  # recorded, not enforced
    result.stdout.fnmatch_lines(
        [
            "ryzen: --ryzen-gate=report let 2 gate(s) through that strict fails:",
            "  FAIL *test_kernel_slow: speedup",
            "  FAIL *test_missing_measurement: accuracy_loss (the test recorded nothing)",
        ]
    )
    final = json.loads((gated.path / "out" / "final_report.json").read_text())
    assert [g["test"] for g in final["unmeasured"]] == ["test_gates.py::test_missing_measurement"]


def test_nan_measurement_fails_with_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
from pytest_ryzen import compression_ratio

@compression_ratio(2.0)
def test_nan(ryzen):
    ryzen.record("compression_ratio", float("nan"))
"""
    )
    result = pytester.runpytest("--device=cpu", "--ryzen-report-dir=out")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ryzen gate failed: compression_ratio is not a number*required 2.0x*"])
    text = (pytester.path / "out" / "validation_report.json").read_text()
    result_0 = json.loads(text)["results"][0]  # strict JSON: json.loads would choke on a bare NaN
    assert result_0["status"] == "FAIL"
    assert result_0["actual"] is None
    assert "NaN" in result_0["reason"]


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("speedup(-1)", "positive finite"),
        ("speedup('fast')", "no such threshold"),
        ("speedup(1, 2)", "exactly one threshold"),
        ("accuracy_loss(5)", "a fraction below 1, and 0.01 means 1%"),
        ("accuracy_loss(1)", "a fraction below 1, and 0.01 means 1%"),  # 1 is 100%: almost surely "1%" meant
        ("acceptance_rate(1.5)", "at most 1"),
        ("speedup('1.3')", "a number in quotes; write @speedup(1.3)"),
        ("speedup(minimum=2)", "unknown argument"),
        ("acceptance_rate(float('nan'))", "positive finite"),
        ("speedup('accuracy_loss')", "is a accuracy_loss threshold, not a speedup one"),
        ("memory_reduction('kv_memory_reduction')", None),
    ],
)
def test_bad_marker_arguments_are_usage_errors(pytester: pytest.Pytester, marker: str, message: str | None) -> None:
    pytester.makepyfile(f"import pytest\n\n@pytest.mark.{marker}\ndef test_x(ryzen):\n    pass\n")
    result = pytester.runpytest("--device=cpu")
    if message is None:  # a key of the marker's own kind is accepted (and fails here: nothing was recorded)
        result.assert_outcomes(failed=1)
        return
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*test_x*{message}*"])


def test_a_profile_may_add_keys_of_its_own(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", profile="[default]\nattention_speedup = 1.5\n[cpu]\nint4_compression_ratio = 3.0\n")
    pytester.makepyfile(
        """
from pytest_ryzen import compression_ratio

@compression_ratio("int4_compression_ratio")
def test_packed(ryzen):
    ryzen.record_compression(4000, 1000)
"""
    )
    result = pytester.runpytest("--device=cpu", "--ryzen-thresholds=profile.toml")
    result.assert_outcomes(passed=1)
    report = json.loads((pytester.path / "ryzen_results" / "final_report.json").read_text())
    assert report["thresholds"]["attention_speedup"] == 1.5  # a profile was in play: it is reported, own keys too
    assert report["results"]["ungrouped"]["compression_ratio"][0]["target"] == 3.0
    # A key of one's own is checked against the marker's kind like any other.
    pytester.makepyfile(
        "from pytest_ryzen import accuracy_loss\n\n@accuracy_loss('attention_speedup')\ndef test_x(ryzen):\n    pass\n"
    )
    wrong = pytester.runpytest("--device=cpu", "--ryzen-thresholds=profile.toml")
    assert wrong.ret == pytest.ExitCode.USAGE_ERROR
    wrong.stderr.fnmatch_lines(["*is a speedup threshold, not a accuracy_loss one*"])


def test_two_gates_of_one_kind_are_a_usage_error(pytester: pytest.Pytester) -> None:
    # The outer @compression_ratio(100) used to be ignored silently in favour of the inner (2).
    pytester.makepyfile(
        """
import pytest
from pytest_ryzen import compression_ratio

@compression_ratio(100)
@compression_ratio(2)
def test_stacked(ryzen):
    ryzen.record_compression(300, 100)

pytestmark = pytest.mark.speedup(2.0)

@pytest.mark.speedup(3.0)
def test_module_and_function(ryzen):
    pass
"""
    )
    result = pytester.runpytest("--device=cpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_stacked: 2 @compression_ratio gates apply to this test*keep one*"])


def test_report_dir_problems_are_usage_errors_at_start(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(ryzen):\n    pass\n")
    (pytester.path / "taken").write_text("a file, not a directory")
    result = pytester.runpytest("--device=cpu", "--ryzen-report-dir=taken")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ryzen: the report directory*taken is a file*--ryzen-report-dir*"])
    result = pytester.runpytest("--device=cpu", "--ryzen-report-dir=taken/sub")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cannot create the report directory*is not a directory*"])


def test_reports_are_readable_by_others(gated: pytest.Pytester) -> None:
    old = os.umask(0o022)
    try:
        gated.runpytest("--device=cpu", "--ryzen-report-dir=out", "-p", "no:randomly")
    finally:
        os.umask(old)
    for path in (gated.path / "out").glob("*.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_thresholds_profile_keys_and_device_sections(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", profile="[default]\nkernel_speedup = 9.0\n[cpu]\nkernel_speedup = 1.5\n")
    pytester.makepyfile(
        FAKE_CLOCK
        + """
from pytest_ryzen import speedup

@speedup("kernel_speedup")
def test_profiled(ryzen):
    clock = FakeClock(4)
    ryzen.compare(clock.work(2.0), clock.work(1.0), timer=clock.now)
"""
    )
    result = pytester.runpytest("--device=cpu", "--ryzen-thresholds=profile.toml", "--ryzen-report-dir=out")
    result.assert_outcomes(passed=1)  # the [cpu] section's 1.5 applies, not [default]'s 9.0
    report = json.loads((pytester.path / "out" / "validation_report.json").read_text())
    assert report["results"][0]["expected"] == 1.5


def test_report_hooks_extend_reports(gated: pytest.Pytester) -> None:
    gated.makeconftest(
        """
def pytest_ryzen_modify_report(config, name, report):
    report["team"] = "inference"

def pytest_ryzen_generate_report(config, name, data):
    if name == "final_report":
        return {**data, "custom": True}
"""
    )
    gated.runpytest("--device=cpu", "--ryzen-report-dir=out")
    reports = _reports(gated.path / "out")
    assert all(r["team"] == "inference" for r in reports.values())
    assert reports["final_report"]["custom"] is True


def test_training_metrics_fixture_lands_in_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_train(training_metrics, offset):
    for step in range(20):
        training_metrics.record_batch_metric({"epoch": 0, "batch": step, "loss": 3.0 + offset - 0.05 * step,
                                              "samples_per_s": 10.0, "tokens_per_s": 100.0,
                                              "learning_rate": 1e-3, "grad_norm": 1.0, "duration_s": 0.1})
"""
    )
    for args, out in (((), "serial"), (("-n", "2", "-p", "xdist"), "parallel")):
        pytester.runpytest("--device=cpu", f"--ryzen-report-dir={out}", *args).assert_outcomes(passed=2)
        report = json.loads((pytester.path / out / "training_metrics_report.json").read_text())
        validate_report("training_metrics_report", report)
        assert report["statistics"]["total_batches"] == 40
        assert len(report["metadata"]["sources"]) == 2
        assert report["anomalies"] == []


def test_json_report_metadata(gated: pytest.Pytester) -> None:
    pytest.importorskip("pytest_jsonreport")
    gated.runpytest("--device=cpu", "--json-report", "--json-report-file=jr.json", "--ryzen-report-dir=out")
    data = json.loads((gated.path / "jr.json").read_text())
    by_name = {t["nodeid"].split("::")[-1]: t for t in data["tests"]}
    ryzen = by_name["test_embedding_compression"]["metadata"]["ryzen"]
    assert ryzen["records"][0]["metric"] == "compression_ratio"
    assert ryzen["records"][0]["value"] == 4.0
    # The verdict and its threshold too, so a dashboard reading pytest-json-report needs nothing else.
    (gate,) = ryzen["gates"]
    assert (gate["metric"], gate["status"], gate["actual"], gate["expected"]) == ("compression_ratio", "PASS", 4.0, 2.0)
    slow = by_name["test_kernel_slow"]["metadata"]["ryzen"]["gates"]
    assert [(g["status"], g["expected"]) for g in slow] == [("FAIL", 1.5)]


def test_no_reports_without_ryzen_use(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain():\n    pass\n")
    pytester.runpytest("--device=cpu").assert_outcomes(passed=1)
    assert not (pytester.path / "ryzen_results").exists()


def test_perf_sampling_under_xdist_takes_the_lock(pytester: pytest.Pytester) -> None:
    from ryzen_opt.measure.timing import serial_lock

    flag = pytester.path / "about_to_time.flag"
    pytester.makepyfile(
        FAKE_CLOCK
        + f"""
from pathlib import Path
from pytest_ryzen import speedup

@speedup(2.0)
def test_locked(ryzen):
    clock = FakeClock(5)
    Path({str(flag)!r}).write_text("1")
    ryzen.compare(clock.work(3.0), clock.work(1.0), timer=clock.now)
"""
    )
    held = threading.Event()
    done = threading.Event()
    hold_s = 1.5

    def hold() -> None:
        # Hold the perf lock until the inner test is about to time, then hold_s longer: it must wait that long.
        with serial_lock():
            held.set()
            while not flag.exists() and not done.wait(0.05):
                pass
            done.wait(hold_s)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(timeout=10)
    try:
        result = pytester.runpytest_subprocess("--device=cpu", "-n", "1", "-p", "xdist", "--ryzen-report-dir=out")
    finally:
        done.set()
        thread.join()
    result.assert_outcomes(passed=1)
    report = json.loads((pytester.path / "out" / "integration_test_report.json").read_text())
    gate = report["test_cases"][0]["gates"][0]
    # The worker had to wait for the lock this process held; the record says so.
    assert gate["details"]["lock_wait_s"] > 0.5 * hold_s


def test_accuracy_details_reach_ryzens_own_reports(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
import torch
from pytest_ryzen import accuracy_loss

class Bigram(torch.nn.Module):
    def __init__(self, noise):
        super().__init__()
        table = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
        self.register_buffer("table", table + noise * torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    def forward(self, input_ids):
        return self.table[input_ids]

@accuracy_loss(0.5)
def test_quantized_table(ryzen):
    data = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(2))
    ryzen.record_accuracy(Bigram(0.0), Bigram(0.01), data, optimizer="quant")
"""
    )
    pytester.runpytest("--device=cpu", "--ryzen-report-dir=out").assert_outcomes(passed=1)
    (result,) = json.loads((pytester.path / "out" / "validation_report.json").read_text())["results"]
    details = result["details"]
    assert details["perplexity_ratio"] > 0
    assert details["kl_divergence"] >= 0
    assert 0 <= details["top1_agreement"] <= 1
    assert details["tokens"] == 8 * 63


BASELINED = (
    FAKE_CLOCK
    + """
import os
from pytest_ryzen import speedup, compression_ratio

@speedup(0.5)
def test_decode(ryzen):
    clock = FakeClock(int(os.environ.get("SEED", "1")))
    slow = float(os.environ.get("SLOWDOWN", "1"))
    ryzen.compare(clock.work(3.0), clock.work(1.0 * slow), timer=clock.now, optimizer="int8")

@compression_ratio(2.0)
def test_pack(ryzen):
    ryzen.record_compression(4000, 1000, optimizer="int8")
"""
)


def test_a_regression_against_a_saved_baseline_fails_and_names_itself(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_base=BASELINED)
    pytester.runpytest("--device=cpu", "--ryzen-save=main").assert_outcomes(passed=2)
    saved = json.loads((pytester.path / ".ryzen" / "main.json").read_text())
    assert saved["name"] == "main"
    assert saved["machine"]["device"] == "cpu"
    assert "commit" in saved
    assert {(e["test"], e["metric"]) for e in saved["entries"]} == {
        ("test_base.py::test_decode", "speedup"),
        ("test_base.py::test_pack", "compression_ratio"),
    }
    # The same code again (another seed: other noise) compares as the same.
    monkeypatch.setenv("SEED", "7")
    same = pytester.runpytest("--device=cpu", "--ryzen-compare=main")
    same.assert_outcomes(passed=2)
    same.stdout.fnmatch_lines(["*ryzen baseline 'main'*", "test_base.py::test_decode*speedup*SAME"])
    # A 3x slower candidate still clears its own 0.5x gate, but not the baseline: the test fails and says why.
    monkeypatch.setenv("SLOWDOWN", "3")
    worse = pytester.runpytest("--device=cpu", "--ryzen-compare=latest")
    worse.assert_outcomes(passed=1, failed=1)
    worse.stdout.fnmatch_lines(
        [
            "*ryzen baseline regression: speedup regressed against baseline 'main': now 1.0*, then 2.9*"
            " (the 95% intervals do not overlap)",
            "test_base.py::test_decode*speedup*REGRESSED",
        ]
    )
    # Under report mode it is recorded, not enforced; under xdist the workers compare too.
    pytester.runpytest("--device=cpu", "--ryzen-compare=main", "--ryzen-gate=report").assert_outcomes(passed=2)
    pytester.runpytest("--device=cpu", "--ryzen-compare=main", "-n", "2", "-p", "xdist").assert_outcomes(
        passed=1, failed=1
    )
    report = json.loads((pytester.path / "ryzen_results" / "validation_report.json").read_text())
    verdicts = {r["name"]: r["details"]["baseline_compare"]["verdict"] for r in report["results"]}
    assert verdicts == {"test_base.py::test_decode": "REGRESSED", "test_base.py::test_pack": "SAME"}


def test_baseline_names_and_machines(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_base=BASELINED)
    missing = pytester.runpytest("--device=cpu", "--ryzen-compare=main")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(
        ["*no baseline 'main' under *.ryzen; saved: none yet (save one with --ryzen-save=NAME)*"]
    )
    bad = pytester.runpytest("--device=cpu", "--ryzen-save=../x")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    pytester.runpytest("--device=cpu", "--ryzen-save=v1").assert_outcomes(passed=2)
    path = pytester.path / ".ryzen" / "v1.json"
    data = json.loads(path.read_text())
    data["machine"]["device_name"] = "Some Other CPU"
    path.write_text(json.dumps(data))
    other = pytester.runpytest("--device=cpu", "--ryzen-compare=v1")
    other.assert_outcomes(passed=2)
    other.stdout.fnmatch_lines(["*machine differs from the baseline's: device_name: 'Some Other CPU' then, * now*"])


def test_report_compare_and_merge_a_ci_matrix(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runners of a matrix write their reports; `ryzen-opt report merge` makes one table and one final report,
    and `ryzen-opt report compare` sets two runs side by side."""
    from ryzen_opt.cli import main

    pytester.makepyfile(test_base=BASELINED)
    pytester.runpytest("--device=cpu", "--ryzen-report-dir=cpu-a", "--ryzen-save=main").assert_outcomes(passed=2)
    monkeypatch.setenv("SLOWDOWN", "3")
    pytester.runpytest("--device=cpu", "--ryzen-report-dir=cpu-b").assert_outcomes(passed=2)
    capsys.readouterr()
    root = str(pytester.path)
    assert main(["report", "compare", "main", f"{root}/cpu-b", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "test_base.py::test_decode  speedup" in out
    assert "REGRESSED" in out
    assert main(["report", "compare", "main", f"{root}/cpu-b", "--root", root, "--fail-on-regression"]) == 1
    capsys.readouterr()
    assert main(["report", "merge", f"{root}/cpu-a", f"{root}/cpu-b", "--out", f"{root}/merged"]) == 0
    out = capsys.readouterr().out
    assert "test    metric" not in out  # a real table: the header names both runs
    assert "cpu-a" in out.splitlines()[0]
    assert "cpu-b" in out.splitlines()[0]
    merged = json.loads((pytester.path / "merged" / "final_report.json").read_text())
    validate_report("final_report", merged)
    assert merged["status"] == "COMPLETE"
    assert sorted(merged["results"]) == ["cpu-a:int8", "cpu-b:int8"]
    assert [s["label"] for s in merged["sources"]] == ["cpu-a", "cpu-b"]
    # A run that is not complete makes the merge incomplete, and says which.
    pytester.runpytest("--device=cpu", "--ryzen-report-dir=cpu-c", "-k", "pack", "-o", "ryzen_parts=attention")
    assert main(["report", "merge", f"{root}/cpu-a", f"{root}/cpu-c", "--out", f"{root}/merged"]) == 1
    assert "cpu-c: no attention gate was measured in this session" in capsys.readouterr().out
    assert main(["report", "merge", f"{root}/nowhere"]) == 2
    assert "no readable validation_report.json" in capsys.readouterr().err
