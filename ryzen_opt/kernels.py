"""KernelOptimizer: faster batch-1 decode and prefill for Hugging Face causal LMs.

Batch-1 decode on a CPU is memory bound: every token streams every weight once (a 134M-parameter Llama in fp32
moves ~540 MB per token). So the speed comes from two things, in this order (CPU_BASELINES.md):

1. **Fewer bytes per weight, streamed by a kernel that runs near bandwidth.** Weight-only or dynamic int8
   (1 byte/weight) and group-wise int4 (~0.56 byte/weight). Which kernel streams best depends on the device and
   the shape; :data:`KERNEL_TABLE` records the measured choice and ``benchmarks/bench_gemv.py`` re-measures it.
2. **Less work between the matmuls.** HF ``forward`` costs ~6 ms/token of Python and small ops on a 134M model,
   ``generate`` another ~2 ms. A lean decode loop over a preallocated (static) KV cache, with fused qkv and
   gate/up projections, removes most of that. It reads the same modules the model holds, so there is one copy
   of every weight.

What :meth:`KernelOptimizer.apply_to_model` does to a model *instance* (never to the ``transformers`` classes):

- replaces each ``nn.Linear`` (and GPT-2's ``Conv1D``) of the decoder and the LM head with a
  :class:`DenseLinear`, :class:`Int8Linear` or :class:`Int4Linear`; with ``fuse=True`` the q/k/v projections
  (and gate/up) become one fused module and the originals become :class:`FusedSlice` views of it, so
  ``model(...)`` still runs HF's own forward, on the optimized weights;
- switches attention to SDPA (``config._attn_implementation``) where the model allows it;
- binds a ``generate`` to the instance that runs the lean static-cache loop (:class:`StaticDecoder`) when the
  request is one it serves (batch 1, greedy or plain sampling), and HF's own ``generate`` otherwise, so the
  interface stays HF's;
- optionally compiles the decode step with ``torch.compile`` and records how long compiling took.

The design follows gpt-fast (``model.py``/``quantize.py``: a static cache indexed by position, weight-only int8
as ``F.linear(x, w.to(x.dtype)) * scales``, int4 through ATen's tinygemm kernels) and torchao's per-channel and
group-wise quantizers; what differs is the CPU: fbgemm's dynamic int8 GEMV and ATen's int4 CPU kernel stream
far better here than a dequantize-then-matmul, and ``torch.compile`` buys little at batch 1 (1.1x for 40 s).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ryzen_opt import native
from ryzen_opt.compat import cache_kwargs, pop_cache_kwarg
from ryzen_opt.configs import ConfigMixin
from ryzen_opt.device import cpu_info
from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.quant import (
    dequantize_int4,
    gptq_int4,
    pack_int4_runs,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_int4_runs,
    unpack_nibbles,
)
from ryzen_opt.sampling import warped_probs

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("none", "bf16", "int8", "int4")
INT4_METHODS = ("rtn", "gptq")
INT8_KERNELS = ("auto", "native", "native-a8", "fbgemm", "int8pack", "dequant")
ATTENTION_MODES = ("sdpa", "eager", "keep")
DECODE_MODES = ("static", "hf")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")

# Which int8 kernel "auto" picks, by device type, and why (accuracy on SmolLM2-135M, prose held out from tuning;
# speed from ``python benchmarks/bench_gemv.py --model smollm2`` and ``bench_kernels.py``):
#   cpu:  "native", ryzen_opt.native's weight-only GEMV: fp32 activations times int8 weights, fp32 scales, the exact
#         dequantized product. fbgemm's dynamic kernel quantizes activations per tensor: real LLMs have outlier
#         activation channels, and SmolLM2 lost 36% of its top-1 accuracy with it (7-bit activations on this AVX2
#         CPU without VNNI; 16-18% with 8 bits on an AVX-512 VNNI one). ATen's weight-only _weight_int8pack_mm keeps
#         accuracy (-0.3%) but takes bf16 activations and runs slowly without AVX-512 BF16. Where the native
#         extension cannot be built (no compiler), "int8pack".
#   cuda: gpt-fast's weight-only form, F.linear(x, w.to(x.dtype)) * scales, which inductor fuses into one
#         kernel under compile=True; fbgemm is CPU-only.
KERNEL_TABLE: dict[str, str] = {"cpu": "native", "cuda": "dequant", "mps": "int8pack"}
# int4: on the CPU, ryzen_opt.native's fp32-activation kernel (K and the group a multiple of 32), else ATen's
# _weight_int4pack_mm_for_cpu (bf16 activations; N a multiple of 16), else the layer stays int8 (logged). On CUDA
# the tinygemm kernel (_weight_int4pack_mm) when its probe matches the dequantized reference, else dequantize on
# the fly.
_INT4_N_MULTIPLE = 16


class UnsupportedModelError(RyzenOptError, TypeError):
    """The model's architecture is not one the KernelOptimizer knows how to run."""


