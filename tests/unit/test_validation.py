"""ryzen_opt.validation.validator: the three-state check, gates, thresholds and profiles, the validator and its
report."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st

from ryzen_opt.errors import ConfigError
from ryzen_opt.measure import timing as bench
from ryzen_opt.measure.timing import SpeedupMeasurement
from ryzen_opt.validation import reports
from ryzen_opt.validation import validator as val
from ryzen_opt.validation.validator import (
    DEVICE_CLASSES,
    METRICS,
    OptimizationValidator,
    Thresholds,
    ValidationResult,
    ValidationStatus,
    check,
    is_failing,
    load_thresholds,
)

S = ValidationStatus
SCHEMA = json.loads(
    resources.files("ryzen_opt.validation")
    .joinpath("schemas/validation_report.schema.json")
    .read_text(encoding="utf-8")
)
ENV = {"device": "cpu", "git_sha": None}
SEED_DEFAULTS = {
    "kernel_speedup": 3.0,
    "compression_ratio": 2.0,
    "kv_memory_reduction": 0.30,
    "acceptance_rate": 0.60,
    "speculative_speedup": 1.2,
    "e2e_speedup": 3.0,
    "accuracy_loss": 0.01,
}


def measured(
    ratio: float, low: float, high: float, n: int = 24, cv_b: float = 0.05, cv_c: float = 0.05, name: str = "baseline"
) -> SpeedupMeasurement:
    """A consistent SpeedupMeasurement with the given median, interval, pair count and arm noise."""
    return SpeedupMeasurement(
        ratios=(ratio,) * n,
        ratio=ratio,
        ci_low=low,
        ci_high=high,
        n=n,
        confidence=0.95,
        baseline_median_s=ratio * 0.01,
        candidate_median_s=0.01,
        cv_baseline=cv_b,
        cv_candidate=cv_c,
        threshold=None,
        verdict=None,
        warmup=2,
        threads=2,
        elapsed_s=1.0,
        stopped_because="max_pairs",
        baseline_name=name,
    )


def strict_loads(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-JSON constant {token} in report")

    return json.loads(text, parse_constant=refuse)


# --- check(): the three states ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low", "high", "threshold", "expected"),
    [
        (3.1, 3.4, 3.0, S.PASS),
        (3.0, 3.4, 3.0, S.PASS),  # lower bound exactly at the threshold passes
        (2.3, 2.9, 3.0, S.FAIL),
        (2.8, 3.2, 3.0, S.INCONCLUSIVE),
        (2.5, 3.0, 3.0, S.INCONCLUSIVE),  # upper bound exactly at the threshold is not below it
    ],
)
def test_speedup_three_states(low: float, high: float, threshold: float, expected: ValidationStatus) -> None:
    result = check("k", "speedup", measured((low + high) / 2, low, high), threshold)
    assert result.status is expected
    assert (result.ci_low, result.ci_high, result.n) == (low, high, 24)
    assert result.tolerance == pytest.approx((high - low) / 2)
    assert (result.expected, result.comparison, result.unit) == (threshold, "min", "x")


def test_speedup_message_names_interval_pairs_and_baseline() -> None:
    fail = check("k", "speedup", measured(2.41, 2.30, 2.52), 3.0, baseline="HF generate fp32")
    assert fail.status is S.FAIL
    assert re.fullmatch(
        r"speedup 2\.41x \(95% CI 2\.30-2\.52, 24 pairs\) < required 3\.0x vs HF generate fp32", fail.message
    )
    ok = check("k", "speedup", measured(3.42, 3.30, 3.55, n=30), 3.0, baseline="HF generate fp32")
    assert re.fullmatch(
        r"speedup 3\.42x \(95% CI 3\.30-3\.55, 30 pairs\) >= required 3\.0x vs HF generate fp32", ok.message
    )
    assert ok.baseline == "HF generate fp32"
    unsure = check("k", "speedup", measured(3.0, 2.9, 3.1), 3.0)
    assert "inconclusive against required 3.0x" in unsure.message


def test_baseline_defaults_to_the_measurement_name_but_not_the_generic_one() -> None:
    named = measured(3.5, 3.4, 3.6, name="HF generate, eager attention, dynamic cache, fp32")
    assert check("k", "speedup", named, 3.0).baseline == "HF generate, eager attention, dynamic cache, fp32"
    assert check("k", "speedup", measured(3.5, 3.4, 3.6), 3.0).baseline is None
    assert check("k", "speedup", named, 3.0, baseline="explicit").baseline == "explicit"


def test_measurement_from_bench_compare_with_a_fake_clock() -> None:
    clock = [0]

    def timer() -> int:
        return clock[0]

    def arm(ns: int) -> Any:
        def run() -> None:
            clock[0] += ns

        return run

    m = bench.compare(arm(400), arm(100), min_pairs=5, max_pairs=5, warmup=0, timer=timer, baseline_name="eager")
    result = check("kernel_performance", "speedup", m, 3.0)
    assert result.status is S.PASS
    assert (result.actual, result.n, result.baseline) == (4.0, 5, "eager")
    assert result.details["measurement"]["ratios"] == [4.0] * 5
    assert check("kernel_performance", "speedup", m, 4.5).status is S.FAIL


@pytest.mark.parametrize(("cv_b", "cv_c", "arm"), [(0.40, 0.05, "baseline CV 0.40"), (0.05, 0.31, "candidate CV 0.31")])
def test_noisy_pass_is_a_warning_that_says_why(cv_b: float, cv_c: float, arm: str) -> None:
    result = check("k", "speedup", measured(3.5, 3.3, 3.7, cv_b=cv_b, cv_c=cv_c), 3.0)
    assert result.status is S.WARNING
    assert arm in result.message
    assert "noisy" in result.message
    assert result.details["noisy"]["noisy_cv"] == 0.25
    assert check("k", "speedup", measured(3.5, 3.3, 3.7, cv_b=cv_b, cv_c=cv_c), 3.0, noisy_cv=0.5).status is S.PASS


def test_noise_does_not_soften_a_fail_or_an_inconclusive() -> None:
    assert check("k", "speedup", measured(2.0, 1.9, 2.1, cv_b=0.9), 3.0).status is S.FAIL
    assert check("k", "speedup", measured(3.0, 2.9, 3.1, cv_b=0.9), 3.0).status is S.INCONCLUSIVE


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [(0.002, 0.008, S.PASS), (0.004, 0.010, S.PASS), (0.011, 0.02, S.FAIL), (0.005, 0.015, S.INCONCLUSIVE)],
)
def test_max_comparison_with_an_interval(low: float, high: float, expected: ValidationStatus) -> None:
    m = {"value": (low + high) / 2, "ci_low": low, "ci_high": high, "n": 500}
    result = check("correctness", "accuracy_loss", m, 0.01)
    assert result.status is expected
    assert result.comparison == "max"
    assert result.n == 500


def test_generic_interval_message() -> None:
    m = {"value": 0.0042, "ci_low": 0.0030, "ci_high": 0.0050, "n": 500}
    msg = check("correctness", "accuracy_loss", m, 0.01).message
    assert msg == "accuracy_loss 0.0042 (95% CI 0.0030-0.0050, n=500) <= allowed 0.01"


@pytest.mark.parametrize(
    ("metric", "value", "threshold", "status", "message"),
    [
        ("compression_ratio", 2.31, 2.0, S.PASS, "compression_ratio 2.31x >= required 2.0x"),
        ("compression_ratio", 1.9, 2.0, S.FAIL, "compression_ratio 1.90x < required 2.0x"),
        ("compression_ratio", 2, 2.0, S.PASS, "compression_ratio 2.00x >= required 2.0x"),
        ("accuracy_loss", 0.0042, 0.01, S.PASS, "accuracy_loss 0.0042 <= allowed 0.01"),
        ("accuracy_loss", 0.01, 0.01, S.PASS, "accuracy_loss 0.0100 <= allowed 0.01"),
        ("accuracy_loss", 0.02, 0.01, S.FAIL, "accuracy_loss 0.0200 > allowed 0.01"),
        ("memory_reduction", 0.52, 0.30, S.PASS, "memory_reduction 0.52 >= required 0.30"),
        ("acceptance_rate", 0.55, 0.6, S.FAIL, "acceptance_rate 0.55 < required 0.60"),
    ],
)
def test_exact_numbers_are_pass_or_fail(
    metric: str, value: float, threshold: float, status: ValidationStatus, message: str
) -> None:
    result = check("x", metric, value, threshold)
    assert (result.status, result.message) == (status, message)
    assert result.tolerance == 0.0
    assert (result.ci_low, result.ci_high, result.n) == (None, None, None)
    assert result.actual == pytest.approx(value)


def test_skipped_needs_and_keeps_a_reason() -> None:
    result = check("kv", "memory_reduction", None, 0.3, reason="no GPU on this machine")
    assert result.status is S.SKIPPED
    assert result.reason == "no GPU on this machine"
    assert result.actual is None
    assert result.tolerance is None
    assert "no GPU on this machine" in result.message
    with pytest.raises(ValueError, match="needs a reason"):
        check("kv", "memory_reduction", None, 0.3)


@pytest.mark.parametrize(
    "measurement",
    [math.nan, math.inf, -math.inf, {"value": math.nan}, {"value": 2.0, "ci_low": math.nan, "ci_high": 3.0}],
)
def test_nonfinite_measurement_fails_with_a_reason_and_stays_json(measurement: Any) -> None:
    result = check("embedding_compression", "compression_ratio", measurement, 2.0)
    assert result.status is S.FAIL
    assert result.reason is not None
    assert result.reason.startswith("measurement is NaN: ")
    assert result.actual is None
    assert result.ci_low is None
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert ValidationResult.from_dict(json.loads(text)).status is S.FAIL


def test_check_rejects_what_it_cannot_judge() -> None:
    with pytest.raises(ConfigError, match="unknown metric 'latency'"):
        check("x", "latency", 1.0, 1.0)
    with pytest.raises(TypeError, match="bool"):
        check("x", "speedup", True, 1.0)
    with pytest.raises(TypeError, match="cannot judge a str"):
        check("x", "speedup", "3.0", 1.0)
    with pytest.raises(ValueError, match="both ci_low and ci_high"):
        check("x", "speedup", {"value": 3.0, "ci_low": 2.0}, 1.0)
    with pytest.raises(ValueError, match="must not exceed"):
        check("x", "speedup", {"value": 3.0, "ci_low": 3.5, "ci_high": 2.0}, 1.0)
    with pytest.raises(ConfigError, match="finite"):
        check("x", "speedup", 3.0, math.nan)


def test_object_measurement_with_value_attribute() -> None:
    class Acc:
        value = 0.004
        ci_low = 0.001
        ci_high = 0.007
        n = 64

        def to_dict(self) -> dict[str, Any]:
            return {"value": self.value, "kl": math.nan}

    result = check("correctness", "accuracy_loss", Acc(), 0.01)
    assert result.status is S.PASS
    assert result.n == 64
    assert result.details["measurement"] == {"value": 0.004, "kl": None}  # NaN sanitised


def test_result_round_trip_and_validation() -> None:
    result = check("k", "speedup", measured(3.5, 3.3, 3.7), 3.0, device="cpu", details={"tag": (1, 2)})
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["status"] == "PASS"
    assert data["details"]["tag"] == [1, 2]
    back = ValidationResult.from_dict(data)
    assert back.to_dict() == data
    assert back.status is S.PASS
    assert back.device == "cpu"
    with pytest.raises(ValueError, match="actual must be finite"):
        ValidationResult("x", S.PASS, actual=math.nan)
    with pytest.raises(ValueError, match="comparison"):
        ValidationResult("x", S.PASS, comparison="between")
    with pytest.raises(ConfigError, match="'bogus'"):
        ValidationResult.from_dict({**data, "bogus": 1})


# --- gates -----------------------------------------------------------------------------------------------------

FAILS = {
    "strict": {S.FAIL, S.INCONCLUSIVE},
    "lenient": {S.FAIL},
    "report": set(),
}


@pytest.mark.parametrize("gate", sorted(FAILS))
@pytest.mark.parametrize("status", list(S))
def test_is_failing_truth_table(gate: str, status: ValidationStatus) -> None:
    assert is_failing(ValidationResult("x", status), gate) is (status in FAILS[gate])


def test_status_reads_as_its_value() -> None:
    assert f"{S.INCONCLUSIVE} {S.PASS!s}" == "INCONCLUSIVE PASS"
    assert S("WARNING") is S.WARNING


def test_is_failing_defaults_to_strict_and_rejects_unknown_gates() -> None:
    assert is_failing(ValidationResult("x", S.INCONCLUSIVE)) is True
    with pytest.raises(ConfigError, match="unknown gate 'loose'.*strict, lenient, report"):
        is_failing(ValidationResult("x", S.PASS), "loose")


def test_copy_speculation_gate_names_its_workload_and_fails_when_not_lossless() -> None:
    validator = OptimizationValidator()
    ok = validator.validate_speculative_copy(measured(1.8, 1.6, 2.0), lossless=True, workload="copy-heavy chat")
    assert ok.status is S.PASS
    assert "on copy-heavy chat" in ok.message
    assert ok.details["workload"] == "copy-heavy chat"
    wrong = validator.validate_speculative_copy(measured(1.8, 1.6, 2.0), lossless=False, workload="copy-heavy chat")
    assert wrong.status is S.FAIL
    assert "lossless" in wrong.reason
    assert validator.results[-1] is wrong
    slow = validator.validate_speculative_copy(measured(1.3, 1.2, 1.4), lossless=True)
    assert slow.status is S.FAIL
    assert slow.expected == 1.5
    skipped = validator.validate_speculative_copy(None, reason="no chat template")
    assert skipped.status is S.SKIPPED


# --- thresholds ------------------------------------------------------------------------------------------------


def test_threshold_defaults_are_the_seeds() -> None:
    # the seed's, plus the copy-heavy speculation gate of the issue that added it (1.5x on chat requests that copy)
    assert Thresholds().to_dict() == {**SEED_DEFAULTS, "copy_speculative_speedup": 1.5}
    assert {spec.threshold_key for spec in METRICS.values()} <= set(SEED_DEFAULTS)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("kernel_speedup", 0, "kernel_speedup.*> 0, got 0"),
        ("kernel_speedup", -1.5, "kernel_speedup.*got -1.5"),
        ("compression_ratio", math.inf, "compression_ratio.*got inf"),
        ("e2e_speedup", math.nan, "e2e_speedup.*got nan"),
        ("accuracy_loss", 1.5, r"accuracy_loss is a fraction.*\(0, 1\], got 1.5"),
        ("acceptance_rate", True, "acceptance_rate must be a number, got bool"),
        ("kv_memory_reduction", "0.3", "kv_memory_reduction must be a number, got str"),
    ],
)
def test_thresholds_reject_bad_values(key: str, value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Thresholds(**{key: value})


def test_thresholds_from_dict() -> None:
    assert Thresholds.from_dict({"kernel_speedup": 2}).kernel_speedup == 2.0
    assert Thresholds.from_dict(Thresholds().to_dict()) == Thresholds()
    with pytest.raises(ConfigError, match=r"'kernel_speedpu': a key of your own ends with its metric.*kernel_speedup"):
        Thresholds.from_dict({"kernel_speedpu": 2.0})
    # A key of one's own, named after its metric, is kept, checked like the built-in ones, and reported.
    own = Thresholds.from_dict({"attention_speedup": 1.5, "int4_accuracy_loss": 0.02})
    assert own.get("attention_speedup") == 1.5
    assert own.get("kernel_speedup") == 3.0
    assert own.get("nothing_speedup") is None
    assert own.to_dict()["int4_accuracy_loss"] == 0.02
    assert Thresholds.from_dict(own.to_dict()) == own
    with pytest.raises(ConfigError, match="int4_accuracy_loss is a fraction"):
        Thresholds.from_dict({"int4_accuracy_loss": 2.0})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "thresholds.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_thresholds_precedence(tmp_path: Path) -> None:
    text = "[default]\nkernel_speedup = 2.5\ncompression_ratio = 1.8\n"
    text += "[cpu]\nkernel_speedup = 1.5\n[cuda]\ne2e_speedup = 4\n"
    path = write(tmp_path, text)
    assert load_thresholds() == Thresholds()
    cpu = load_thresholds(path, "cpu")
    assert (cpu.kernel_speedup, cpu.compression_ratio, cpu.e2e_speedup) == (1.5, 1.8, 3.0)
    cuda = load_thresholds(path, "cuda")
    assert (cuda.kernel_speedup, cuda.compression_ratio, cuda.e2e_speedup) == (2.5, 1.8, 4.0)
    assert load_thresholds(path, "mps") == Thresholds(kernel_speedup=2.5, compression_ratio=1.8)
    assert load_thresholds(write(tmp_path, "[rocm]\naccuracy_loss = 0.02\n"), "rocm").accuracy_loss == 0.02


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[default\nkernel_speedup = 2", "not valid TOML"),
        ("[gpu]\nkernel_speedup = 2.0\n", r"unknown section \[gpu\].*default, cpu, cuda, rocm, mps"),
        ("kernel_speedup = 2.0\n", r"top-level key.*\[kernel_speedup\]"),
        ("[cpu]\nkernel_sped = 2.0\n", r"\[cpu\] unknown threshold key 'kernel_sped'.*kernel_speedup"),
        ('[default]\naccuracy_loss = "1%"\n', r"\[default\] threshold accuracy_loss must be a number, got str"),
        ("[cuda]\nacceptance_rate = 60\n", r"\[cuda\] threshold acceptance_rate is a fraction"),
    ],
)
def test_load_thresholds_errors_name_file_section_and_key(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_thresholds(path, "cpu")
    assert str(path) in str(info.value)


def test_load_thresholds_missing_file_and_unknown_device_class(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        load_thresholds(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="unknown device class 'tpu'"):
        load_thresholds(None, "tpu")


def test_shipped_profile_matches_the_code() -> None:
    path = val.default_profile_path()
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert set(data["default"]) == {f.name for f in fields(Thresholds)} - {"extra"}  # documents every key
    for device_class in DEVICE_CLASSES:
        assert load_thresholds(path, device_class) == Thresholds()


# --- the validator and its report ------------------------------------------------------------------------------


def full_run(validator: OptimizationValidator) -> None:
    validator.validate_kernel_performance(measured(3.42, 3.3, 3.55), baseline="HF generate fp32")
    validator.validate_embedding_compression(2.8)
    validator.validate_kv_cache_optimization(0.2, context_len=2048)
    validator.validate_speculative_decoding(0.72, speedup=measured(1.25, 1.1, 1.4, cv_c=0.5))
    validator.validate_end_to_end_system(None, reason="no end-to-end run")
    validator.validate_correctness({"value": 0.004, "ci_low": 0.001, "ci_high": 0.012})


def test_validator_records_the_seeds_names_and_counts() -> None:
    validator = OptimizationValidator(device="cpu")
    spec = validator.validate_speculative_decoding(0.7, speedup=1.5)
    assert spec.name == "speculative_decoding"
    assert spec.details["metric"] == "acceptance_rate"
    validator.results.clear()
    full_run(validator)
    names = [r.name for r in validator.results]
    assert names == [
        "kernel_performance",
        "embedding_compression",
        "kv_cache_optimization",
        "speculative_decoding",
        "speculative_speedup",
        "end_to_end_system",
        "correctness",
    ]
    statuses = [r.status for r in validator.results]
    assert statuses == [S.PASS, S.PASS, S.FAIL, S.PASS, S.INCONCLUSIVE, S.SKIPPED, S.INCONCLUSIVE]
    assert validator.results[2].details["context_len"] == 2048
    assert all(r.device == "cpu" for r in validator.results)
    assert validator.summary() == {
        "pass_rate": 3 / 6,
        "total_checks": 7,
        "passed": 3,
        "failed": 1,
        "warnings": 0,
        "inconclusive": 2,
        "skipped": 1,
    }
    assert [r.name for r in validator.failures("lenient")] == ["kv_cache_optimization"]
    assert len(validator.failures("strict")) == 3


def test_validator_uses_its_thresholds_and_counts_warnings() -> None:
    validator = OptimizationValidator(Thresholds(speculative_speedup=1.0, kv_memory_reduction=0.1))
    assert validator.validate_kv_cache_optimization(0.2).status is S.PASS
    validator.validate_speculative_decoding(0.1, speedup=measured(1.25, 1.1, 1.4, cv_c=0.5))
    assert [r.status for r in validator.results] == [S.PASS, S.FAIL, S.WARNING]
    assert validator.summary()["warnings"] == 1
    assert validator.results[-1].expected == 1.0


def test_summary_of_nothing_has_no_pass_rate() -> None:
    validator = OptimizationValidator()
    assert validator.summary()["pass_rate"] is None
    validator.validate_correctness(None, reason="no held-out text")
    assert validator.summary()["pass_rate"] is None
    validator.add(ValidationResult("from_plugin", S.PASS, actual=1.0, expected=1.0))
    assert validator.summary()["pass_rate"] == 1.0
    with pytest.raises(TypeError):
        validator.add({"name": "x", "status": "PASS"})  # type: ignore[arg-type]


def test_exported_report_validates_and_is_strict_json(tmp_path: Path) -> None:
    validator = OptimizationValidator(device="cpu")
    full_run(validator)
    validator.validate_embedding_compression(math.nan)
    out = validator.export_validation_report(
        tmp_path / "r" / "validation_report.json", environment=ENV, extra={"gate": "strict"}
    )
    report = strict_loads(out.read_text(encoding="utf-8"))
    jsonschema.validate(report, SCHEMA)
    assert report["schema_version"] == reports.SCHEMA_VERSION
    assert report["thresholds"] == Thresholds().to_dict()
    assert report["environment"] == ENV
    assert report["gate"] == "strict"
    assert report["summary"]["total_checks"] == 8
    assert report["summary"]["failed"] == 2
    assert report["results"][-1]["actual"] is None
    assert sorted(p.name for p in out.parent.iterdir()) == ["validation_report.json"]  # no temp file left
    with pytest.raises(ValueError, match="summary"):
        validator.export_validation_report(tmp_path / "x.json", environment=ENV, extra={"summary": {}})


def test_report_dict_is_what_export_writes(tmp_path: Path) -> None:
    validator = OptimizationValidator()
    full_run(validator)
    data = validator.report_dict(environment=ENV, extra={"gate_mode": "lenient"})
    jsonschema.validate(data, SCHEMA)
    out = validator.export_validation_report(tmp_path / "v.json", environment=ENV, extra={"gate_mode": "lenient"})
    assert strict_loads(out.read_text()) == data


def test_schema_rejects_a_broken_report(tmp_path: Path) -> None:
    validator = OptimizationValidator()
    validator.validate_embedding_compression(2.5)
    report = strict_loads(validator.export_validation_report(tmp_path / "v.json", environment=ENV).read_text())
    report["results"][0]["status"] = "MAYBE"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, SCHEMA)


def test_export_defaults_to_the_reports_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def fake_environment(device: Any = None) -> dict[str, Any]:
        calls.append(device)
        return {"device": str(device), "marker": 1}

    monkeypatch.setattr(reports, "environment", fake_environment)
    out = OptimizationValidator(device="cpu").export_validation_report(tmp_path / "v.json")
    assert strict_loads(out.read_text())["environment"] == {"device": "cpu", "marker": 1}
    assert calls == ["cpu"]


def test_validation_does_not_import_transformers() -> None:
    code = "import sys, ryzen_opt.validation.validator; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- property ----------------------------------------------------------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(a=finite, b=finite, threshold=st.floats(min_value=1e-6, max_value=1e6))
def test_exactly_one_verdict_and_max_mirrors_min(a: float, b: float, threshold: float) -> None:
    low, high = min(a, b), max(a, b)
    m = {"value": low + (high - low) / 2, "ci_low": low, "ci_high": high}
    lo = check("x", "speedup", m, threshold).status
    expected_min = S.PASS if low >= threshold else S.FAIL if high < threshold else S.INCONCLUSIVE
    assert lo is expected_min
    hi = check("x", "accuracy_loss", m, threshold).status
    expected_max = S.PASS if high <= threshold else S.FAIL if low > threshold else S.INCONCLUSIVE
    assert hi is expected_max
    assert {lo, hi} <= {S.PASS, S.FAIL, S.INCONCLUSIVE}
