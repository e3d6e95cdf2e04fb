"""The sampler on real small callables: a micro-speedup measured by ``ryzen.compare`` agrees with ``timeit``.

Each call here lasts about a microsecond or less, so one call per sample would time the timer (measured before
calibration: a 22x pair read as 4.4x). ``compare`` calibrates the calls per sample (``timeit.autorange``'s rule, at
least 1 ms a sample); ``timeit`` times the same two callables the way Python users trust. The bound is the issue's,
0.6-1.6x of timeit's ratio: the two use different samples and loop overheads, and a busy machine moves both.
"""

from __future__ import annotations

import statistics
import timeit

import pytest

from ryzen_opt.measure.timing import serial_lock

pytestmark = pytest.mark.perf


def _timeit_ratio(slow, fast, rounds: int = 9) -> float:
    """timeit's ratio, paired: each round times ``slow`` then ``fast`` (autorange's number each), and the median
    of the per-round ratios is the reference. The minimum of each arm timed apart (timeit's own habit) read 27.7x
    against 14.9x in CI, where the other xdist worker loaded the cores while one arm was timed and not the other."""
    timers = [timeit.Timer(slow), timeit.Timer(fast)]
    numbers = [t.autorange()[0] for t in timers]
    ratios = []
    for _ in range(rounds):
        s, f = (t.timeit(n) / n for t, n in zip(timers, numbers, strict=False))
        ratios.append(s / f)
    return statistics.median(ratios)


def test_a_micro_speedup_matches_timeit(ryzen) -> None:
    small, large = list(range(8)), list(range(400))

    def slow() -> int:
        return sum(large)

    def fast() -> int:
        return sum(small)

    with serial_lock():  # no other perf section times beside the reference
        reference = _timeit_ratio(slow, fast)
    m = ryzen.compare(slow, fast, baseline_name="sum of 400 ints", candidate_name="sum of 8 ints", min_pairs=20)
    assert m.candidate_calls > m.baseline_calls > 1  # each arm calibrated to its own cost
    assert 0.6 <= m.ratio / reference <= 1.6, f"compare {m.describe()} against timeit {reference:.1f}x"
