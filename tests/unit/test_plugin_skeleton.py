"""The plugin as users meet it: options in --help, markers in --markers, the device fixture, device errors."""

from __future__ import annotations

import pytest

import pytest_ryzen

MARKER_NAMES = (
    "speedup",
    "accuracy_loss",
    "compression_ratio",
    "memory_reduction",
    "acceptance_rate",
    "perf",
    "gpu",
    "slow",
)


def test_markers_listed(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    for name in MARKER_NAMES:
        result.stdout.fnmatch_lines([f"@pytest.mark.{name}*"])


def test_help_shows_device_options(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*ryzen*", "*--ryzen-device*", "*--device*"])


def test_a_project_that_owns_device_keeps_it(pytester: pytest.Pytester) -> None:
    # pytest-playwright (for one) registers --device: ryzen must step back to --ryzen-device, not crash pytest.
    pytester.makeconftest(
        """
def pytest_addoption(parser):
    parser.addoption("--device", default="desktop", help="the project's own device (a browser profile)")
"""
    )
    pytester.makepyfile(
        """
def test_both(request, device):
    assert request.config.getoption("device") == "iPhone 15"
    assert device.type == "cpu"
"""
    )
    result = pytester.runpytest("--device=iPhone 15", "--ryzen-device=cpu", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*ryzen: --device belongs to another plugin or conftest here*--ryzen-device*"])


def test_gpu_marker_skips_without_a_gpu(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpu\ndef test_on_gpu():\n    raise AssertionError\n")
    result = pytester.runpytest("--device=cpu", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs a GPU (--device=cuda or --device=rocm)*cpu*"])


def test_strict_markers_accept_ryzen_markers_and_device_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_ryzen import speedup, perf

        @perf
        @speedup(3.0)
        @pytest.mark.accuracy_loss(0.01)
        @pytest.mark.compression_ratio(2.0)
        @pytest.mark.memory_reduction(0.3)
        @pytest.mark.acceptance_rate(0.6)
        @pytest.mark.slow
        def test_marked(device):
            assert device.type == "cpu"
        """
    )
    # report mode: the gates record (nothing, here) without failing; this test is about marker acceptance.
    result = pytester.runpytest("--strict-markers", "--device=cpu", "--ryzen-gate=report", "-p", "no:randomly")
    result.assert_outcomes(passed=1)


def test_alias_option_and_ini_default(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nryzen_device = cpu\n")
    pytester.makepyfile("def test_d(device):\n    assert str(device) == 'cpu'\n")
    pytester.runpytest().assert_outcomes(passed=1)
    pytester.runpytest("--ryzen-device=cpu").assert_outcomes(passed=1)


def test_rocm_without_rocm_is_one_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "import pytest\n" + "\n".join(f"@pytest.mark.perf\ndef test_{i}(device):\n    pass\n" for i in range(5))
    )
    result = pytester.runpytest("-m", "perf", "--device=rocm")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ryzen: --device=rocm needs a ROCm (HIP) build of torch*"])
    assert "skipped" not in result.stdout.str()


def test_unknown_device_is_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--device=tpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown device 'tpu'*auto, cpu, cuda, rocm, mps*"])


def test_python_aliases_are_pytest_marks() -> None:
    assert pytest_ryzen.speedup.name == "speedup"
    decorated = pytest_ryzen.speedup(3.0)
    assert decorated.mark.args == (3.0,)
