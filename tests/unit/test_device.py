"""ryzen_opt.device: resolution, the errors users see, and the environment facts reports carry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ryzen_opt import device as dev_mod
from ryzen_opt.device import DEVICE_CHOICES, device_class, device_info, resolve_device
from ryzen_opt.errors import DeviceNotAvailableError, InvalidDeviceError


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev_mod, "_mps_available", lambda: False)


@pytest.fixture
def cpu_only_build(monkeypatch: pytest.MonkeyPatch, no_gpu: None) -> None:
    monkeypatch.setattr(dev_mod, "_hip_version", lambda: None)
    monkeypatch.setattr(dev_mod, "_cuda_version", lambda: None)


def test_cpu_resolves_to_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_picks_cpu_without_gpu(no_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_auto_prefers_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("spec", ["gpu", "tpu", "cuda:x", "", "rocm-6", "cpu:0:1"])
def test_unknown_device_names_the_choices(spec: str) -> None:
    with pytest.raises(InvalidDeviceError) as info:
        resolve_device(spec)
    for choice in DEVICE_CHOICES:
        assert choice in str(info.value)


def test_rocm_on_cpu_build_says_what_to_install(cpu_only_build: None) -> None:
    with pytest.raises(DeviceNotAvailableError, match=r"ROCm \(HIP\) build.*CPU-only") as info:
        resolve_device("rocm")
    assert "--device=cpu" in str(info.value)


def test_rocm_on_cuda_build_points_to_cuda(monkeypatch: pytest.MonkeyPatch, no_gpu: None) -> None:
    monkeypatch.setattr(dev_mod, "_hip_version", lambda: None)
    monkeypatch.setattr(dev_mod, "_cuda_version", lambda: "12.4")
    with pytest.raises(DeviceNotAvailableError, match=r"built for CUDA 12\.4.*--device=cuda"):
        resolve_device("rocm")


def test_cuda_on_cpu_build_says_what_to_install(cpu_only_build: None) -> None:
    with pytest.raises(DeviceNotAvailableError, match="CPU-only build"):
        resolve_device("cuda")


def test_cuda_build_without_visible_gpu(monkeypatch: pytest.MonkeyPatch, no_gpu: None) -> None:
    monkeypatch.setattr(dev_mod, "_hip_version", lambda: None)
    monkeypatch.setattr(dev_mod, "_cuda_version", lambda: "12.4")
    with pytest.raises(DeviceNotAvailableError, match="CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda")


def test_rocm_maps_to_cuda_on_hip_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev_mod, "_hip_version", lambda: "6.2.41133")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("rocm") == torch.device("cuda")
    assert resolve_device("rocm:1") == torch.device("cuda", 1)
    assert device_class(torch.device("cuda")) == "rocm"
    with pytest.raises(DeviceNotAvailableError, match="only 2 GPU"):
        resolve_device("rocm:2")


def test_mps_missing(no_gpu: None) -> None:
    with pytest.raises(DeviceNotAvailableError, match="MPS"):
        resolve_device("mps")


def test_device_info_is_complete_and_json() -> None:
    info = device_info()
    json.dumps(info, allow_nan=False)
    assert info["device"] == "cpu"
    assert info["device_class"] == "cpu"
    assert info["versions"]["torch"] == torch.__version__
    assert info["threads"]["torch_intra_op"] == torch.get_num_threads()
    for flag in ("avx512_bf16", "avx512_vnni", "amx_tile"):
        assert flag in info["cpu"]["flags"]
    assert info["cpu"]["model"]
    if sys.platform.startswith("linux"):
        assert info["memory"]["total_bytes"] > 0


def test_import_does_not_initialise_cuda() -> None:
    # torchao's rule: importing the library must not touch CUDA (a broken driver must not break `import`).
    code = (
        "import torch, ryzen_opt, ryzen_opt.device, ryzen_opt.models.loading, pytest_ryzen, pytest_ryzen.plugin\n"
        "ryzen_opt.device.device_info()\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
