"""The lean decoder: one layer loop over a preallocated KV cache, for prefill, decode and speculative verification.

One loop (:meth:`StaticDecoder._layers`) runs every layer; what differs between its uses is only how attention
reads the cache, passed in as a function:

- **eager, static cache** (prefill, decode, verify): the new keys and values are written at their positions and
  SDPA attends over the filled prefix (``is_causal`` for a prefill from an empty cache, an explicit mask when
  appending several tokens to a filled one);
- **compiled step**: one token at a position held in a tensor, attending over the whole cache with a mask, so that
  the shapes never change and ``torch.compile`` compiles once;
- **an attached cache** that attends on its own stored form (:class:`AttendingCache`, the KVCacheOptimizer's
  quantized cache): it gets the query and the new key/value and returns the attention output.

On the CPU, for up to ``native.SMALL_M`` new tokens, a Llama-family model whose linears the native extension reads
(:class:`NativeLinear`) runs each layer as one ``ryzen_native::decode_layer`` call instead: the same layer, fused
(RMSNorm, q|k|v, RoPE, the cache write, GQA attention, o, RMSNorm, gate|up, SiLU gating, down).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ryzen_opt.errors import ConfigError
from ryzen_opt.ops import native
from ryzen_opt.runtime.arch import Arch, Layer
from ryzen_opt.runtime.state import DECODER, attach, attached

logger = logging.getLogger(__name__)

# attention(layer index, layer, q [1, H, T, D], k [1, KV, T, D], v [1, KV, T, D]) -> [1, H, T, D]
Attention = Callable[[int, Layer, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class AttendingCache(Protocol):
    """A ``transformers`` cache that computes attention on its own stored form (the KVCacheOptimizer's quantized
    cache): the lean loop hands it the layer's query and new key/value and gets the attention output back, so the
    stored keys and values are never materialized in fp32 as a whole."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor: ...

    def get_seq_length(self) -> int: ...

    def reset(self) -> None: ...

    def crop(self, max_length: int) -> None: ...


@runtime_checkable
class NativeAttendingCache(AttendingCache, Protocol):
    """An :class:`AttendingCache` whose layers the fused native layer can read directly (the KVCacheOptimizer's
    quantized cache on the CPU): one ``ryzen_native::decode_layer_kv`` call per layer instead of two native calls
    around :meth:`attend`."""

    def native_state(self, layer: int) -> tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor] | None:
        """``(chunk tensors, bits, residual keys, residual values)`` of ``layer``, or ``None`` to use ``attend``."""
        ...

    def native_commit(self, layer: int, rest_k: torch.Tensor, rest_v: torch.Tensor) -> None:
        """Keep the residual window the native layer grew by the new tokens."""
        ...


def attends_on_storage(cache: Any) -> bool:
    """Whether ``cache`` is an :class:`AttendingCache` (the one test every caller uses)."""
    return cache is not None and callable(getattr(cache, "attend", None))


@dataclass(frozen=True)
class NativeSpec:
    """How ``ryzen_native::decode_layer`` reads one linear: its weight kind (0 dense fp32 ``[in, out]``, 1 int8,
    2 int4, 3 int8 with int8 activations), three tensors (weight, scale, minimum; empty where unused) and the int4
    group size (0 otherwise)."""

    kind: int
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    group: int = 0


@runtime_checkable
class NativeLinear(Protocol):
    """A linear module the fused native layer can read (the KernelOptimizer's linears)."""

    def native_spec(self) -> NativeSpec | None:
        """Its :class:`NativeSpec`, or ``None`` when it must run as a module (a bias, another kernel, dtype)."""
        ...


@dataclass(frozen=True)
class NativeLayer:
    """The arguments of one ``ryzen_native::decode_layer`` call that do not change from token to token."""

    weights: list[torch.Tensor]
    kinds: list[int]
    groups: list[int]
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps1: float
    eps2: float
    scale: float


def _spec(module: nn.Module) -> NativeSpec | None:
    return module.native_spec() if isinstance(module, NativeLinear) else None


