"""The speedup gate's error rates, measured on this machine by timing real work (nothing simulated).

    python benchmarks/bench_gate_errors.py                 # 100 runs per case, 1 thread
    python benchmarks/bench_gate_errors.py --runs 20 --threads 2

Each run is a fresh ``ryzen_opt.measure.timing.compare`` with the plugin's defaults (the gate as its threshold, adaptive
stopping, calibrated calls per sample) and its own bootstrap seed, judged by ``ryzen_opt.validation.validator.check``,
the
function every gate uses. The work is a ``size x size`` float32 matmul.

Cases (the truth is known by construction):
- **A/A against 1.2x**: both arms run the same work, so the truth is 1.0x; a PASS (or a WARNING, a noisy pass) is a
  false pass.
- **3x against 2x**: the baseline runs the work three times, the candidate once; a FAIL, or an INCONCLUSIVE (which
  fails a test under ``--ryzen-gate=strict``), is a false fail.
- **3x against 4x**: the same pair; a PASS or WARNING is a false pass.

Each case reports its verdict counts, its false-verdict rate and a 95% upper bound on that rate (Clopper-Pearson;
with 0 errors in 100 runs it is 3.0%: 100 runs can show a rate is small, not that it is below 1%, so ``--runs 300``
bounds it at 1.0%). Results go to ``benchmarks/results/gate_errors.json`` (gitignored) and a table.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.measure.timing import compare
from ryzen_opt.validation.reports import atomic_write_json
from ryzen_opt.validation.validator import check

# (case, gate, arms' repetitions (baseline, candidate), the verdicts that are wrong)
CASES: list[tuple[str, float, tuple[int, int], tuple[str, ...]]] = [
    ("A/A", 1.2, (1, 1), ("PASS", "WARNING")),
    ("3x pair", 2.0, (3, 1), ("FAIL", "INCONCLUSIVE")),
    ("3x pair", 4.0, (3, 1), ("PASS", "WARNING")),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="compares per case (default 100)")
    parser.add_argument("--size", type=int, default=192, help="matmul size (default 192: ~0.3 ms on one core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default="benchmarks/results/gate_errors.json")
    args = parser.parse_args()
    if args.runs < 1 or args.size < 1 or args.threads < 1:
        parser.error("--runs, --size and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    logging.getLogger("ryzen_opt").setLevel(logging.ERROR)  # each verdict's log line; the table says it all
    a, b = torch.randn(args.size, args.size), torch.randn(args.size, args.size)

    def work(times: int) -> Any:
        def run() -> None:
            for _ in range(times):
                torch.mm(a, b)

        return run

    rows: list[dict[str, Any]] = []
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for case, gate, (reps_a, reps_b), wrong in CASES:
        counts = {"PASS": 0, "FAIL": 0, "INCONCLUSIVE": 0, "WARNING": 0}
        ratios, pairs, seconds = [], [], []
        runs = range(args.runs)
        bar = tqdm(runs, desc=f"{case} vs {gate}x", leave=False) if tqdm else runs
        for i in bar:
            started = time.perf_counter()
            m = compare(work(reps_a), work(reps_b), threshold=gate, seed=i)
            seconds.append(time.perf_counter() - started)
            verdict = check(f"{case}#{i}", "speedup", m, gate).status.value
            counts[verdict] = counts.get(verdict, 0) + 1
            ratios.append(m.ratio)
            pairs.append(m.n)
        errors = sum(counts.get(v, 0) for v in wrong)
        rows.append(
            {
                "case": case,
                "gate": gate,
                "runs": args.runs,
                "counts": counts,
                "wrong_verdicts": list(wrong),
                "errors": errors,
                "error_rate": errors / args.runs,
                "error_rate_upper95": upper_bound(errors, args.runs),
                "median_ratio": statistics.median(ratios),
                "median_pairs": statistics.median(pairs),
                "median_seconds": statistics.median(seconds),
            }
        )
    atomic_write_json(Path(args.out), {"size": args.size, "threads": args.threads, "cases": rows})
    print(
        f"{'case':<8} {'gate':>5} {'runs':>5} {'PASS':>5} {'FAIL':>5} {'INCON':>5} {'WARN':>5} "
        f"{'false':>6} {'<=(95%)':>8} {'median':>7} {'pairs':>6}"
    )
    for r in rows:
        c = r["counts"]
        print(
            f"{r['case']:<8} {r['gate']:>4}x {r['runs']:>5} {c['PASS']:>5} {c['FAIL']:>5} {c['INCONCLUSIVE']:>5} "
            f"{c.get('WARNING', 0):>5} {r['error_rate']:>6.1%} {r['error_rate_upper95']:>8.1%} "
            f"{r['median_ratio']:>6.2f}x {r['median_pairs']:>6.0f}"
        )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
