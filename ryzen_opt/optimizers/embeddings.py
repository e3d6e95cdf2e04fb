"""EmbeddingCompressor: the token embedding and the LM head, stored smaller and used without being rebuilt.

In small models the embedding and the LM head are 20-30% of the parameters (the zoo target: 1.0M of 6.8M; MiniLM's
word embeddings: over half), and the LM head is read in full for every decoded token. So both are first-class
targets here:

- **int8**: per-row symmetric (a row is one token's vector), fp32 scale per row. ~3.9x smaller at width 256.
- **int4**: per-row groups of ``group_size`` along the width, asymmetric (scale and zero per group, bf16, as ATen's
  kernel takes them). On the CPU the nibbles are stored once, in ATen's int4 kernel layout: the LM head's matmul is
  that kernel, and an embedding lookup gathers its rows straight out of the same bytes (``quant.gather_int4_cpu``).
- **lowrank**: truncated SVD ``W ≈ A @ B`` (``A = U_r S_r``, ``B = V_r^T``), with the rank chosen to meet
  ``target_ratio`` (or given).

Rules that hold for every method:

- **Tied weights are compressed once**, and the embedding and the LM head share that one table. Never untie first:
  that would grow the model before shrinking it.
- **Every stored tensor counts** (scales, zeros, padding, factors); bytes of a tensor shared by two modules count once.
- **No full-size rebuild on the hot path**: a lookup dequantizes only the rows asked for; the LM head runs a kernel on
  the compressed storage (int8: :mod:`ryzen_opt.ops.native`'s fp32-activation kernel, or ``_weight_int8pack_mm`` where
  it
  cannot be built; int4: ``_weight_int4pack_mm_for_cpu``, with bf16 activations; low rank: two thin matmuls).
  ``dequantize()`` exists for measurement, never for ``forward``.
  On CUDA/ROCm the int8/int4 LM head dequantizes in the matmul (fused under ``torch.compile``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ryzen_opt.configs import ConfigMixin
from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.ops import native
from ryzen_opt.ops.quant import (
    INT4_CPU_BLOCK_ROWS,
    gather_int4_cpu,
    pack_int4_cpu,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)
from ryzen_opt.runtime import state

logger = logging.getLogger(__name__)

METHODS = ("int8", "int4", "lowrank")


class UnsupportedEmbeddingError(RyzenOptError, TypeError):
    """The model's embedding or LM head is not a module this compressor knows how to replace."""


@dataclass(frozen=True)
class CompressionConfig(ConfigMixin):
    """What :class:`EmbeddingCompressor` applies. Frozen: one config describes one compressed model.

    Attributes:
        method: ``"int8"``, ``"int4"`` or ``"lowrank"`` (module docstring).
        group_size: int4 group along the embedding width; a width it does not divide is zero-padded (counted).
        target_ratio: lowrank: the rank is the largest that keeps the ratio at least this (default 2.0).
        rank: lowrank: an explicit rank instead of ``target_ratio``.
        embedding: compress the input embedding.
        lm_head: compress the LM head (if the model has one and it is not tied to the embedding).
    """

    method: str = "int8"
    group_size: int = 64
    target_ratio: float | None = None
    rank: int | None = None
    embedding: bool = True
    lm_head: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"CompressionConfig.method = {self.method!r}: choose one of {', '.join(map(repr, METHODS))}"
            )
        if self.group_size not in (16, 32, 64, 128, 256):
            raise ConfigError(f"CompressionConfig.group_size = {self.group_size!r}: choose 16, 32, 64, 128 or 256")
        if self.target_ratio is not None and not self.target_ratio > 1.0:
            raise ConfigError(f"CompressionConfig.target_ratio = {self.target_ratio!r}: must be > 1")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"CompressionConfig.rank = {self.rank!r}: must be >= 1")
        if self.method != "lowrank" and (self.rank is not None or self.target_ratio is not None):
            raise ConfigError("CompressionConfig.rank / target_ratio apply to method='lowrank' only")
        if not (self.embedding or self.lm_head):
            raise ConfigError("CompressionConfig: embedding and lm_head are both False: nothing to compress")


