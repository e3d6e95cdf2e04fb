"""Native CPU kernels for weight-only int8 / int4 linears, the fused decoder layer and attention on quantized KV codes.

Why our own kernels (measured on SmolLM2-135M, prose held out from tuning):

- fbgemm's dynamic int8 linear quantizes *activations* per tensor. Real LLMs carry outlier activation channels, so
  one scale per tensor wrecks the prefill (relative top-1 loss 36% on SmolLM2). Rounding per block of 32, as
  llama.cpp's Q8_0 does, loses nothing measurable.
- ATen's weight-only kernels take bf16 activations and bf16 scales, and run slowly on CPUs without AVX-512 BF16.

The C++ lives in ``ryzen_opt/ops/csrc/`` (shipped as package data): ``ops.cpp`` holds the torch operators (schemas,
checks, threading), ``kernels.h`` the table of primitives each instruction-set path implements, ``generic.cpp`` the
portable path and ``x86/`` one file per x86 path. ``docs/native.md`` says what runs where and what it measured.

**Instruction sets, chosen at run time.** One build holds every path: each path's file is compiled for its own
target (``#pragma GCC target``), and :func:`select_isa` picks the best one the CPU's flags allow
(``avx512vnni`` > ``avx512`` > ``avx2`` > ``scalar``). Where Debian's ``libsimde-dev`` is installed, the build also
holds the AVX2 and AVX-512 paths compiled a second time on SIMDe's portable intrinsics (``avx2-simde``,
``avx512-simde``, ``avx512vnni-simde``), so that the tests run every path's code on any machine.
``RYZEN_OPT_NATIVE_ISA=NAME`` forces a path (one the CPU lacks is refused); ``RYZEN_OPT_NATIVE=0`` turns the extension
off and every caller uses ATen's kernels. :func:`isa` says which path runs; the KernelOptimizer's report records it.

The extension is built on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja) into torch's extension
cache, named by a hash of the sources, the flags and torch's version, under a file lock; a machine that cannot build
it gets ``None`` from :func:`ops` and a logged reason, and callers fall back to ATen's kernels.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.errors import ConfigError
from ryzen_opt.locking import file_lock

logger = logging.getLogger(__name__)

SMALL_M = 8  # rows of x at most that the fused layer takes (the speculative decoder verifies at most 8 tokens)
CSRC = Path(__file__).resolve().parent / "csrc"

_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
# The paths, best first: (name, CPU flags it needs, whether it is SIMDe's emulation of another path). The emulated
# paths are built for AVX2 (the AVX-512 ones) or the x86-64 baseline (avx2-simde), and are never chosen by default.
ISAS: tuple[tuple[str, frozenset[str], bool], ...] = (
    ("avx512vnni", _AVX512 | {"avx512_vnni"}, False),
    ("avx512", _AVX512, False),
    ("avx2", frozenset({"avx2", "fma"}), False),
    ("scalar", frozenset(), False),
    ("avx512vnni-simde", frozenset({"avx2", "fma"}), True),
    ("avx512-simde", frozenset({"avx2", "fma"}), True),
    ("avx2-simde", frozenset(), True),
)
ISA_NAMES = tuple(name for name, _, _ in ISAS)
_X86_SOURCES = ("x86/avx2.cpp", "x86/avx512.cpp", "x86/avx512vnni.cpp")
_SIMDE_SOURCES = ("x86/simde_avx2.cpp", "x86/simde_avx512.cpp", "x86/simde_avx512vnni.cpp")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """This CPU's flags as ``/proc/cpuinfo`` spells them (empty where there is no such file)."""
    return set(_cpu_flags().split())


def needs(name: str) -> frozenset[str]:
    """The CPU flags path ``name`` needs."""
    return next(flags for isa_name, flags, _ in ISAS if isa_name == name)


