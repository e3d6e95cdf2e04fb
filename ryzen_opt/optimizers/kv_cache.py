"""KVCacheOptimizer: a KV cache that stores less, as a ``transformers`` ``Cache``.

Two strategies:

- **quantized** (KIVI, Liu et al. 2024): keys quantized *per channel* (each channel's min/max over a group of
  ``group_size`` tokens: key outliers live in fixed channels), values *per token* (groups of ``group_size`` along the
  head dimension), int8 or int4, with the most recent ``residual_length`` tokens kept in full precision. Tokens move
  from the residual window into quantized storage ``group_size`` at a time.
- **sink** (StreamingLLM, Xiao et al. 2023): the first ``sink_tokens`` plus the last ``window`` tokens; everything in
  between is dropped. **Lossy for long context by construction**: a fact that scrolled out of the window is gone.
  Keys keep the rotary positions they were written with (no re-rotation).

Two ways to attend, and what each costs in memory:

- ``model.generate(..., cache=cache)`` (``past_key_values=`` before transformers 5.24) runs HF's attention, which
  needs the whole cache as tensors: every ``update`` dequantizes all stored tokens into a full-precision copy (as
  HF's own ``QuantizedCache`` does). The stored bytes shrink; the peak during a step does not.
  :meth:`KVCacheOptimizer.memory_report` measures both.
- :meth:`QuantizedKVCache.attend` computes attention on the stored form, ``attend_chunk`` tokens at a time with an
  online softmax (as flash-decoding does across splits), so a step never holds more than one chunk dequantized. This
  is the path of ryzen-opt's own decode loop (:class:`ryzen_opt.runtime.StaticDecoder`, through ``attach_cache``).

Sizes are accounted from the tensors actually stored (codes, scales, zeros, the residual window), never from a formula.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from ryzen_opt.compat import cache_kwargs
from ryzen_opt.configs import ConfigMixin
from ryzen_opt.errors import ConfigError
from ryzen_opt.measure.memory import PeakMemory, cache_bytes
from ryzen_opt.ops import native
from ryzen_opt.ops.quant import pack_nibbles, unpack_nibbles

logger = logging.getLogger(__name__)

STRATEGIES = ("quantized", "sink")


@dataclass(frozen=True)
class KVCacheConfig(ConfigMixin):
    """What :class:`KVCacheOptimizer` builds. Frozen: one config, one kind of cache.

    Attributes:
        strategy: ``"quantized"`` (KIVI) or ``"sink"`` (StreamingLLM, lossy for long context).
        bits: 8 or 4 (quantized).
        group_size: tokens per key group (per-channel scales), and channels per value group (per-token scales).
        residual_length: recent tokens kept in full precision (quantized); at least ``group_size``.
        attend_chunk: tokens dequantized at a time by :meth:`QuantizedKVCache.attend` (bounds its peak memory).
        native_attend: on the CPU, attend with ``ryzen_native::kv_attend`` (scores and values read from the codes,
            no dequantized copy) where the native kernels run; ``False`` keeps the ATen ops (for comparison).
        sink_tokens, window: the sink strategy's kept prefix and recent window.
    """

    strategy: str = "quantized"
    bits: int = 8
    group_size: int = 64
    residual_length: int = 128
    attend_chunk: int = 512
    native_attend: bool = True
    sink_tokens: int = 4
    window: int = 1020

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"KVCacheConfig.strategy = {self.strategy!r}: choose 'quantized' or 'sink'")
        if self.bits not in (4, 8):
            raise ConfigError(f"KVCacheConfig.bits = {self.bits!r}: choose 8 or 4")
        if self.group_size < 2 or self.group_size & (self.group_size - 1):
            raise ConfigError(f"KVCacheConfig.group_size = {self.group_size!r}: a power of two >= 2")
        if self.residual_length < self.group_size:
            raise ConfigError(
                f"KVCacheConfig.residual_length = {self.residual_length} < group_size {self.group_size}: "
                "the full-precision window must hold at least one group"
            )
        if self.attend_chunk < self.group_size:
            raise ConfigError(f"KVCacheConfig.attend_chunk = {self.attend_chunk}: at least group_size")
        if self.sink_tokens < 0 or self.window < 1:
            raise ConfigError("KVCacheConfig: sink_tokens >= 0 and window >= 1")


# ----------------------------------------------------------------------------------------------- quantizer


def quantize_groups(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of ``x`` reduced over ``dim`` (size = the group): ``x ≈ q * scale + lo``.

    Returns ``(q uint8, scale, lo)`` with ``scale``/``lo`` keeping ``dim`` as size 1; ``|error| <= scale / 2``.
    """
    levels = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
    q = torch.clamp(torch.round((x - lo) / scale), 0, levels).to(torch.uint8)
    return q, scale, lo


