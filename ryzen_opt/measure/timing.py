"""The paired A/B sampler: how ryzen-opt measures a speedup, and how sure it is.

A speedup (docs/definitions.md) is the baseline's time over the candidate's, measured on paired,
interleaved samples in one process, after warm-up, with the same thread count for both arms. Why each piece:

- **Pairs, not two separate runs.** Machine state drifts (thermal throttling, turbo budgets, a neighbour
  process). Timing A and B back to back and taking the per-pair ratio cancels drift slower than one pair.
- **ABBA order** (A-B, B-A, A-B, ...): the classic counterbalanced design from crossover trials. Whichever arm
  runs second in a pair inherits warmer caches or a cooler core; alternating the order cancels that carry-over
  to first order instead of handing it to one arm.
- **Median of the per-pair ratios** with a **percentile bootstrap** interval (Efron & Tibshirani, "An
  Introduction to the Bootstrap", 1993, ch. 13): timing noise is skewed and has outliers (a GC, an
  interrupt); the median ignores them and the bootstrap needs no normality assumption.
- **Three-state verdict**: PASS only when the interval's lower bound clears the threshold, FAIL only when its
  upper bound is below it, INCONCLUSIVE otherwise, so that noise is never reported as a regression or a win.
- **Adaptive stopping**: sample until the verdict is decided (or, with no threshold, until the interval is
  narrow) or a pair/time budget runs out. Stopping at the first of many looks that happens to clear the gate
  inflates the error rate ("optional stopping": at a true ratio equal to the threshold, 39 looks at a 95%
  interval PASS about 16% of runs, not 2.5%). So an early stop needs the verdict to hold at a Bonferroni-
  corrected confidence ``1 - (1 - confidence) / looks``; the reported interval stays at ``confidence``.

- **Calibrated calls per sample** (the idea of ``timeit.autorange``): a call of ~100 ns timed alone measures the
  timer as much as the call. After warm-up, each arm's number of calls per sample grows (1, 2, 5, 10, 20, ...) until
  one of its samples takes at least ``MIN_SAMPLE_S`` (1 ms: two timer reads of ~50 ns are then 0.01% of it). Each arm
  has its own count (``baseline_calls``, ``candidate_calls``, recorded): one count for both made a 100 us arm run
  20,000 times a sample beside a 30 ns one, so a pair took seconds. Times are reported per call; a pair's ratio is
  of per-call times, its two samples still adjacent in time.
- **Oversubscription is flagged**, not hidden: more torch threads than the cores this process may run on, or a
  coefficient of variation above 0.5 in either arm, marks the measurement ``oversubscribed`` with the reason.

The clock is injectable (``timer``) so that the statistics are tested with fake clocks, never real timings.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

import numpy as np
import torch

from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.locking import file_lock
from ryzen_opt.measure.accuracy import AccuracyMeasurement, accuracy, greedy_agreement  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

DEFAULT_LOCK_NAME = "ryzen_opt_perf.lock"
STOP_REASONS = ("decided", "max_pairs", "max_time")
_NS_PER_S = 1e9
# Fewer pairs than this give no interval worth the name: a bootstrap of 2 values has 3 distinct medians.
_MIN_PAIRS_FLOOR = 3
# Cap on elements of one bootstrap block (n_boot x n doubles), so a long run never allocates gigabytes.
_BOOT_BLOCK_ELEMENTS = 2_000_000
# Resamples per interval: enough that the quantiles' Monte-Carlo error stays well below timing noise.
_N_BOOT = 2000


class MeasurementError(RyzenOptError, ValueError):
    """A timing that cannot be a real measurement: zero, negative or non-finite (a coarse or broken timer)."""


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


def _check_confidence(confidence: float) -> None:
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
    _check_confidence(confidence)
    return _percentile_interval(_bootstrap_distribution(ratios, n_boot, seed, statistic), confidence)


def _bootstrap_distribution(
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


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
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


def _cv(times: np.ndarray) -> float:
    """Coefficient of variation (sample std / mean) of positive times."""
    if times.size < 2:
        return 0.0
    return float(np.std(times, ddof=1) / np.mean(times))


def _resolve_sync(sync: Callable[[], None] | None, device: Any) -> Callable[[], None] | None:
    """An explicit ``sync`` wins; else a CUDA/ROCm device gets ``torch.cuda.synchronize``; CPU needs none.

    Kernels launch asynchronously on a GPU: without a sync the timer measures launch overhead, not the work.
    """
    if sync is not None or device is None:
        return sync
    dev = torch.device(device)
    if dev.type == "cuda":

        def _cuda_sync() -> None:
            torch.cuda.synchronize(dev)

        return _cuda_sync
    if dev.type == "mps":
        return torch.mps.synchronize
    return None


def _timed_call(
    fn: Callable[[], Any], timer: Callable[[], int], sync: Callable[[], None] | None, what: str
) -> tuple[float, int]:
    """Run ``fn`` once between two synced timer reads; return ``(duration_ns, stop_timestamp)``."""
    if sync is not None:
        sync()  # drain work queued before this call so that it is not billed to it
    start = timer()
    fn()
    if sync is not None:
        sync()  # wait for this call's own queued work
    stop = timer()
    duration = float(stop - start)
    if not (math.isfinite(duration) and duration > 0):
        raise MeasurementError(
            f"{what} measured a non-positive or non-finite time ({duration!r} ns): the timer is too coarse "
            "for this workload or not monotonic; time a larger unit of work or use time.perf_counter_ns"
        )
    return duration, stop


def _validate_compare_args(
    threshold: float | None, min_pairs: int, max_pairs: int, max_time: float, warmup: int, check_every: int
) -> None:
    checks = [
        (min_pairs >= _MIN_PAIRS_FLOOR, f"min_pairs must be >= {_MIN_PAIRS_FLOOR}, got {min_pairs!r}"),
        (max_pairs >= min_pairs, f"max_pairs must be >= min_pairs ({min_pairs!r}), got {max_pairs!r}"),
        (max_time > 0, f"max_time must be > 0 seconds (math.inf for no limit), got {max_time!r}"),  # NaN fails too
        (warmup >= 0, f"warmup must be >= 0, got {warmup!r}"),
        (check_every >= 1, f"check_every must be >= 1, got {check_every!r}"),
        (
            threshold is None or (math.isfinite(threshold) and threshold > 0),
            f"threshold must be a finite number > 0, got {threshold!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def compare(
    baseline: Callable[[], Any],
    candidate: Callable[[], Any],
    *,
    threshold: float | None = None,
    min_pairs: int = 10,
    max_pairs: int = 200,
    max_time: float = 60.0,
    warmup: int = 2,
    confidence: float = 0.95,
    check_every: int = 5,
    timer: Callable[[], int] = time.perf_counter_ns,
    sync: Callable[[], None] | None = None,
    device: Any = None,
    baseline_name: str = "baseline",
    candidate_name: str = "candidate",
    seed: int = 0,
    lock: bool | str | os.PathLike[str] | None = None,
    target_precision: float = 0.02,
    calibrate: bool | None = None,
) -> SpeedupMeasurement:
    """Measure the speedup of ``candidate`` over ``baseline`` on paired, interleaved (ABBA) samples.

    ``warmup`` untimed calls of each arm (compilation, caches, allocator) come first. Then pair ``i`` runs A-B
    when ``i`` is even and B-A when odd, each call timed alone between two ``sync()``-ed ``timer()`` reads.
    From ``min_pairs`` on, every ``check_every`` pairs, sampling stops ("decided") when, with a ``threshold``,
    the Bonferroni-corrected interval (module docstring) gives PASS or FAIL, or, without one, when the
    interval's half-width is below ``target_precision`` of the ratio. It also stops at ``max_pairs``, or once
    sampling has run longer than ``max_time`` seconds ("max_time": this wins over ``min_pairs``, but never
    leaves fewer than 3 pairs). The reported interval and verdict always use ``confidence`` on all pairs.

    Args:
        baseline: the reference arm ("A"); its time is the ratio's numerator.
        candidate: the optimized arm ("B").
        threshold: the speedup gate; ``None`` measures without a verdict.
        min_pairs, max_pairs: pairs before the first look (>= 3), and the pair budget.
        max_time: seconds for the timed sampling (warm-up and lock wait excluded); ``math.inf`` for no limit.
        warmup: untimed calls per arm before sampling.
        confidence, check_every, seed: the interval's coverage, pairs between looks, bootstrap seed.
        timer: integer-nanosecond clock, injectable so that tests drive a fake one.
        sync: called before each timer read; by default ``torch.cuda.synchronize(device)`` on a CUDA ``device``.
        device: the device the arms run on; only used to choose ``sync``.
        baseline_name, candidate_name: named in reports, e.g. "HF generate, eager attention, dynamic cache, fp32".
        lock: truthy to time under :func:`serial_lock` (``True``: default path; else that path), so that two
            processes (pytest-xdist workers) never time at once.
        target_precision: relative CI half-width that ends a run without a threshold.
        calibrate: time as many calls per sample as make the faster arm's sample last ``MIN_SAMPLE_S`` (module
            docstring); ``None`` calibrates with the real clock and not with an injected ``timer`` (whose fake
            durations are the test's own), ``False`` times one call per sample.

    Example:
        >>> compare(eager_step, compiled_step, threshold=1.5).describe()  # doctest: +SKIP
        '2.41x (95% CI 2.30-2.52, 24 pairs) vs 1.5x: PASS'
    """
    _validate_compare_args(threshold, min_pairs, max_pairs, max_time, warmup, check_every)
    _check_confidence(confidence)
    if not 0 < target_precision < 1:
        raise ConfigError(f"target_precision must be in (0, 1), got {target_precision!r}")
    sync_fn = _resolve_sync(sync, device)
    looks = 1 + math.ceil((max_pairs - min_pairs) / check_every)
    decision_confidence = 1.0 - (1.0 - confidence) / looks

    if calibrate is None:
        calibrate = timer is time.perf_counter_ns
    warm: tuple[float, float] | None = None
    for i in range(warmup):  # interleaved like the sampling so both arms reach the same warm state
        if calibrate and i == warmup - 1:  # the last round is timed: calibration starts from it
            warm = (
                _timed_call(baseline, timer, sync_fn, f"{baseline_name} (warm-up)")[0],
                _timed_call(candidate, timer, sync_fn, f"{candidate_name} (warm-up)")[0],
            )
        else:
            baseline()
            candidate()

    lock_cm = serial_lock(None if lock is True else lock) if lock else contextlib.nullcontext(0.0)
    with lock_cm as lock_wait_s:
        if calibrate:
            n_a = _calibrate(baseline, timer, sync_fn, None if warm is None else warm[0])
            n_b = _calibrate(candidate, timer, sync_fn, None if warm is None else warm[1])
        else:
            n_a = n_b = 1
        if n_a > 1:
            baseline = _repeated(baseline, n_a)
        if n_b > 1:
            candidate = _repeated(candidate, n_b)
        threads = torch.get_num_threads()
        a_times: list[float] = []
        b_times: list[float] = []
        stopped_because = "max_pairs"
        t_start = last_stop = timer()
        for i in range(max_pairs):
            if i % 2 == 0:  # ABBA
                t_a, _ = _timed_call(baseline, timer, sync_fn, f"{baseline_name} (pair {i})")
                t_b, last_stop = _timed_call(candidate, timer, sync_fn, f"{candidate_name} (pair {i})")
            else:
                t_b, _ = _timed_call(candidate, timer, sync_fn, f"{candidate_name} (pair {i})")
                t_a, last_stop = _timed_call(baseline, timer, sync_fn, f"{baseline_name} (pair {i})")
            a_times.append(t_a)
            b_times.append(t_b)
            n = i + 1
            if n >= min_pairs and (n - min_pairs) % check_every == 0:
                ratios = np.asarray(a_times) / np.asarray(b_times)
                stats = _bootstrap_distribution(ratios, _N_BOOT, seed)
                if _decided(stats, ratios, threshold, confidence, decision_confidence, target_precision):
                    stopped_because = "decided"
                    break
            if n < max_pairs and (last_stop - t_start) / _NS_PER_S > max_time and n >= _MIN_PAIRS_FLOOR:
                stopped_because = "max_time"
                break
        if threads != torch.get_num_threads():
            logger.warning("torch thread count changed while sampling (%d -> %d)", threads, torch.get_num_threads())

    result = _measurement(
        np.asarray(a_times) / n_a,
        np.asarray(b_times) / n_b,
        confidence=confidence,
        seed=seed,
        threshold=threshold,
        warmup=warmup,
        threads=threads,
        elapsed_s=(last_stop - t_start) / _NS_PER_S,
        stopped_because=stopped_because,
        lock_wait_s=float(lock_wait_s),
        baseline_name=baseline_name,
        candidate_name=candidate_name,
        baseline_calls=n_a,
        candidate_calls=n_b,
    )
    logger.info("%s over %s: %s (%s)", candidate_name, baseline_name, result.describe(), stopped_because)
    return result


def compare_arms(
    baseline: Callable[[], Any],
    arms: dict[str, Callable[[], Any]],
    *,
    rounds: int = 5,
    warmup: int = 1,
    confidence: float = 0.95,
    timer: Callable[[], int] = time.perf_counter_ns,
    sync: Callable[[], None] | None = None,
    device: Any = None,
    baseline_name: str = "baseline",
    seed: int = 0,
) -> dict[str, SpeedupMeasurement]:
    """The speedup of each of several ``arms`` over one ``baseline``, sharing the baseline's samples.

    :func:`compare` times the baseline once per pair; with five arms against a slow baseline (HF ``generate`` fp32)
    that is five times the baseline's cost. Here each round runs the baseline once and every arm once, in the order
    B, A1 ... Ak on even rounds and Ak ... A1, B on odd ones (the ABBA counterbalance, extended), and each arm's
    ratio for the round is the baseline's time in that round over the arm's. Ratios stay paired within a round, so
    drift slower than a round cancels as in :func:`compare`; the interval and the median are computed the same
    way. ``rounds`` is fixed (no adaptive stopping): these are reports, not gates decided on the fly. Arms are timed
    one call per sample (they are whole workloads, far above the timer's cost).
    """
    if rounds < _MIN_PAIRS_FLOOR:
        raise ConfigError(f"rounds must be >= {_MIN_PAIRS_FLOOR}, got {rounds!r}")
    if not arms:
        raise ConfigError("compare_arms needs at least one arm")
    _check_confidence(confidence)
    sync_fn = _resolve_sync(sync, device)
    order = [("__baseline__", baseline), *arms.items()]
    for _ in range(warmup):
        for _, fn in order:
            fn()
    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {name: [] for name, _ in order}
    t_start = last = timer()
    for r in range(rounds):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t, last = _timed_call(fn, timer, sync_fn, f"{name} (round {r})")
            times[name].append(t)
    elapsed = (last - t_start) / _NS_PER_S
    base = np.asarray(times["__baseline__"])
    results: dict[str, SpeedupMeasurement] = {}
    for name in arms:
        results[name] = _measurement(
            base,
            np.asarray(times[name]),
            confidence=confidence,
            seed=seed,
            threshold=None,
            warmup=warmup,
            threads=threads,
            elapsed_s=elapsed,
            stopped_because="max_pairs",
            baseline_name=baseline_name,
            candidate_name=name,
        )
        logger.info("%s over %s: %s (shared baseline)", name, baseline_name, results[name].describe())
    return results


# A sample lasts at least this long after calibration: two timer reads (~50 ns each) are then 0.01% of it.
MIN_SAMPLE_S = 1e-3
_CALIBRATION_STEPS = (1, 2, 5)
# A coefficient of variation above this in either arm means the machine was busy (measured here: an idle core
# gives 0.01-0.10 on decode steps; two torch processes sharing 2 cores gave 0.6-3).
_CV_BUSY = 0.5


def _calibrate(
    fn: Callable[[], Any], timer: Callable[[], int], sync: Callable[[], None] | None, warm: float | None
) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... calls per sample for which one sample of ``fn`` lasts at least
    ``MIN_SAMPLE_S`` (``timeit.autorange``'s rule), capped at 10**6. An arm already that slow in its timed warm-up
    (``warm`` ns) costs no extra call."""
    number = 1
    elapsed = warm
    while number < 10**6:
        if elapsed is None:
            elapsed = _timed_call(_repeated(fn, number), timer, sync, "calibration")[0]
        if elapsed >= MIN_SAMPLE_S * _NS_PER_S:
            return number
        # Jump to the step this time says is enough, then check it once more.
        wanted = number * MIN_SAMPLE_S * _NS_PER_S / max(elapsed, 1.0)
        while number < wanted and number < 10**6:
            number = _next_value(number)
        elapsed = None
    return number


def _next_value(number: int) -> int:
    """The value after ``number`` in 1, 2, 5, 10, 20, 50, ..."""
    decade = len(str(number)) - 1
    step = _CALIBRATION_STEPS.index(number // 10**decade) + 1
    if step == len(_CALIBRATION_STEPS):
        return 10 ** (decade + 1)
    return _CALIBRATION_STEPS[step] * 10**decade


def _repeated(fn: Callable[[], Any], number: int) -> Callable[[], Any]:
    if number == 1:
        return fn

    def run() -> None:
        for _ in range(number):
            fn()

    return run


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _oversubscribed(threads: int, cv_a: float, cv_b: float) -> str | None:
    cores = _available_cores()
    reasons = []
    if threads > cores:
        reasons.append(f"{threads} torch threads on {cores} core(s)")
    if max(cv_a, cv_b) > _CV_BUSY:
        reasons.append(f"timing CV {max(cv_a, cv_b):.2f} > {_CV_BUSY} (another process competing?)")
    return "; ".join(reasons) or None


def _measurement(
    a: np.ndarray, b: np.ndarray, *, confidence: float, seed: int, threshold: float | None, **fields_: Any
) -> SpeedupMeasurement:
    """A :class:`SpeedupMeasurement` from paired per-call times ``a`` (baseline) and ``b`` (candidate), in ns: the
    median per-pair ratio, its percentile-bootstrap interval, the verdict against ``threshold`` and the noise flags."""
    ratios = a / b
    ci_low, ci_high = _percentile_interval(_bootstrap_distribution(ratios, _N_BOOT, seed), confidence)
    return SpeedupMeasurement(
        ratios=tuple(ratios.tolist()),
        ratio=float(np.median(ratios)),
        ci_low=ci_low,
        ci_high=ci_high,
        n=len(ratios),
        confidence=confidence,
        baseline_median_s=float(np.median(a)) / _NS_PER_S,
        candidate_median_s=float(np.median(b)) / _NS_PER_S,
        cv_baseline=_cv(a),
        cv_candidate=_cv(b),
        threshold=None if threshold is None else float(threshold),
        verdict=None if threshold is None else verdict_for(ci_low, ci_high, threshold),
        oversubscribed=_oversubscribed(fields_["threads"], _cv(a), _cv(b)),
        **fields_,
    )


def _decided(
    stats: np.ndarray,
    ratios: np.ndarray,
    threshold: float | None,
    confidence: float,
    decision_confidence: float,
    target_precision: float,
) -> bool:
    """The stopping rule at one look; ``stats`` is the bootstrap distribution of the median ratio."""
    if threshold is not None:
        verdict = verdict_for(*_percentile_interval(stats, decision_confidence), threshold)
        logger.debug("%d pairs: %s at %.4g confidence", ratios.size, verdict.value, decision_confidence)
        return verdict is not Verdict.INCONCLUSIVE
    low, high = _percentile_interval(stats, confidence)
    relative_half_width = (high - low) / 2.0 / float(np.median(ratios))
    logger.debug("%d pairs: CI %.4f-%.4f, relative half-width %.4f", ratios.size, low, high, relative_half_width)
    return relative_half_width < target_precision


def noise_floor(
    fn: Callable[[], Any],
    *,
    pairs: int = 30,
    warmup: int = 2,
    timer: Callable[[], int] = time.perf_counter_ns,
    sync: Callable[[], None] | None = None,
    confidence: float = 0.95,
    device: Any = None,
    seed: int = 0,
    lock: bool | str | os.PathLike[str] | None = None,
) -> NoiseFloor:
    """Compare ``fn`` against itself (A/A) for exactly ``pairs`` pairs: the spread that noise alone produces.

    The true ratio is 1 by construction, so the interval shows how far from 1 this machine's noise pushes a
    measurement; its upper bound is the smallest speedup a gate can hope to detect here.
    """
    if pairs < _MIN_PAIRS_FLOOR:
        raise ConfigError(f"pairs must be >= {_MIN_PAIRS_FLOOR}, got {pairs!r}")
    m = compare(
        fn,
        fn,
        min_pairs=pairs,  # exactly `pairs` pairs: no early stop, no time limit
        max_pairs=pairs,
        max_time=math.inf,
        warmup=warmup,
        confidence=confidence,
        timer=timer,
        sync=sync,
        device=device,
        seed=seed,
        lock=lock,
        baseline_name="A",
        candidate_name="A'",
    )
    # Both arms time the same function, so their means agree and the root-mean-square of the two CVs is the
    # pooled CV of all 2 * pairs calls (up to the ddof correction).
    cv = math.sqrt((m.cv_baseline**2 + m.cv_candidate**2) / 2.0)
    floor = NoiseFloor(
        m.ratio,
        m.ci_low,
        m.ci_high,
        m.n,
        smallest_detectable_speedup=max(m.ci_high, 1.0 / m.ci_low),
        cv=cv,
        confidence=confidence,
    )
    logger.info(
        "noise floor: A/A %s, smallest detectable speedup %.3fx", m.describe(), floor.smallest_detectable_speedup
    )
    return floor


def default_lock_path() -> str:
    """``<tempdir>/ryzen_opt_perf.lock``: one file per machine that every ryzen-opt process agrees on."""
    return os.path.join(tempfile.gettempdir(), DEFAULT_LOCK_NAME)


@contextlib.contextmanager
def serial_lock(path: str | os.PathLike[str] | None = None) -> Iterator[float]:
    """The machine-wide perf lock: yield the seconds spent waiting for it.

    Two processes timing at once on the same cores measure each other. Perf sections of every process
    (pytest-xdist workers, a CLI run beside the suite) take this lock, so timings never overlap; the wait is
    recorded so that a report can show it. See :func:`ryzen_opt.locking.file_lock` (re-entrant within a thread).

    Args:
        path: the lock file; default :func:`default_lock_path`.

    Example:
        >>> with serial_lock() as waited:
        ...     pass  # time something
    """
    with file_lock(path if path is not None else default_lock_path()) as waited:
        yield waited


def generate_workload(model: Any, prompt: torch.Tensor, new_tokens: int) -> Callable[[], torch.Tensor]:
    """A zero-argument call for :func:`compare`: ``model.generate`` of exactly ``new_tokens`` greedy tokens.

    ``min_new_tokens`` holds EOS off, so every call does the same work whatever the weights predict (a decode that
    stopped early would look fast). The first call checks the output length, so a workload that silently does
    less fails loudly instead of being timed.
    """
    if prompt.ndim != 2:
        raise ConfigError(f"prompt must be [batch, tokens] token ids, got shape {tuple(prompt.shape)}")
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    kwargs["pad_token_id"] = 0 if pad is None else pad
    checked = False

    @torch.no_grad()
    def run() -> torch.Tensor:
        nonlocal checked
        out = model.generate(prompt, **kwargs)
        if not checked:
            if out.shape[1] != prompt.shape[1] + new_tokens:
                raise MeasurementError(
                    f"generate produced {out.shape[1] - prompt.shape[1]} new tokens, not {new_tokens}: "
                    "the workload would not be comparable"
                )
            checked = True
        return out

    return run


def read_bandwidth_gbs(mib: int = 512, repeats: int = 7) -> float:
    """This machine's read bandwidth now, at torch's current thread count: the median of ``repeats`` float32 sums
    over ``mib`` MiB (far larger than any last-level cache), in GB/s.

    Why a sum: it reads every byte once and does almost nothing with it, the access pattern of a memory-bound decode
    step, so "weight bytes per token / seconds per token" over this is the share of the bandwidth a kernel reaches.
    """
    if mib <= 0 or repeats <= 0:
        raise ConfigError(f"read_bandwidth_gbs needs mib > 0 and repeats > 0, got mib={mib}, repeats={repeats}")
    data = torch.ones(mib * 2**20 // 4)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / float(np.median(times)) / 1e9
