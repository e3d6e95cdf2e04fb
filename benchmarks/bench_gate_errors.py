"""The speedup gate's error rates, measured on this machine by timing real work (nothing simulated).

    python benchmarks/bench_gate_errors.py                        # 100 runs per case, 1 thread
    python benchmarks/bench_gate_errors.py --runs 300             # bounds each case's false-verdict rate at 1.0%
    python benchmarks/bench_gate_errors.py --runs 20 --cases unequal,spin   # only the cases whose name has these

Each run is a fresh ``ryzen_opt.measure.timing.compare`` with the plugin's defaults (the gate as its threshold, adaptive
stopping, calibrated calls per sample) and its own bootstrap seed, judged by ``ryzen_opt.validation.validator.check``,
the function every gate uses. The work unit is a ``--size`` square float32 matmul (well under 1 ms on one core), a
``--long-size`` one (several ms), or a busy-wait on ``time.perf_counter`` (no sleep, so its wall time is exact).

Cases (the truth is known by construction; FAIL or INCONCLUSIVE, which fails a test under ``--ryzen-gate=strict``,
is a false fail where the truth clears the gate; PASS or WARNING, a noisy pass, is a false pass where it does not):

- **A/A**, gate 1.2x: both arms run the same work, so the truth is 1.0x (false pass).
- **3x pair**, gates 2.0x (false fail) and 4.0x (false pass): the baseline runs the work three times, the candidate
  once.
- **unequal 2x**, gates 1.5x (false fail) and 3.0x (false pass): the baseline runs a short unit twice, the candidate
  once, so calibration gives the arms different calls per sample (e.g. 5 and 10).
- **unequal 0.5x**, gates 0.4x (false fail) and 0.75x (false pass): the reverse, a slowdown.
- **long 2x**, gate 1.5x (false fail): the 2x pair on a unit of several ms, one call per sample in each arm.
- **spin 2x**, gates 1.5x (false fail) and 3.0x (false pass): busy-waits of 0.6 ms (baseline) and 0.3 ms.
- **spin hiccup**, gate 1.5x (false fail): the spin pair, with the slow arm's first call after its creation (in
  the warm-up) 5 ms longer; each run builds a fresh arm, so every run meets the hiccup.

Why the unequal-calls cases: ``compare`` calibrates each arm's calls per sample on its own, and its stopping rule
used to read raw sample times, whose ratio is the per-call ratio times ``baseline_calls / candidate_calls``: with 5
and 10 calls a true 2x reads 1x there, so sampling could stop on a verdict that the reported per-call ratio
contradicts. The 2x and 0.5x pairs put that factor on both sides of 1, and each pair's two gates catch an error in
either direction. The long arms check the path where both arms run one call per sample. The spin arms have an
exact truth and no cache effects. The hiccup case exists because a single warm-up call's time used to set an arm's
calls per sample, so one slow call (an interrupt, a page fault) could give the 0.6 ms arm 1 call instead of 2;
calibration now starts from the median of three timed warm-up rounds, which one slow call cannot move.

Each case reports its verdict counts, its false-verdict rate and a 95% upper bound on that rate (Clopper-Pearson;
with 0 errors in 100 runs it is 3.0%: 100 runs can show a rate is small, not that it is below 1%, so ``--runs 300``
bounds it at 1.0%), the median calls per sample of each arm and the median pairs. Results go to
``benchmarks/results/gate_errors.json`` (gitignored) and a table.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.measure.timing import compare
from ryzen_opt.validation.reports import atomic_write_json
from ryzen_opt.validation.validator import check

Arm = Callable[[], Any]
FALSE_PASS = ("PASS", "WARNING")
FALSE_FAIL = ("FAIL", "INCONCLUSIVE")
HICCUP_S = 5e-3


@dataclass(frozen=True)
class Units:
    """The work units cases are built from, so a case names its arms without knowing the sizes on the CLI."""

    short: Arm  # one ``--size`` matmul, well under 1 ms
    long: Arm  # one ``--long-size`` matmul, several ms


@dataclass(frozen=True)
class Case:
    """One row of the table: a pair of arms with a known true ratio, the gate, and the verdicts that are wrong.

    ``build`` runs once per run, so arms with state (the hiccup) start fresh every time.
    """

    name: str
    gate: float
    truth: float
    build: Callable[[Units], tuple[Arm, Arm]]
    wrong: tuple[str, ...]


def times(fn: Arm, n: int) -> Arm:
    """``fn`` run ``n`` times per call: an arm whose true cost is exactly ``n`` units."""
    if n == 1:
        return fn

    def run() -> None:
        for _ in range(n):
            fn()

    return run


def spin(seconds: float) -> Arm:
    """A busy-wait of ``seconds`` of wall time on ``time.perf_counter``: an exact truth, unlike sleep, whose wake-up
    lags by a scheduler tick."""

    def run() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return run


def hiccup(fn: Arm, extra_s: float = HICCUP_S) -> Arm:
    """``fn`` whose first call spins ``extra_s`` longer: compare's first call is a warm-up one, so this is one slow
    warm-up call (an interrupt, a page fault) that calibration must not trust."""
    first = True

    def run() -> None:
        nonlocal first
        if first:
            first = False
            spin(extra_s)()
        fn()

    return run


CASES: list[Case] = [
    Case("A/A", 1.2, 1.0, lambda u: (u.short, u.short), FALSE_PASS),
    Case("3x pair", 2.0, 3.0, lambda u: (times(u.short, 3), u.short), FALSE_FAIL),
    Case("3x pair", 4.0, 3.0, lambda u: (times(u.short, 3), u.short), FALSE_PASS),
    Case("unequal 2x", 1.5, 2.0, lambda u: (times(u.short, 2), u.short), FALSE_FAIL),
    Case("unequal 2x", 3.0, 2.0, lambda u: (times(u.short, 2), u.short), FALSE_PASS),
    Case("unequal 0.5x", 0.4, 0.5, lambda u: (u.short, times(u.short, 2)), FALSE_FAIL),
    Case("unequal 0.5x", 0.75, 0.5, lambda u: (u.short, times(u.short, 2)), FALSE_PASS),
    Case("long 2x", 1.5, 2.0, lambda u: (times(u.long, 2), u.long), FALSE_FAIL),
    Case("spin 2x", 1.5, 2.0, lambda u: (spin(0.6e-3), spin(0.3e-3)), FALSE_FAIL),
    Case("spin 2x", 3.0, 2.0, lambda u: (spin(0.6e-3), spin(0.3e-3)), FALSE_PASS),
    Case("spin hiccup", 1.5, 2.0, lambda u: (hiccup(spin(0.6e-3)), spin(0.3e-3)), FALSE_FAIL),
]


def upper_bound(errors: int, runs: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate seen as ``errors`` in ``runs`` (bisection on the binomial
    tail, no scipy needed)."""
    if errors >= runs:
        return 1.0
    alpha = 1.0 - confidence

    def tail(p: float) -> float:  # P(X <= errors | p)
        return sum(math.comb(runs, k) * p**k * (1 - p) ** (runs - k) for k in range(errors + 1))

    lo, hi = errors / runs, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) > alpha else (lo, mid)
    return hi