@dataclass
class _Chunk:
    """``group_size`` tokens of one layer: keys per channel, values per token."""

    kq: torch.Tensor  # [B, H, G, D] (int8) or [B, H, G, D/2] (int4), uint8
    k_scale: torch.Tensor  # [B, H, 1, D]
    k_lo: torch.Tensor
    vq: torch.Tensor  # [B, H, G, D] or [B, H, G, D/2]
    v_scale: torch.Tensor  # [B, H, G, D/gv, 1]
    v_lo: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kq, self.k_scale, self.k_lo, self.vq, self.v_scale, self.v_lo)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


# Chunks merged into one native entry: a 2k-token cache then passes ``ryzen_native::kv_attend`` 4 entries of 6
# tensors instead of 32 (converting each tensor of the list costs about as much as attending to a few tokens).
_MERGE = 8


def _merge(chunks: list[_Chunk]) -> list[torch.Tensor]:
    """One native entry for ``chunks`` (batch 1): their tensors concatenated over tokens; each chunk's tensors become
    views of the entry, so the memory is held once."""
    entry = [torch.cat([c.tensors()[i][0] for c in chunks], dim=1) for i in range(6)]
    for n, c in enumerate(chunks):
        views = []
        for t, e in zip(c.tensors(), entry, strict=True):
            width = t.shape[2]
            views.append(e[None, :, n * width : (n + 1) * width])
        c.kq, c.k_scale, c.k_lo, c.vq, c.v_scale, c.v_lo = views
    return entry


class _GrowingLayer(CacheLayerMixin):
    """A cache layer that grows by concatenation, built on the documented ``CacheLayerMixin`` API alone.

    Not on ``DynamicLayer``: what its lazy initialisation sets changed between releases (5.23 set ``dtype``, 5.24 does
    not), so this layer sets every attribute it reads itself.
    """

    is_sliding = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # 4-D and empty, so that shapes and slicing hold from the first token.
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.is_initialized = True

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1  # grows without a limit

    def reset(self) -> None:
        # Dropped, not zeroed: the layer grows by concatenation and starts again from its lazy initialisation.
        self.keys = self.values = None
        self.is_initialized = False


