"""Does ``-n 2`` change a gate's verdict? The worked example of ``docs/gate-your-own.md`` run serially, under
pytest-xdist, and under xdist with the plugin's machine lock switched off, beside ordinary tests that keep a core busy.

    python benchmarks/bench_xdist_verdicts.py            # the three runs, ~2 minutes each on 2 cores

Each run is a real ``pytest`` in a scratch project (a temporary directory): the page's test file as it stands, plus
``test_busy.py`` (30 tests of ~2 s, each a loop of 512x512 matmuls on one thread: a model being quantized elsewhere,
say), enough to keep one worker busy for as long as the other measures.
The "unlocked" run replaces ``pytest_ryzen.scheduling.lock_path`` with ``None`` from the project's conftest, which is
the plugin's behaviour before measuring tests ran alone (only ``compare``'s sampling was locked). The table gives
each run's verdicts, ratios with their 95% intervals and each arm's interquartile range per call; the reports stay in
``benchmarks/results/xdist_verdicts/`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ryzen_opt.models.cache import cache_root

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "gate-your-own.md"

BUSY = '''"""Ordinary tests that keep a core busy while others may measure."""
import pytest
import torch


@pytest.mark.parametrize("i", range(30))
def test_busy(i):
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    for _ in range(400):
        a = torch.tanh(a @ a)
'''

CONFTEST = """import os

if os.environ.get("RYZEN_BENCH_UNLOCKED"):
    import pytest_ryzen.scheduling as scheduling

    scheduling.lock_path = lambda config: None  # measuring tests no longer run alone
"""

RUNS = {"serial": ([], False), "-n 2": (["-n", "2"], False), "-n 2, lock off": (["-n", "2"], True)}


def example() -> str:
    """The page's test file, exactly as ``tests/integration/test_plugin_docs.py`` runs it."""
    found = re.search(r"<!-- example: test_my_optimizations.py -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    if found is None:
        raise SystemExit(f"{DOC} has no example block")
    return found.group(1)


def run(project: Path, label: str, args: list[str], unlocked: bool, out: Path) -> dict[str, Any]:
    """One pytest run of the scratch project; its validation report."""
    env = {**os.environ, "RYZEN_OPT_CACHE": str(cache_root())}
    env.pop("RYZEN_BENCH_UNLOCKED", None)
    if unlocked:
        env["RYZEN_BENCH_UNLOCKED"] = "1"
    report_dir = out / label.replace(" ", "").replace(",", "_")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--device=cpu"]
    done = subprocess.run(
        [*cmd, f"--ryzen-report-dir={report_dir}", *args],
        cwd=project,
        env=env,
        text=True,
        capture_output=True,
        timeout=1200,
    )
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:])
    return json.loads((report_dir / "validation_report.json").read_text())


def rows(label: str, report: dict[str, Any]) -> list[str]:
    """One line per gate or tracked speedup: verdict, value, interval, per-arm IQR."""
    lines = []
    for entry in [*report["results"], *report.get("tracked", [])]:
        d = entry.get("details") or {}
        iqr = ""
        if "baseline_iqr_s" in d:
            iqr = f"IQR {d['baseline_iqr_s'] * 1e3:.0f} / {d['candidate_iqr_s'] * 1e3:.0f} ms"
        ci = "" if entry.get("ci_low") is None else f"({entry['ci_low']:.3g}-{entry['ci_high']:.3g})"
        name = entry["name"].rsplit("::", 1)[-1]
        lines.append(f"{label:<15} {name:<36} {entry['status']:<8} {entry['actual']:.3g} {ci:<16} {iqr}")
    return lines


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    out = ROOT / "benchmarks" / "results" / "xdist_verdicts"
    out.mkdir(parents=True, exist_ok=True)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "test_my_optimizations.py").write_text(example())
        (project / "test_busy.py").write_text(BUSY)
        (project / "conftest.py").write_text(CONFTEST)
        for label, (args, unlocked) in RUNS.items():
            table += rows(label, run(project, label, args, unlocked, out))
    print("\n".join(table))


if __name__ == "__main__":
    main()
