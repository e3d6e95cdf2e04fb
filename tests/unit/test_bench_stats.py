"""ryzen_opt.measure.timing: the statistics of the paired A/B sampler, driven by fake clocks.

No test here times real work: a FakeClock's time advances only when a fake workload "runs", by a duration drawn
from a seeded lognormal (multiplicative timing noise). So every number below is deterministic, and the only
real-time assertions are the lock's (a behaviour: "the second process waited"), never a speed claim.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ryzen_opt.errors import ConfigError
from ryzen_opt.measure.stats import bootstrap_ci
from ryzen_opt.measure.timing import (
    MeasurementError,
    NoiseFloor,
    SpeedupMeasurement,
    Verdict,
    compare,
    noise_floor,
    read_bandwidth_gbs,
    serial_lock,
    verdict_for,
)

MS = 1e-3


class FakeClock:
    """Simulated time in integer nanoseconds that moves only while a fake workload runs.

    ``log`` records every event in order: ``"read"`` for a timer read, ``"sync"`` for a sync, and a workload's
    name when it runs, so that tests can check what was timed and in which order.
    """

    def __init__(self, seed: int = 0) -> None:
        self.ns = 0
        self.reads = 0
        self.rng = np.random.default_rng(seed)
        self.log: list[str] = []

    def now(self) -> int:
        self.reads += 1
        self.log.append("read")
        return self.ns

    def sync(self) -> None:
        self.log.append("sync")

    def workload(self, name: str, median_s: float, sigma: float = 0.1) -> Callable[[], None]:
        """A callable that "takes" ``median_s * lognormal(0, sigma)`` seconds of fake time."""

        def run() -> None:
            self.log.append(name)
            self.ns += max(1, round(median_s * 1e9 * self.rng.lognormal(0.0, sigma)))

        return run

    def fixed(self, name: str, durations_s: Callable[[int], float]) -> Callable[[], None]:
        """A callable whose k-th call (0-based) takes exactly ``durations_s(k)`` seconds."""
        calls = [0]

        def run() -> None:
            self.log.append(name)
            self.ns += round(durations_s(calls[0]) * 1e9)
            calls[0] += 1

        return run


def measure(true_ratio: float, seed: int, sigma: float = 0.1, **kwargs: object) -> SpeedupMeasurement:
    """compare() on a fake clock where the baseline is ``true_ratio`` times slower than the candidate."""
    clock = FakeClock(seed)
    baseline = clock.workload("A", true_ratio * MS, sigma)
    candidate = clock.workload("B", 1 * MS, sigma)
    return compare(baseline, candidate, timer=clock.now, seed=seed, **kwargs)  # type: ignore[arg-type]


# --- the gate's statistics ------------------------------------------------------------------------------------


def test_true_3x_passes_a_2x_gate() -> None:
    for seed in range(20):
        m = measure(3.0, seed, threshold=2.0)
        assert m.verdict is Verdict.PASS, m.describe()
        assert m.stopped_because == "decided"
        assert m.n == 10  # clear at the first look: 3x is ~8 standard errors above 2x at 10 pairs
        # 10% noise per call: a log-ratio sd of 0.14, so the median of 10 has a standard error of ~0.056 in log
        # space; [2.5, 3.6] is ~3 standard errors either side of log(3).
        assert 2.5 < m.ratio < 3.6
        assert m.ci_low >= 2.0


def test_no_speedup_never_passes_a_1_2x_gate() -> None:
    results = [measure(1.0, seed, threshold=1.2) for seed in range(200)]
    assert not [m.describe() for m in results if m.verdict is Verdict.PASS]
    # And it is recognised as a failure, not left undecided: a sampler that never decides would also "never
    # pass". At 10% noise, 1.2x is ~3 standard errors of the median away by 10 pairs.
    assert sum(m.verdict is Verdict.FAIL for m in results) >= 190


def test_interval_covers_the_true_ratio_about_95_percent() -> None:
    # Fixed n = 30 (min_pairs = max_pairs, no threshold: no adaptive stop changes n). The log-ratio of two
    # lognormal calls is normal, so the true median ratio is exactly 1.5. Over 300 runs the coverage of a
    # correct 95% interval has binomial sd sqrt(0.95 * 0.05 / 300) = 0.0126; the percentile bootstrap of a
    # median at n = 30 is close to nominal. [0.90, 0.99] is about -4 / +3 sd: a 90% or 68% interval (coverage
    # <= 0.90) fails it, so does one that is far too wide (coverage ~1.0).
    covered = 0
    for seed in range(300):
        m = measure(1.5, seed, min_pairs=30, max_pairs=30, max_time=math.inf)
        assert m.n == 30
        covered += m.ci_low <= 1.5 <= m.ci_high
    assert 0.90 <= covered / 300 <= 0.99


def test_ratio_equal_to_threshold_stays_undecided_and_optional_stopping_is_controlled() -> None:
    # At a true ratio equal to the gate neither PASS nor FAIL is right. With 11 looks (10, 15, ..., 60 pairs)
    # an early stop on a plain 95% interval happens in ~20% of runs (optional stopping); the Bonferroni-
    # corrected early-stop rule keeps it near or below the nominal 5%. 0.07 is the nominal rate plus ~1 sd
    # of a binomial over 150 runs (0.018).
    results = [measure(1.0, seed, threshold=1.0, max_pairs=60) for seed in range(150)]
    for m in results:
        assert m.stopped_because in ("decided", "max_pairs")
        assert isinstance(m.verdict, Verdict)
    early = [m for m in results if m.stopped_because == "decided"]
    assert len(early) / len(results) <= 0.07
    assert all(m.n == 60 for m in results if m.stopped_because == "max_pairs")
    undecided = sum(m.verdict is Verdict.INCONCLUSIVE or m.stopped_because == "max_pairs" for m in results)
    assert undecided / len(results) >= 0.93


@pytest.mark.parametrize(
    ("low", "high", "threshold", "expected"),
    [
        (2.1, 2.5, 2.0, Verdict.PASS),
        (2.0, 2.5, 2.0, Verdict.PASS),  # lower bound exactly at the gate passes ("at least")
        (1.5, 1.9, 2.0, Verdict.FAIL),
        (1.5, 2.0, 2.0, Verdict.INCONCLUSIVE),  # upper bound at the gate is not "below" it
        (1.9, 2.1, 2.0, Verdict.INCONCLUSIVE),
        (2.0, 2.0, 2.0, Verdict.PASS),
    ],
)
def test_verdict_truth_table(low: float, high: float, threshold: float, expected: Verdict) -> None:
    assert verdict_for(low, high, threshold) is expected


def test_verdict_rejects_an_inverted_interval() -> None:
    with pytest.raises(ValueError, match=r"2\.5"):
        verdict_for(2.5, 2.0, 1.0)


# --- the sampling protocol ------------------------------------------------------------------------------------


def test_abba_order() -> None:
    clock = FakeClock()
    m = compare(
        clock.workload("A", 2 * MS),
        clock.workload("B", 1 * MS),
        warmup=0,
        min_pairs=6,
        max_pairs=6,
        timer=clock.now,
    )
    assert m.n == 6
    runs = [event for event in clock.log if event in ("A", "B")]
    assert runs == ["A", "B", "B", "A"] * 3


def test_each_call_is_timed_alone_between_synced_reads() -> None:
    clock = FakeClock()
    compare(
        clock.workload("A", 2 * MS),
        clock.workload("B", 1 * MS),
        warmup=0,
        min_pairs=3,
        max_pairs=3,
        timer=clock.now,
        sync=clock.sync,
    )

    def timed(name: str) -> list[str]:
        return ["sync", "read", name, "sync", "read"]

    expected = ["read"] + timed("A") + timed("B") + timed("B") + timed("A") + timed("A") + timed("B")
    assert clock.log == expected  # the leading read starts the time budget


def test_warmup_runs_untimed_and_first() -> None:
    clock = FakeClock()
    reads_seen: list[tuple[str, int]] = []
    slow_first = 3  # the warm-up calls are 1000x slower (compilation): timing one would break a ratio

    def arm(name: str, seconds: float) -> Callable[[], None]:
        calls = [0]

        def run() -> None:
            reads_seen.append((name, clock.reads))
            clock.ns += round((1.0 if calls[0] < slow_first else seconds) * 1e9)
            calls[0] += 1

        return run

    m = compare(arm("A", 2 * MS), arm("B", 1 * MS), warmup=slow_first, min_pairs=5, max_pairs=5, timer=clock.now)
    assert [name for name, _ in reads_seen[: 2 * slow_first]] == ["A", "B"] * slow_first
    assert all(reads == 0 for _, reads in reads_seen[: 2 * slow_first])  # no timer read before or between them
    assert len(reads_seen) == 2 * slow_first + 2 * m.n
    assert m.ratios == (2.0,) * 5
    assert m.warmup == slow_first


def test_cuda_device_syncs_with_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(device))
    m = measure(2.0, 0, device="cuda:0", warmup=0, min_pairs=4, max_pairs=4)
    assert len(seen) == 4 * m.n  # two syncs per timed call, two calls per pair
    assert set(seen) == {torch.device("cuda:0")}


def test_cpu_device_does_not_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(device: object = None) -> None:
        raise AssertionError("CPU work is synchronous: no device sync expected")

    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    assert measure(2.0, 0, device="cpu", min_pairs=4, max_pairs=4).n == 4


def test_records_thread_count_and_arm_statistics() -> None:
    m = measure(2.0, 3, min_pairs=20, max_pairs=20)
    assert m.threads == torch.get_num_threads()
    assert m.baseline_median_s == pytest.approx(2 * MS, rel=0.1)
    assert m.candidate_median_s == pytest.approx(1 * MS, rel=0.1)
    assert 0.05 < m.cv_baseline < 0.15  # sigma = 0.1 lognormal: CV ~= 0.1
    assert 0.05 < m.cv_candidate < 0.15
    assert m.ratio == float(np.median(m.ratios))


# --- stopping ---------------------------------------------------------------------------------------------------


def test_stops_when_decided() -> None:
    m = measure(3.0, 0, threshold=2.0, min_pairs=10, max_pairs=200)
    assert (m.stopped_because, m.n) == ("decided", 10)


def test_without_threshold_stops_when_precise() -> None:
    # 1% noise: the interval's relative half-width is well under 2% at the first look.
    m = measure(2.0, 0, sigma=0.01, min_pairs=10, max_pairs=200)
    assert (m.stopped_because, m.n, m.verdict) == ("decided", 10, None)
    assert (m.ci_high - m.ci_low) / 2 / m.ratio < 0.02


def test_stops_at_max_pairs() -> None:
    m = measure(1.0, 0, sigma=0.5, min_pairs=10, max_pairs=20, check_every=5)
    assert (m.stopped_because, m.n) == ("max_pairs", 20)


def alternating_arms(clock: FakeClock) -> tuple[Callable[[], None], Callable[[], None]]:
    """A takes 1 s; B alternates 0.5 s / 1.5 s: pairs of 1.5 s and 2.5 s, ratios 2 and 2/3 (never precise)."""
    return clock.fixed("A", lambda k: 1.0), clock.fixed("B", lambda k: 0.5 if k % 2 == 0 else 1.5)


def test_stops_at_max_time() -> None:
    clock = FakeClock()
    # Elapsed after n pairs: 2n (n even) or 2n - 0.5 (n odd): 29.5 s after 15 pairs, 32 s after 16.
    m = compare(*alternating_arms(clock), warmup=0, min_pairs=10, max_time=30.0, timer=clock.now)
    assert (m.stopped_because, m.n, m.elapsed_s) == ("max_time", 16, 32.0)


def test_max_time_wins_over_min_pairs_but_keeps_three_pairs() -> None:
    clock = FakeClock()
    m = compare(*alternating_arms(clock), warmup=0, min_pairs=10, max_time=1.0, threshold=1.5, timer=clock.now)
    assert (m.stopped_because, m.n) == ("max_time", 3)
    assert m.verdict is Verdict.INCONCLUSIVE  # a verdict is still given, from the 3 pairs there are


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_pairs": 2}, r"min_pairs must be >= 3, got 2"),
        ({"min_pairs": 10, "max_pairs": 5}, r"max_pairs .* got 5"),
        ({"confidence": 1.0}, r"confidence .* got 1\.0"),
        ({"confidence": 0}, r"confidence .* got 0"),
        ({"warmup": -1}, r"warmup must be >= 0, got -1"),
        ({"threshold": 0}, r"threshold .* got 0"),
        ({"threshold": -1.5}, r"threshold .* got -1\.5"),
        ({"threshold": math.nan}, r"threshold .* got nan"),
        ({"max_time": 0.0}, r"max_time .* got 0\.0"),
        ({"check_every": 0}, r"check_every must be >= 1, got 0"),
        ({"target_precision": 2.0}, r"target_precision .* got 2\.0"),
    ],
)
def test_argument_validation_names_the_value(kwargs: dict[str, object], message: str) -> None:
    called: list[str] = []
    with pytest.raises(ConfigError, match=message):
        compare(lambda: called.append("A"), lambda: called.append("B"), **kwargs)  # type: ignore[arg-type]
    assert not called  # validated before any call: a bad config never costs a warm-up
    assert issubclass(ConfigError, ValueError)


def test_noise_floor_validates_pairs() -> None:
    with pytest.raises(ConfigError, match=r"pairs must be >= 3, got 1"):
        noise_floor(lambda: None, pairs=1)


def test_zero_duration_is_an_error_not_a_ratio() -> None:
    clock = FakeClock()
    with pytest.raises(MeasurementError, match=r"candidate \(pair 0\).*non-positive"):
        compare(clock.workload("A", MS), lambda: None, warmup=0, timer=clock.now)
    assert issubclass(MeasurementError, ValueError)


def test_backwards_clock_is_an_error() -> None:
    ticks = iter([100, 50, 40])
    with pytest.raises(MeasurementError, match=r"-10"):  # t_start = 100, then start = 50, stop = 40
        compare(lambda: None, lambda: None, warmup=0, timer=lambda: next(ticks))


# --- results ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [None, 1.5])
def test_to_dict_round_trips_through_strict_json(threshold: float | None) -> None:
    m = measure(2.0, 0, threshold=threshold, baseline_name="HF generate, eager, fp32", candidate_name="compiled")
    text = json.dumps(m.to_dict(), allow_nan=False)
    assert SpeedupMeasurement.from_dict(json.loads(text)) == m
    assert json.loads(text)["verdict"] == (None if threshold is None else "PASS")


def test_non_finite_values_never_reach_a_report() -> None:
    m = measure(2.0, 0)
    with pytest.raises(ValueError, match="ci_low"):
        dataclasses.replace(m, ci_low=math.nan)
    with pytest.raises(ValueError, match="cv_baseline"):
        dataclasses.replace(m, cv_baseline=math.inf)
    with pytest.raises(ValueError, match="verdict"):
        dataclasses.replace(m, threshold=2.0)  # a threshold without its verdict


def test_describe() -> None:
    m = dataclasses.replace(measure(2.0, 0), ratio=2.414, ci_low=2.301, ci_high=2.523)
    m = dataclasses.replace(m, ratios=(2.414,) * 24, n=24)
    assert m.describe() == "2.41x (95% CI 2.30-2.52, 24 pairs)"
    gated = dataclasses.replace(m, threshold=2.0, verdict=Verdict.PASS)
    assert gated.describe() == "2.41x (95% CI 2.30-2.52, 24 pairs) vs 2x: PASS"


# --- bootstrap --------------------------------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_matches_the_normal_theory_for_a_mean() -> None:
    data = np.random.default_rng(1).normal(10.0, 1.0, 400)
    assert bootstrap_ci(data, seed=3) == bootstrap_ci(data, seed=3)
    low, high = bootstrap_ci(data, statistic=np.mean, seed=3)
    # For a mean, the 95% interval is ~ mean +- 1.96 s / sqrt(n); 2000 resamples put the bootstrap's
    # quantiles within a few percent of that width.
    half_width = 1.96 * data.std(ddof=1) / math.sqrt(data.size)
    assert low == pytest.approx(data.mean() - half_width, abs=0.15 * half_width)
    assert high == pytest.approx(data.mean() + half_width, abs=0.15 * half_width)


def test_bootstrap_rejects_empty_and_non_finite() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="nan"):
        bootstrap_ci([1.0, math.nan])


@given(
    ratios=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=40),
    confidence=st.floats(min_value=0.5, max_value=0.99),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_bootstrap_interval_contains_the_median(ratios: list[float], confidence: float, seed: int) -> None:
    low, high = bootstrap_ci(ratios, confidence=confidence, n_boot=500, seed=seed)
    assert min(ratios) <= low <= float(np.median(ratios)) <= high <= max(ratios)


# --- noise floor -----------------------------------------------------------------------------------------------


def test_noise_floor_on_a_noisy_clock() -> None:
    floors: list[NoiseFloor] = []
    for seed in range(40):
        clock = FakeClock(seed)
        floors.append(noise_floor(clock.workload("A", MS, sigma=0.1), pairs=30, timer=clock.now, seed=seed))
    # A/A: the true ratio is 1, so a 95% interval covers it in ~38 of 40 runs; 34 is ~3 binomial sd below.
    assert sum(f.ci_low <= 1.0 <= f.ci_high for f in floors) >= 34
    # The farthest the A/A interval strays from 1, either way: its upper bound, or 1 / its lower bound on a run
    # whose interval fell below 1 (which happens in ~2.5% of runs, and must not claim a floor under 1x).
    assert all(f.smallest_detectable_speedup == max(f.ci_high, 1.0 / f.ci_low) > 1.0 for f in floors)
    assert sum(f.smallest_detectable_speedup == f.ci_high for f in floors) >= 20
    assert all(f.n == 30 for f in floors)
    assert 0.08 < float(np.mean([f.cv for f in floors])) < 0.12  # lognormal sigma 0.1: CV ~= 0.10
    json.dumps(floors[0].to_dict(), allow_nan=False)


def test_noise_floor_of_a_noiseless_clock_is_exactly_one() -> None:
    clock = FakeClock()
    floor = noise_floor(clock.fixed("A", lambda k: MS), pairs=5, timer=clock.now)
    assert (floor.ratio, floor.ci_low, floor.ci_high, floor.cv) == (1.0, 1.0, 1.0, 0.0)


# --- the cross-process lock -------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from ryzen_opt.measure.timing import serial_lock

    with serial_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(0.3)
    """
)


