"""Device resolution and the environment facts every report carries.

``resolve_device`` turns the strings users type (``--device=rocm``) into a ``torch.device`` or a clear error.
ROCm builds of torch expose AMD GPUs through the ``cuda`` device type, so ``"rocm"`` resolves to ``cuda`` when
``torch.version.hip`` is set. Nothing here initialises CUDA at import time: ``import ryzen_opt`` must work on a
machine whose driver is broken.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.errors import DeviceNotAvailableError, InvalidDeviceError
from ryzen_opt.validation.gates import DEVICE_CHOICES

logger = logging.getLogger(__name__)

# CPU features that decide which kernels are fast on x86 (see CPU_BASELINES.md): VNNI for int8 dot products,
# AVX-512 BF16 for bf16 matmuls, AMX on Sapphire Rapids and newer.
_CPU_FLAGS_OF_INTEREST: tuple[str, ...] = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def _hip_version() -> str | None:
    return getattr(torch.version, "hip", None)


def _cuda_version() -> str | None:
    return getattr(torch.version, "cuda", None)


def _split_index(spec: str) -> tuple[str, int | None]:
    match = re.fullmatch(r"([a-z]+)(?::(\d+))?", spec)
    if match is None:
        raise InvalidDeviceError(
            f"unknown device {spec!r}: expected one of {', '.join(DEVICE_CHOICES)} (optionally with an index, "
            "as in 'cuda:1')"
        )
    kind, index = match.group(1), match.group(2)
    return kind, (int(index) if index is not None else None)


def _gpu_missing_reason(kind: str) -> str:
    """Explain why ``kind`` ('cuda' or 'rocm') is not usable, and how to fix it."""
    hip, cuda = _hip_version(), _cuda_version()
    build = f"torch {torch.__version__}"
    if kind == "rocm":
        if hip is None and cuda is None:
            return (
                f"--device=rocm needs a ROCm (HIP) build of torch, but {build} is a CPU-only build. Install a ROCm "
                "wheel (pip install torch --index-url https://download.pytorch.org/whl/rocm6.2), or use --device=cpu "
                "or --device=auto."
            )
        if hip is None:
            return (
                f"--device=rocm needs a ROCm (HIP) build of torch, but {build} is built for CUDA {cuda}. Use "
                "--device=cuda on NVIDIA GPUs, or install a ROCm wheel of torch."
            )
        return (
            f"--device=rocm: {build} is a ROCm build (HIP {hip}) but torch.cuda.is_available() is False, so no AMD "
            "GPU is visible. Check rocm-smi, HIP_VISIBLE_DEVICES and that your user is in the 'render' and 'video' "
            "groups; or use --device=cpu."
        )
    if hip is None and cuda is None:
        return (
            f"--device=cuda needs a CUDA build of torch, but {build} is a CPU-only build. Install a CUDA wheel "
            "(pip install torch --index-url https://download.pytorch.org/whl/cu124), or use --device=cpu or "
            "--device=auto."
        )
    return (
        f"--device=cuda: {build} is built for {'HIP ' + hip if hip else 'CUDA ' + str(cuda)} but "
        "torch.cuda.is_available() is False, so no GPU is visible. Check nvidia-smi (or rocm-smi) and "
        "CUDA_VISIBLE_DEVICES; or use --device=cpu."
    )


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's device string into a ``torch.device``, or explain why it cannot.

    Args:
        spec: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"rocm"`` or ``"mps"``, optionally with an index (``"cuda:1"``),
            or a ``torch.device``. ``None`` means ``"auto"``.

    Returns:
        The device. ``"rocm"`` maps to ``cuda`` on a HIP build, because that is how torch exposes AMD GPUs.
        ``"auto"`` prefers a GPU (CUDA or ROCm), then MPS, then the CPU.

    Raises:
        InvalidDeviceError: ``spec`` names no known device.
        DeviceNotAvailableError: the device is known but this machine or this torch build cannot provide it; the
            message names what is missing and how to fix it.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None:
        spec = "auto"
    if not isinstance(spec, str):
        raise InvalidDeviceError(f"device must be a string or torch.device, got {type(spec).__name__}")
    kind, index = _split_index(spec.strip().lower())
    if kind not in DEVICE_CHOICES:
        raise InvalidDeviceError(f"unknown device {spec!r}: expected one of {', '.join(DEVICE_CHOICES)}")

    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", index) if index is not None else torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise DeviceNotAvailableError(
                "--device=mps needs Apple silicon and a torch build with MPS; torch.backends.mps.is_available() is "
                "False here. Use --device=cpu or --device=auto."
            )
        return torch.device("mps")

    # cuda or rocm
    if kind == "rocm" and _hip_version() is None:
        raise DeviceNotAvailableError(_gpu_missing_reason("rocm"))
    if not torch.cuda.is_available():
        raise DeviceNotAvailableError(_gpu_missing_reason(kind))
    if kind == "cuda" and _hip_version() is not None:
        logger.info("--device=cuda on a ROCm build of torch: using the HIP device (same as --device=rocm)")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DeviceNotAvailableError(
            f"--device={spec}: only {count} GPU(s) are visible (indices 0..{count - 1}). Check CUDA_VISIBLE_DEVICES."
        )
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def device_class(device: torch.device) -> str:
    """The threshold-profile class of a device: ``cpu``, ``cuda``, ``rocm`` or ``mps``."""
    if device.type == "cuda":
        return "rocm" if _hip_version() is not None else "cuda"
    return device.type


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_info() -> dict[str, Any]:
    """CPU model, the SIMD flags that decide kernel choice, and core counts.

    Reads ``/proc/cpuinfo`` on Linux; elsewhere falls back to ``platform`` and reports flags as unknown (``None``).
    """
    text = _read_text("/proc/cpuinfo")
    model = None
    flags: set[str] | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    if model is None:
        model = platform.processor() or platform.machine() or "unknown"
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    capability = None
    cpu_backend = getattr(torch.backends, "cpu", None)
    if cpu_backend is not None and hasattr(cpu_backend, "get_cpu_capability"):
        capability = cpu_backend.get_cpu_capability()
    return {
        "model": model,
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "flags": {flag: (flag in flags) if flags is not None else None for flag in _CPU_FLAGS_OF_INTEREST},
        "torch_cpu_capability": capability,
    }


def memory_info() -> dict[str, int | None]:
    """Total and available host memory in bytes (``None`` where the OS does not say)."""
    fields: dict[str, int | None] = {"total_bytes": None, "available_bytes": None}
    for line in _read_text("/proc/meminfo").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if not parts:
            continue
        if key == "MemTotal":
            fields["total_bytes"] = int(parts[0]) * 1024
        elif key == "MemAvailable":
            fields["available_bytes"] = int(parts[0]) * 1024
    return fields


def device_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Everything a report needs to say where a number was measured.

    Args:
        device: the device the measurements ran on. ``None`` describes the CPU only and never touches CUDA.

    Returns:
        A JSON-serialisable dict: the device and its name, CPU model and flags, threads, torch / CUDA / HIP /
        transformers / Python versions, and memory.
    """
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    cpu = cpu_info()
    info: dict[str, Any] = {
        "device": str(dev),
        "device_class": device_class(dev),
        "device_name": cpu["model"],
        "cpu": cpu,
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": _cuda_version(),
            "hip": _hip_version(),
            "transformers": _package_version("transformers"),
            "ryzen_opt": _package_version("ryzen-opt"),
        },
        "platform": platform.platform(),
        "memory": memory_info(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["device_name"] = props.name
        info["gpu"] = {
            "name": props.name,
            "total_memory_bytes": int(props.total_memory),
            "count": torch.cuda.device_count(),
        }
    elif dev.type == "mps":
        info["device_name"] = "Apple MPS"
    return info


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