def select_isa(flags: set[str], forced: str | None = None) -> str:
    """The path to run on a CPU with ``flags`` (``/proc/cpuinfo``'s words): ``forced`` when the CPU supports it,
    else the best native path it supports.

    Raises:
        ConfigError: ``forced`` is not a path this source has, or needs flags the CPU lacks (it would crash with an
            illegal instruction).
    """
    if forced in (None, "", "auto"):
        return next(name for name, need, emulated in ISAS if not emulated and need <= flags)
    if forced not in ISA_NAMES:
        raise ConfigError(
            f"RYZEN_OPT_NATIVE_ISA={forced!r}: the native kernels have the paths {', '.join(ISA_NAMES)} (or 'auto')"
        )
    missing = needs(str(forced)) - flags
    if missing:
        raise ConfigError(
            f"RYZEN_OPT_NATIVE_ISA={forced!r} needs CPU flags {sorted(missing)} this CPU lacks; "
            f"unset it, or choose one of {[n for n, need, _ in ISAS if need <= flags]}"
        )
    return str(forced)


def simde_include() -> str | None:
    """The include directory that holds SIMDe's ``simde/x86/avx512.h`` (``RYZEN_OPT_SIMDE_INCLUDE``, else the
    system's), or ``None``: the emulated paths are then not built."""
    candidates = [os.environ.get("RYZEN_OPT_SIMDE_INCLUDE", ""), "/usr/include", "/usr/local/include"]
    for directory in candidates:
        if directory and (Path(directory) / "simde" / "x86" / "avx512.h").is_file():
            return directory
    return None


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _sources() -> list[Path]:
    names = ["ops.cpp", "generic.cpp"]
    if _is_x86():
        names += _X86_SOURCES
        if simde_include() is not None:
            names += _SIMDE_SOURCES
    return [CSRC / name for name in names]


def _compile_flags() -> list[str]:
    # The glue and the portable path are built for the baseline target: each vector path raises its own in its file,
    # so nothing outside a path's file can hold an instruction the CPU may lack. -fopenmp: at::parallel_for is
    # inline, and runs serially unless the file that calls it is built with OpenMP.
    flags = ["-O3", "-fno-math-errno", "-fopenmp", "-Wno-psabi"]
    if _is_x86():
        flags += ["-march=x86-64", "-mtune=generic"]
        if simde_include() is not None:
            flags.append("-DRYZEN_WITH_SIMDE")
    return flags