def sqnr_db(original: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, ``10 log10(|W|^2 / |W - W'|^2)`` in dB (inf when exact)."""
    noise = (original.float() - approx.float()).pow(2).sum().item()
    signal = original.float().pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


# ------------------------------------------------------------------------------------------------- tables


class CompressedTable(nn.Module):
    """A compressed ``[rows, width]`` matrix: ``lookup(ids)`` gives rows, ``matmul(h)`` gives ``h @ W^T``."""

    rows: int
    width: int
    method: str

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matmul(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The whole matrix in fp32: for measuring error, never used by ``forward``."""
        raise NotImplementedError

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"rows={self.rows}, width={self.width}, method={self.method}, bytes={self.stored_bytes()}"


class Int8Table(CompressedTable):
    """Per-row symmetric int8 with an fp32 scale per row; the int8 rows are what both lookup and matmul read."""

    method = "int8"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.rows, self.width = weight.shape
        q, scale = quantize_int8(weight)
        self.register_buffer("qweight", q.to(weight.device))
        self.register_buffer("scale", scale.to(weight.device))
        self.native = weight.device.type == "cpu" and native.preferred()

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (F.embedding(ids, self.qweight).to(dtype) * self.scale[ids, None].to(dtype)).to(dtype)

    def matmul(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        if self.native:
            # ryzen_opt.ops.native's weight-only kernel: fp32 activations, the exact dequantized product, on the stored
            # rows (the KernelOptimizer's int8 kernel, so a compressed head is as fast as its own).
            y = torch.ops.ryzen_native.w8_linear(x.float(), self.qweight, self.scale)
        elif x.device.type == "cpu":
            # ATen's weight-only GEMV on the stored rows; bf16 activations are what it takes (its fp32 path is ~30x
            # slower).
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scale.to(torch.bfloat16))
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y.to(h.dtype).reshape(*shape[:-1], self.rows)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


class Int4Table(CompressedTable):
    """Group-wise asymmetric int4. On the CPU the nibbles are kept once, in ATen's int4 kernel layout (rows padded to
    a multiple of 64 and the width to a multiple of ``group_size``, both counted); elsewhere, two plain nibbles a byte.
    Scales and zeros: bf16 ``[width / g, rows, 2]`` in ATen's convention ``w = (q - 8) * scale + zero``."""

    method = "int4"

    def __init__(self, weight: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.rows, self.width = weight.shape
        self.group_size = group_size
        device = weight.device
        self.layout = "cpu-int4pack" if device.type == "cpu" else "plain"
        padded_rows = _round_up(self.rows, INT4_CPU_BLOCK_ROWS) if self.layout == "cpu-int4pack" else self.rows
        padded_width = _round_up(self.width, group_size)
        w = torch.zeros(padded_rows, padded_width, dtype=torch.float32, device=device)
        w[: self.rows, : self.width] = weight.detach().float()
        q, scale, lo = quantize_int4(w, group_size)
        self.padded_rows, self.padded_width = padded_rows, padded_width
        zero = lo + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16))
        if self.layout == "cpu-int4pack":
            self.register_buffer("qweight", pack_int4_cpu(q))
        else:
            self.register_buffer("qweight", pack_nibbles(q))

    def _values(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layout == "cpu-int4pack":
            return gather_int4_cpu(self.qweight, ids, self.padded_width)
        return unpack_nibbles(self.qweight[ids])

    def _dequant_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = self._values(ids).to(torch.float32)
        sz = self.scales_and_zeros.float()  # [G, rows, 2]
        scale = sz[:, :, 0].t()[ids]  # [*ids, G]
        zero = sz[:, :, 1].t()[ids]
        g = self.group_size
        q = q.reshape(*ids.shape, -1, g)
        w = (q - 8.0) * scale[..., None] + zero[..., None]
        return w.reshape(*ids.shape, self.padded_width)[..., : self.width].to(dtype)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._dequant_rows(ids, dtype)

    def matmul(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        if self.padded_width != self.width:
            x = F.pad(x, (0, self.padded_width - self.width))
        if self.layout == "cpu-int4pack":
            y = torch._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), self.qweight, self.group_size, self.scales_and_zeros
            )
        else:  # dequantize in the matmul: inductor fuses it under torch.compile
            y = F.linear(x, self._dequant_rows(torch.arange(self.rows, device=x.device), x.dtype).to(x.dtype))
        return y[:, : self.rows].to(h.dtype).reshape(*shape[:-1], self.rows)

    def dequantize(self) -> torch.Tensor:
        return self._dequant_rows(torch.arange(self.rows, device=self.qweight.device), torch.float32)


class LowRankTable(CompressedTable):
    """``W ≈ A @ B`` by truncated SVD: ``A = U_r S_r`` ``[rows, r]``, ``B = V_r^T`` ``[r, width]``, fp32."""

    method = "lowrank"

    def __init__(self, weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        self.rows, self.width = weight.shape
        if not 1 <= rank <= min(self.rows, self.width):
            raise ConfigError(
                f"lowrank rank {rank} is outside [1, {min(self.rows, self.width)}] for {self.rows}x{self.width}"
            )
        self.rank = rank
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        self.register_buffer("a", (u[:, :rank] * s[:rank]).contiguous())
        self.register_buffer("b", vh[:rank].contiguous())

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (F.embedding(ids, self.a) @ self.b).to(dtype)

    def matmul(self, h: torch.Tensor) -> torch.Tensor:
        return ((h.float() @ self.b.t()) @ self.a.t()).to(h.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.a @ self.b


def _round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


def lowrank_rank(rows: int, width: int, target_ratio: float) -> int:
    """The largest rank whose factors (fp32) are at most ``1 / target_ratio`` of the fp32 matrix."""
    rank = int(rows * width / (target_ratio * (rows + width)))
    if rank < 1:
        raise ConfigError(f"target_ratio {target_ratio} leaves no rank for a {rows}x{width} matrix")
    return min(rank, rows, width)


# ------------------------------------------------------------------------------------------------ modules


class CompressedEmbedding(nn.Module):
    """Stands where ``nn.Embedding`` stood: ``forward(ids)`` dequantizes only the rows asked for."""

    def __init__(self, table: CompressedTable, dtype: torch.dtype, padding_idx: int | None = None) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = table.rows, table.width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.lookup(ids, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, method={self.table.method}"


class CompressedLMHead(nn.Module):
    """Stands where the LM head ``nn.Linear`` stood: ``forward(h) = h @ W^T (+ bias)`` on the compressed storage."""

    def __init__(self, table: CompressedTable, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.table = table
        self.in_features, self.out_features = table.width, table.rows
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.table.matmul(h)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.table.method}"


# --------------------------------------------------------------------------------------------- compressor


class EmbeddingCompressor:
    """Apply a :class:`CompressionConfig` to a model's token embedding and LM head. ``apply_to_model`` is the verb.

    >>> compressor = EmbeddingCompressor(CompressionConfig(method="int8"))  # doctest: +SKIP
    >>> model = compressor.apply_to_model(model)                             # doctest: +SKIP
    >>> compressor.compression_report()["ratio"]                             # doctest: +SKIP
    """

    def __init__(self, config: CompressionConfig | None = None) -> None:
        self.config = config or CompressionConfig()
        if not isinstance(self.config, CompressionConfig):
            raise ConfigError(f"EmbeddingCompressor takes a CompressionConfig, got {type(self.config).__name__}")
        self._report: dict[str, Any] | None = None

    def _table(self, weight: torch.Tensor) -> CompressedTable:
        c = self.config
        if c.method == "int8":
            return Int8Table(weight)
        if c.method == "int4":
            return Int4Table(weight, c.group_size)
        rows, width = weight.shape
        rank = c.rank if c.rank is not None else lowrank_rank(rows, width, c.target_ratio or 2.0)
        return LowRankTable(weight, rank)

    @torch.no_grad()
    def apply_to_model(self, model: Any) -> Any:
        """Compress ``model``'s input embedding and LM head in place (tied: one table for both); return the model.

        Raises:
            UnsupportedEmbeddingError: the embedding is not an ``nn.Embedding``, or the LM head not an ``nn.Linear``.
            ConfigError: already compressed, or the config cannot apply to these shapes.
        """
        embedding, head = _tables_of(model)
        started = time.perf_counter()
        tied = head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
        tensors: list[dict[str, Any]] = []
        shared: CompressedTable | None = None
        if self.config.embedding or (tied and self.config.lm_head):
            shared = self._table(embedding.weight)
            tensors.append(_tensor_record("embedding" + ("+lm_head (tied)" if tied else ""), embedding.weight, shared))
            if self.config.embedding:
                model.set_input_embeddings(
                    CompressedEmbedding(shared, embedding.weight.dtype, getattr(embedding, "padding_idx", None))
                )
        if head is not None and self.config.lm_head:
            if tied:
                assert shared is not None
                table = shared  # one table, read by both: never untie
            else:
                table = self._table(head.weight)
                tensors.append(_tensor_record("lm_head", head.weight, table))
            model.set_output_embeddings(CompressedLMHead(table, head.bias))
        original_bytes = sum(t["original_bytes"] for t in tensors)
        compressed = sum(t["compressed_bytes"] for t in tensors)
        if tied and not self.config.embedding:
            # The embedding keeps its fp32 weight and the head reads the compressed copy: both are stored.
            original_bytes = embedding.weight.numel() * embedding.weight.element_size()
            tensors[0]["name"] = "lm_head (tied; the embedding keeps its weight)"
            compressed += original_bytes
        self._report = {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "tied": tied,
            "original_bytes": original_bytes,
            "compressed_bytes": compressed,
            "ratio": original_bytes / compressed,
            "tensors": tensors,
            "apply_seconds": time.perf_counter() - started,
        }
        state.attach(model, state.EMBEDDINGS, self._report)
        logger.info(
            "EmbeddingCompressor %s: %.2f MB -> %.2f MB (%.2fx)%s",
            self.config.method,
            original_bytes / 1e6,
            compressed / 1e6,
            original_bytes / compressed,
            ", tied: one table" if tied else "",
        )
        return model

    def compression_report(self) -> dict[str, Any]:
        """Original bytes, compressed bytes (every stored tensor), the ratio, and per-tensor SQNR (dB)."""
        if self._report is None:
            raise ConfigError("compression_report() before apply_to_model(): nothing was compressed yet")
        return dict(self._report)


def _tables_of(model: Any) -> tuple[nn.Embedding, nn.Linear | None]:
    """The input embedding and the LM head (``None`` if the model has none), refused before anything changes when
    either is not the plain module this compressor replaces."""
    if embedding_report(model) is not None:
        raise ConfigError("this model's embeddings are already compressed; apply to a fresh copy")
    get_in = getattr(model, "get_input_embeddings", None)
    if get_in is None:
        raise UnsupportedEmbeddingError(
            f"{type(model).__name__} has no get_input_embeddings(): not a transformers model"
        )
    embedding = get_in()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out is not None else None
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedEmbeddingError(
            f"input embedding is {type(embedding).__name__}, not nn.Embedding (already replaced?)"
        )
    if head is not None and not isinstance(head, nn.Linear):
        raise UnsupportedEmbeddingError(
            f"LM head is {type(head).__name__}, not nn.Linear: apply the EmbeddingCompressor first"
        )
    return embedding, head


def _tensor_record(name: str, weight: torch.Tensor, table: CompressedTable) -> dict[str, Any]:
    """One row of the compression report: sizes before and after, and the SQNR of what a lookup returns."""
    size = weight.numel() * weight.element_size()
    return {
        "name": name,
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "original_bytes": size,
        "compressed_bytes": table.stored_bytes(),
        "ratio": size / table.stored_bytes(),
        "sqnr_db": sqnr_db(weight, table.dequantize()),
    }


def embedding_report(model: Any) -> dict[str, Any] | None:
    """The :meth:`EmbeddingCompressor.compression_report` of the compressor that compressed ``model``, or ``None``."""
    report = state.attached(model, state.EMBEDDINGS, dict)
    return None if report is None else dict(report)