def hold_lock_in_another_process(path: Path) -> subprocess.Popen[str]:
    """Start a process that holds the lock ~0.3 s; return once it has it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_serial_lock_makes_a_second_process_wait(tmp_path: Path) -> None:
    path = tmp_path / "perf.lock"
    proc = hold_lock_in_another_process(path)
    try:
        with serial_lock(path) as waited:
            pass
        assert waited > 0.1
    finally:
        proc.communicate(timeout=30)  # reaps it and closes its stdout pipe
    with serial_lock(path) as uncontended:
        assert uncontended >= 0.0


def test_compare_times_under_the_lock_and_records_the_wait(tmp_path: Path) -> None:
    path = tmp_path / "perf.lock"
    proc = hold_lock_in_another_process(path)
    try:
        m = measure(2.0, 0, lock=str(path), min_pairs=5, max_pairs=5)
    finally:
        proc.communicate(timeout=30)  # reaps it and closes its stdout pipe
    assert m.lock_wait_s > 0.1
    assert measure(2.0, 0, min_pairs=5, max_pairs=5).lock_wait_s == 0.0


def test_serial_lock_is_reentrant_in_a_thread_and_excludes_other_threads(tmp_path: Path) -> None:
    path = tmp_path / "perf.lock"
    done = threading.Event()

    def nested() -> None:
        with serial_lock(path), serial_lock(path) as inner:  # e.g. the plugin's lock around compare(lock=...)
            assert inner < 1.0
        done.set()

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert done.is_set(), "nested serial_lock deadlocked"

    waits: list[float] = []
    with serial_lock(path):

        def contender() -> None:
            with serial_lock(path) as waited:
                waits.append(waited)

        other = threading.Thread(target=contender, daemon=True)
        other.start()
        time.sleep(0.3)
        assert not waits  # still blocked while this thread holds the lock
    other.join(timeout=10)
    assert waits
    assert waits[0] > 0.1


class CostlyTimer(FakeClock):
    """A fake clock whose every read costs ``read_ns`` of fake time, as a real timer's call does."""

    def __init__(self, read_ns: int) -> None:
        super().__init__()
        self.read_ns = read_ns

    def now(self) -> int:
        self.ns += self.read_ns
        return super().now()


