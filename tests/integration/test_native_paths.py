"""Each native instruction-set path this machine can run, forced, passes the kernel tests: the integer GEMVs against
a float64 reference, the activation quantizer bit-exact, the fused layer against the torch-written one, row
independence, speculative-style verification.

Every path is tested on every machine: the native build of a path where the CPU has its instructions, and the same
code compiled on SIMDe's portable intrinsics (``avx512vnni-simde``, ``avx512-simde``, ``avx2-simde``) everywhere
SIMDe is installed (``make setup`` installs Debian's ``libsimde-dev``). A path the CPU lacks is skipped naming the
flags it needs; the emulated ones are skipped, with the reason, when SIMDe is missing.

Each path runs the tests in a fresh pytest process with ``RYZEN_OPT_NATIVE_ISA`` set, so that every optimizer built
in it picks that path up from the start. One build holds every path: nothing is compiled again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ryzen_opt.ops import native

ROOT = Path(__file__).resolve().parents[2]
FLAGS = set(native._cpu_flags().split())


@pytest.mark.parametrize("isa", native.ISA_NAMES)
def test_a_forced_path_passes_the_kernel_tests(isa: str) -> None:
    needs = native.needs(isa)
    if not needs <= FLAGS:
        pytest.skip(f"the {isa} path needs CPU flags {sorted(needs - FLAGS)}")
    if isa.endswith("-simde") and native.simde_include() is None:
        pytest.skip(f"{isa} needs SIMDe's headers (Debian: apt-get install libsimde-dev), not found")
    if native.ops() is None:
        pytest.skip("no native kernels on this machine (see the log)")
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
