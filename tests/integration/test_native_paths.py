"""Each native instruction-set path this CPU can run, forced, passes the kernel tests: the integer GEMVs bit-exact
against torch, the fused layer against the torch-written one, row independence, speculative-style verification.

One process loads one build of the extension, so each path runs the tests in a fresh pytest process with
``RYZEN_OPT_NATIVE_ISA`` set. The path chosen by default (the best one) already ran them in the unit suite; this adds
the others. A path the CPU lacks is skipped with the flags it needs (AVX2 on an old CPU). Building a path costs about
40 s of compiling, once per machine (torch's extension cache keeps it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ryzen_opt import native

ROOT = Path(__file__).resolve().parents[2]
FLAGS = set(native._cpu_flags().split())


@pytest.mark.parametrize("isa", [name for name, _, _ in native.ISAS])
def test_a_forced_path_passes_the_kernel_tests(isa: str) -> None:
    needs = next(needs for name, needs, _ in native.ISAS if name == isa)
    if not needs <= FLAGS:
        pytest.skip(f"the {isa} path needs CPU flags {sorted(needs - FLAGS)}")
    if isa == native.select_isa(FLAGS):
        pytest.skip(f"{isa} is this CPU's default path: the unit suite ran the kernel tests on it")
    env = {**os.environ, "RYZEN_OPT_NATIVE_ISA": isa, "RYZEN_OPT_NATIVE": "1"}
    tests = [
        "tests/unit/test_native_isa.py",
        "tests/unit/test_native_layer.py",
        "tests/unit/test_kernels.py",
        "tests/unit/test_kv_cache.py",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *tests, "-k", "native"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, f"the {isa} path failed its kernel tests:\n{tail}"
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary, f"the {isa} path ran no kernel tests:\n{tail}"
    assert "skipped" not in summary, f"the {isa} path skipped kernel tests:\n{tail}"
