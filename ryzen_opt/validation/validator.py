"""Thresholds -> results -> validation report: where a real measurement becomes PASS, FAIL or something between.

:func:`check` is the one place the three-state rule (docs/definitions.md, "verdict") lives. With a confidence
interval, PASS needs the whole interval on the right side of the threshold and FAIL the whole interval on the
wrong side; anything else is INCONCLUSIVE, so that noise is never reported as a regression or a win ("max" gates,
like accuracy loss, are the mirror image). Exact measures (byte counts) are PASS or FAIL. A would-be PASS on noisy
timings is a WARNING; an unmeasured check is SKIPPED with a reason; a NaN/Inf measurement is a FAIL with a reason,
never a NaN in a report. :func:`is_failing` turns a status into a CI outcome under a gate policy, and
:func:`load_thresholds` reads per-device-class threshold profiles over the seed's defaults (:class:`Thresholds`).
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.measure.stats import SpeedupMeasurement, Verdict, verdict_for
from ryzen_opt.validation import reports
from ryzen_opt.validation.gates import (
    CHECKS,
    DEVICE_CLASSES,
    GATE_MODES,
    METRICS,
    MetricSpec,  # noqa: F401  (re-exported: ryzen_opt.validation.MetricSpec)
    is_fraction,
    threshold_kind,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

GATES = GATE_MODES  # the validator's name for them


class ValidationStatus(str, Enum):
    """Outcome of one check; the string values are what reports carry."""

    PASS = "PASS"
    FAIL = "FAIL"
    WARNING = "WARNING"
    INCONCLUSIVE = "INCONCLUSIVE"
    SKIPPED = "SKIPPED"

    def __str__(self) -> str:  # "PASS", not "ValidationStatus.PASS", in f-strings and terminal summaries
        return self.value


# Decimals of a measured value in messages: accuracy losses live around 1e-3, everything else around 1.
_VALUE_DECIMALS = {"accuracy_loss": 4}


def _json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(allow_nan=False)`` accepts: non-finite floats become ``None``."""
    if isinstance(obj, Enum):  # before str: ValidationStatus is a str subclass, and execnet can't send enums
        return obj.value
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "to_dict"):
        return _json_safe(obj.to_dict())
    return str(obj)  # Path, torch.device, ...


