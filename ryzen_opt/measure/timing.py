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
  of per-call times, its two samples still adjacent in time, and the stopping rule reads those same per-call ratios
  (on raw sample times it would see the true ratio times ``baseline_calls / candidate_calls``). Calibration starts
  from the median of three timed warm-up rounds, so one slow call (an interrupt) cannot set an arm's count.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ryzen_opt.errors import ConfigError, MeasurementError
from ryzen_opt.locking import file_lock
from ryzen_opt.measure.stats import (
    N_BOOT,
    NoiseFloor,
    SpeedupMeasurement,
    Verdict,
    bootstrap_distribution,
    check_confidence,
    coefficient_of_variation,
    percentile_interval,
    verdict_for,
)

# Re-exported: generate_workload lived here, and callers (benchmarks, perf tests, the system optimizer) import it here.
from ryzen_opt.measure.workloads import generate_workload as generate_workload

logger = logging.getLogger(__name__)

DEFAULT_LOCK_NAME = "ryzen_opt_perf.lock"
_NS_PER_S = 1e9
# Fewer pairs than this give no interval worth the name: a bootstrap of 2 values has 3 distinct medians.
_MIN_PAIRS_FLOOR = 3


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

    ``warmup`` untimed calls of each arm (compilation, caches, allocator) come first (at least 3 when calibrating:
    the last 3 are timed, and calibration starts from their median, so one slow call cannot set the calls per sample).
    Then pair ``i`` runs A-B when ``i`` is even and B-A when odd, each sample timed alone between two ``sync()``-ed
    ``timer()`` reads.
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
    check_confidence(confidence)
    if not 0 < target_precision < 1:
        raise ConfigError(f"target_precision must be in (0, 1), got {target_precision!r}")
    sync_fn = _resolve_sync(sync, device)
    if calibrate is None:
        calibrate = timer is time.perf_counter_ns
    arms = (_Arm(baseline, baseline_name), _Arm(candidate, candidate_name))
    warm = _warm_up(arms, warmup, calibrate, timer, sync_fn)
    lock_cm = serial_lock(None if lock is True else lock) if lock else contextlib.nullcontext(0.0)
    with lock_cm as lock_wait_s:
        for arm, estimate in zip(arms, warm, strict=True):
            arm.calls = _calibrate(arm.fn, timer, sync_fn, estimate) if calibrate else 1
        threads = torch.get_num_threads()
        rule = _StoppingRule(threshold, confidence, min_pairs, max_pairs, check_every, target_precision, seed)
        sampled = _sample_pairs(arms, rule, max_pairs, max_time, timer, sync_fn)
        if threads != torch.get_num_threads():
            logger.warning("torch thread count changed while sampling (%d -> %d)", threads, torch.get_num_threads())
    a, b = sampled.per_call(arms)
    result = _measurement(
        a,
        b,
        confidence=confidence,
        seed=seed,
        threshold=threshold,
        warmup=max(warmup, _WARM_TIMED) if calibrate else warmup,
        threads=threads,
        elapsed_s=sampled.elapsed_ns / _NS_PER_S,
        stopped_because=sampled.stopped_because,
        lock_wait_s=float(lock_wait_s),
        baseline_name=baseline_name,
        candidate_name=candidate_name,
        baseline_calls=arms[0].calls,
        candidate_calls=arms[1].calls,
    )
    logger.info("%s over %s: %s (%s)", candidate_name, baseline_name, result.describe(), sampled.stopped_because)
    return result


# Calibration starts from the median of this many timed warm-up rounds (the last ones), so that one slow call (an
# interrupt, a page fault) cannot set an arm's calls per sample; a calibrated run warms up at least this many rounds.
_WARM_TIMED = 3


@dataclass
class _Arm:
    """One side of a comparison: the callable, its name in messages, and its calls per sample once calibrated."""

    fn: Callable[[], Any]
    name: str
    calls: int = 1

    def sample(self, timer: Callable[[], int], sync: Callable[[], None] | None, label: str) -> tuple[float, int]:
        """One timed sample of ``calls`` calls: ``(duration_ns, stop_timestamp)``."""
        return _timed_call(_repeated(self.fn, self.calls), timer, sync, f"{self.name} ({label})")


def _warm_up(
    arms: tuple[_Arm, _Arm], rounds: int, timed: bool, timer: Callable[[], int], sync: Callable[[], None] | None
) -> tuple[float | None, float | None]:
    """Untimed rounds, interleaved like the sampling so both arms reach the same warm state. When calibrating, at
    least ``_WARM_TIMED`` rounds, the last ``_WARM_TIMED`` timed: each arm's median of those is where calibration
    starts (``None`` for both when not calibrating)."""
    if not timed:
        for _ in range(rounds):
            for arm in arms:
                arm.fn()
        return None, None
    rounds = max(rounds, _WARM_TIMED)
    times: list[list[float]] = [[], []]
    for i in range(rounds):
        for k, arm in enumerate(arms):
            if i < rounds - _WARM_TIMED:
                arm.fn()
            else:
                times[k].append(_timed_call(arm.fn, timer, sync, f"{arm.name} (warm-up)")[0])
    return float(np.median(times[0])), float(np.median(times[1]))


