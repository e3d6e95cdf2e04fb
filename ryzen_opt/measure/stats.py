"""The statistics of a speedup, without I/O and without torch: the bootstrap interval, the three-state verdict,
and the records a measurement is reported as.

Torch-free on purpose (numpy only): the pytest plugin and the validator judge records with these at any time,
and a user's ``pytest --help`` must not pay for torch. The sampler that produces the records is
:mod:`ryzen_opt.measure.timing`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

import numpy as np

from ryzen_opt.errors import ConfigError

STOP_REASONS = ("decided", "max_pairs", "max_time")


# Cap on elements of one bootstrap block (n_boot x n doubles), so a long run never allocates gigabytes.
_BOOT_BLOCK_ELEMENTS = 2_000_000


# Resamples per interval: enough that the quantiles' Monte-Carlo error stays well below timing noise.
N_BOOT = 2000


class Verdict(str, Enum):
    """Outcome of a speedup gate; see :func:`verdict_for`."""

    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


def verdict_for(ci_low: float, ci_high: float, threshold: float) -> Verdict:
    """Three-state verdict (docs/definitions.md): PASS when ``ci_low >= threshold``, FAIL when ``ci_high < threshold``.

    Anything else (the interval straddles the threshold) is INCONCLUSIVE: the data cannot tell, and saying
    PASS or FAIL would be reporting noise.

    Example:
        >>> verdict_for(2.1, 2.6, 2.0)
        <Verdict.PASS: 'PASS'>
    """
    if ci_low > ci_high:
        raise ValueError(f"ci_low ({ci_low!r}) must not exceed ci_high ({ci_high!r})")
    if ci_low >= threshold:
        return Verdict.PASS
    if ci_high < threshold:
        return Verdict.FAIL
    return Verdict.INCONCLUSIVE


def check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ConfigError(f"confidence must be strictly between 0 and 1, got {confidence!r}")


def bootstrap_ci(
    ratios: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    statistic: Callable[..., Any] = np.median,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval ``(low, high)`` of ``statistic`` (Efron & Tibshirani 1993, ch. 13).

    Resamples ``ratios`` (finite, at least one) with replacement ``n_boot`` times, vectorised as one
    ``(n_boot, n)`` index draw, applies ``statistic(samples, axis=1)`` (a numpy reducer; the median by default,
    robust to timing outliers) and returns its ``(1-c)/2`` and ``(1+c)/2`` quantiles. Seeded with
    ``numpy.random.default_rng(seed)``: the same data always give the same interval.
    """
    check_confidence(confidence)
    return percentile_interval(bootstrap_distribution(ratios, n_boot, seed, statistic), confidence)


def bootstrap_distribution(
    ratios: Sequence[float] | np.ndarray, n_boot: int, seed: int, statistic: Callable[..., Any] = np.median
) -> np.ndarray:
    """``n_boot`` values of ``statistic`` over resamples of ``ratios`` (vectorised, in bounded blocks)."""
    data = np.asarray(ratios, dtype=float)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D sequence, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"bootstrap got non-finite values: {data[~np.isfinite(data)].tolist()}")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BOOT_BLOCK_ELEMENTS // data.size)
    stats = np.empty(n_boot, dtype=float)
    for start in range(0, n_boot, rows_per_block):
        rows = min(rows_per_block, n_boot - start)
        stats[start : start + rows] = statistic(data[rng.integers(0, data.size, size=(rows, data.size))], axis=1)
    return stats


def percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _require_finite(owner: str, values: dict[str, Any]) -> None:
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{owner}.{name} must be finite (NaN/inf is not JSON and not a measurement), got {value}")