def test_calibration_keeps_the_timer_out_of_a_micro_speedup() -> None:
    # A call of 100 ns against one of 2,200 ns (22x), with 500 ns per timer read: one call per sample would
    # measure (2200 + 500) / (100 + 500) = 4.5x. Calibrated, each sample lasts >= 1 ms and the timer vanishes.
    clock = CostlyTimer(read_ns=500)
    slow = clock.fixed("slow", lambda k: 2200e-9)
    fast = clock.fixed("fast", lambda k: 100e-9)
    raw = compare(slow, fast, min_pairs=5, max_pairs=5, warmup=1, timer=clock.now)
    assert (raw.baseline_calls, raw.candidate_calls) == (1, 1)
    assert raw.ratio == pytest.approx(4.5, rel=0.01)
    m = compare(slow, fast, min_pairs=5, max_pairs=5, warmup=1, timer=clock.now, calibrate=True)
    # Each arm its own: the first of 1, 2, 5, 10, ... giving a sample >= 1 ms (2.2 us: 500; 100 ns: 10,000).
    assert (m.baseline_calls, m.candidate_calls) == (500, 10_000)
    assert m.ratio == pytest.approx(22.0, rel=0.01)
    assert m.candidate_median_s == pytest.approx(100e-9, rel=0.02)  # reported per call