class QuantizedLayer(_GrowingLayer):
    """One layer of a :class:`QuantizedKVCache`: quantized chunks plus a full-precision residual window."""

    is_croppable = True

    def __init__(self, bits: int, group_size: int, residual_length: int, *, native: bool = True) -> None:
        super().__init__()
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.native = native
        self.chunks: list[_Chunk] = []
        # The native kernel's argument, kept in step with ``chunks`` (append, pop, reset) so that a decode step does not
        # rebuild it: a merged entry of 6 tensors per _MERGE chunks (``_blocks``), then each later chunk's 6 tensors,
        # batch dimension dropped. Empty unless the batch is 1.
        self._blocks: list[list[torch.Tensor]] = []
        self._flat: list[torch.Tensor] = []
        self._flat_chunks = 0

    # -- storage

    def _quantize_chunk(self, k: torch.Tensor, v: torch.Tensor) -> _Chunk:
        kq, ks, kl = quantize_groups(k, dim=2, bits=self.bits)  # per channel, over the chunk's tokens
        d = v.shape[-1]
        gv = min(self.group_size, d)
        if d % gv:
            gv = d  # a head dim the group does not divide: one group per token
        vg = v.reshape(*v.shape[:-1], d // gv, gv)
        vq, vs, vl = quantize_groups(vg, dim=-1, bits=self.bits)  # per token
        vq = vq.reshape(v.shape)
        if self.bits == 4:
            kq, vq = pack_nibbles(kq), pack_nibbles(vq)
        return _Chunk(kq, ks, kl, vq, vs, vl)

    def _dequantize_chunk(self, c: _Chunk, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        kq = unpack_nibbles(c.kq) if self.bits == 4 else c.kq
        vq = unpack_nibbles(c.vq) if self.bits == 4 else c.vq
        k = kq.to(c.k_scale.dtype) * c.k_scale + c.k_lo
        vg = vq.reshape(*vq.shape[:-1], c.v_scale.shape[-2], -1).to(c.v_scale.dtype)
        v = (vg * c.v_scale + c.v_lo).reshape(vq.shape)
        return k.to(dtype), v.to(dtype)

    def _flush(self) -> None:
        """Move the oldest tokens beyond the residual window into quantized chunks, a group at a time."""
        g = self.group_size
        moved = False
        while self.keys.shape[-2] - g >= self.residual_length:
            chunk = self._quantize_chunk(self.keys[..., :g, :].float(), self.values[..., :g, :].float())
            self.chunks.append(chunk)
            if chunk.kq.shape[0] == 1 and len(self.chunks) == _MERGE * (len(self._blocks) + 1):
                self._blocks.append(_merge(self.chunks[-_MERGE:]))
            self.keys = self.keys[..., g:, :]
            self.values = self.values[..., g:, :]
            moved = True
        if moved:
            # A slice keeps its whole base alive (a 4k-token prefill's fp32 keys, behind a 128-token window): copy the
            # window out so that what is counted as stored is what is held.
            self.keys, self.values = self.keys.clone(), self.values.clone()
            self._native_entries()

    def _native_entries(self) -> None:
        """Rebuild the native argument from the merged blocks and the chunks after them."""
        del self._blocks[len(self.chunks) // _MERGE :]
        flat: list[torch.Tensor] = []
        if self.chunks and self.chunks[0].kq.shape[0] == 1:
            for block in self._blocks:
                flat += block
            for chunk in self.chunks[len(self._blocks) * _MERGE :]:
                flat += [t[0] for t in chunk.tensors()]
        self._flat, self._flat_chunks = flat, len(self.chunks) if flat else 0

    def stored_bytes(self) -> int:
        residual = 0 if not self.is_initialized else self.keys.numel() * self.keys.element_size() * 2
        return residual + sum(c.nbytes() for c in self.chunks)

    # -- HF Cache layer API

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append; return the whole cache as full-precision tensors (what HF's attention needs: a full copy)."""
        self._append(key_states, value_states)
        parts = [self._dequantize_chunk(c, self.dtype) for c in self.chunks]
        keys = torch.cat([p[0] for p in parts] + [self.keys], dim=-2)
        values = torch.cat([p[1] for p in parts] + [self.values], dim=-2)
        self._flush()
        return keys, values

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return len(self.chunks) * self.group_size + self.keys.shape[-2]

    def reset(self) -> None:
        self.chunks = []
        self._native_entries()
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (HF's convention: a count <= 0; a positive one is an error)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(0, self.get_seq_length() + tokens_to_remove)
        # Cropping into quantized storage brings those chunks back to the residual (dequantized: lossy once).
        while len(self.chunks) * self.group_size > keep:
            k, v = self._dequantize_chunk(self.chunks.pop(), self.dtype)
            self.keys = torch.cat([k, self.keys], dim=-2)
            self.values = torch.cat([v, self.values], dim=-2)
        cut = keep - len(self.chunks) * self.group_size
        self.keys = self.keys[..., :cut, :].clone()
        self.values = self.values[..., :cut, :].clone()
        self._native_entries()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("QuantizedKVCache supports neither beam search nor batch expansion")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("QuantizedKVCache does not support beam search; use num_beams=1")

    # -- attention on the stored form

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk_tokens: int
    ) -> torch.Tensor:
        """Attention of ``q`` ``[B, Hq, T, D]`` over the stored tokens plus the new ``k``/``v`` (causal among the
        new ones), then append them. Quantized tokens are dequantized ``chunk_tokens`` at a time (online softmax)."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        if self._native_ok(q) and self.chunks:
            return self._attend_native(q, k, v, scale)
        if len(self.chunks) * self.group_size <= chunk_tokens:
            return self._attend_whole(q, k, v, scale)
        b, hq, t, d = q.shape
        hk = k.shape[1]
        group = hq // hk
        qg = q.reshape(b, hk, group * t, d).float() * scale  # queries of one kv head side by side
        m = torch.full((b, hk, group * t, 1), -math.inf, device=q.device)
        denom = torch.zeros_like(m)
        acc = torch.zeros(b, hk, group * t, v.shape[-1], device=q.device)

        def absorb(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> None:
            nonlocal m, denom, acc
            s = qg @ keys.float().transpose(-1, -2)
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            correction = torch.exp(m - m_new)
            denom = denom * correction + p.sum(-1, keepdim=True)
            acc = acc * correction + p @ values.float()
            m = m_new

        per_call = max(1, chunk_tokens // self.group_size)
        for start in range(0, len(self.chunks), per_call):
            parts = [self._dequantize_chunk(c, torch.float32) for c in self.chunks[start : start + per_call]]
            absorb(torch.cat([p[0] for p in parts], -2), torch.cat([p[1] for p in parts], -2), None)
        if self.keys.shape[-2]:
            absorb(self.keys, self.values, None)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        absorb(k, v, causal.repeat(group, 1) if t > 1 else None)
        out = (acc / denom).reshape(b, hq, t, -1).to(q.dtype)
        self.keys = torch.cat([self.keys, k], dim=-2)
        self.values = torch.cat([self.values, v], dim=-2)
        self._flush()
        return out

    def _native_ok(self, q: torch.Tensor) -> bool:
        return (
            self.native
            and q.shape[0] == 1
            and q.dtype == torch.float32
            and q.device.type == "cpu"
            and self.dtype == torch.float32
            and not torch.is_grad_enabled()
            and self._flat_chunks == len(self.chunks)
            and native.preferred()
        )

    def native_state(self) -> tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor] | None:
        """What ``ryzen_native::decode_layer_kv`` reads for this layer (chunks, bits, residual keys and values
        ``[H, R, D]``), or ``None`` when the layer must attend through :meth:`attend` (not yet initialised, batch > 1,
        not fp32 on the CPU, native kernels off)."""
        if not self.is_initialized or self.keys.shape[0] != 1 or not self._native_ok(self.keys):
            return None
        return self._flat, self.bits, self.keys[0], self.values[0]

    def native_commit(self, rest_k: torch.Tensor, rest_v: torch.Tensor) -> None:
        """Keep the residual window the native layer grew (``[H, R + T, D]``), quantizing what overflows it."""
        self.keys, self.values = rest_k[None], rest_v[None]
        self._flush()

    def _attend_native(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """``ryzen_native::kv_attend``: scores and values straight from the quantized codes (no dequantized copy,
        one call per layer), the residual window and the new tokens in fp32."""
        rest_k = torch.cat([self.keys, k], dim=-2)[0].contiguous()
        rest_v = torch.cat([self.values, v], dim=-2)[0].contiguous()
        out = torch.ops.ryzen_native.kv_attend(q[0].contiguous(), self._flat, self.bits, rest_k, rest_v, scale)
        self.keys, self.values = rest_k[None], rest_v[None]
        self._flush()
        return out[None]

    def _attend_whole(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """A cache that fits in one chunk: dequantize it whole (at most ``attend_chunk`` tokens, the same bound as
        the chunked path) and run one SDPA: at short contexts the online softmax's dozen small ops per layer cost
        more than the attention itself."""
        parts = [self._dequantize_chunk(c, k.dtype) for c in self.chunks]
        keys = torch.cat([p[0] for p in parts] + [self.keys, k], dim=-2)
        values = torch.cat([p[1] for p in parts] + [self.values, v], dim=-2)
        t, n = q.shape[2], keys.shape[2]
        mask = None if t == 1 else torch.ones(t, n, dtype=torch.bool, device=q.device).tril(diagonal=n - t)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        self.keys = torch.cat([self.keys, k], dim=-2)
        self.values = torch.cat([self.values, v], dim=-2)
        self._flush()
        return out


class QuantizedKVCache(Cache):
    """KIVI int8/int4 KV cache (module docstring). A ``transformers`` ``Cache``: ``generate`` accepts it."""

    def __init__(self, num_layers: int, config: KVCacheConfig) -> None:
        super().__init__(
            layers=[
                QuantizedLayer(config.bits, config.group_size, config.residual_length, native=config.native_attend)
                for _ in range(num_layers)
            ]
        )
        self.config = config

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self.layers)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention over layer ``layer_idx``'s stored tokens and the new ones; appends the new ones."""
        return self.layers[layer_idx].attend(q, k, v, scale, self.config.attend_chunk)

    def native_state(self, layer_idx: int) -> tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor] | None:
        """:meth:`QuantizedLayer.native_state` of layer ``layer_idx`` (the runtime's :class:`NativeAttendingCache`)."""
        return self.layers[layer_idx].native_state()

    def native_commit(self, layer_idx: int, rest_k: torch.Tensor, rest_v: torch.Tensor) -> None:
        """:meth:`QuantizedLayer.native_commit` of layer ``layer_idx``."""
        self.layers[layer_idx].native_commit(rest_k, rest_v)


class SinkLayer(_GrowingLayer):
    """The first ``sink`` tokens and the last ``window`` (StreamingLLM). Lossy: the middle is dropped."""

    is_croppable = False

    def __init__(self, sink: int, window: int) -> None:
        super().__init__()
        self.sink, self.window = sink, window
        self.seen = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._append(key_states, value_states)
        keys, values = self.keys, self.values
        self.seen += key_states.shape[-2]
        if self.keys.shape[-2] > self.sink + self.window:
            self.keys = torch.cat([self.keys[..., : self.sink, :], self.keys[..., -self.window :, :]], dim=-2)
            self.values = torch.cat([self.values[..., : self.sink, :], self.values[..., -self.window :, :]], dim=-2)
        return keys, values  # this step still attends to everything it was handed

    def get_seq_length(self) -> int:
        return self.seen  # positions keep counting: RoPE and cache_position stay absolute

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if not self.is_initialized else self.keys.shape[-2]
        return stored + query_length, max(0, self.seen - stored)

    def reset(self) -> None:
        self.seen = 0
        super().reset()

    def stored_bytes(self) -> int:
        return 0 if not self.is_initialized else self.keys.numel() * self.keys.element_size() * 2


class SinkKVCache(Cache):
    """Attention sinks plus a recent window (StreamingLLM): bounded memory, lossy beyond the window."""

    def __init__(self, num_layers: int, config: KVCacheConfig) -> None:
        super().__init__(layers=[SinkLayer(config.sink_tokens, config.window) for _ in range(num_layers)])
        self.config = config

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self.layers)


# ------------------------------------------------------------------------------------------- peak memory


# ------------------------------------------------------------------------------------------- optimizer


def _num_layers(model: Any) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if not layers:
        raise ConfigError(f"{type(model).__name__}: its config names no number of layers; is it a decoder LM?")
    return int(layers)


class KVCacheOptimizer:
    """Build smaller KV caches for a model. ``make_cache`` is the verb; ``memory_report`` measures one.

    >>> cache = KVCacheOptimizer(KVCacheConfig(bits=8)).make_cache(model, max_len=2048)      # doctest: +SKIP
    >>> model.generate(ids, cache=cache, max_new_tokens=64)                       # doctest: +SKIP
    """

    def __init__(self, config: KVCacheConfig | None = None) -> None:
        self.config = config or KVCacheConfig()
        if not isinstance(self.config, KVCacheConfig):
            raise ConfigError(f"KVCacheOptimizer takes a KVCacheConfig, got {type(self.config).__name__}")

    def make_cache(self, model: Any, max_len: int | None = None) -> Cache:
        """A fresh cache for ``model``. ``max_len`` is checked against the model's positions (the cache itself
        grows as needed: a quantized cache allocates per group, not up front)."""
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if max_len is not None and limit is not None and max_len > limit:
            raise ConfigError(f"max_len {max_len} exceeds the model's {limit} positions")
        layers = _num_layers(model)
        if self.config.strategy == "sink":
            return SinkKVCache(layers, self.config)
        return QuantizedKVCache(layers, self.config)

    @torch.no_grad()
    def memory_report(self, model: Any, context_len: int, *, decode_steps: int = 16, seed: int = 0) -> dict[str, Any]:
        """Stored KV bytes of the baseline (HF ``DynamicCache``, model dtype) and of this cache after a
        ``context_len``-token prefill, the reduction, and the measured peak memory of ``decode_steps`` HF decode steps
        with each (the quantized cache's HF path dequantizes everything every step: the peak shows it)."""
        device = next(model.parameters()).device
        vocab = model.config.vocab_size
        ids = torch.randint(1, vocab, (1, context_len), generator=torch.Generator().manual_seed(seed)).to(device)
        result: dict[str, Any] = {"context_len": context_len, "config": self.config.to_dict(), "device": str(device)}
        for name in ("baseline", "optimized"):
            with PeakMemory(device) as peak:
                cache = DynamicCache(config=model.config) if name == "baseline" else self.make_cache(model)
                out = model(ids, **cache_kwargs(cache), use_cache=True)
                stored = cache_bytes(cache)
                token = out.logits[:, -1:].argmax(-1)
                del out  # the prefill's [1, T, vocab] logits are not decode memory
                peak.mark()
                for _ in range(decode_steps):
                    out = model(token, **cache_kwargs(cache), use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
                del cache, out
            result[name] = {
                "cache": type(self.make_cache(model)).__name__ if name == "optimized" else "DynamicCache",
                "stored_bytes": stored,
                "decode_peak_bytes": peak.peak_after_mark,
                "rss_delta_bytes": peak.rss_delta,
            }
        result["reduction"] = 1.0 - result["optimized"]["stored_bytes"] / result["baseline"]["stored_bytes"]
        base_peak, opt_peak = result["baseline"]["decode_peak_bytes"], result["optimized"]["decode_peak_bytes"]
        result["peak_reduction"] = 1.0 - opt_peak / base_peak if base_peak > 0 else None
        return result


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention of new queries over ``k``/``v`` whose last ``T`` entries are the queries' own (tests)."""
    t, n = q.shape[2], k.shape[2]
    mask = torch.ones(t, n, dtype=torch.bool, device=q.device).tril(diagonal=n - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# ------------------------------------------------------------------------------------------ retrieval probe