def _build_key(sources: list[Path], flags: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.is_file() and path.suffix in (".cpp", ".h"):
            digest.update(path.relative_to(CSRC).as_posix().encode() + path.read_bytes())
    digest.update(" ".join([*(p.name for p in sources), *flags, torch.__version__]).encode())
    return digest.hexdigest()[:12]


def isa() -> str | None:
    """The instruction-set path the native kernels run (``"avx512vnni"``, ``"avx2"``, ...), or ``None`` when ATen's
    kernels run instead (no extension: see :func:`ops`)."""
    lib = ops()
    return None if lib is None else str(lib.isa())


def built_isas() -> tuple[str, ...]:
    """The paths the loaded build holds, whether or not this CPU can run them (empty without an extension)."""
    lib = ops()
    return () if lib is None else tuple(str(lib.isas()).split(","))


def runnable_isas() -> tuple[str, ...]:
    """The paths of the loaded build that this CPU can run: the native ones its flags allow, and SIMDe's."""
    flags = cpu_flags() if _is_x86() else set()
    built = set(built_isas())
    return tuple(name for name, need, _ in ISAS if name in built and need <= flags)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Run the native kernels on path ``name`` inside the block (the tests run each path this way), then return to the
    one that ran before.

    Raises:
        ConfigError: the build has no such path, or the CPU lacks its flags.
    """
    lib = ops()
    if lib is None:
        raise ConfigError("no native kernels on this machine (see the log): there is no path to choose")
    if name not in runnable_isas():
        raise ConfigError(f"native path {name!r} cannot run here: this build and CPU run {', '.join(runnable_isas())}")
    before = str(lib.isa())
    lib.use_isa(name)
    try:
        yield name
    finally:
        lib.use_isa(before)


def preferred() -> bool:
    """Whether callers should choose the native kernels over ATen's by default: a vectorized path runs, or the user
    forced a path (``RYZEN_OPT_NATIVE_ISA``). The plain-loop path alone runs SmolLM2's int8 and int4 decode about 2x
    slower than ATen's kernels (2 threads): it serves correctness tests and explicit requests, not the default."""
    if ops() is None:
        return False
    return isa() != "scalar" or os.environ.get("RYZEN_OPT_NATIVE_ISA", "auto") not in ("", "auto")


def ops() -> Any | None:
    """``torch.ops.ryzen_native`` once the extension is built and loaded; ``None`` (and a logged reason) if this
    machine cannot build it (no compiler, no ninja, ``RYZEN_OPT_NATIVE=0``)."""
    return _loaded()


@functools.cache
def _loaded() -> Any | None:
    if os.environ.get("RYZEN_OPT_NATIVE", "1") == "0":
        logger.info("native kernels disabled (RYZEN_OPT_NATIVE=0)")
        return None
    # A path the CPU cannot run is the user's error, raised: falling back silently would hide it.
    flags = cpu_flags() if _is_x86() else set()
    chosen = select_isa(flags, os.environ.get("RYZEN_OPT_NATIVE_ISA")) if _is_x86() else "scalar"
    from torch.utils import cpp_extension

    sources = _sources()
    cflags = _compile_flags()
    name = f"ryzen_native_{_build_key(sources, cflags)}"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    include = simde_include()
    start = time.perf_counter()
    try:
        with file_lock(os.path.join(os.path.dirname(build_dir), f"{name}.lock")):
            cpp_extension.load(
                name=name,
                sources=[str(p) for p in sources],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(CSRC)] + ([include] if include and _is_x86() else []),
                is_python_module=False,
                build_directory=build_dir,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use ATen's kernels, and say why
        logger.warning("native kernels unavailable, using ATen's (%s: %s)", type(exc).__name__, exc)
        return None
    lib = torch.ops.ryzen_native
    built = str(lib.isas()).split(",")
    if chosen not in built:
        logger.warning("native kernels: the %s path is not in this build (%s); using ATen's", chosen, built)
        return None
    if int(lib.small_m()) != SMALL_M:
        raise RuntimeError(f"ryzen_native takes {lib.small_m()} rows, ryzen_opt.ops.native.SMALL_M says {SMALL_M}")
    lib.use_isa(chosen)
    _register_fakes()
    logger.info(
        "native kernels %s ready in %.1f s: running %s (built: %s)",
        name,
        time.perf_counter() - start,
        chosen,
        ", ".join(built),
    )
    return lib


def _register_fakes() -> None:
    """Output shapes for ``torch.compile`` and ``torch.library.opcheck``: to the compiler each kernel is one opaque
    op."""

    def linear_fake(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], scale.shape[0])  # int8 [N, K] or panels: N is the scales' count

    def int4_fake(
        x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int, n: int
    ):
        return x.new_empty(x.shape[0], n)

    def dequantize_fake(panels: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int, n: int):
        return panels.new_empty(n, panels.shape[1] * 8, dtype=torch.float32)

    def quantize_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], x.shape[1] // 32)

    def attend_fake(q: torch.Tensor, *args: Any) -> torch.Tensor:
        return torch.empty_like(q)

    def layer_qkv_fake(h: torch.Tensor, w: list[torch.Tensor], kinds: list[int], *args: Any) -> torch.Tensor:
        # kind 0: fp32 [K, N]; 1 and 3: N scales; 2: int4 panels of 16 rows
        width = {0: w[0].shape[1], 2: w[0].shape[0] * 16}.get(kinds[0], w[1].shape[0])
        return h.new_empty(h.shape[0], width)

    def layer_fake(h: torch.Tensor, *args: Any) -> torch.Tensor:
        return torch.empty_like(h)

    for op, fake in (
        ("w8_linear", linear_fake),
        ("w8a8_linear", linear_fake),
        ("w4_linear", int4_fake),
        ("w4_dequantize", dequantize_fake),
        ("quantize_q8", quantize_fake),
        ("kv_attend", attend_fake),
        ("layer_qkv", layer_qkv_fake),
        ("layer_out", layer_fake),
        ("decode_layer", layer_fake),
    ):
        torch.library.register_fake(f"ryzen_native::{op}", fake)
