"""Quantizers shared by the optimizers: the arithmetic only, no modules and no policy.

``kernels`` (weights of the decoder's linears) and ``embeddings`` (the token embedding and LM head) both store
int8/int4 matrices; DESIGN.md keeps optimizers from importing each other, so what they share lives here.

- int8, per row (output channel) symmetric: ``w ≈ q * scale``, ``|error| <= scale / 2``.
- int4, per group of ``group_size`` along a row, asymmetric: ``w ≈ q * scale + minimum``, ``|error| <= scale / 2``.
- ATen's CPU int4 kernel layout (``_convert_weight_to_int4pack_for_cpu``), decoded here so that rows can be gathered
  straight from it: an embedding lookup and the LM head's matmul then read one stored copy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ryzen_opt.errors import ConfigError


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ≈ q * scale[:, None]`` with ``|error| <= scale / 2``.

    Returns ``(q int8 [N, K], scale float32 [N])``. An all-zero row gets scale 1 (its q is 0) rather than 0, so
    dequantizing never divides by zero and the row stays exactly zero.
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 along the input dimension: ``w ≈ q * scale + minimum`` per group.

    Returns ``(q uint8 in [0, 15] [N, K], scale float32 [N, K/g], minimum float32 [N, K/g])``;
    ``|error| <= scale / 2`` element-wise. ``K`` must be a multiple of ``group_size``.
    """
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ConfigError(f"int4: input dimension {k} is not a multiple of group_size {group_size}")
    g = w.reshape(n, k // group_size, group_size)
    lo = g.amin(dim=2)
    hi = g.amax(dim=2)
    scale = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    q = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    g = q.reshape(n, k // group_size, group_size).float()
    return (g * scale[..., None] + minimum[..., None]).reshape(n, k)


# ATen's CPU int4 layout differs with the CPU capability torch dispatches to. Read off the kernel (pack one-hot
# patterns, see where each nibble lands) rather than assumed:
# - AVX-512: rows in blocks of 64; inside a block, for each input column k, 32 bytes, byte j holding row j in its low
#   nibble and row j + 32 in its high one (a block is a [K, 32] byte matrix);
# - AVX2: blocks of 32 rows, [K, 16] bytes per block, byte j holding rows j and j + 16.
# Rows are padded to 64, a multiple of every block size seen.
INT4_CPU_BLOCK_ROWS = 64


@dataclass(frozen=True)
class Int4CpuLayout:
    """Where ATen's CPU int4 kernel puts row ``lane`` of a block: byte ``byte[lane]``, high nibble if ``high[lane]``."""

    block_rows: int
    byte: torch.Tensor  # [block_rows] int64
    high: torch.Tensor  # [block_rows] bool


@functools.cache
def int4_cpu_layout() -> Int4CpuLayout:
    """The layout of ``torch._convert_weight_to_int4pack_for_cpu`` in this process (probed once, then cached).

    Raises ``RuntimeError`` naming what was seen if the kernel packs some other way than ``[N/B, K, B/2]`` bytes
    with two rows per byte: a torch whose layout nobody has decoded must not be read as if it were known.
    """
    rows, width = INT4_CPU_BLOCK_ROWS, 2
    where = []
    for r in range(rows):
        q = torch.zeros(rows, width, dtype=torch.int32)
        q[r, 1] = 15
        flat = torch._convert_weight_to_int4pack_for_cpu(q, 1).view(-1)
        hit = (flat != 0).nonzero().flatten()
        if hit.numel() != 1 or int(flat[hit[0]]) not in (0x0F, 0xF0):
            raise RuntimeError(f"int4 CPU layout: row {r} packed to bytes {hit.tolist()}; not two rows per byte")
        where.append((int(hit[0]), int(flat[hit[0]]) == 0xF0))
    block = 2 * where[0][0]  # row 0, column 1 sits half a block's width in: [N/B, K=2, B/2] bytes
    if block < 2 or rows % block:
        raise RuntimeError(f"int4 CPU layout: row 0, column 1 landed at byte {where[0][0]}; no block size fits")
    byte, high = [], []
    for r, (index, hi) in enumerate(where):
        blk, within = divmod(index, block)
        col, b = divmod(within, block // 2)
        if blk != r // block or col != 1:
            raise RuntimeError(f"int4 CPU layout: row {r} landed at byte {index}; not [N/B, K, B/2] with B={block}")
        byte.append(b)
        high.append(hi)
    return Int4CpuLayout(block, torch.tensor(byte[:block]), torch.tensor(high[:block]))


def pack_int4_cpu(q: torch.Tensor) -> torch.Tensor:
    """ATen's CPU int4 layout of ``q`` (values 0..15, ``[N, K]``, ``N % 64 == 0``): ``uint8 [N, K / 2]``."""
    n, k = q.shape
    if n % INT4_CPU_BLOCK_ROWS or k % 2:
        raise ConfigError(f"int4 CPU layout needs rows % {INT4_CPU_BLOCK_ROWS} == 0 and an even width, got {n}x{k}")
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def gather_int4_cpu(packed: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """Rows ``rows`` (any shape of indices) of a :func:`pack_int4_cpu` matrix, as values 0..15 ``[*rows.shape, K]``."""
    layout = int4_cpu_layout()
    b = layout.block_rows
    blocks = packed.view(-1, width, b // 2)  # [N / B, K, B / 2]
    flat = rows.reshape(-1)
    lane = flat % b
    picked = blocks[flat // b]  # [R, K, B / 2]
    index = layout.byte.to(flat.device)[lane]
    byte = picked.gather(2, index[:, None, None].expand(-1, width, 1)).squeeze(2)  # [R, K]
    values = torch.where(layout.high.to(flat.device)[lane][:, None], byte >> 4, byte & 15)
    return values.reshape(*rows.shape, width)