@dataclass(frozen=True)
class SpeedupMeasurement:
    """One paired A/B measurement: the speedup, its interval, and everything needed to judge it.

    ``ratio`` is the median of ``ratios`` (baseline time / candidate time per pair); ``ci_low``/``ci_high`` the
    seeded percentile-bootstrap interval of that median at ``confidence``.
    """

    ratios: tuple[float, ...]
    ratio: float
    ci_low: float
    ci_high: float
    n: int  # pairs
    confidence: float
    baseline_median_s: float
    candidate_median_s: float
    cv_baseline: float  # coefficient of variation (std/mean) of the baseline's times: how noisy the arm was
    cv_candidate: float
    threshold: float | None
    verdict: Verdict | None  # None exactly when threshold is None
    warmup: int  # untimed calls per arm before sampling
    threads: int  # torch.get_num_threads() while sampling; both arms share it
    elapsed_s: float  # wall time of the timed sampling (warm-up and lock wait excluded)
    stopped_because: str  # "decided" | "max_pairs" | "max_time"
    lock_wait_s: float = 0.0
    baseline_name: str = "baseline"
    candidate_name: str = "candidate"
    baseline_calls: int = 1  # calls of the baseline timed together as one sample (calibrated; times are per call)
    candidate_calls: int = 1  # the same for the candidate
    oversubscribed: str | None = None  # why the machine was too busy to trust this, or None
    baseline_iqr_s: float = 0.0  # interquartile range of the baseline's per-call times: its spread, robustly
    candidate_iqr_s: float = 0.0

    def __post_init__(self) -> None:
        # Validate here so that to_dict() is JSON-safe by construction: a NaN never reaches a report.
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if self.n != len(self.ratios):
            raise ValueError(f"SpeedupMeasurement.n ({self.n}) != len(ratios) ({len(self.ratios)})")
        _require_finite("SpeedupMeasurement", {f.name: getattr(self, f.name) for f in fields(self)})
        if any(not math.isfinite(r) or r <= 0 for r in self.ratios):
            raise ValueError("SpeedupMeasurement.ratios must be finite and positive")
        if self.stopped_because not in STOP_REASONS:
            raise ValueError(f"stopped_because must be one of {STOP_REASONS}, got {self.stopped_because!r}")
        if (self.threshold is None) != (self.verdict is None):
            raise ValueError("verdict must be given exactly when threshold is")
        if self.verdict is not None and not isinstance(self.verdict, Verdict):
            object.__setattr__(self, "verdict", Verdict(self.verdict))

    def describe(self) -> str:
        """One line for logs and terminal summaries, e.g. ``2.41x (95% CI 2.30-2.52, 24 pairs)``."""
        text = f"{self.ratio:.2f}x ({self.confidence * 100:g}% CI {self.ci_low:.2f}-{self.ci_high:.2f}, {self.n} pairs)"
        if self.verdict is not None:
            text += f" vs {self.threshold:g}x: {self.verdict.value}"
        if self.oversubscribed:
            text += f" [oversubscribed: {self.oversubscribed}]"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``json.dumps(..., allow_nan=False)`` accepts it); inverse of :meth:`from_dict`."""
        data = asdict(self)
        data["ratios"] = list(self.ratios)
        data["verdict"] = None if self.verdict is None else self.verdict.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedupMeasurement:
        """Rebuild a measurement from :meth:`to_dict` output (e.g. a report read back)."""
        kwargs = dict(data)
        if "calls_per_sample" in kwargs:  # reports written before the arms were calibrated apart
            kwargs["baseline_calls"] = kwargs["candidate_calls"] = kwargs.pop("calls_per_sample")
        kwargs["ratios"] = tuple(kwargs["ratios"])
        kwargs["verdict"] = None if kwargs.get("verdict") is None else Verdict(kwargs["verdict"])
        return cls(**kwargs)


@dataclass(frozen=True)
class NoiseFloor:
    """An A/A comparison (a function against itself): what "no change" looks like on this machine.

    ``smallest_detectable_speedup`` is how far noise alone pushed the A/A interval from 1: its upper bound
    (or ``1 / ci_low`` when that is farther, e.g. on a run whose interval fell below 1). A real speedup must
    clear that spread before its own interval's lower bound can clear 1; gates below it cannot PASS reliably.
    """

    ratio: float
    ci_low: float
    ci_high: float
    n: int
    smallest_detectable_speedup: float
    cv: float  # coefficient of variation of the timed calls (RMS of the two arms' CVs)
    confidence: float = 0.95

    def __post_init__(self) -> None:
        _require_finite("NoiseFloor", {f.name: getattr(self, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (finite by construction)."""
        return asdict(self)


def coefficient_of_variation(times: np.ndarray) -> float:
    """Coefficient of variation (sample std / mean) of positive times."""
    if times.size < 2:
        return 0.0
    return float(np.std(times, ddof=1) / np.mean(times))
