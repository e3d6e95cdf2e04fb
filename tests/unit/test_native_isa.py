"""The native kernels' instruction-set paths: chosen at run time from the CPU's flags, forced by
``RYZEN_OPT_NATIVE_ISA``, and reported. ``tests/integration/test_native_paths.py`` runs the kernel tests again with
each other path this CPU can run forced (natively, or under SIMDe's emulation), in a fresh process."""

from __future__ import annotations

import os

import pytest

from ryzen_opt.errors import ConfigError
from ryzen_opt.ops import native

ZEN3 = {"sse2", "avx", "avx2", "fma", "f16c"}
OLD = {"sse2", "sse4_2"}
SKYLAKE_SP = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
ZEN4 = SKYLAKE_SP | {"avx512_vnni", "avx512_bf16"}
KNL = ZEN3 | {"avx512f", "avx512cd", "avx512er"}  # AVX-512 F without BW/VL: the AVX2 path


@pytest.mark.parametrize(
    ("flags", "best"),
    [
        (ZEN3, "avx2"),
        (ZEN4, "avx512vnni"),
        (SKYLAKE_SP, "avx512"),
        (KNL, "avx2"),
        (OLD, "scalar"),
        ({"avx2"}, "scalar"),
    ],
)
def test_the_best_path_the_cpu_supports_is_chosen(flags, best) -> None:
    assert native.select_isa(flags) == best
    assert native.select_isa(flags, "auto") == best


def test_any_path_the_cpu_supports_can_be_forced() -> None:
    assert native.select_isa(ZEN3, "scalar") == "scalar"
    assert native.select_isa(ZEN3, "avx2") == "avx2"
    assert native.select_isa(ZEN4, "avx2") == "avx2"
    # SIMDe's emulations of the AVX-512 paths run on AVX2: how a Zen 3 tests them.
    assert native.select_isa(ZEN3, "avx512vnni-simde") == "avx512vnni-simde"
    assert native.select_isa(OLD, "avx2-simde") == "avx2-simde"


def test_an_emulated_path_is_never_the_default() -> None:
    for flags in (ZEN3, ZEN4, OLD):
        assert not native.select_isa(flags).endswith("-simde")


def test_a_path_the_cpu_lacks_is_refused_before_it_crashes() -> None:
    with pytest.raises(ConfigError, match=r"needs CPU flags \['avx2', 'fma'\].*\['scalar', 'avx2-simde'\]"):
        native.select_isa(OLD, "avx2")
    with pytest.raises(ConfigError, match=r"needs CPU flags \['avx512_vnni'\]"):
        native.select_isa(SKYLAKE_SP, "avx512vnni")


def test_an_unknown_path_names_the_ones_there_are() -> None:
    with pytest.raises(ConfigError, match="paths avx512vnni, avx512, avx2, scalar, avx512vnni-simde"):
        native.select_isa(ZEN3, "neon")


@pytest.mark.skipif(native.ops() is None, reason="no native kernels on this machine (see the log)")
def test_the_loaded_build_is_the_path_asked_for() -> None:
    flags = set(native._cpu_flags().split())
    wanted = native.select_isa(flags, os.environ.get("RYZEN_OPT_NATIVE_ISA"))
    assert native.isa() == wanted
    ops = native.ops()
    assert ops is not None
    assert ops.isa() == wanted  # the table the extension dispatches to, from inside it


@pytest.mark.skipif(native.ops() is None, reason="no native kernels on this machine (see the log)")
def test_one_build_holds_every_path_of_this_architecture() -> None:
    built = set(native.built_isas())
    if native._is_x86():
        assert {"avx512vnni", "avx512", "avx2", "scalar"} <= built
        emulated = {"avx512vnni-simde", "avx512-simde", "avx2-simde"}
        assert (emulated <= built) is (native.simde_include() is not None)
    assert set(native.runnable_isas()) <= built
    assert native.isa() in native.runnable_isas()


@pytest.mark.skipif(native.ops() is None, reason="no native kernels on this machine (see the log)")
def test_use_isa_switches_the_path_and_restores_it() -> None:
    before = native.isa()
    with native.use_isa("scalar"):
        assert native.isa() == "scalar"
    assert native.isa() == before
    lacking = [name for name in native.ISA_NAMES if name not in native.runnable_isas()]
    for name in lacking:
        with pytest.raises(ConfigError, match="cannot run here"), native.use_isa(name):
            pass
    assert native.isa() == before


@pytest.mark.parametrize(
    ("path", "forced", "preferred"),
    [("avx2", None, True), ("scalar", None, False), ("scalar", "scalar", True), (None, None, False)],
)
def test_the_plain_loops_are_not_the_default_unless_forced(monkeypatch, path, forced, preferred) -> None:
    """The plain-loop path decodes ~2x slower than ATen's kernels: callers pick ATen's unless a user forced it."""
    monkeypatch.setattr(native, "ops", lambda: None if path is None else object())
    monkeypatch.setattr(native, "isa", lambda: path)
    if forced is None:
        monkeypatch.delenv("RYZEN_OPT_NATIVE_ISA", raising=False)
    else:
        monkeypatch.setenv("RYZEN_OPT_NATIVE_ISA", forced)
    assert native.preferred() is preferred


@pytest.mark.skipif(native.ops() is None, reason="no native kernels on this machine (see the log)")
def test_the_kernel_report_says_which_path_ran() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer, kernel_report

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = KernelOptimizer(KernelConfig(weights="int8")).apply_to_model(LlamaForCausalLM(config))
    report = kernel_report(model)
    assert report.native_isa == native.isa()
    assert report.native_layers is native.preferred()
    assert report.to_dict()["native_isa"] == native.isa()