@dataclass(frozen=True)
class KernelConfig(ConfigMixin):
    """What :class:`KernelOptimizer` applies. Frozen: one config describes one optimized model.

    Attributes:
        weights: ``"none"`` keeps the model's dtype (fp32 stays fp32, stored transposed for a faster GEMV);
            ``"bf16"`` casts linears to bf16; ``"int8"`` per-output-channel symmetric int8; ``"int4"`` group-wise
            asymmetric int4 (``group_size`` along the input dimension).
        int8_kernel: ``"auto"`` picks per device from :data:`KERNEL_TABLE`; or force ``"native"`` (CPU, weight-only,
            fp32 activations), ``"native-a8"`` (CPU: up to ``native.SMALL_M`` rows, activations rounded to int8 per
            block of 32 as llama.cpp's Q8_0 does, integer products; faster decode, see ``docs/native.md``),
            ``"fbgemm"`` (CPU, dynamic per-tensor activation quantization: lossy on real LLMs), ``"int8pack"``
            (weight-only, bf16 activations) or ``"dequant"``.
        group_size: int4 group along the input dimension (32, 64, 128 or 256). 32 by default: llama.cpp's Q4_0/Q4_1
            block; 64 lost 9% of SmolLM2's top-1 accuracy (``benchmarks/bench_kernels.py --sections accuracy``).
        int4_method: ``"rtn"`` rounds each group to nearest; ``"gptq"`` quantizes column by column and compensates
            each rounding error on the columns still to come, weighted by the layer's input statistics on
            calibration text (``apply_to_model(model, calibration=ids)``). Same stored form and speed; see
            ``docs/int4.md`` for what each costs on SmolLM2 and on weights that do not come from a 4-bit file.
        attention: ``"sdpa"`` (PyTorch's fused attention, ``is_causal`` where possible), ``"eager"`` or
            ``"keep"`` (leave the model's setting alone).
        decode: ``"static"``: ``generate`` runs the lean static-cache loop where it can; ``"hf"``: HF's own loop
            on the optimized modules.
        compile: compile the static decode step with ``torch.compile`` (``compile_mode``); the time it takes is
            reported. ``False`` is always correct and is the default on CPU, where compile buys ~1.1x for 40 s.
        fuse: fuse q/k/v and gate/up projections into one matmul each (one weight read, one call).
        lm_head: the LM head's weights: ``"auto"`` is ``weights``, except int8 under ``weights="int4"`` (as
            llama.cpp's Q4_K_M keeps its output matrix at 6 bits: on the zoo target, an int4 LM head alone cost 0.7% of
            top-1 accuracy, int8 nothing measurable); or ``"none"``, ``"bf16"``, ``"int8"``, ``"int4"``.
        max_cache_len: cap on prompt + new tokens for the static cache; ``None`` uses the model's
            ``max_position_embeddings``.
        native_layers: on CPU, run each Llama-family layer of a decode step (and of a verification of up to
            ``native.SMALL_M`` tokens) as one fused native call (:func:`ryzen_opt.native.ops`): the ~40 small ATen
            ops a layer costs per token were half of an eager int8 step on SmolLM2. ``False`` keeps ATen's ops.
    """

    weights: str = "none"
    int8_kernel: str = "auto"
    group_size: int = 32
    int4_method: str = "rtn"
    attention: str = "sdpa"
    decode: str = "static"
    compile: bool = False
    compile_mode: str = "default"
    fuse: bool = True
    lm_head: str = "auto"
    max_cache_len: int | None = None
    native_layers: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (
            ("weights", WEIGHT_MODES),
            ("int8_kernel", INT8_KERNELS),
            ("attention", ATTENTION_MODES),
            ("decode", DECODE_MODES),
            ("lm_head", ("auto", *WEIGHT_MODES)),
            ("int4_method", INT4_METHODS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"KernelConfig.{name} = {value!r}: choose one of {', '.join(map(repr, allowed))}")
        if self.group_size not in (32, 64, 128, 256):
            raise ConfigError(f"KernelConfig.group_size = {self.group_size!r}: choose 32, 64, 128 or 256")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ConfigError(f"KernelConfig.compile_mode = {self.compile_mode!r}: a torch.compile mode")
        if self.max_cache_len is not None and self.max_cache_len < 2:
            raise ConfigError(f"KernelConfig.max_cache_len = {self.max_cache_len!r}: at least 2, or None")

    def resolved_lm_head(self) -> str:
        if self.lm_head != "auto":
            return self.lm_head
        return "int8" if self.weights == "int4" else self.weights


# ------------------------------------------------------------------------------------------- linear modules


class _KernelLinear(nn.Module):
    """Base of the replacement linears: 2-D or N-D input, ``y = x W^T + b`` in the input's dtype."""

    in_features: int
    out_features: int
    kernel: str

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    def weight_bytes(self) -> int:
        """Bytes streamed per full read of the weights, scales and bias included."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def dequantized_weight(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], self.out_features)


class DenseLinear(_KernelLinear):
    """fp32/bf16 linear with the weight stored transposed, ``[in, out]``.

    ``x @ Wt`` streams a batch-1 GEMV 1.2-1.5x faster than ``F.linear`` on this CPU (LM head: 1.9x), because
    MKL's GEMV over a row-major ``[in, out]`` matrix walks memory contiguously (CPU_BASELINES.md, "Weight layout").
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or weight.dtype
        self.out_features, self.in_features = weight.shape
        self.kernel = f"dense-{str(dtype).removeprefix('torch.')}"
        self.register_buffer("weight_t", weight.detach().to(dtype).t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_t.t().float()

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        xin = x2d.to(self.weight_t.dtype)
        y = torch.addmm(self.bias, xin, self.weight_t) if self.bias is not None else xin @ self.weight_t
        return y.to(x2d.dtype)


def _qint8_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Quantized-tensor constructors warn that they are deprecated (pytorch#184982); fbgemm's prepack still needs
    # one, and it is still the fastest int8 GEMV on x86 CPUs. Int8Linear falls back to int8pack without it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        return torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)


# fbgemm's packed weight is a TorchBind object, which torch.compile cannot take as an input: it breaks the graph at
# every linear (measured: the compiled decode step then ran at 0.67x of the eager one). So the packed weights live in
# a registry and a custom op takes the handle, an int: to the compiler the linear is one opaque op with a known output
# shape, and the norms, RoPE, attention and residuals around it fuse.
_FBGEMM_PACKED: dict[int, Any] = {}
_FBGEMM_HANDLES = itertools.count()


_LIB = torch.library.Library("ryzen_opt", "FRAGMENT")
_LIB.define("fbgemm_linear_dynamic(Tensor x, int handle, int out_features) -> Tensor")


@functools.cache
def fbgemm_reduce_range() -> bool:
    """Whether fbgemm must quantize activations to 7 bits on this CPU (PyTorch's own x86 rule).

    Without VNNI, fbgemm multiplies u8 x s8 with ``vpmaddubsw``, whose int16 pair sums saturate at full 8-bit range:
    measured on an AVX2 Zen 3, a 64-wide int8 linear's relative error is 9% with 8-bit activations and 1.4% with 7.
    VNNI (``vpdpbusd``) accumulates in int32 and needs no reduction.
    """
    flags = cpu_info()["flags"]
    return not (flags.get("avx512_vnni") or flags.get("avx_vnni"))


def _fbgemm_linear_impl(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, _FBGEMM_PACKED[handle], fbgemm_reduce_range())


def _fbgemm_linear_fake(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


# A bare Library kernel, not torch.library.custom_op: the latter's autograd wrappers cost ~20 us a call here.
_LIB.impl("fbgemm_linear_dynamic", _fbgemm_linear_impl, "CPU")
torch.library.register_fake("ryzen_opt::fbgemm_linear_dynamic", _fbgemm_linear_fake, lib=_LIB)


class Int8Linear(_KernelLinear):
    """Per-output-channel symmetric int8 weights, one of three kernels (see :data:`KERNEL_TABLE`).

    - ``fbgemm``: fbgemm's dynamic int8 linear: activations are quantized per tensor at each call, the product
      runs in int8 with int32 accumulation. Fastest here; adds activation rounding (measured in the accuracy
      loss, not assumed away).
    - ``native``: :mod:`ryzen_opt.native`'s weight-only kernel, fp32 activations (the default on CPU).
    - ``native-a8``: the same weights; up to ``native.SMALL_M`` rows (decode, verification) round their activations
      to int8 per block of 32 and multiply in integers (llama.cpp's Q8_0 x Q8_0); longer inputs as ``native``.
    - ``int8pack``: ATen's weight-only ``_weight_int8pack_mm`` with bf16 activations.
    - ``dequant``: gpt-fast's ``F.linear(x, q.to(x.dtype)) * scale``: correct everywhere, fast under compile.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_int8(weight)
        self.kernel = kernel
        self.register_buffer("qweight", q.to(weight.device))
        self.register_buffer("scale", scale.to(weight.device))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._handle = -1
        self._packed: Any = None
        if kernel == "fbgemm":
            if weight.device.type != "cpu":
                raise ConfigError(f"int8 kernel 'fbgemm' runs on the CPU only, not {weight.device.type}")
            # The packed copy is fbgemm's layout of the same int8 weight; the plain q stays for dequantized_weight.
            self._packed = torch.ops.quantized.linear_prepack(_qint8_weight(q, scale), self.bias)
            self.register_packed()
        elif kernel == "int8pack":
            self.register_buffer("scale_bf16", scale.to(device=weight.device, dtype=torch.bfloat16))
        elif kernel in ("native", "native-a8"):
            if weight.device.type != "cpu" or native.ops() is None:
                raise ConfigError(f"int8 kernel {kernel!r} needs the CPU and a built ryzen_opt.native (see the log)")
        elif kernel != "dequant":
            raise ConfigError(f"int8 kernel {kernel!r}: choose one of {INT8_KERNELS[1:]}")

    def register_packed(self) -> None:
        """Give this module's packed weight a handle of its own (again after a ``copy.deepcopy``, which copies the
        handle too); the handle is released when the module is garbage-collected."""
        if _FBGEMM_PACKED.get(self._handle) is not self._packed:
            self._handle = next(_FBGEMM_HANDLES)
            _FBGEMM_PACKED[self._handle] = self._packed
            weakref.finalize(self, _FBGEMM_PACKED.pop, self._handle, None)

    def weight_bytes(self) -> int:
        n = self.qweight.numel() + self.scale.numel() * 4
        return n + (self.bias.numel() * 4 if self.bias is not None else 0)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm":
            if torch.compiler.is_compiling():  # the compiler sees an opaque op; compile() checked the handles
                y = torch.ops.ryzen_opt.fbgemm_linear_dynamic(x2d.float(), self._handle, self.out_features)
            else:
                y = torch.ops.quantized.linear_dynamic(x2d.float(), self._packed, fbgemm_reduce_range())
            return y.to(x2d.dtype)
        if self.kernel == "native":
            # torch.ops directly (loaded when this module was built): no cached Python call for the compiler to trace.
            y = torch.ops.ryzen_native.w8_linear(x2d.float(), self.qweight, self.scale).to(x2d.dtype)
        elif self.kernel == "native-a8":
            y = torch.ops.ryzen_native.w8a8_linear(x2d.float(), self.qweight, self.scale).to(x2d.dtype)
        elif self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2d.to(torch.bfloat16), self.qweight, self.scale_bf16).to(x2d.dtype)
        else:
            y = F.linear(x2d, self.qweight.to(x2d.dtype)) * self.scale.to(x2d.dtype)
        return y + self.bias.to(x2d.dtype) if self.bias is not None else y


class Int4Linear(_KernelLinear):
    """Group-wise asymmetric int4 weights (``w ≈ q * scale + min`` per group of ``group_size`` inputs).

    CPU: :mod:`ryzen_opt.native`'s kernel (fp32 activations and scales: the exact dequantized product) when the
    input width and the group are multiples of 32, else ATen's ``_weight_int4pack_mm_for_cpu`` (bf16 activations).
    CUDA: ATen's tinygemm ``_weight_int4pack_mm`` when a probe matches the dequantized reference, else
    dequantize on the fly. The packed layouts use ATen's convention ``w = (q - 8) * scale + zero``, so the zero
    handed to the kernel is ``min + 8 * scale``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
        hessian: torch.Tensor | None = None,
    ) -> None:
        """``hessian`` (``X^T X`` of this layer's inputs on calibration text) quantizes with GPTQ; without it,
        round-to-nearest. Both give the same stored form."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        device = weight.device
        if hessian is None:
            q, scale, lo = quantize_int4(weight, group_size)
        else:
            q, scale, lo = (t.to(device) for t in gptq_int4(weight.cpu(), hessian.cpu(), group_size))
        self.native = device.type == "cpu" and self.in_features % 32 == 0 and group_size % 32 == 0
        self.native = self.native and native.ops() is not None
        # Nibbles, two per byte, are what counts as storage (and what dequantized_weight reads): in the native
        # kernel's layout when it runs them, else plain pairs.
        packed = pack_int4_runs(q) if self.native else pack_nibbles(q)
        self.register_buffer("qweight", packed.to(device))
        self.register_buffer("scale", scale.to(device))
        self.register_buffer("minimum", lo.to(device))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        zero = lo + 8 * scale
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [K/g, N, 2]
        self.kernel = "dequant"
        self._packed: torch.Tensor | None = None
        self._sz: torch.Tensor | None = None
        if self.native:
            self.kernel = "native-int4"
        elif device.type == "cpu":
            self._packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            self._sz = sz
            self.kernel = "int4pack-cpu"
        elif device.type == "cuda":
            self._try_tinygemm(q, sz.to(device))

    def _try_tinygemm(self, q: torch.Tensor, sz: torch.Tensor) -> None:
        try:
            packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch._convert_weight_to_int4pack(packed_u8.to(sz.device), 8)
            x = torch.randn(2, self.in_features, device=sz.device, dtype=torch.bfloat16)
            got = torch._weight_int4pack_mm(x, packed, self.group_size, sz).float()
            want = x.float() @ self.dequantized_weight().t()
            if torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                self._packed, self._sz, self.kernel = packed, sz, "tinygemm"
            else:
                logger.warning("int4 tinygemm probe disagrees with the dequantized reference; dequantizing instead")
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a ROCm build or an unsupported arch
            logger.info("int4 tinygemm unavailable (%s); dequantizing on the fly", str(exc).splitlines()[0])

    def weight_bytes(self) -> int:
        n = self.qweight.numel() + (self.scale.numel() + self.minimum.numel()) * 4
        return n + (self.bias.numel() * 4 if self.bias is not None else 0)

    def dequantized_weight(self) -> torch.Tensor:
        q = unpack_int4_runs(self.qweight) if self.native else unpack_nibbles(self.qweight)
        return dequantize_int4(q, self.scale, self.minimum, self.group_size)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native-int4":
            y = torch.ops.ryzen_native.w4_linear(x2d.float(), self.qweight, self.scale, self.minimum, self.group_size)
        elif self.kernel == "int4pack-cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2d.to(torch.bfloat16), self._packed, self.group_size, self._sz)
        elif self.kernel == "tinygemm":
            y = torch._weight_int4pack_mm(x2d.to(torch.bfloat16), self._packed, self.group_size, self._sz)
        else:
            y = F.linear(x2d, self.dequantized_weight().to(x2d.dtype))
        y = y.to(x2d.dtype)
        return y + self.bias.to(x2d.dtype) if self.bias is not None else y


class FusedSlice(nn.Module):
    """One output slice of a fused projection, standing where the original q/k/v (or gate/up) module stood.

    HF's attention calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` on the same tensor one after the other. The
    fused module computes all three in one weight read; the slices share a one-entry cache keyed on the input
    tensor's identity and version counter (same object, unmodified since ⇒ same values), so HF's forward runs
    the fused matmul once, not three times, and no weight is stored twice.
    """

    def __init__(self, fused: _SharedFused, start: int, stop: int) -> None:
        super().__init__()
        self.fused = [fused]  # a list, so the fused module is not registered (and counted) once per slice
        self.start, self.stop = start, stop
        self.in_features = fused.linear.in_features
        self.out_features = stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0](x)[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"slice=[{self.start}:{self.stop}] of {self.fused[0].linear.extra_repr()}"


class _SharedFused(nn.Module):
    def __init__(self, linear: _KernelLinear) -> None:
        super().__init__()
        self.linear = linear
        self._key: tuple[weakref.ref[torch.Tensor], int] | None = None
        self._out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training or autograd: never serve a cached output
            self._key, self._out = None, None
            return self.linear(x)
        # Inference tensors (torch.inference_mode) keep no version counter; for them identity is the key, which
        # holds for HF's pattern (three projections of one tensor, called back to back).
        version = -1 if x.is_inference() else x._version
        if self._key is not None and self._key[0]() is x and self._key[1] == version:
            assert self._out is not None
            return self._out
        out = self.linear(x)
        self._key, self._out = (weakref.ref(x), version), out
        return out


# ------------------------------------------------------------------------------------------ model structure


@dataclass
class _Layer:
    """One decoder layer, as the lean loop sees it (modules shared with the HF tree, never copied)."""

    norm1: nn.Module
    norm2: nn.Module
    qkv: nn.Module  # fused [q | k | v] projection, or a callable returning the concatenation
    o: nn.Module
    mlp_in: nn.Module  # llama: fused [gate | up]; gpt2: c_fc
    down: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    scale: float


@dataclass
class _Arch:
    kind: str  # "llama" (llama, mistral, qwen2) or "gpt2"
    layers: list[_Layer]
    embed: nn.Module
    pos_embed: nn.Module | None
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module | None
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    norm_eps: float
    max_positions: int
    sliding_window: int | None


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _linear_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is ``[in, out]``)."""
    if _is_conv1d(module):
        return module.weight.detach().t(), module.bias
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    raise UnsupportedModelError(f"expected nn.Linear or Conv1D, found {type(module).__name__}")


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"KernelOptimizer supports {', '.join(SUPPORTED_MODEL_TYPES)} causal LMs; this model is "
            f"{type(model).__name__} (model_type={model_type!r}). Use another optimizer, or open an issue with "
            "the architecture."
        )
    if not hasattr(model, "lm_head"):
        raise UnsupportedModelError(f"{type(model).__name__} has no lm_head: pass the *ForCausalLM model")
    return str(model_type)


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses = getattr(config, "use_sliding_window", True) and (not layer_types or "sliding_attention" in layer_types)
    return int(window) if window and uses else None


def _input_hessians(model: nn.Module, calibration: torch.Tensor) -> dict[int, torch.Tensor]:
    """``X^T X`` of every ``nn.Linear``'s inputs over ``calibration`` (keyed by ``id(module)``), from one pass of the
    unmodified model: GPTQ's statistics."""
    if (
        not isinstance(calibration, torch.Tensor)
        or calibration.ndim != 2
        or calibration.dtype
        not in (
            torch.int32,
            torch.int64,
        )
    ):
        raise ConfigError(
            f"calibration must be an [N, T] LongTensor of token ids, got "
            f"{type(calibration).__name__}{tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else ''}"
        )
    sums: dict[int, torch.Tensor] = {}
    hooks = []
    last: dict[str, Any] = {"x": None, "h": None}

    def collect(module: nn.Module, args: tuple[Any, ...]) -> None:
        # q/k/v (and gate/up) receive the very same tensor: its X^T X is computed once. Each block's product in
        # float32 (the matmul is the cost), accumulated across blocks in float64.
        if args[0] is not last["x"]:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            last["x"], last["h"] = args[0], (x.t() @ x).to(torch.float64)
        key = id(module)
        sums[key] = sums[key] + last["h"] if key in sums else last["h"].clone()

    for module in model.modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(collect))
    device = next(model.parameters()).device
    started = time.perf_counter()
    try:
        with torch.no_grad():
            for row in calibration.long():
                model(input_ids=row[None].to(device))
    finally:
        for hook in hooks:
            hook.remove()
        last.clear()
    logger.info(
        "GPTQ calibration: %d x %d tokens through %d linears in %.1f s",
        *calibration.shape,
        len(sums),
        time.perf_counter() - started,
    )
    return {key: h.cpu() for key, h in sums.items()}