def select(cases: list[Case], spec: str | None) -> list[Case]:
    """The cases whose name contains any of the comma-separated substrings in ``spec`` (case-insensitive); all when
    ``spec`` is empty, so a user can rerun only the rows in question."""
    if not spec:
        return cases
    wanted = [s.strip().lower() for s in spec.split(",") if s.strip()]
    return [c for c in cases if any(w in c.name.lower() for w in wanted)]


def matmul(size: int) -> Arm:
    """One ``size x size`` float32 matmul on tensors made once, so a call times the matmul alone."""
    a, b = torch.randn(size, size), torch.randn(size, size)

    def run() -> None:
        torch.mm(a, b)

    return run


def run_case(case: Case, units: Units, runs: int, progress: Any) -> dict[str, Any]:
    """``runs`` fresh compares of one case; its verdict counts, false-verdict rate and medians."""
    counts = {"PASS": 0, "FAIL": 0, "INCONCLUSIVE": 0, "WARNING": 0}
    ratios: list[float] = []
    pairs: list[int] = []
    seconds: list[float] = []
    calls_a: list[int] = []
    calls_b: list[int] = []
    label = f"{case.name} vs {case.gate}x"
    for i in progress(range(runs), desc=label, leave=False):
        baseline, candidate = case.build(units)
        started = time.perf_counter()
        m = compare(baseline, candidate, threshold=case.gate, seed=i)
        seconds.append(time.perf_counter() - started)
        verdict = check(f"{case.name}#{i}", "speedup", m, case.gate).status.value
        counts[verdict] = counts.get(verdict, 0) + 1
        ratios.append(m.ratio)
        pairs.append(m.n)
        calls_a.append(m.baseline_calls)
        calls_b.append(m.candidate_calls)
    errors = sum(counts.get(v, 0) for v in case.wrong)
    return {
        "case": case.name,
        "gate": case.gate,
        "truth": case.truth,
        "runs": runs,
        "counts": counts,
        "wrong_verdicts": list(case.wrong),
        "errors": errors,
        "error_rate": errors / runs,
        "error_rate_upper95": upper_bound(errors, runs),
        "median_ratio": statistics.median(ratios),
        "median_pairs": statistics.median(pairs),
        "median_baseline_calls": statistics.median(calls_a),
        "median_candidate_calls": statistics.median(calls_b),
        "median_seconds": statistics.median(seconds),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per case: the verdict counts, then the false verdicts and what they bound, then the medians."""
    print(
        f"{'case':<12} {'truth':>5} {'gate':>5} {'runs':>5} {'PASS':>5} {'FAIL':>5} {'INCON':>5} {'WARN':>5} "
        f"{'false':>5} {'rate':>6} {'<=(95%)':>8} {'median':>7} {'calls':>8} {'pairs':>5}"
    )
    for r in rows:
        c = r["counts"]
        calls = f"{r['median_baseline_calls']:g}/{r['median_candidate_calls']:g}"
        print(
            f"{r['case']:<12} {r['truth']:>4}x {r['gate']:>4}x {r['runs']:>5} {c['PASS']:>5} {c['FAIL']:>5} "
            f"{c['INCONCLUSIVE']:>5} {c.get('WARNING', 0):>5} {r['errors']:>5} {r['error_rate']:>6.1%} "
            f"{r['error_rate_upper95']:>8.1%} {r['median_ratio']:>6.2f}x {calls:>8} {r['median_pairs']:>5.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="compares per case (default 100)")
    parser.add_argument("--size", type=int, default=192, help="short matmul size (default 192: well under 1 ms)")
    parser.add_argument("--long-size", type=int, default=512, help="long matmul size (default 512: several ms)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cases", default=None, help="comma-separated substrings of case names to run (default all)")
    parser.add_argument("--out", default="benchmarks/results/gate_errors.json")
    args = parser.parse_args()
    if args.runs < 1 or args.size < 1 or args.long_size < 1 or args.threads < 1:
        parser.error("--runs, --size, --long-size and --threads must be at least 1")
    cases = select(CASES, args.cases)
    if not cases:
        names = ", ".join(dict.fromkeys(c.name for c in CASES))
        parser.error(f"--cases {args.cases!r} matches no case; cases: {names}")
    torch.set_num_threads(args.threads)
    logging.getLogger("ryzen_opt").setLevel(logging.ERROR)  # each verdict's log line; the table says it all
    units = Units(short=matmul(args.size), long=matmul(args.long_size))
    try:
        from tqdm.auto import tqdm as progress
    except ImportError:  # pragma: no cover

        def progress(it: Any, **_: Any) -> Any:
            return it

    rows = [run_case(case, units, args.runs, progress) for case in cases]
    atomic_write_json(
        Path(args.out),
        {
            "size": args.size,
            "long_size": args.long_size,
            "threads": args.threads,
            "cases_filter": args.cases,
            "cases": rows,
        },
    )
    print_table(rows)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
