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

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ryzen_opt import runtime
from ryzen_opt.configs import ConfigMixin
from ryzen_opt.errors import ConfigError
from ryzen_opt.ops import native
from ryzen_opt.ops.linear import (
    INT8_KERNELS,
    DenseLinear,
    FusedSlice,
    Int4Linear,
    Int8Linear,
    KernelLinear,
    SharedFused,
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
    state,
)

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("none", "bf16", "int8", "int4")
INT4_METHODS = ("rtn", "gptq")
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
    ) -> KernelLinear:
        mode = self.config.weights
        if name == "lm_head":
            mode = self.config.resolved_lm_head()
        module: KernelLinear
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
            shared = SharedFused(self._make_linear(weight, bias, label, report, hessian))
            start = 0
            for n, (w, _) in zip(names, params, strict=True):
                setattr(parent, n, FusedSlice(shared, start, start + w.shape[0]))
                start += w.shape[0]
            report.fused.append(f"{label}: {'+'.join(names)} -> {start}x{weight.shape[1]}")
            # A registered submodule, not a record (runtime.state): .to() and state_dict() must reach the fused
            # weight; iter_kernel_modules() is how other modules find it.
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
                (e.g. ``corpus.prose_blocks(tokenizer, "tune", blocks=32)``); ignored otherwise.

        Raises:
            UnsupportedModelError: not a Llama/Mistral/Qwen2/GPT-2 causal LM.
            ConfigError: the config asks for something this device cannot do, or GPTQ without calibration.
        """
        model_type = self._check(model, calibration)
        gptq = self.config.weights == "int4" and self.config.int4_method == "gptq"
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
        decoder = self._install_decoder(model, arch, report)
        report.apply_seconds = time.perf_counter() - started
        self._hessians = {}
        if self.config.compile:
            for _, module in iter_kernel_modules(model):
                if isinstance(module, Int8Linear) and module.kernel == "fbgemm":
                    module.register_packed()  # the compiled step reads packed weights through their handles
            report.compile_seconds = decoder.compile()
        _log_report(report)
        self.report = report
        return model

    def _check(self, model: Any, calibration: torch.Tensor | None) -> str:
        """Refuse what cannot be optimized before anything changes: a second pass, an unsupported architecture,
        GPTQ without calibration text. Returns the model type."""
        if kernel_report_or_none(model) is not None:
            raise ConfigError("this model was already optimized by a KernelOptimizer; apply to a fresh copy")
        model_type = runtime.model_type(model, "KernelOptimizer")
        gptq = self.config.weights == "int4" and self.config.int4_method == "gptq"
        if gptq and calibration is None:
            raise ConfigError(
                "KernelConfig.int4_method='gptq' needs calibration text: apply_to_model(model, calibration=ids) with "
                "ids an [N, T] LongTensor of token ids (e.g. 32 blocks of 256 tokens of text like your prompts), "
                "or int4_method='rtn'"
            )
        return model_type

    def _install_decoder(self, model: Any, arch: runtime.Arch, report: KernelReport) -> StaticDecoder:
        """Build the lean decoder over the swapped linears, bind ``generate`` to it when asked, and record both."""
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
        state.attach(model, state.KERNELS, report)
        attach_decoder(model, decoder)
        return decoder

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
    if isinstance(module, KernelLinear):
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


def _log_report(report: KernelReport) -> None:
    """One line of what changed; fallbacks as a warning unless every one was expected (compressed before)."""
    if report.fallbacks:
        expected = all("compressed before" in f for f in report.fallbacks)
        shown = "; ".join(report.fallbacks[:3])
        if len(report.fallbacks) > 3:
            shown += f"; and {len(report.fallbacks) - 3} more (KernelReport.fallbacks lists them all)"
        (logger.info if expected else logger.warning)("KernelOptimizer fallbacks: %s", shown)
    logger.info(
        "KernelOptimizer: %s, kernels %s (native path %s), %.1f MB/token -> %.1f MB/token, attention %s, decode %s",
        report.model_type,
        report.kernels,
        report.native_isa,
        report.weight_bytes_before / 1e6,
        report.bytes_per_token / 1e6,
        report.attention,
        report.decode,
    )


def kernel_report_or_none(model: nn.Module) -> KernelReport | None:
    """:func:`kernel_report` for a model that may not be optimized."""
    report = state.attached(model, state.KERNELS, KernelReport)
    return None if report is None else replace(report)


def iter_kernel_modules(model: nn.Module) -> Iterator[tuple[str, KernelLinear]]:
    """``(name, module)`` for every kernel linear in an optimized model (fused ones once)."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, KernelLinear) and id(module) not in seen:
            seen.add(id(module))
            yield name, module


def kernel_report(model: nn.Module) -> KernelReport:
    """The :class:`KernelReport` of an optimized model."""
    report = state.attached(model, state.KERNELS, KernelReport)
    if report is None:
        raise ConfigError("this model was not optimized by a KernelOptimizer")
    return replace(report)