# ------------------------------------------------------------------------------------------------ report


@dataclass
class KernelReport:
    """What was applied, per module, and what it cost. Every figure is read off the model, none assumed."""

    model_type: str
    config: dict[str, Any]
    device: str
    kernels: dict[str, int] = field(default_factory=dict)  # kernel -> number of modules
    fallbacks: list[str] = field(default_factory=list)  # modules that got another kernel than asked, and why
    fused: list[str] = field(default_factory=list)
    attention: str = ""
    decode: str = ""
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    bytes_per_token: int = 0  # weights read by one decode step (decoder + LM head, not the embedding lookup)
    apply_seconds: float = 0.0
    compile_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- optimizer


class KernelOptimizer:
    """Apply a :class:`KernelConfig` to a causal LM instance. ``apply_to_model`` is the one verb.

    >>> model = KernelOptimizer(KernelConfig(weights="int8")).apply_to_model(model)  # doctest: +SKIP
    >>> model.generate(input_ids, max_new_tokens=64)                                   # doctest: +SKIP
    """

    def __init__(self, config: KernelConfig | None = None) -> None:
        self.config = config or KernelConfig()
        if not isinstance(self.config, KernelConfig):
            raise ConfigError(f"KernelOptimizer takes a KernelConfig, got {type(self.config).__name__}")
        self.report: KernelReport | None = None
        self._hessians: dict[int, torch.Tensor] = {}

    # -- module construction

    def _int8_kernel(self, device: torch.device) -> str:
        kernel = self.config.int8_kernel
        if kernel == "auto":
            kernel = KERNEL_TABLE.get(device.type, "dequant")
            if kernel == "native" and native.ops() is None:
                kernel = "int8pack"  # no compiler here: ATen's weight-only kernel (logged by native.ops)
            elif kernel == "native" and self.config.weights == "int4":
                # The int8 LM head of an int4 model: its int4 GEMVs round activations to int8 per block already,
                # and the head is a fifth of SmolLM2's weights: the integer kernel for it too.
                kernel = "native-a8"
            return kernel
        if kernel in ("native", "native-a8") and device.type != "cpu":
            raise ConfigError(f"KernelConfig.int8_kernel={kernel!r} is CPU-only; the model is on {device}")
        if kernel == "fbgemm" and device.type != "cpu":
            raise ConfigError(f"KernelConfig.int8_kernel='fbgemm' is CPU-only; the model is on {device}")
        return kernel

    def _make_linear(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        name: str,
        report: KernelReport,
        hessian: torch.Tensor | None = None,
    ) -> _KernelLinear:
        mode = self.config.weights
        if name == "lm_head":
            mode = self.config.resolved_lm_head()
        module: _KernelLinear
        if mode == "int4":
            n, k = weight.shape
            native_ok = weight.device.type == "cpu" and k % 32 == 0 and native.ops() is not None
            if k % self.config.group_size or (weight.device.type == "cpu" and n % _INT4_N_MULTIPLE and not native_ok):
                report.fallbacks.append(
                    f"{name}: int4 needs in % {self.config.group_size} == 0 and out % {_INT4_N_MULTIPLE} == 0 "
                    f"(shape {n}x{k}); stored as int8"
                )
                mode = "int8"
            else:
                module = Int4Linear(weight, bias, self.config.group_size, hessian)
        if mode == "int8":
            kernel = self._int8_kernel(weight.device)
            if kernel == "fbgemm" and not hasattr(torch.ops.quantized, "linear_dynamic"):
                report.fallbacks.append(f"{name}: this torch build has no fbgemm dynamic linear; int8pack instead")
                kernel = "int8pack"
            module = Int8Linear(weight, bias, kernel)
        elif mode == "bf16":
            module = DenseLinear(weight, bias, torch.bfloat16)
        elif mode == "none":
            module = DenseLinear(weight, bias)
        report.kernels[module.kernel] = report.kernels.get(module.kernel, 0) + 1
        return module

    def _replace(self, parent: nn.Module, names: list[str], report: KernelReport, label: str, fuse: bool) -> nn.Module:
        """Replace ``parent.<names>`` by kernel linears; return the module computing their concatenation."""
        originals = [getattr(parent, n) for n in names]
        if names == ["lm_head"] and not (isinstance(originals[0], nn.Linear) or _is_conv1d(originals[0])):
            # Already compressed (the EmbeddingCompressor runs first): it brings its own fast matmul; keep it.
            report.fallbacks.append(f"lm_head: kept as {type(originals[0]).__name__} (compressed before)")
            return originals[0]
        params = [_linear_params(m) for m in originals]
        # Fused projections read the same input: one Hessian serves them all.
        hessian = self._hessians.get(id(originals[0]))
        if fuse and len(names) > 1:
            weight = torch.cat([w for w, _ in params], dim=0)
            if any(b is not None for _, b in params):
                bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in params], dim=0)
            else:
                bias = None
            shared = _SharedFused(self._make_linear(weight, bias, label, report, hessian))
            start = 0
            for n, (w, _) in zip(names, params, strict=True):
                setattr(parent, n, FusedSlice(shared, start, start + w.shape[0]))
                start += w.shape[0]
            report.fused.append(f"{label}: {'+'.join(names)} -> {start}x{weight.shape[1]}")
            setattr(parent, "_ryzen_fused_" + "_".join(names), shared)
            return shared.linear
        modules = []
        for n, orig, (w, b) in zip(names, originals, params, strict=True):
            h = self._hessians.get(id(orig))
            module = self._make_linear(w, b, label if len(names) == 1 else f"{label}.{n}", report, h)
            setattr(parent, n, module)
            modules.append(module)
        if len(modules) == 1:
            return modules[0]
        return _Concat(modules)

    def _build_arch(self, model: Any, model_type: str, report: KernelReport) -> _Arch:
        config = model.config
        fuse = self.config.fuse
        layers: list[_Layer] = []
        if model_type == "gpt2":
            if getattr(config, "add_cross_attention", False):
                raise UnsupportedModelError("GPT-2 with cross-attention is not a decoder-only LM")
            body = model.transformer
            heads = config.n_head
            head_dim = config.n_embd // heads
            for i, block in enumerate(body.h):
                scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
                if config.scale_attn_by_inverse_layer_idx:
                    scale /= float(i + 1)
                qkv = self._replace(block.attn, ["c_attn"], report, f"h.{i}.attn.c_attn", fuse=False)
                o = self._replace(block.attn, ["c_proj"], report, f"h.{i}.attn.c_proj", fuse=False)
                fc = self._replace(block.mlp, ["c_fc"], report, f"h.{i}.mlp.c_fc", fuse=False)
                down = self._replace(block.mlp, ["c_proj"], report, f"h.{i}.mlp.c_proj", fuse=False)
                layers.append(_Layer(block.ln_1, block.ln_2, qkv, o, fc, down, block.mlp.act, scale))
            lm_head = self._replace(model, ["lm_head"], report, "lm_head", fuse=False)
            return _Arch(
                "gpt2",
                layers,
                body.wte,
                body.wpe,
                body.ln_f,
                lm_head,
                None,
                heads,
                heads,
                head_dim,
                config.n_inner or 4 * config.n_embd,
                config.layer_norm_epsilon,
                config.n_positions,
                None,
            )
        body = model.model
        for i, block in enumerate(body.layers):
            attn, mlp = block.self_attn, block.mlp
            if hasattr(attn, "q_norm"):
                raise UnsupportedModelError(f"{type(model).__name__}: q/k norms (Qwen3-style) are not supported")
            qkv = self._replace(attn, ["q_proj", "k_proj", "v_proj"], report, f"layers.{i}.qkv", fuse)
            o = self._replace(attn, ["o_proj"], report, f"layers.{i}.o_proj", fuse=False)
            gate_up = self._replace(mlp, ["gate_proj", "up_proj"], report, f"layers.{i}.gate_up", fuse)
            down = self._replace(mlp, ["down_proj"], report, f"layers.{i}.down_proj", fuse=False)
            layers.append(
                _Layer(
                    block.input_layernorm,
                    block.post_attention_layernorm,
                    qkv,
                    o,
                    gate_up,
                    down,
                    mlp.act_fn,
                    float(attn.scaling),
                )
            )
        lm_head = self._replace(model, ["lm_head"], report, "lm_head", fuse=False)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        return _Arch(
            "llama",
            layers,
            body.embed_tokens,
            None,
            body.norm,
            lm_head,
            body.rotary_emb,
            config.num_attention_heads,
            config.num_key_value_heads or config.num_attention_heads,
            head_dim,
            config.intermediate_size,
            config.rms_norm_eps,
            config.max_position_embeddings,
            _sliding_window(config),
        )

    # -- the verb

    @torch.no_grad()
    def apply_to_model(self, model: Any, *, calibration: torch.Tensor | None = None) -> Any:
        """Optimize ``model`` in place and return it. See the module docstring for what changes.

        Args:
            calibration: ``[N, T]`` token ids of text like what the model will see, for ``int4_method="gptq"``
                (e.g. ``zoo.prose_blocks(tokenizer, "tune", blocks=32)``); ignored otherwise.

        Raises:
            UnsupportedModelError: not a Llama/Mistral/Qwen2/GPT-2 causal LM.
            ConfigError: the config asks for something this device cannot do, or GPTQ without calibration.
        """
        if getattr(model, "_ryzen_kernels", None) is not None:
            raise ConfigError("this model was already optimized by a KernelOptimizer; apply to a fresh copy")
        model_type = _model_type(model)
        gptq = self.config.weights == "int4" and self.config.int4_method == "gptq"
        if gptq and calibration is None:
            raise ConfigError(
                "KernelConfig.int4_method='gptq' needs calibration text: apply_to_model(model, calibration=ids) with "
                "ids an [N, T] LongTensor of token ids (e.g. 32 blocks of 256 tokens of text like your prompts), "
                "or int4_method='rtn'"
            )
        self._hessians = _input_hessians(model, calibration) if gptq else {}
        if model.training:
            logger.info(
                "KernelOptimizer: switching %s to eval mode (inference-only optimization)", type(model).__name__
            )
        model.eval()
        started = time.perf_counter()
        device = next(model.parameters()).device
        report = KernelReport(model_type=model_type, config=self.config.to_dict(), device=str(device))
        report.weight_bytes_before = _decode_bytes(model)
        arch = self._build_arch(model, model_type, report)
        report.attention = self._set_attention(model)
        report.bytes_per_token = sum(
            _module_bytes(m) for layer in arch.layers for m in (layer.qkv, layer.o, layer.mlp_in, layer.down)
        ) + _module_bytes(arch.lm_head)
        report.weight_bytes_after = report.bytes_per_token
        decoder = StaticDecoder(model, arch, self.config)
        report.decode = "static (lean loop)" if self.config.decode == "static" else "hf generate"
        if self.config.decode == "static":
            _bind_generate(model, decoder)
        model._ryzen_kernels = report
        model._ryzen_decoder = decoder
        report.apply_seconds = time.perf_counter() - started
        self._hessians = {}
        if self.config.compile:
            report.compile_seconds = decoder.compile()
        if report.fallbacks:
            expected = all("compressed before" in f for f in report.fallbacks)
            shown = "; ".join(report.fallbacks[:3])
            if len(report.fallbacks) > 3:
                shown += f"; and {len(report.fallbacks) - 3} more (KernelReport.fallbacks lists them all)"
            (logger.info if expected else logger.warning)("KernelOptimizer fallbacks: %s", shown)
        logger.info(
            "KernelOptimizer: %s, kernels %s, %.1f MB/token -> %.1f MB/token, attention %s, decode %s",
            model_type,
            report.kernels,
            report.weight_bytes_before / 1e6,
            report.bytes_per_token / 1e6,
            report.attention,
            report.decode,
        )
        self.report = report
        return model

    def _set_attention(self, model: Any) -> str:
        wanted = self.config.attention
        current = str(getattr(model.config, "_attn_implementation", None) or "eager")
        if wanted == "keep" or wanted == current:
            return current
        setter = getattr(model, "set_attn_implementation", None)
        try:
            if setter is not None:
                setter(wanted)
            else:
                model.config._attn_implementation = wanted
        except (ValueError, ImportError) as exc:
            logger.warning("attention %r not available for this model (%s); keeping %r", wanted, exc, current)
            return current
        return wanted