def test_slow_arms_cost_no_extra_call_to_calibrate() -> None:
    clock = FakeClock()
    calls = {"a": 0, "b": 0}

    def arm(name: str) -> Callable[[], None]:
        def run() -> None:
            calls[name] += 1
            clock.ns += 5_000_000  # 5 ms: already above the 1 ms floor

        return run

    m = compare(arm("a"), arm("b"), min_pairs=3, max_pairs=3, warmup=1, timer=clock.now, calibrate=True)
    assert (m.baseline_calls, m.candidate_calls) == (1, 1)
    assert calls == {"a": 6, "b": 6}  # 3 timed warm-ups (calibration starts from their median) + 3 pairs each


def test_one_slow_warm_up_call_does_not_set_the_calls_per_sample() -> None:
    clock = FakeClock()
    slow_first = {"left": 1}

    def hiccup() -> None:  # 0.3 ms a call, but its first timed call is held up for 5 ms (an interrupt)
        clock.ns += 5_000_000 if slow_first["left"] else 300_000
        slow_first["left"] = 0

    fast = clock.workload("fast", 150e-6, sigma=0.0)
    m = compare(hiccup, fast, min_pairs=3, max_pairs=3, warmup=0, timer=clock.now, calibrate=True)
    # 0.3 ms needs 5 calls for a 1 ms sample; had the 5 ms call set it, the arm would run 1 call per sample.
    assert (m.baseline_calls, m.candidate_calls) == (5, 10)
    assert m.ratio == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize(
    ("baseline_s", "candidate_s", "verdict"),
    [
        (250e-6, 125e-6, "PASS"),  # 5 and 10 calls per sample: the raw samples are equal, per call it is 2x
        (125e-6, 250e-6, "FAIL"),  # 10 and 5 calls: raw samples equal, per call 0.5x
    ],
)
def test_the_stopping_rule_reads_per_call_ratios(baseline_s: float, candidate_s: float, verdict: str) -> None:
    clock = FakeClock(seed=3)
    a = clock.workload("a", baseline_s, sigma=0.02)
    b = clock.workload("b", candidate_s, sigma=0.02)
    m = compare(a, b, threshold=1.0, min_pairs=10, max_pairs=200, timer=clock.now, calibrate=True)
    assert {m.baseline_calls, m.candidate_calls} == {5, 10}
    # A rule on raw sample times sees 1.0x against the 1.0x gate and samples to max_pairs; per call it is decided at
    # the first look, on the ratio it reports.
    assert (m.stopped_because, m.n, m.verdict.value) == ("decided", 10, verdict)
    assert m.ratio == pytest.approx(baseline_s / candidate_s, rel=0.05)


