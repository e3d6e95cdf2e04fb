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
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ryzen_opt import runtime
from ryzen_opt.configs import ConfigMixin
from ryzen_opt.device import cpu_info
from ryzen_opt.errors import ConfigError
from ryzen_opt.ops import native
from ryzen_opt.ops.quant import (
    PANEL,
    dequantize_int4,
    gptq_int4,
    pack_group_panels,
    pack_int4_panels,
    pack_int8_panels,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_group_panels,
    unpack_int4_panels,
    unpack_int8_panels,
    unpack_nibbles,
)
from ryzen_opt.runtime import (  # noqa: F401  (this module's API too)
    SUPPORTED_MODEL_TYPES,
    Concat,
    NativeSpec,
    StaticDecoder,
    UnsupportedModelError,
    attach_decoder,
    bind_generate,
    is_conv1d,
    linear_params,
)

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("none", "bf16", "int8", "int4")
INT4_METHODS = ("rtn", "gptq")
INT8_KERNELS = ("auto", "native", "native-a8", "fbgemm", "int8pack", "dequant")
ATTENTION_MODES = ("sdpa", "eager", "keep")
DECODE_MODES = ("static", "hf")

# Which int8 kernel "auto" picks, by device type, and why (accuracy on SmolLM2-135M, prose held out from tuning;
# speed from ``python benchmarks/bench_gemv.py --model smollm2`` and ``bench_kernels.py``):
#   cpu:  "native-a8", ryzen_opt.ops.native's integer GEMV: int8 weights in panels of 16 rows times activations rounded
#         to int8 per block of 32 (llama.cpp's Q8_0 x Q8_0), for decode, verification and prompts alike. It reads
#         each weight once for all the rows of a call, so verifying 8 tokens costs little more than one step, and
#         the rounding is per block, not per tensor (docs/native.md). "native" (fp32 activations, the exact
#         dequantized product) is the choice where every bit of the product matters. fbgemm's dynamic kernel
#         quantizes activations per tensor: real LLMs have outlier activation channels, and SmolLM2 lost 36% of
#         its top-1 accuracy with it (7-bit activations on an AVX2 CPU without VNNI; 16-18% with 8 bits on an
#         AVX-512 VNNI one). ATen's weight-only _weight_int8pack_mm keeps accuracy (-0.3%) but takes bf16
#         activations and runs slowly without AVX-512 BF16. Where the native extension cannot be built (no
#         compiler), "int8pack".
#   cuda: gpt-fast's weight-only form, F.linear(x, w.to(x.dtype)) * scales, which inductor fuses into one
#         kernel under compile=True; fbgemm is CPU-only.
KERNEL_TABLE: dict[str, str] = {"cpu": "native-a8", "cuda": "dequant", "mps": "int8pack"}
# int4: on the CPU, ryzen_opt.ops.native's integer kernel (K and the group a multiple of 32), else ATen's
# _weight_int4pack_mm_for_cpu (bf16 activations; N a multiple of 16), else the layer stays int8 (logged). On CUDA
# the tinygemm kernel (_weight_int4pack_mm) when its probe matches the dequantized reference, else dequantize on
# the fly.
_INT4_N_MULTIPLE = 16


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
            ``native.SMALL_M`` tokens) as one fused native call (:func:`ryzen_opt.ops.native.ops`): the ~40 small ATen
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


_EMPTY = torch.empty(0)


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

    def native_spec(self) -> NativeSpec | None:
        """How the fused native layer reads this linear (:class:`ryzen_opt.runtime.NativeLinear`), or ``None``."""
        return None

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

    def native_spec(self) -> NativeSpec | None:
        if self.bias is not None or self.weight_t.dtype != torch.float32 or not self.weight_t.is_cpu:
            return None
        return NativeSpec(0, (self.weight_t, _EMPTY, _EMPTY))

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


# Above this many rows (a prompt pass) the int8 native kernels hand over to a dequantized BLAS GEMM; at or below it
# (decode, verification) the GEMV reads the int8 weight directly. Measured crossover on AVX2: between 16 and 64 rows.
NATIVE_MAX_ROWS = 32