def native_plan(arch: Arch, dtype: torch.dtype) -> list[NativeLayer] | None:
    """The native layer plan of ``arch``, or ``None`` (logged) when some layer is not what the fused kernel runs:
    a Llama-family fp32 layer with RMSNorms, SiLU gating and linears that are :class:`NativeLinear`."""
    if arch.kind != "llama" or dtype != torch.float32 or native.ops() is None:
        return None
    plan = []
    for i, layer in enumerate(arch.layers):
        specs = [_spec(m) for m in (layer.qkv, layer.o, layer.mlp_in, layer.down)]
        norms_ok = all(
            type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") and n.weight.is_cpu
            for n in (layer.norm1, layer.norm2)
        )
        act = layer.act
        silu = type(act).__name__ in ("SiLU", "SiLUActivation") or getattr(act, "__name__", "") == "silu"
        if not norms_ok or not silu or any(spec is None for spec in specs):
            logger.info(
                "layer %d runs in ATen ops (the fused native layer needs native/fp32 linears, RMSNorm, SiLU)", i
            )
            return None
        ready = [spec for spec in specs if spec is not None]
        norm1: Any = layer.norm1
        norm2: Any = layer.norm2
        plan.append(
            NativeLayer(
                [t for spec in ready for t in spec.tensors],
                [spec.kind for spec in ready],
                [spec.group for spec in ready],
                norm1.weight.detach().float().contiguous(),
                norm2.weight.detach().float().contiguous(),
                float(norm1.variance_epsilon),
                float(norm2.variance_epsilon),
                layer.scale,
            )
        )
    return plan


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's Llama/Mistral/Qwen2 RMSNorm as one fused ``F.rms_norm`` (its six small ops cost ~4 us more a call, five
    to thirteen calls a token); other norms (GPT-2's LayerNorm is already one op) run as they are."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is not None and type(module).__name__.endswith("RMSNorm") and x.dtype == torch.float32:
        weight: Any = module.weight
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return module(x)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StaticDecoder:
    """A lean forward over a preallocated KV cache, reading the modules of one model (see the module docstring).

    Batch 1. ``forward(ids)`` appends ``T`` positions (a prefill from an empty cache fills ``[0, T)``); ``step(token)``
    appends one. The cache is one ``[1, kv_heads, max_len, head_dim]`` tensor per layer, in the activation dtype.
    ``crop(n)`` rolls back by position (no copy), which is what speculative decoding needs.

    Args:
        model: the model whose modules ``arch`` holds (its device is the decoder's).
        arch: the model read by :func:`ryzen_opt.runtime.build_arch`.
        max_cache_len: the most positions a cache may hold (``None``: the model's own limit).
        native_layers: run fused native layers where the model allows it (CPU, fp32, Llama family).
        compile_mode: the ``torch.compile`` mode of :meth:`compile`.
    """

    def __init__(
        self,
        model: nn.Module,
        arch: Arch,
        *,
        max_cache_len: int | None = None,
        native_layers: bool = True,
        compile_mode: str | None = None,
    ) -> None:
        self.model = model
        self.arch = arch
        self.max_cache_len = max_cache_len
        self.use_native = native_layers
        self.compile_mode = compile_mode
        embed: Any = arch.embed
        # An embedding compressed by the EmbeddingCompressor has no .weight; it states its output dtype.
        self.dtype: torch.dtype = embed.weight.dtype if hasattr(embed, "weight") else embed.dtype
        self.device: torch.device = next(model.parameters()).device
        self.max_len = 0
        self.pos = 0
        self.k_cache: list[torch.Tensor] | None = None
        self.v_cache: list[torch.Tensor] | None = None
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.external: AttendingCache | None = None
        self._native: list[NativeLayer] | None = None
        self._native_checked = False

    @property
    def is_compiled(self) -> bool:
        """Whether the decode step runs compiled (after :meth:`compile`)."""
        return self._compiled is not None

    # -- cache

    def attach_cache(self, cache: Any) -> None:
        """Use ``cache`` (an :class:`AttendingCache`, such as the KVCacheOptimizer's quantized cache) instead of the
        static one: attention then runs on its stored form. ``None`` goes back to the static cache."""
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
        """The most positions one sequence may use."""
        cap = self.max_cache_len or self.arch.max_positions
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

    @property
    def native_rows(self) -> int:
        """The most new tokens one forward runs through the fused native layers (``native.SMALL_M``)."""
        return native.SMALL_M

    def native_layers(self) -> list[NativeLayer] | None:
        """The fused native layer plan (one ``ryzen_native::decode_layer`` call per layer for up to
        ``native.SMALL_M`` new tokens), or ``None`` when this model's layers run in ATen ops. Built on first use."""
        if not self._native_checked:
            self._native_checked = True
            if self.device.type == "cpu" and self.use_native:
                self._native = native_plan(self.arch, self.dtype)
        return self._native

    # -- the one layer loop

    def _layers(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, attention: Attention
    ) -> torch.Tensor:
        """Every layer over ``h`` ``[1, T, hidden]``, with ``attention`` reading and writing the cache."""
        arch = self.arch
        heads, kv_heads, hd = arch.heads, arch.kv_heads, arch.head_dim
        q_size, kv_size = heads * hd, kv_heads * hd
        t = h.shape[1]
        for i, layer in enumerate(arch.layers):
            qkv = layer.qkv(_norm(layer.norm1, h))
            # q and k side by side as heads + kv_heads heads: RoPE runs once on both (half the small ops).
            qk = qkv[..., : q_size + kv_size].view(1, t, heads + kv_heads, hd).transpose(1, 2)
            if rope is not None:
                qk = _apply_rope(qk, *rope)
            v = qkv[..., q_size + kv_size :].view(1, t, kv_heads, hd).transpose(1, 2)
            attn = attention(i, layer, qk[:, :heads], qk[:, heads:], v)
            h = h + layer.o(attn.transpose(1, 2).reshape(1, t, q_size))
            x = _norm(layer.norm2, h)
            if arch.kind == "llama":
                gate, up = layer.mlp_in(x).split(arch.intermediate, dim=-1)
                h = h + layer.down(layer.act(gate) * up)
            else:
                h = h + layer.down(layer.act(layer.mlp_in(x)))
        return h

    # -- attention strategies

    def _attend_prefix(
        self,
        pos: int,
        mask: torch.Tensor | None,
        i: int,
        layer: Layer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """Eager: write the new positions, attend over the filled prefix with SDPA."""
        assert self.k_cache is not None
        assert self.v_cache is not None
        t = q.shape[2]
        end = pos + t
        self.k_cache[i][:, :, pos:end] = k
        self.v_cache[i][:, :, pos:end] = v
        return F.scaled_dot_product_attention(
            q, self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end], attn_mask=mask,
            is_causal=t > 1 and pos == 0, scale=layer.scale, enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip

    def _attend_external(self, i: int, layer: Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self.external is not None
        return self.external.attend(i, q, k, v, layer.scale)

    def _attend_masked(
        self, pos_t: torch.Tensor, i: int, layer: Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Compiled: one token at ``pos_t`` (a tensor), attending over the whole cache with a mask.

        Written out rather than SDPA: inductor fuses these into a few loops over the cache, while SDPA with a mask over
        the whole cache took ~100 us a layer here (4x the eager loop's SDPA over the filled prefix)."""
        assert self.k_cache is not None
        assert self.v_cache is not None
        self.k_cache[i].index_copy_(2, pos_t, k)
        self.v_cache[i].index_copy_(2, pos_t, v)
        heads, kv_heads, hd = q.shape[1], k.shape[1], q.shape[-1]
        mask = (torch.arange(self.max_len, device=q.device) <= pos_t)[None, None, None]
        grouped = q.reshape(1, kv_heads, heads // kv_heads, hd)
        scores = torch.matmul(grouped, self.k_cache[i].transpose(-1, -2)) * layer.scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.matmul(probs, self.v_cache[i]).view(1, heads, 1, hd)

    # -- forward

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.arch.embed(ids)
        if self.arch.pos_embed is not None:
            h = h + self.arch.pos_embed(positions)[None]
        return h

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.arch.rotary is None:
            return None
        cos, sin = self.arch.rotary(h, positions[None])
        return cos[:, None], sin[:, None]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.arch.lm_head(_norm(self.arch.final_norm, h))

    def _native_for(self, t: int, end: int) -> list[NativeLayer] | None:
        if t > native.SMALL_M or torch.is_grad_enabled():
            return None
        window = self.arch.sliding_window
        if window is not None and end > window:
            return None  # the fused kernel attends over every cached position
        return self.native_layers()

    def _run_native(
        self, plan: list[NativeLayer], h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, pos: int
    ) -> torch.Tensor:
        t = h.shape[1]
        cos, sin = (c.reshape(t, -1).float().contiguous() for c in rope) if rope is not None else (None, None)
        rows = h.reshape(t, -1).float().contiguous()
        arch = self.arch
        if self.external is not None:
            return self._run_native_external(plan, rows, cos, sin).view(1, t, -1)
        assert self.k_cache is not None
        assert self.v_cache is not None
        for i, nl in enumerate(plan):
            rows = torch.ops.ryzen_native.decode_layer(
                rows, nl.weights, nl.kinds, nl.groups, nl.norm1, nl.norm2, nl.eps1, nl.eps2,
                self.k_cache[i], self.v_cache[i], pos, cos, sin, arch.heads, arch.kv_heads, nl.scale,
            )  # fmt: skip
        return rows.view(1, t, -1)

    def _run_native_external(
        self, plan: list[NativeLayer], rows: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
    ) -> torch.Tensor:
        """The fused halves of each layer around the attached cache's own attention."""
        assert self.external is not None
        arch = self.arch
        t, hd = rows.shape[0], arch.head_dim
        q_size, kv_size = arch.heads * hd, arch.kv_heads * hd
        fused = isinstance(self.external, NativeAttendingCache)
        for i, nl in enumerate(plan):
            state = self.external.native_state(i) if fused else None  # type: ignore[attr-defined]
            if state is not None:
                chunks, bits, res_k, res_v = state
                rows, rest_k, rest_v = torch.ops.ryzen_native.decode_layer_kv(
                    rows, nl.weights, nl.kinds, nl.groups, nl.norm1, nl.norm2, nl.eps1, nl.eps2, chunks, bits,
                    res_k, res_v, cos, sin, arch.heads, arch.kv_heads, nl.scale,
                )  # fmt: skip
                self.external.native_commit(i, rest_k, rest_v)  # type: ignore[attr-defined]
                continue
            qkv = torch.ops.ryzen_native.layer_qkv(
                rows, nl.weights, nl.kinds, nl.groups, nl.norm1, nl.eps1, cos, sin, arch.heads, arch.kv_heads
            )
            q = qkv[:, :q_size].view(t, arch.heads, hd).transpose(0, 1)[None]
            k = qkv[:, q_size : q_size + kv_size].view(t, arch.kv_heads, hd).transpose(0, 1)[None]
            v = qkv[:, q_size + kv_size :].view(t, arch.kv_heads, hd).transpose(0, 1)[None]
            attn = self.external.attend(i, q, k, v, nl.scale)
            attn_rows = attn[0].transpose(0, 1).reshape(t, q_size).contiguous()
            rows = torch.ops.ryzen_native.layer_out(rows, attn_rows, nl.weights, nl.kinds, nl.groups, nl.norm2, nl.eps2)
        return rows

    @overload
    def forward(self, ids: torch.Tensor, *, all_logits: bool = ..., features: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def forward(
        self, ids: torch.Tensor, *, all_logits: bool = ..., features: Literal[True]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, ids: torch.Tensor, *, all_logits: bool = False, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Append ``ids`` ``[1, T]`` at the current position; logits of the last position ``[1, V]``, or of all
        positions ``[1, T, V]`` with ``all_logits``. With ``features``, also the hidden states the LM head read (after
        the final norm, ``[1, T, d]`` or ``[1, d]`` like the logits): a feature draft drafts from them."""
        if self.k_cache is None and self.external is None:
            raise RuntimeError("StaticDecoder.forward before allocate()")
        pos, t = self.pos, ids.shape[1]
        end = pos + t
        if self.external is None and end > self.max_len:
            raise ConfigError(f"the static cache holds {self.max_len} positions; {pos} used, {t} more asked")
        positions = torch.arange(pos, end, device=ids.device)
        h = self._embed(ids, positions)
        rope = self._rope(h, positions)
        plan = self._native_for(t, end)
        if plan is not None:
            h = self._run_native(plan, h, rope, pos)
        elif self.external is not None:
            h = self._layers(h, rope, self._attend_external)
        else:
            mask = None
            if t > 1 and pos > 0:
                mask = torch.ones(t, end, dtype=torch.bool, device=ids.device).tril(diagonal=pos)
            h = self._layers(h, rope, functools.partial(self._attend_prefix, pos, mask))
        self.pos = end
        normed = _norm(self.arch.final_norm, h if all_logits else h[:, -1:])
        logits = self.arch.lm_head(normed)
        if not all_logits:
            logits, normed = logits[:, -1], normed[:, -1]
        return (logits, normed) if features else logits

    # -- compiled step (static shapes)

    def _step_static(self, ids: torch.Tensor, pos_t: torch.Tensor) -> torch.Tensor:
        h = self._embed(ids, pos_t)
        h = self._layers(h, self._rope(h, pos_t), functools.partial(self._attend_masked, pos_t))
        return self._head(h)[:, -1]

    def compile(self) -> float:
        """Compile the decode step and run it once on a scratch cache; returns the seconds it took."""
        started = time.perf_counter()
        self._compiled = torch.compile(self._step_static, mode=self.compile_mode, dynamic=False)
        self.allocate(min(self.limit(), 256))
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for p in range(2):  # the second call checks that no recompile is pending
                self._compiled(token, torch.tensor([p], device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
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


def attach_decoder(model: nn.Module, decoder: StaticDecoder) -> None:
    """Make ``decoder`` the one :func:`decoder_of` finds on ``model``."""
    attach(model, DECODER, decoder)


def decoder_of(model: nn.Module) -> StaticDecoder | None:
    """The lean decoder attached to ``model`` (a KernelOptimizer with ``decode="static"`` attaches one), or ``None``."""
    return attached(model, DECODER, StaticDecoder)