class _Concat(nn.Module):
    """Unfused q/k/v (``fuse=False``): three calls, one concatenated result, for the lean loop's split."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)


def _module_bytes(module: nn.Module) -> int:
    if isinstance(module, _KernelLinear):
        return module.weight_bytes()
    if isinstance(module, _Concat):
        return sum(_module_bytes(m) for m in module.parts)
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def _decode_bytes(model: nn.Module) -> int:
    """Bytes of the linears one decode step reads (decoder projections and LM head), before optimization."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or _is_conv1d(module):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            del name
    return total


# ------------------------------------------------------------------------------------------ static decoder


@runtime_checkable
class AttendingCache(Protocol):
    """A ``transformers`` cache that computes attention on its own stored form (the KVCacheOptimizer's quantized
    cache): the lean loop hands it the layer's query and new key/value and gets the attention output back, so the
    stored keys and values are never materialized in fp32 as a whole."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor: ...

    def get_seq_length(self) -> int: ...


def attends_on_storage(cache: Any) -> bool:
    """Whether ``cache`` is an :class:`AttendingCache` (the one test every caller uses)."""
    return cache is not None and callable(getattr(cache, "attend", None))


def decoder_of(model: nn.Module) -> StaticDecoder | None:
    """The lean decoder a KernelOptimizer attached to ``model`` (``decode="static"``), or ``None``."""
    return getattr(model, "_ryzen_decoder", None)


def kernel_report_or_none(model: nn.Module) -> KernelReport | None:
    """:func:`kernel_report` for a model that may not be optimized."""
    report = getattr(model, "_ryzen_kernels", None)
    return None if report is None else replace(report)


def _native_linear(module: nn.Module) -> tuple[int, list[torch.Tensor], int] | None:
    """How :func:`ryzen_native::decode_layer` reads ``module``: (kind, three tensors, group), or ``None`` when the
    layer must run in ATen ops (a bias, another kernel, another dtype)."""
    empty = torch.empty(0)
    if getattr(module, "bias", None) is not None:
        return None
    if isinstance(module, Int8Linear) and module.kernel in ("native", "native-a8"):
        return (1 if module.kernel == "native" else 3), [module.qweight, module.scale, empty], 0
    if isinstance(module, Int4Linear) and module.kernel == "native-int4":
        return 2, [module.qweight, module.scale, module.minimum], module.group_size
    if isinstance(module, DenseLinear) and module.weight_t.dtype == torch.float32 and module.weight_t.is_cpu:
        return 0, [module.weight_t, empty, empty], 0
    return None


@dataclass(frozen=True)
class _NativeLayer:
    """The arguments of one ``ryzen_native::decode_layer`` call that do not change from token to token."""

    weights: list[torch.Tensor]
    kinds: list[int]
    groups: list[int]
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps1: float
    eps2: float
    scale: float


def _native_layers(arch: _Arch, dtype: torch.dtype) -> list[_NativeLayer] | None:
    """The native layer plan of ``arch``, or ``None`` (logged) when some layer is not what the fused kernel runs:
    a Llama-family fp32 layer with RMSNorms, SiLU gating and bias-free native or fp32 linears."""
    if arch.kind != "llama" or dtype != torch.float32 or native.ops() is None:
        return None
    plan = []
    for i, layer in enumerate(arch.layers):
        specs = [_native_linear(m) for m in (layer.qkv, layer.o, layer.mlp_in, layer.down)]
        norms_ok = all(
            type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") and n.weight.is_cpu
            for n in (layer.norm1, layer.norm2)
        )
        act = layer.act
        silu = type(act).__name__ in ("SiLU", "SiLUActivation") or getattr(act, "__name__", "") == "silu"
        if any(spec is None for spec in specs) or not norms_ok or not silu:
            logger.info(
                "layer %d runs in ATen ops (the fused native layer needs native/fp32 linears, RMSNorm, SiLU)", i
            )
            return None
        weights = [t for spec in specs if spec is not None for t in spec[1]]
        norm1: Any = layer.norm1
        norm2: Any = layer.norm2
        plan.append(
            _NativeLayer(
                weights,
                [spec[0] for spec in specs if spec is not None],
                [spec[2] for spec in specs if spec is not None],
                norm1.weight.detach().float().contiguous(),
                norm2.weight.detach().float().contiguous(),
                float(norm1.variance_epsilon),
                float(norm2.variance_epsilon),
                layer.scale,
            )
        )
    return plan


class StaticDecoder:
    """A lean forward over a preallocated KV cache, reading the optimized modules of one model.

    Batch 1. ``forward(ids)`` appends ``T`` positions (a prefill from an empty cache fills ``[0, T)``); ``step(token)``
    appends one. The cache is one ``[1, kv_heads, max_len, head_dim]`` tensor per layer, in the activation dtype.
    ``crop(n)`` rolls back by position (no copy), which is what speculative decoding needs.

    Eager attention is SDPA: ``is_causal`` for a prefill from an empty cache, an explicit mask when appending several
    tokens, and a slice of the filled prefix at decode (each step attends over ``pos + 1`` keys, not ``max_len``).
    The compiled step attends over the whole cache with a mask instead, so that its shapes never change and it
    compiles once.
    """

    def __init__(self, model: nn.Module, arch: _Arch, config: KernelConfig) -> None:
        self.model = model
        self.arch = arch
        self.config = config
        embed: Any = arch.embed
        # An embedding compressed by the EmbeddingCompressor has no .weight; it states its output dtype.
        self.dtype: torch.dtype = embed.weight.dtype if hasattr(embed, "weight") else embed.dtype
        self.device: torch.device = next(model.parameters()).device
        self.max_len = 0
        self.pos = 0
        self.k_cache: list[torch.Tensor] | None = None
        self.v_cache: list[torch.Tensor] | None = None
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.external: Any = None
        self._native: list[_NativeLayer] | None = None
        self._native_checked = False

    @property
    def is_compiled(self) -> bool:
        """Whether the decode step runs compiled (``KernelConfig(compile=True)``, after :meth:`compile`)."""
        return self._compiled is not None

    # -- cache

    def attach_cache(self, cache: Any) -> None:
        """Use ``cache`` (a ``transformers`` ``Cache`` with ``attend(layer, q, k, v, scale)``, such as the
        KVCacheOptimizer's quantized cache) instead of the static one: attention then runs on its stored form.
        ``None`` goes back to the static cache."""
        if cache is not None and not attends_on_storage(cache):
            raise ConfigError(
                f"{type(cache).__name__} has no attend(layer, q, k, v, scale): the lean loop needs a cache that "
                "computes attention on its own storage (KVCacheOptimizer(KVCacheConfig(strategy='quantized')))"
            )
        if cache is not None and self._compiled is not None:
            raise ConfigError("an attached cache runs eagerly: build the KernelOptimizer with compile=False")
        self.external = cache
        self.pos = 0 if cache is None else cache.get_seq_length()

    def limit(self) -> int:
        cap = self.config.max_cache_len or self.arch.max_positions
        return min(cap, self.arch.max_positions)

    def allocate(self, max_len: int) -> None:
        """Preallocate (or reuse) a cache for ``max_len`` positions and reset it to empty."""
        if self.external is not None:
            if max_len > self.limit():
                raise ConfigError(f"prompt + new tokens = {max_len} exceed the model's {self.limit()} positions")
            self.external.reset()
            self.pos = 0  # max_len stays the static cache's: it is still there for when the cache is detached
            return
        if max_len > self.limit():
            raise ConfigError(
                f"prompt + new tokens = {max_len} exceeds the static cache limit {self.limit()} "
                "(KernelConfig.max_cache_len / the model's max_position_embeddings)"
            )
        if self.k_cache is None or self.max_len < max_len:
            # Round up to 256 so that a session of similar requests reuses one allocation (and one compile).
            size = min(self.limit(), 256 * math.ceil(max_len / 256))
            # One tensor per layer, not one 5-D tensor: a compiled step that writes into a view of a shared base
            # gets the whole base copied back by functionalization at every step.
            shape = (1, self.arch.kv_heads, size, self.arch.head_dim)
            self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.arch.layers]
            self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.arch.layers]
            self.max_len = size
        self.pos = 0

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on (by position: the stale entries are overwritten later)."""
        if not 0 <= length <= self.pos:
            raise ValueError(f"crop({length}): the cache holds {self.pos} positions")
        if self.external is not None:
            self.external.crop(length - self.pos)
        self.pos = length

    def native_layers(self) -> list[_NativeLayer] | None:
        """The fused native layer plan (one ``ryzen_native::decode_layer`` call per layer for up to
        ``native.SMALL_M`` new tokens), or ``None`` when this model's layers run in ATen ops. Built on first use."""
        if not self._native_checked:
            self._native_checked = True
            if self.device.type == "cpu" and self.config.native_layers:
                self._native = _native_layers(self.arch, self.dtype)
        return self._native

    # -- forward

    def _embed(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        h = self.arch.embed(ids)
        if self.arch.pos_embed is not None:
            positions = torch.arange(pos, pos + ids.shape[1], device=ids.device)
            h = h + self.arch.pos_embed(positions)[None]
        return h

    def _rope(self, h: torch.Tensor, pos: int, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.arch.rotary is None:
            return None
        position_ids = torch.arange(pos, pos + t, device=h.device)[None]
        cos, sin = self.arch.rotary(h, position_ids)
        return cos[:, None], sin[:, None]

    @staticmethod
    def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """HF's Llama/Mistral/Qwen2 RMSNorm as one fused ``F.rms_norm`` (its six small ops cost ~4 us more a call,
        five to thirteen calls a token); other norms (GPT-2's LayerNorm is already one op) run as they are."""
        eps = getattr(module, "variance_epsilon", None)
        if eps is not None and type(module).__name__.endswith("RMSNorm") and x.dtype == torch.float32:
            weight: Any = module.weight
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return module(x)

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, ids: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Append ``ids`` ``[1, T]`` at the current position; logits of the last position ``[1, V]``, or of all
        positions ``[1, T, V]`` with ``all_logits``."""
        if self.k_cache is None and self.external is None:
            raise RuntimeError("StaticDecoder.forward before allocate()")
        pos, t = self.pos, ids.shape[1]
        if self.external is None and pos + t > self.max_len:
            raise ConfigError(f"the static cache holds {self.max_len} positions; {pos} used, {t} more asked")
        arch = self.arch
        h = self._embed(ids, pos)
        rope = self._rope(h, pos, t)
        heads, kv_heads, hd = arch.heads, arch.kv_heads, arch.head_dim
        q_size, kv_size = heads * hd, kv_heads * hd
        end = pos + t
        mask: torch.Tensor | None = None
        causal = False
        if t > 1:
            if pos == 0:
                causal = True
            else:
                mask = torch.ones(t, end, dtype=torch.bool, device=ids.device).tril(diagonal=pos)
        eligible = t <= native.SMALL_M and self.external is None and not torch.is_grad_enabled()
        native_layers = self.native_layers() if eligible else None
        if native_layers is not None and arch.sliding_window is not None and end > arch.sliding_window:
            native_layers = None  # the fused kernel attends over every cached position
        if native_layers is not None:
            assert self.k_cache is not None
            assert self.v_cache is not None
            cos, sin = (c.reshape(t, -1).float().contiguous() for c in rope) if rope is not None else (None, None)
            rows = h.reshape(t, -1).float().contiguous()
            for i, nl in enumerate(native_layers):
                rows = torch.ops.ryzen_native.decode_layer(
                    rows, nl.weights, nl.kinds, nl.groups, nl.norm1, nl.norm2, nl.eps1, nl.eps2,
                    self.k_cache[i], self.v_cache[i], pos, cos, sin, heads, kv_heads, nl.scale,
                )  # fmt: skip
            h = rows.view(1, t, -1)
        for i, layer in enumerate(arch.layers if native_layers is None else ()):
            x = layer.norm1(h)
            qkv = layer.qkv(x)
            # q and k side by side as heads + kv_heads heads: RoPE runs once on both (half the small ops).
            qk = qkv[..., : q_size + kv_size].view(1, t, heads + kv_heads, hd).transpose(1, 2)
            if rope is not None:
                qk = self._apply_rope(qk, *rope)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[..., q_size + kv_size :].view(1, t, kv_heads, hd).transpose(1, 2)
            if self.external is not None:
                attn = self.external.attend(i, q, k, v, layer.scale)
            else:
                assert self.k_cache is not None
                assert self.v_cache is not None
                self.k_cache[i][:, :, pos:end] = k
                self.v_cache[i][:, :, pos:end] = v
                keys = self.k_cache[i][:, :, :end]
                values = self.v_cache[i][:, :, :end]
                attn = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, is_causal=causal, scale=layer.scale, enable_gqa=heads != kv_heads
                )
            h = h + layer.o(attn.transpose(1, 2).reshape(1, t, q_size))
            x = self._norm(layer.norm2, h)
            if arch.kind == "llama":
                gate_up = layer.mlp_in(x)
                gate, up = gate_up.split(arch.intermediate, dim=-1)
                h = h + layer.down(layer.act(gate) * up)
            else:
                h = h + layer.down(layer.act(layer.mlp_in(x)))
        self.pos = end
        h = self._norm(arch.final_norm, h if all_logits else h[:, -1:])
        logits = arch.lm_head(h)
        return logits if all_logits else logits[:, -1]

    # -- compiled step (static shapes: attends over the whole cache with a mask)

    def _step_static(self, ids: torch.Tensor, pos_t: torch.Tensor) -> torch.Tensor:
        arch = self.arch
        assert self.k_cache is not None
        assert self.v_cache is not None
        heads, kv_heads, hd = arch.heads, arch.kv_heads, arch.head_dim
        q_size, kv_size = heads * hd, kv_heads * hd
        h = arch.embed(ids)
        if arch.pos_embed is not None:
            h = h + arch.pos_embed(pos_t)[None]
        rope = None
        if arch.rotary is not None:
            cos, sin = arch.rotary(h, pos_t[None])
            rope = (cos[:, None], sin[:, None])
        mask = (torch.arange(self.max_len, device=ids.device) <= pos_t)[None, None, None]
        for i, layer in enumerate(arch.layers):
            x = layer.norm1(h)
            qkv = layer.qkv(x)
            q = qkv[..., :q_size].view(1, 1, heads, hd).transpose(1, 2)
            k = qkv[..., q_size : q_size + kv_size].view(1, 1, kv_heads, hd).transpose(1, 2)
            v = qkv[..., q_size + kv_size :].view(1, 1, kv_heads, hd).transpose(1, 2)
            if rope is not None:
                q = self._apply_rope(q, *rope)
                k = self._apply_rope(k, *rope)
            self.k_cache[i].index_copy_(2, pos_t, k)
            self.v_cache[i].index_copy_(2, pos_t, v)
            # Written out rather than SDPA: inductor fuses these into a few loops over the cache, while SDPA with a
            # mask over the whole cache took ~100 us a layer here (4x the eager loop's SDPA over the filled prefix).
            group = heads // kv_heads
            scores = torch.matmul(q.view(1, kv_heads, group, hd), self.k_cache[i].transpose(-1, -2)) * layer.scale
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            attn = torch.matmul(probs, self.v_cache[i]).view(1, heads, 1, hd)
            h = h + layer.o(attn.transpose(1, 2).reshape(1, 1, q_size))
            x = layer.norm2(h)
            if arch.kind == "llama":
                gate, up = layer.mlp_in(x).split(arch.intermediate, dim=-1)
                h = h + layer.down(layer.act(gate) * up)
            else:
                h = h + layer.down(layer.act(layer.mlp_in(x)))
        return arch.lm_head(arch.final_norm(h))[:, -1]

    def compile(self) -> float:
        """Compile the decode step and run it once on a scratch cache; returns the seconds it took."""
        started = time.perf_counter()
        for module in self.model.modules():
            if isinstance(module, Int8Linear) and module.kernel == "fbgemm":
                module.register_packed()
        self._compiled = torch.compile(self._step_static, mode=self.config.compile_mode, dynamic=False)
        self.allocate(min(self.limit(), 256))
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for p in range(2):  # the second call checks that no recompile is pending
                self._compiled(token, torch.tensor([p], device=self.device))
        _sync(self.device)
        self.pos = 0
        return time.perf_counter() - started

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token ``[1, 1]``; the next-token logits ``[1, V]``."""
        if self._compiled is None:
            return self.forward(token)
        if self.pos + 1 > self.max_len:
            raise ConfigError(f"the static cache holds {self.max_len} positions; all are used")
        logits = self._compiled(token, torch.tensor([self.pos], device=self.device))
        self.pos += 1
        return logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- generate


_SERVED_KWARGS = {
    "input_ids",
    "attention_mask",
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "generation_config",
    "min_new_tokens",
    "use_cache",
}


def _bind_generate(model: Any, decoder: StaticDecoder) -> None:
    """Give ``model`` (the instance) a ``generate`` that runs the lean loop when it can, HF's otherwise."""
    hf_generate = model.generate  # bound method of the class: the fallback

    def generate(self: nn.Module, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if inputs is not None:
            kwargs["input_ids"] = inputs
        _, cache = pop_cache_kwarg(kwargs)  # either spelling; None asks for nothing: the lean loop's own cache
        own = attends_on_storage(cache) and cache.get_seq_length() == 0
        if cache is not None and not own:
            kwargs.update(cache_kwargs(cache))  # a cache the lean loop cannot use: HF's generate gets it
        reason = _why_not_served(self, decoder, kwargs)
        if reason is not None:
            logger.debug("KernelOptimizer: HF generate (%s)", reason)
            if own:
                kwargs.update(cache_kwargs(cache))
            return hf_generate(**kwargs)
        if not own:
            return _lean_generate(self, decoder, **kwargs)
        # A cache that attends on its own storage (KVCacheOptimizer's quantized cache): the lean loop uses it.
        decoder.attach_cache(cache)
        try:
            return _lean_generate(self, decoder, **kwargs)
        finally:
            decoder.attach_cache(None)

    model.generate = types.MethodType(generate, model)
    model._ryzen_hf_generate = hf_generate


def _settings(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def pick(name: str, default: Any = None) -> Any:
        if name in kwargs:  # an explicit argument wins, even None (HF: eos_token_id=None means no EOS)
            return kwargs[name] if kwargs[name] is not None or name == "eos_token_id" else default
        value = getattr(gen_config, name, None) if gen_config is not None else None
        return default if value is None else value

    return {
        name: pick(name, default)
        for name, default in (
            ("max_new_tokens", None),
            ("max_length", 20),
            ("do_sample", False),
            ("temperature", 1.0),
            ("top_k", None),
            ("top_p", None),
            ("eos_token_id", None),
            ("min_new_tokens", 0),
        )
    }


def _why_not_served(model: nn.Module, decoder: StaticDecoder, kwargs: dict[str, Any]) -> str | None:
    extra = sorted(set(kwargs) - _SERVED_KWARGS)
    if extra:
        return f"options {extra}"
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return "no 2-D input_ids"
    if ids.shape[0] != 1:
        return f"batch {ids.shape[0]}"
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return "padding in attention_mask"
    gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if gen_config is not None:
        for name, neutral in (("num_beams", 1), ("num_return_sequences", 1), ("repetition_penalty", 1.0)):
            value = getattr(gen_config, name, neutral)
            if value not in (None, neutral):
                return f"{name}={value}"
    total = ids.shape[1] + (_settings(model, kwargs)["max_new_tokens"] or 0)
    if total > decoder.limit():
        return f"{total} positions exceed the static cache limit {decoder.limit()}"
    window = decoder.arch.sliding_window
    if window is not None and total > window:
        return f"{total} positions exceed the sliding window {window}"
    return None


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """A multinomial draw from HF's warped distribution (:func:`ryzen_opt.sampling.warped_probs`)."""
    return torch.multinomial(warped_probs(logits, temperature, top_k, top_p), 1)


def _eos_set(eos: Any) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, torch.Tensor):
        return {int(x) for x in eos.flatten().tolist()}
    if isinstance(eos, int):
        return {eos}
    return {int(x) for x in eos}


@torch.no_grad()
def _lean_generate(model: nn.Module, decoder: StaticDecoder, **kwargs: Any) -> torch.Tensor:
    settings = _settings(model, kwargs)
    ids: torch.Tensor = kwargs["input_ids"].to(decoder.device)
    prompt_len = ids.shape[1]
    new = settings["max_new_tokens"]
    if new is None:
        new = max(0, settings["max_length"] - prompt_len)
    if new == 0:
        return ids
    eos = _eos_set(settings["eos_token_id"])
    min_new = int(settings["min_new_tokens"] or 0)
    decoder.allocate(prompt_len + new)
    out = torch.empty(1, prompt_len + new, dtype=ids.dtype, device=ids.device)
    out[:, :prompt_len] = ids
    logits = decoder.forward(ids)
    produced = 0
    for produced in range(1, new + 1):
        if produced <= min_new and eos:
            logits[:, list(eos)] = float("-inf")
        if settings["do_sample"]:
            token = _sample(logits, settings["temperature"], settings["top_k"], settings["top_p"])
        else:
            token = logits.argmax(dim=-1, keepdim=True)
        out[:, prompt_len + produced - 1] = token[:, 0]
        if produced == new or (eos and int(token) in eos):
            break
        logits = decoder.step(token)
    return out[:, : prompt_len + produced]


def iter_kernel_modules(model: nn.Module) -> Iterator[tuple[str, _KernelLinear]]:
    """``(name, module)`` for every kernel linear in an optimized model (fused ones once)."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, _KernelLinear) and id(module) not in seen:
            seen.add(id(module))
            yield name, module


def kernel_report(model: nn.Module) -> KernelReport:
    """The :class:`KernelReport` of an optimized model."""
    report = getattr(model, "_ryzen_kernels", None)
    if report is None:
        raise ConfigError("this model was not optimized by a KernelOptimizer")
    return replace(report)