class Int8Linear(_KernelLinear):
    """Per-output-channel symmetric int8 weights, one of three kernels (see :data:`KERNEL_TABLE`).

    - ``fbgemm``: fbgemm's dynamic int8 linear: activations are quantized per tensor at each call, the product
      runs in int8 with int32 accumulation. Fastest here; adds activation rounding (measured in the accuracy
      loss, not assumed away).
    - ``native``: :mod:`ryzen_opt.ops.native`'s weight-only kernel, fp32 activations: the exact dequantized product.
    - ``native-a8`` (the default on CPU): the weights in panels of 16 rows (:func:`ryzen_opt.ops.quant.pack_int8_panels`);
      every call rounds its activations to int8 per block of 32 and multiplies in integers (llama.cpp's Q8_0 x Q8_0).
      An input width that is not a multiple of 32 takes ``native``.
    - ``int8pack``: ATen's weight-only ``_weight_int8pack_mm`` with bf16 activations.
    - ``dequant``: gpt-fast's ``F.linear(x, q.to(x.dtype)) * scale``: correct everywhere, fast under compile.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_int8(weight)
        if kernel == "native-a8" and self.in_features % 32:
            logger.info("int8 %dx%d: input width not a multiple of 32, kernel 'native'", *weight.shape)
            kernel = "native"
        self.kernel = kernel
        stored = pack_int8_panels(q) if kernel == "native-a8" else q  # native-a8 reads panels of 16 rows
        self.register_buffer("qweight", stored.to(weight.device))
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
                raise ConfigError(
                    f"int8 kernel {kernel!r} needs the CPU and a built ryzen_opt.ops.native (see the log)"
                )
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

    def int8_weight(self) -> torch.Tensor:
        """The int8 codes ``[out, in]`` in row-major order, whatever layout the kernel reads."""
        if self.kernel == "native-a8":
            return unpack_int8_panels(self.qweight, self.out_features)
        return self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scale[:, None]

    def native_spec(self) -> NativeSpec | None:
        if self.bias is not None or self.kernel not in ("native", "native-a8"):
            return None
        return NativeSpec(1 if self.kernel == "native" else 3, (self.qweight, self.scale, _EMPTY))

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm":
            if torch.compiler.is_compiling():  # the compiler sees an opaque op; compile() checked the handles
                y = torch.ops.ryzen_opt.fbgemm_linear_dynamic(x2d.float(), self._handle, self.out_features)
            else:
                y = torch.ops.quantized.linear_dynamic(x2d.float(), self._packed, fbgemm_reduce_range())
            return y.to(x2d.dtype)
        if self.kernel == "native" and x2d.shape[0] > NATIVE_MAX_ROWS:
            # A prompt pass: the weight dequantized once and one BLAS GEMM beats the row-tiled fp32 GEMV (256 rows of
            # SmolLM2's 576 -> 1536: 3.7 ms against 9.0; 64 rows: 1.2 against 1.9; 16 rows: 0.66 against 0.45).
            y = (F.linear(x2d.float(), self.qweight.float()) * self.scale).to(x2d.dtype)
        elif self.kernel == "native":
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

    CPU: :mod:`ryzen_opt.ops.native`'s kernel (weights in panels of 16 rows, activations rounded to int8 per block of 32,
    fp32 scales: llama.cpp's Q4_1 x Q8_1) when the input width and the group are multiples of 32, else ATen's
    ``_weight_int4pack_mm_for_cpu`` (bf16 activations).
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
        self.native = self.native and native.preferred()
        # Nibbles, two per byte, are what counts as storage (and what dequantized_weight reads): in the native
        # kernel's panels of 16 rows when it runs them (scales and minimums too), else plain pairs.
        if self.native:
            packed, scale_kept, lo_kept = pack_int4_panels(q), pack_group_panels(scale), pack_group_panels(lo)
        else:
            packed, scale_kept, lo_kept = pack_nibbles(q), scale, lo
        self.register_buffer("qweight", packed.to(device))
        self.register_buffer("scale", scale_kept.to(device))
        self.register_buffer("minimum", lo_kept.to(device))
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
        if self.native:
            n = self.out_features
            q = unpack_int4_panels(self.qweight, n)
            scale, lo = unpack_group_panels(self.scale, n), unpack_group_panels(self.minimum, n)
            return dequantize_int4(q, scale, lo, self.group_size)
        return dequantize_int4(unpack_nibbles(self.qweight), self.scale, self.minimum, self.group_size)

    def native_spec(self) -> NativeSpec | None:
        # The fused layer takes the outputs from the panels' count: whole panels only.
        if self.bias is not None or self.kernel != "native-int4" or self.out_features % PANEL:
            return None
        return NativeSpec(2, (self.qweight, self.scale, self.minimum), self.group_size)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native-int4":
            y = torch.ops.ryzen_native.w4_linear(
                x2d.float(), self.qweight, self.scale, self.minimum, self.group_size, self.out_features
            )
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
    # The native kernels' instruction-set path ("avx2", "scalar"), None where none of its kernels runs here.
    native_isa: str | None = None
    native_layers: bool = False  # whether decode runs one fused native call per layer

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
            if kernel.startswith("native") and not native.preferred():
                kernel = "int8pack"  # no compiler, or only the plain-loop path: ATen's weight-only kernel (logged)
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
            native_ok = weight.device.type == "cpu" and k % 32 == 0 and native.preferred()
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
        if names == ["lm_head"] and not (isinstance(originals[0], nn.Linear) or is_conv1d(originals[0])):
            # Already compressed (the EmbeddingCompressor runs first): it brings its own fast matmul; keep it.
            report.fallbacks.append(f"lm_head: kept as {type(originals[0]).__name__} (compressed before)")
            return originals[0]
        params = [linear_params(m) for m in originals]
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
        return Concat(modules)

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
        model_type = runtime.model_type(model, "KernelOptimizer")
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
        arch = runtime.build_arch(
            model,
            lambda parent, names, label, fusable: self._replace(
                parent, names, report, label, fusable and self.config.fuse
            ),
        )
        report.attention = self._set_attention(model)
        report.bytes_per_token = sum(
            _module_bytes(m) for layer in arch.layers for m in (layer.qkv, layer.o, layer.mlp_in, layer.down)
        ) + _module_bytes(arch.lm_head)
        report.weight_bytes_after = report.bytes_per_token
        decoder = StaticDecoder(
            model,
            arch,
            max_cache_len=self.config.max_cache_len,
            native_layers=self.config.native_layers,
            compile_mode=self.config.compile_mode,
        )
        report.decode = "static (lean loop)" if self.config.decode == "static" else "hf generate"
        if any(n.startswith("native") for n in report.kernels) or decoder.native_layers() is not None:
            report.native_isa = native.isa()
        report.native_layers = decoder.native_layers() is not None
        if self.config.decode == "static":
            bind_generate(model, decoder)
        model._ryzen_kernels = report
        attach_decoder(model, decoder)
        report.apply_seconds = time.perf_counter() - started
        self._hessians = {}
        if self.config.compile:
            for _, module in iter_kernel_modules(model):
                if isinstance(module, Int8Linear) and module.kernel == "fbgemm":
                    module.register_packed()  # the compiled step reads packed weights through their handles
            report.compile_seconds = decoder.compile()
        if report.fallbacks:
            expected = all("compressed before" in f for f in report.fallbacks)
            shown = "; ".join(report.fallbacks[:3])
            if len(report.fallbacks) > 3:
                shown += f"; and {len(report.fallbacks) - 3} more (KernelReport.fallbacks lists them all)"
            (logger.info if expected else logger.warning)("KernelOptimizer fallbacks: %s", shown)
        logger.info(
            "KernelOptimizer: %s, kernels %s (native path %s), %.1f MB/token -> %.1f MB/token, attention %s, decode %s",
            model_type,
            report.kernels,
            report.native_isa,
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


def _module_bytes(module: nn.Module) -> int:
    if isinstance(module, _KernelLinear):
        return module.weight_bytes()
    if isinstance(module, Concat):
        return sum(_module_bytes(m) for m in module.parts)
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def _decode_bytes(model: nn.Module) -> int:
    """Bytes of the linears one decode step reads (decoder projections and LM head), before optimization."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            del name
    return total


def kernel_report_or_none(model: nn.Module) -> KernelReport | None:
    """:func:`kernel_report` for a model that may not be optimized."""
    report = getattr(model, "_ryzen_kernels", None)
    return None if report is None else replace(report)


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