def test_oversubscription_is_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    from ryzen_opt.measure import timing as bench

    monkeypatch.setattr(bench, "_available_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    clock = FakeClock()
    m = compare(clock.workload("a", MS), clock.workload("b", MS), min_pairs=5, max_pairs=5, timer=clock.now)
    assert m.oversubscribed is not None
    assert "8 torch threads on 2 core(s)" in m.oversubscribed
    assert "oversubscribed" in m.describe()
    noisy = FakeClock()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    m = compare(
        noisy.workload("a", MS, sigma=1.5),
        noisy.workload("b", MS, sigma=1.5),
        min_pairs=9,
        max_pairs=9,
        timer=noisy.now,
    )
    assert m.oversubscribed is not None
    assert "CV" in m.oversubscribed


def test_compare_arms_shares_one_baseline_run_per_round() -> None:
    from ryzen_opt.measure.timing import compare_arms

    clock = FakeClock()
    base = clock.fixed("base", lambda k: 6 * MS)
    arms = {"two": clock.fixed("two", lambda k: 3 * MS), "three": clock.fixed("three", lambda k: 2 * MS)}
    results = compare_arms(base, arms, rounds=4, warmup=1, timer=clock.now)
    assert results["two"].ratio == pytest.approx(2.0)
    assert results["three"].ratio == pytest.approx(3.0)
    assert results["two"].n == 4
    runs = [e for e in clock.log if e in ("base", "two", "three")]
    assert runs.count("base") == 5  # 1 warm-up + 4 rounds, not once per arm per pair
    timed = runs[3:]
    assert timed[:3] == ["base", "two", "three"]
    assert timed[3:6] == ["three", "two", "base"]  # odd rounds run in reverse: the ABBA counterbalance


def test_compare_arms_rejects_too_few_rounds() -> None:
    from ryzen_opt.measure.timing import compare_arms

    with pytest.raises(ConfigError, match="rounds must be >= 3"):
        compare_arms(lambda: None, {"a": lambda: None}, rounds=2)


def test_read_bandwidth_is_a_measured_positive_rate_and_rejects_empty_sizes() -> None:
    gbs = read_bandwidth_gbs(mib=16, repeats=3)
    assert math.isfinite(gbs)
    assert gbs > 0.1  # any machine reads 16 MiB faster than 0.1 GB/s
    with pytest.raises(ConfigError, match="mib > 0"):
        read_bandwidth_gbs(mib=0)