@dataclass(frozen=True)
class _StoppingRule:
    """When adaptive sampling may stop (module docstring): looks every ``check_every`` pairs from ``min_pairs`` on,
    each judged at the Bonferroni-corrected confidence; without a threshold, when the interval is narrow enough."""

    threshold: float | None
    confidence: float
    min_pairs: int
    max_pairs: int
    check_every: int
    target_precision: float
    seed: int

    @property
    def decision_confidence(self) -> float:
        looks = 1 + math.ceil((self.max_pairs - self.min_pairs) / self.check_every)
        return 1.0 - (1.0 - self.confidence) / looks

    def is_look(self, n: int) -> bool:
        return n >= self.min_pairs and (n - self.min_pairs) % self.check_every == 0

    def decided(self, ratios: np.ndarray) -> bool:
        """Judged on per-call ratios, the statistic the verdict reports (never raw sample times, which differ by the
        arms' calls per sample)."""
        stats = bootstrap_distribution(ratios, N_BOOT, self.seed)
        return _decided(stats, ratios, self.threshold, self.confidence, self.decision_confidence, self.target_precision)


@dataclass
class _Sampled:
    """Raw sample times of both arms (ns, ``calls`` calls each), and why and when sampling stopped."""

    a: list[float]
    b: list[float]
    stopped_because: str
    elapsed_ns: float

    def per_call(self, arms: tuple[_Arm, _Arm]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.a) / arms[0].calls, np.asarray(self.b) / arms[1].calls


def _sample_pairs(
    arms: tuple[_Arm, _Arm],
    rule: _StoppingRule,
    max_pairs: int,
    max_time: float,
    timer: Callable[[], int],
    sync: Callable[[], None] | None,
) -> _Sampled:
    """Timed pairs in ABBA order until ``rule`` decides, the pair budget ends, or ``max_time`` has passed (never
    fewer than 3 pairs)."""
    sampled = _Sampled([], [], "max_pairs", 0.0)
    baseline, candidate = arms
    t_start = last_stop = timer()
    for i in range(max_pairs):
        first, second = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)  # ABBA
        t_first, _ = first.sample(timer, sync, f"pair {i}")
        t_second, last_stop = second.sample(timer, sync, f"pair {i}")
        sampled.a.append(t_first if first is baseline else t_second)
        sampled.b.append(t_second if first is baseline else t_first)
        n = i + 1
        if rule.is_look(n):
            a, b = sampled.per_call(arms)
            if rule.decided(a / b):
                sampled.stopped_because = "decided"
                break
        if n < max_pairs and (last_stop - t_start) / _NS_PER_S > max_time and n >= _MIN_PAIRS_FLOOR:
            sampled.stopped_because = "max_time"
            break
    sampled.elapsed_ns = float(last_stop - t_start)
    return sampled


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
    check_confidence(confidence)
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
    ci_low, ci_high = percentile_interval(bootstrap_distribution(ratios, N_BOOT, seed), confidence)
    return SpeedupMeasurement(
        ratios=tuple(ratios.tolist()),
        ratio=float(np.median(ratios)),
        ci_low=ci_low,
        ci_high=ci_high,
        n=len(ratios),
        confidence=confidence,
        baseline_median_s=float(np.median(a)) / _NS_PER_S,
        candidate_median_s=float(np.median(b)) / _NS_PER_S,
        baseline_iqr_s=_iqr(a) / _NS_PER_S,
        candidate_iqr_s=_iqr(b) / _NS_PER_S,
        cv_baseline=coefficient_of_variation(a),
        cv_candidate=coefficient_of_variation(b),
        threshold=None if threshold is None else float(threshold),
        verdict=None if threshold is None else verdict_for(ci_low, ci_high, threshold),
        oversubscribed=_oversubscribed(fields_["threads"], coefficient_of_variation(a), coefficient_of_variation(b)),
        **fields_,
    )


def _iqr(times: np.ndarray) -> float:
    q1, q3 = np.percentile(times, [25.0, 75.0])
    return float(q3 - q1)


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
        verdict = verdict_for(*percentile_interval(stats, decision_confidence), threshold)
        logger.debug("%d pairs: %s at %.4g confidence", ratios.size, verdict.value, decision_confidence)
        return verdict is not Verdict.INCONCLUSIVE
    low, high = percentile_interval(stats, confidence)
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
