"""Quantizers shared by the optimizers: the arithmetic only, no modules and no policy.

``kernels`` (weights of the decoder's linears) and ``embeddings`` (the token embedding and LM head) both store
int8/int4 matrices; optimizers never import each other (docs/definitions.md, "Structure"), so what they share lives
here.

- int8, per row (output channel) symmetric: ``w ≈ q * scale``, ``|error| <= scale / 2``.
- int4, per group of ``group_size`` along a row, asymmetric: ``w ≈ q * scale + minimum``, ``|error| <= scale / 2``.
- GPTQ int4 (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers"): the same group-wise format, but columns are quantized one at a time and each one's rounding error
  is pushed onto the columns not yet quantized, weighted by the inverse Hessian ``H = X^T X`` of the layer's inputs on
  calibration text, so that the layer's *outputs* move least. Needs calibration; round-to-nearest does not.
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


def gptq_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ into :func:`quantize_int4`'s format: ``(q uint8 [N, K], scale [N, K/g], minimum [N, K/g])``.

    ``hessian`` is ``X^T X`` (``[K, K]``, any positive scale) of the layer's inputs ``X`` on calibration text. Follows
    the reference implementation (IST-DASLab/gptq, ``gptq.py``): lazy batched updates over blocks of ``block``
    columns, the Cholesky factor of the inverse Hessian, ``damp`` times its mean diagonal added for stability.
    ``act_order`` quantizes the columns with the largest input energy first (while the most columns are left to
    absorb their error) with *static groups*: each group's min/max is fixed from the original weights beforehand,
    so groups stay contiguous in the stored form. Without it, columns go in natural order and each group's min/max
    is taken from the weights as updated when its first column is reached.

    An input channel that never fired (zero diagonal) gets weight 0, as in the reference. When the weights already
    sit on a 4-bit grid of these groups, every rounding error is zero and the result equals round-to-nearest.
    """
    w = weight.detach().float().clone()
    n, k = w.shape
    if k % group_size:
        raise ConfigError(f"int4: input dimension {k} is not a multiple of group_size {group_size}")
    if hessian.shape != (k, k):
        raise ConfigError(f"GPTQ: Hessian of shape {tuple(hessian.shape)} for a weight with {k} inputs")
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = k // group_size
    scales = torch.empty(n, groups)
    mins = torch.empty(n, groups)
    static = act_order
    if static:
        g = w.reshape(n, groups, group_size)
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scales, mins = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi)), lo
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(k, dtype=h.dtype) * (damp * torch.diag(h).mean())
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except RuntimeError as exc:  # not positive definite even damped: the calibration is degenerate
        raise ConfigError(f"GPTQ: the calibration Hessian is not positive definite ({exc}); give more text") from exc
    block = max(block, group_size)
    q = torch.zeros(n, k, dtype=torch.uint8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // group_size
            if not static and col % group_size == 0:
                part = w1[:, i : i + group_size]
                lo, hi = part.amin(dim=1), part.amax(dim=1)
                scales[:, grp] = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
                mins[:, grp] = lo
            scale, lo = scales[:, grp], mins[:, grp]
            codes = torch.clamp(torch.round((w1[:, i] - lo) / scale), 0, 15)
            q[:, col] = codes.to(torch.uint8)
            err = (w1[:, i] - (codes * scale + lo)) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q, scales, mins


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    g = q.reshape(n, k // group_size, group_size).float()
    return (g * scale[..., None] + minimum[..., None]).reshape(n, k)


# -- int4 nibble layouts: the one definition of each (the layers, the KV cache and the native kernel share them) --


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Int4 codes (values 0..15, an even last dimension) two a byte: element ``2i`` in the low nibble of byte ``i``,
    element ``2i + 1`` in its high one. ``uint8``, half the last dimension."""
    q = q.to(torch.uint8)
    return q[..., ::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: values 0..15, ``uint8``, twice the last dimension."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


# The native kernels' weight layout (ryzen_opt/ops/csrc, docs/native.md): panels of PANEL output rows. Inside a panel
# the
# inputs come in steps of 4 (int8) or 8 (int4), and each step holds those inputs of the panel's 16 rows side by side:
# 64 bytes, one 32-bit lane a row. One vector load then feeds 16 outputs at once (vpdpbusd against 4 activations
# broadcast), so no horizontal sums are left, and every row of activations is computed from the weights read once.
PANEL = 16


def _panel_rows(n: int) -> int:
    return -(-n // PANEL) * PANEL


def pack_int8_panels(q: torch.Tensor) -> torch.Tensor:
    """int8 ``q [N, K]`` (``K % 4 == 0``) as ``uint8 [ceil(N/16), K/4, 64]``: byte ``4 j + i`` of step ``s`` in
    panel ``p`` is row ``16 p + j``, input ``4 s + i``, stored as ``q + 128`` (the unsigned operand of vpdpbusd; the
    kernels subtract ``128 * sum(x)``). Rows past ``N`` are zero weights (stored 128)."""
    n, k = q.shape
    padded = torch.zeros(_panel_rows(n), k, dtype=torch.int16)
    padded[:n] = q.to(torch.int16)
    u = (padded + 128).to(torch.uint8)
    return u.view(-1, PANEL, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(-1, k // 4, 4 * PANEL)


def unpack_int8_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int8_panels`: int8 ``[n, K]``."""
    p, steps, _ = panels.shape
    rows = panels.view(p, steps, PANEL, 4).permute(0, 2, 1, 3).reshape(p * PANEL, steps * 4)
    return (rows[:n].to(torch.int16) - 128).to(torch.int8)


def pack_int4_panels(q: torch.Tensor) -> torch.Tensor:
    """int4 codes ``q [N, K]`` (values 0..15, ``K % 8 == 0``) as ``uint8 [ceil(N/16), K/8, 64]``: byte ``4 j + i``
    of step ``s`` in panel ``p`` holds row ``16 p + j``'s input ``8 s + i`` in its low nibble and input
    ``8 s + 4 + i`` in its high one. Rows past ``N`` are zero codes."""
    n, k = q.shape
    padded = torch.zeros(_panel_rows(n), k, dtype=torch.uint8)
    padded[:n] = q.to(torch.uint8)
    v = padded.view(-1, PANEL, k // 8, 2, 4)
    b = v[:, :, :, 0] | (v[:, :, :, 1] << 4)  # [P, 16, K/8, 4]
    return b.permute(0, 2, 1, 3).contiguous().view(-1, k // 8, 4 * PANEL)


def unpack_int4_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_panels`: codes 0..15, ``uint8 [n, K]``."""
    p, steps, _ = panels.shape
    b = panels.view(p, steps, PANEL, 4).permute(0, 2, 1, 3)  # [P, 16, K/8, 4]
    codes = torch.stack([b & 15, b >> 4], dim=3)  # [P, 16, K/8, 2, 4]
    return codes.reshape(p * PANEL, steps * 8)[:n]


def pack_group_panels(t: torch.Tensor) -> torch.Tensor:
    """Per-group values ``[N, G]`` (int4 scales, minimums) as ``float32 [ceil(N/16), G, 16]``: a group's 16 values
    of a panel side by side, one vector load. Rows past ``N`` are zero."""
    n, g = t.shape
    padded = torch.zeros(_panel_rows(n), g, dtype=torch.float32)
    padded[:n] = t.float()
    return padded.view(-1, PANEL, g).transpose(1, 2).contiguous()


def unpack_group_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_group_panels`: ``[n, G]``."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n]


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