@dataclass
class ValidationResult:
    """One gate's outcome, with enough context to be read on its own in a report.

    ``tolerance`` is the measurement's uncertainty (the CI half-width, 0.0 for exact measures, None when nothing
    was measured); ``comparison`` "min" means ``actual`` must be >= ``expected``, "max" that it must be <=.
    """

    name: str
    status: ValidationStatus
    actual: float | None = None
    expected: float | None = None
    tolerance: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    unit: str = ""
    comparison: str = "min"
    baseline: str | None = None
    device: str | None = None
    message: str = ""
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate at construction so that a bad result from elsewhere (the plugin's add()) fails where it is made.
        self.status = ValidationStatus(self.status)
        if self.comparison not in ("min", "max"):
            raise ValueError(f"ValidationResult.comparison must be 'min' or 'max', got {self.comparison!r}")
        for name in ("actual", "expected", "tolerance", "ci_low", "ci_high"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"ValidationResult.{name} must be finite or None (NaN is not JSON), got {value!r}")
        if not isinstance(self.details, dict):
            raise TypeError(f"ValidationResult.details must be a dict, got {type(self.details).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``json.dumps(..., allow_nan=False)`` accepts it); inverse of :meth:`from_dict`."""
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValidationResult:
        """Rebuild a result from :meth:`to_dict` output, e.g. one sent from an xdist worker or read from a report.

        Raises:
            ConfigError: a key that is not a field (a report from another schema version, or a typo).
        """
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown ValidationResult keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**{**data, "details": dict(data.get("details") or {})})


def _fmt_threshold(value: float, min_decimals: int) -> str:
    """Shortest decimal form with at least ``min_decimals``: 3.0 -> "3.0", 0.3 -> "0.30", 0.005 -> "0.005"."""
    for decimals in range(min_decimals, 10):
        text = f"{value:.{decimals}f}"
        if abs(float(text) - value) <= 1e-12 * max(1.0, abs(value)):
            return text
    return f"{value:.6g}"


def _real(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _field(measurement: Any, key: str) -> Any:
    return measurement.get(key) if isinstance(measurement, Mapping) else getattr(measurement, key, None)


class _Parsed(NamedTuple):
    value: float
    low: float | None
    high: float | None
    n: int | None
    confidence: float
    n_text: str  # how n reads in a message: "24 pairs" or "n=500"


def _parse(name: str, measurement: Any, extra: dict[str, Any]) -> _Parsed:
    """The value, interval and sample count of any accepted measurement; its raw record goes into ``extra``."""
    if isinstance(measurement, SpeedupMeasurement):
        extra["measurement"] = measurement.to_dict()
        m = measurement
        return _Parsed(m.ratio, m.ci_low, m.ci_high, m.n, m.confidence, f"{m.n} pairs")
    if isinstance(measurement, numbers.Real) and not isinstance(measurement, bool):
        return _Parsed(float(measurement), None, None, None, 0.95, "")  # exact: a count of bytes has no interval
    if _field(measurement, "value") is None:
        raise TypeError(
            f"{name}: cannot judge a {type(measurement).__name__}; pass a SpeedupMeasurement, a number, a dict/object "
            "with 'value' (and optional ci_low, ci_high, n), or None with a reason"
        )
    low, high = (
        None if _field(measurement, k) is None else _real(_field(measurement, k), k) for k in ("ci_low", "ci_high")
    )
    if (low is None) != (high is None):
        raise ValueError(f"{name}: a measurement needs both ci_low and ci_high or neither, got {low!r}, {high!r}")
    if low is not None and high is not None and low > high:  # NaN compares False: judged as non-finite later
        raise ValueError(f"{name}: ci_low ({low!r}) must not exceed ci_high ({high!r})")
    n = _field(measurement, "n")
    extra["measurement"] = _json_safe(measurement)
    value = _real(_field(measurement, "value"), f"{name} value")
    confidence = float(_field(measurement, "confidence") or 0.95)
    return _Parsed(value, low, high, None if n is None else int(n), confidence, "" if n is None else f"n={int(n)}")


def _judge(metric: str, p: _Parsed, threshold: float, measurement: Any, noisy_cv: float) -> tuple[Verdict, bool]:
    """The verdict on the interval (or the exact value), and whether the timing arms were noisier than ``noisy_cv``."""
    low, high = (p.low, p.high) if p.low is not None and p.high is not None else (p.value, p.value)
    if METRICS[metric].comparison == "min":
        verdict = verdict_for(low, high, threshold)
    else:  # the mirror image: negate everything, so PASS iff high <= threshold and FAIL iff low > threshold
        verdict = verdict_for(-high, -low, -threshold)
    cvs = [_field(measurement, k) for k in ("cv_baseline", "cv_candidate")]
    return verdict, any(isinstance(v, numbers.Real) and float(v) > noisy_cv for v in cvs)


def check(
    name: str,
    metric: str,
    measurement: Any,
    threshold: float,
    *,
    baseline: str | None = None,
    device: Any = None,
    noisy_cv: float = 0.25,
    reason: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> ValidationResult:
    """Judge one measurement against one threshold: the only place the three-state logic lives.

    Args:
        name: the result's name in the report (e.g. "kernel_performance").
        metric: a key of :data:`METRICS`; fixes the comparison direction and unit.
        measurement: a ``bench.SpeedupMeasurement``; a plain number (exact, no interval); a dict or object with
            ``value`` and optional ``ci_low``, ``ci_high``, ``n``, ``confidence``; or ``None`` (not measured:
            SKIPPED, and ``reason`` is required).
        threshold: the gate value (finite).
        baseline: what the candidate was compared against, named in the message; defaults to a
            SpeedupMeasurement's ``baseline_name`` unless that is the generic "baseline".
        device: where it was measured (stored as a string).
        noisy_cv: a would-be PASS whose arms' coefficient of variation (``cv_baseline``/``cv_candidate``) exceeds
            this is a WARNING: the interval of a noisy run may not reproduce.
        reason: why nothing was measured (required with ``measurement=None``); otherwise kept as a note.
        details: extra JSON-able context stored in the result (e.g. a context length).

    Returns:
        The :class:`ValidationResult`; nothing is recorded anywhere (see :class:`OptimizationValidator`).
    """
    threshold = _checked_threshold(name, metric, measurement, threshold, reason)
    spec = METRICS[metric]
    x = "x" if spec.unit == "x" else ""
    thr_text = f"{'required' if spec.comparison == 'min' else 'allowed'} {_fmt_threshold(threshold, 1 if x else 2)}{x}"
    if baseline is None and isinstance(measurement, SpeedupMeasurement) and measurement.baseline_name != "baseline":
        baseline = measurement.baseline_name
    vs = f" vs {baseline}" if baseline else ""
    extra: dict[str, Any] = {"metric": metric, **dict(details or {})}
    if extra.get("workload"):  # what was run: a speedup holds for a workload, not in general
        vs += f" on {extra['workload']}"
    if measurement is not None and reason:
        extra["note"], reason = reason, None
    base: dict[str, Any] = {"name": name, "expected": threshold, "unit": spec.unit, "comparison": spec.comparison}
    base.update(baseline=baseline, device=None if device is None else str(device), details=extra)

    p = None if measurement is None else _parse(name, measurement, extra)
    if p is None:
        text = f"{metric} not measured ({thr_text}{vs}): {reason}"
        result = ValidationResult(status=ValidationStatus.SKIPPED, message=text, reason=reason, **base)
    elif not all(math.isfinite(v) for v in (p.value, p.low, p.high) if v is not None):
        text, result = _non_finite_result(metric, p, f"{thr_text}{vs}", base)
    else:
        text, result = _judged_result(metric, p, threshold, measurement, noisy_cv, f"{thr_text}{vs}", base)
    logger.log(logging.INFO if result.status is ValidationStatus.PASS else logging.WARNING, "%s: %s", name, text)
    return result


def _checked_threshold(name: str, metric: str, measurement: Any, threshold: float, reason: str | None) -> float:
    """The threshold as a float, after refusing an unknown metric, a non-finite threshold or an unexplained skip."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    threshold = _real(threshold, f"threshold of {name}")
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold of {name} must be finite, got {threshold!r}")
    if measurement is None and not reason:
        raise ValueError(f"{name}: a check without a measurement needs a reason (why it was not measured)")
    return threshold


def _non_finite_result(metric: str, p: _Parsed, against: str, base: dict[str, Any]) -> tuple[str, ValidationResult]:
    """A FAIL with its reason for a NaN/Inf measurement: a broken measurement never passes, nor reaches a report."""
    why = f"measurement is NaN: {metric} = {p.value!r} (interval {p.low!r} to {p.high!r}); a non-finite number "
    why += "is a broken measurement and never passes"
    text = f"{metric} is not a number: FAIL against {against}"
    return text, ValidationResult(status=ValidationStatus.FAIL, n=p.n, message=text, reason=why, **base)


def _judged_result(
    metric: str, p: _Parsed, threshold: float, measurement: Any, noisy_cv: float, against: str, base: dict[str, Any]
) -> tuple[str, ValidationResult]:
    """The three-state verdict on a finite measurement, with its message; a noisy would-be PASS is a WARNING.

    ``against`` is the threshold's text with what was compared (e.g. "required 3.0x vs eager");
    ``base["details"]`` gets the noise record of a WARNING.
    """
    spec = METRICS[metric]
    is_min, x = spec.comparison == "min", "x" if spec.unit == "x" else ""
    verdict, noisy = _judge(metric, p, threshold, measurement, noisy_cv)
    d = _VALUE_DECIMALS.get(metric, 2)
    text = f"{metric} {p.value:.{d}f}{x}"
    if p.low is not None and p.high is not None:
        text += f" ({p.confidence * 100:g}% CI {p.low:.{d}f}-{p.high:.{d}f}{', ' if p.n_text else ''}{p.n_text})"
    relation = {"PASS": ">=" if is_min else "<=", "FAIL": "<" if is_min else ">"}
    text += f" {relation.get(verdict.value, 'is inconclusive against')} {against}"
    status = ValidationStatus(verdict.value)
    if verdict is Verdict.INCONCLUSIVE:
        text += " (the interval contains the threshold: more samples or less noise needed)"
    elif verdict is Verdict.PASS and noisy:
        status = ValidationStatus.WARNING
        cvs = {k: float(_field(measurement, k) or 0.0) for k in ("cv_baseline", "cv_candidate")}
        arms = ", ".join(f"{k[3:]} CV {v:.2f}" for k, v in cvs.items() if v > noisy_cv)
        text += f"; WARNING: noisy measurement ({arms} > {noisy_cv:g}), the pass may not reproduce"
        base["details"]["noisy"] = {**cvs, "noisy_cv": noisy_cv}
    half = (p.high - p.low) / 2.0 if p.low is not None and p.high is not None else 0.0
    result = ValidationResult(
        status=status, actual=p.value, tolerance=half, ci_low=p.low, ci_high=p.high, n=p.n, message=text, **base
    )
    return text, result


def is_failing(result: ValidationResult, gate: str = "strict") -> bool:
    """Whether ``result`` fails CI under ``gate``.

    Args:
        result: a checked result.
        gate: "strict" (FAIL and INCONCLUSIVE fail: an unproven claim is not a pass), "lenient" (only FAIL fails;
            INCONCLUSIVE is logged as a warning) or "report" (never fails: measure and report only).

    Returns:
        True when the result should fail the run. WARNING and SKIPPED never do.
    """
    if gate not in GATES:
        raise ConfigError(f"unknown gate {gate!r}; allowed: {', '.join(GATES)}")
    if gate == "report":
        return False
    if result.status is ValidationStatus.INCONCLUSIVE:
        if gate == "lenient":
            logger.warning("%s is INCONCLUSIVE; passing under the lenient gate: %s", result.name, result.message)
            return False
        return True
    return result.status is ValidationStatus.FAIL


def _validate_threshold(key: str, value: Any) -> float:
    """The bounds every threshold must satisfy; the error names the key and the bad value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"threshold {key} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"threshold {key} must be a finite number > 0, got {value!r}")
    if is_fraction(key) and number > 1:
        raise ConfigError(f"threshold {key} is a fraction and must be in (0, 1], got {value!r}")
    return number


@dataclass(frozen=True)
class Thresholds:
    """The gate values (the seed's defaults; docs/definitions.md). Speedups and ratios are "x".

    A profile may add keys of its own (``extra``): any name that ends with its metric (``attention_speedup``,
    ``int4_accuracy_loss``), so that a marker naming it is checked against the right kind of gate.
    """

    kernel_speedup: float = 3.0
    compression_ratio: float = 2.0
    kv_memory_reduction: float = 0.30
    acceptance_rate: float = 0.60
    speculative_speedup: float = 1.2
    copy_speculative_speedup: float = 1.5
    e2e_speedup: float = 3.0
    accuracy_loss: float = 0.01
    extra: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "extra":
                object.__setattr__(self, f.name, _validate_threshold(f.name, getattr(self, f.name)))
        extra = {}
        for key, value in dict(self.extra).items():
            _check_key(key)
            extra[key] = _validate_threshold(key, value)
        object.__setattr__(self, "extra", extra)

    def get(self, key: str) -> float | None:
        """The threshold called ``key`` (built-in or the profile's own), or ``None``."""
        if key in self.extra:
            return self.extra[key]
        return getattr(self, key) if key in _BUILT_IN_KEYS else None

    def to_dict(self) -> dict[str, float]:
        """Key -> value, the built-in keys then the profile's own; what the report's ``thresholds`` block holds."""
        data = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Build from a (partial) mapping; missing keys keep their defaults, keys of one's own go to ``extra``.

        Raises:
            ConfigError: a key that names no metric (see :func:`threshold_kind`) or a bad value.
        """
        for key in data:
            _check_key(key)
        own = {k: v for k, v in data.items() if k not in _BUILT_IN_KEYS}
        return cls(**{k: v for k, v in data.items() if k in _BUILT_IN_KEYS}, extra=own)


_BUILT_IN_KEYS = frozenset(f.name for f in fields(Thresholds) if f.name != "extra")


def _check_key(key: str) -> None:
    if key in _BUILT_IN_KEYS or (key != "extra" and threshold_kind(key) is not None):
        return
    endings = ", ".join(f"_{m}" for m in METRICS)
    raise ConfigError(
        f"unknown threshold key {key!r}: a key of your own ends with its metric ({endings}), e.g. "
        f"attention_speedup; the built-in keys are {', '.join(sorted(_BUILT_IN_KEYS))}"
    )


def default_profile_path() -> Path:
    """The shipped example profile, ``ryzen_opt/profiles/thresholds.toml`` (the file users copy and edit)."""
    return Path(str(resources.files("ryzen_opt.validation").joinpath("profiles/thresholds.toml")))


def load_thresholds(path: str | Path | None = None, device_class: str = "cpu") -> Thresholds:
    """Thresholds for ``device_class``: built-in defaults < the profile's ``[default]`` < its ``[<device_class>]``.

    Args:
        path: a TOML profile with an optional ``[default]`` table and tables ``[cpu]``, ``[cuda]``, ``[rocm]``,
            ``[mps]``; ``None`` gives the built-in defaults. A GPU is judged by different bars than a 2-core CPU,
            so one file carries all of them.
        device_class: which device table applies.

    Returns:
        The merged, validated :class:`Thresholds`.

    Raises:
        ConfigError: a missing or unreadable file, bad TOML, an unknown section or key, or a bad value, naming the
            file, the section and the key.
    """
    if device_class not in DEVICE_CLASSES:
        raise ConfigError(f"unknown device class {device_class!r}; allowed: {', '.join(DEVICE_CLASSES)}")
    if path is None:
        return Thresholds()
    source = Path(path)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"thresholds profile {source} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"thresholds profile {source} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"thresholds profile {source} is not valid TOML: {exc}") from exc

    sections = ("default", *DEVICE_CLASSES)
    merged: dict[str, float] = {}
    for section, table in data.items():
        if section not in sections or not isinstance(table, dict):
            what = "section" if isinstance(table, dict) else "top-level key (thresholds go in a table)"
            raise ConfigError(f"{source}: unknown {what} [{section}]; allowed sections: {', '.join(sections)}")
        for key, value in table.items():
            try:
                _check_key(key)
                _validate_threshold(key, value)
            except ConfigError as exc:
                raise ConfigError(f"{source}: [{section}] {exc}") from None
    for section in ("default", device_class):
        merged.update(data.get(section, {}))
    thresholds = Thresholds.from_dict(merged)
    logger.debug("thresholds for %s from %s: %s", device_class, source, thresholds)
    return thresholds


class OptimizationValidator:
    """Collects checked results of real measurements and writes ``validation_report.json``.

    Every ``validate_*`` method takes a measurement (never a default), appends the result to :attr:`results` and
    returns it. Pass ``None`` with ``reason=...`` for a check that could not run (it is SKIPPED).
    """

    def __init__(self, thresholds: Thresholds | None = None, *, device: Any = None) -> None:
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self.device = None if device is None else str(device)
        self.results: list[ValidationResult] = []

    def _run(self, name: str, measurement: Any, **kwargs: Any) -> ValidationResult:
        metric, key = CHECKS[name]
        threshold = getattr(self.thresholds, key)
        return self.add(check(name, metric, measurement, threshold, device=self.device, **kwargs))

    def add(self, result: ValidationResult) -> ValidationResult:
        """Record a result produced elsewhere (e.g. by the pytest plugin); returns it."""
        if not isinstance(result, ValidationResult):
            raise TypeError(f"add() takes a ValidationResult, got {type(result).__name__}")
        self.results.append(result)
        return result

    def validate_kernel_performance(
        self, speedup: Any, *, baseline: str | None = None, reason: str | None = None
    ) -> ValidationResult:
        """Kernel speedup (baseline time / optimized time) against ``kernel_speedup``."""
        return self._run("kernel_performance", speedup, baseline=baseline, reason=reason)

    def validate_embedding_compression(self, ratio: Any, *, reason: str | None = None) -> ValidationResult:
        """Embedding/LM-head compression ratio (original / compressed bytes) against ``compression_ratio``."""
        return self._run("embedding_compression", ratio, reason=reason)

    def validate_kv_cache_optimization(
        self, reduction: Any, *, context_len: int | None = None, reason: str | None = None
    ) -> ValidationResult:
        """KV-cache reduction ``1 - optimized/baseline`` (stated at ``context_len``) against ``kv_memory_reduction``."""
        return self._run("kv_cache_optimization", reduction, reason=reason, details={"context_len": context_len})

    def validate_speculative_decoding(
        self, acceptance_rate: Any, *, speedup: Any = None, baseline: str | None = None, reason: str | None = None
    ) -> ValidationResult:
        """Draft acceptance rate against ``acceptance_rate``; a given ``speedup`` also records "speculative_speedup".

        Returns:
            The acceptance-rate result (the gated value); the speedup result, when any, follows it in :attr:`results`.
        """
        result = self._run("speculative_decoding", acceptance_rate, reason=reason)
        if speedup is not None:
            self._run("speculative_speedup", speedup, baseline=baseline)
        return result

    def validate_speculative_copy(
        self,
        speedup: Any,
        *,
        lossless: bool | None = None,
        baseline: str | None = None,
        workload: str | None = None,
        reason: str | None = None,
    ) -> ValidationResult:
        """Speculative decoding on prompts whose answers copy them, against ``copy_speculative_speedup``.

        ``lossless=False`` (greedy output that left the target's own without a near-tie) FAILS whatever the speed:
        a faster wrong answer is not an optimization.
        """
        result = self._run(
            "speculative_copy_speedup", speedup, baseline=baseline, reason=reason, details={"workload": workload}
        )
        if lossless is False:
            why = "greedy speculative output differs from the target's own (no near-tie): speculation must be lossless"
            result = replace(result, status=ValidationStatus.FAIL, reason=why, message=f"{result.message}; FAIL: {why}")
            self.results[-1] = result
        return result

    def validate_end_to_end_system(
        self, speedup: Any, *, baseline: str | None = None, workload: str | None = None, reason: str | None = None
    ) -> ValidationResult:
        """End-to-end generation speedup of all optimizations together against ``e2e_speedup``, measured on
        ``workload`` (named in the result: a speedup holds for a workload)."""
        return self._run("end_to_end_system", speedup, baseline=baseline, reason=reason, details={"workload": workload})

    def validate_correctness(self, accuracy_loss: Any, *, reason: str | None = None) -> ValidationResult:
        """Relative top-1 accuracy loss against the reference; must be at most ``accuracy_loss``."""
        return self._run("correctness", accuracy_loss, reason=reason)

    def failures(self, gate: str = "strict") -> list[ValidationResult]:
        """The recorded results that fail CI under ``gate`` (see :func:`is_failing`)."""
        return [r for r in self.results if is_failing(r, gate)]

    def summary(self) -> dict[str, Any]:
        """The seed's counts plus ``inconclusive`` and ``skipped``.

        Returns:
            ``pass_rate`` is PASS results over those that ran (all but SKIPPED), ``None`` when none ran: a run that
            skipped everything has no pass rate, not a perfect one.
        """
        c = {status.name: sum(r.status is status for r in self.results) for status in ValidationStatus}
        ran = len(self.results) - c["SKIPPED"]
        summary = {"pass_rate": c["PASS"] / ran if ran else None, "total_checks": len(self.results)}
        keys = {"passed": "PASS", "failed": "FAIL", "warnings": "WARNING", "inconclusive": "INCONCLUSIVE"}
        return {**summary, **{k: c[v] for k, v in keys.items()}, "skipped": c["SKIPPED"]}

    def report_dict(
        self, *, environment: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The ``validation_report.json`` content (schema: ``schemas/validation_report.schema.json``), JSON-safe.

        Separate from :meth:`export_validation_report` so that a caller that writes files itself (the pytest
        plugin's controller under xdist) builds the same report.

        Args:
            environment: the environment block; default :func:`ryzen_opt.validation.reports.environment` for this
            device.
            extra: more top-level fields (e.g. the gate mode); may not replace the core ones.

        Returns:
            ``{"schema_version", "summary", "results", "thresholds", "environment", **extra}``.
        """
        if environment is None:
            try:
                environment = reports.environment(self.device)
            except (RyzenOptError, ValueError, RuntimeError):  # e.g. a device string this process cannot open
                logger.debug("environment(%r) failed; describing the host only", self.device, exc_info=True)
                environment = {**reports.environment(), "device": self.device}
        report: dict[str, Any] = {
            "schema_version": reports.SCHEMA_VERSION,
            "summary": self.summary(),
            "results": [r.to_dict() for r in self.results],
            "thresholds": self.thresholds.to_dict(),
            "environment": _json_safe(environment),
        }
        clash = sorted(set(extra or {}) & set(report))
        if clash:
            raise ValueError(f"extra may not replace core report fields {clash}")
        report.update(_json_safe(extra or {}))
        return report

    def export_validation_report(
        self, path: str | Path, *, environment: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
    ) -> Path:
        """Write :meth:`report_dict` to ``path`` atomically (a reader never sees half a report).

        Args:
            path: the report file; its directory is created.
            environment, extra: as for :meth:`report_dict`.

        Returns:
            The written path.
        """
        report = self.report_dict(environment=environment, extra=extra)
        written = reports.atomic_write_json(path, report)
        logger.info("validation report: %s (%s)", written, report["summary"])
        return written
