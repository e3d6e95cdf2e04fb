"""Quantizers shared by the optimizers: the arithmetic only, no modules and no policy.

``kernels`` (weights of the decoder's linears) and ``embeddings`` (the token embedding and LM head) both store
int8/int4 matrices; DESIGN.md keeps optimizers from importing each other, so what they share lives here.

- int8, per row (output channel) symmetric: ``w ≈ q * scale``, ``|error| <= scale / 2``.
- int4, per group of ``group_size`` along a row, asymmetric: ``w ≈ q * scale + minimum``, ``|error| <= scale / 2``.
- ATen's CPU int4 kernel layout (``_convert_weight_to_int4pack_for_cpu``), decoded here so that rows can be gathered
  straight from it: an embedding lookup and the LM head's matmul then read one stored copy.
"""

from __future__ import annotations

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


# ATen's CPU int4 layout, read off the kernel (pack an index pattern and see where each nibble lands; the unit tests
# re-check it against the torch in use): rows in blocks of 64; inside a block, for each input column k, 32 bytes, byte j
# holding row j in its low nibble and row j + 32 in its high one. So a block is a [K, 32] byte matrix.
INT4_CPU_BLOCK_ROWS = 64


def pack_int4_cpu(q: torch.Tensor) -> torch.Tensor:
    """ATen's CPU int4 layout of ``q`` (values 0..15, ``[N, K]``, ``N % 64 == 0``): ``uint8 [N, K / 2]``."""
    n, k = q.shape
    if n % INT4_CPU_BLOCK_ROWS or k % 2:
        raise ConfigError(f"int4 CPU layout needs rows % {INT4_CPU_BLOCK_ROWS} == 0 and an even width, got {n}x{k}")
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def gather_int4_cpu(packed: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """Rows ``rows`` (any shape of indices) of a :func:`pack_int4_cpu` matrix, as values 0..15 ``[*rows.shape, K]``."""
    blocks = packed.view(-1, width, INT4_CPU_BLOCK_ROWS // 2)  # [N / 64, K, 32]
    flat = rows.reshape(-1)
    lane = flat % INT4_CPU_BLOCK_ROWS
    picked = blocks[flat // INT4_CPU_BLOCK_ROWS]  # [R, K, 32]
    byte = picked.gather(2, (lane % 32)[:, None, None].expand(-1, width, 1)).squeeze(2)  # [R, K]
    values = torch.where((lane >= 32)[:, None], byte >> 4, byte & 15)
    return values.reshape(*rows.shape, width)
