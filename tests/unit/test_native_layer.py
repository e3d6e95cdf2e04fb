"""The native kernels against the same computation written in torch: the integer GEMVs, and the fused decoder layer
(``ryzen_native::decode_layer``).

Tolerances and why:
- The activation quantizer is bit-exact (same fp32 ops, round half to even).
- The integer GEMVs are compared with a float64 reference built from the same int8 activations: the integer block
  dots are exact, so only the fp32 accumulation of the scaled blocks differs (1e-5 relative).
- The layer in fp32 weights, or int8 weights with fp32 activations: only the order of the sums differs (GEMM, norm
  and softmax reductions); over widths of a few hundred, fp32 reassociation moves results by ~1e-6 of their scale,
  so 1e-4 leaves a wide margin.
- The layer in int4 or ``native-a8`` int8 weights against torch on the same weights: the kernel rounds each GEMV's
  activations to int8 per block of 32, the reference does not, so results differ by that rounding (~0.5% RMS of an
  input): 2e-2 of the output scale. A wrong index, sign or scale moves results by O(1) and still fails.

Row independence is bit-exact: speculative verification appends several tokens in one call, and greedy output is
lossless only if each token's logits are those of a one-token step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from ryzen_opt.ops import native
from ryzen_opt.ops.quant import (
    pack_group_panels,
    pack_int4_panels,
    pack_int8_panels,
    quantize_int4,
    quantize_int8,
)
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer
from ryzen_opt.optimizers.kv_cache import KVCacheConfig, KVCacheOptimizer
from ryzen_opt.runtime import decoder_of

pytestmark = pytest.mark.skipif(native.ops() is None, reason="no native kernels on this machine (see the log)")

VOCAB = 320


def _model(hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _optimized(
    model: LlamaForCausalLM, weights: str, native_layers: bool, int8_kernel: str = "auto"
) -> LlamaForCausalLM:
    config = KernelConfig(weights=weights, native_layers=native_layers, int8_kernel=int8_kernel)
    return KernelOptimizer(config).apply_to_model(copy.deepcopy(model))


@pytest.mark.parametrize(
    ("weights", "kernel"), [("int8", "native"), ("int8", "native-a8"), ("int4", "auto"), ("none", "auto")]
)
@pytest.mark.parametrize("kv", [None, 8, 4], ids=["static-cache", "int8-kv", "int4-kv"])
def test_native_layers_match_the_aten_layers(weights: str, kernel: str, kv: int | None) -> None:
    """With the static cache the fused layer attends itself; with a quantized KV cache attached, the fused halves
    (``layer_qkv``, ``layer_out``) run around the cache's own attention (``kv_attend``), against ATen's layers
    around the same cache."""
    base = _model()
    fused, plain = _optimized(base, weights, True, kernel), _optimized(base, weights, False, kernel)
    assert decoder_of(fused).native_layers() is not None
    assert decoder_of(plain).native_layers() is None
    ids = _ids(20)
    got, want = [], []
    with torch.no_grad():
        for model, out in ((fused, got), (plain, want)):
            decoder = decoder_of(model)
            if kv is not None:  # group 4, window 4: most of the 20 tokens are read from quantized storage
                config = KVCacheConfig(bits=kv, group_size=4, residual_length=4, attend_chunk=4)
                decoder.attach_cache(KVCacheOptimizer(config).make_cache(model))
            decoder.allocate(64)
            out.append(decoder.forward(ids[:, :12]))  # a prefill of 12 > SMALL_M rows: ATen's path in both
            out.append(decoder.forward(ids[:, 12:15], all_logits=True))  # three rows at once
            out.extend(decoder.step(ids[:, i : i + 1]) for i in range(15, 20))
    for g, w in zip(got, want, strict=True):
        scale = w.abs().max().item()
        # Both paths run the same GEMV kernels; inputs that differ in the last bits (norm and attention sums) can
        # round an activation to the neighbouring int8 step: 1e-2 for int8/int4, fp32 reassociation only for fp32.
        exact = weights == "none" or kernel == "native"
        assert (g - w).abs().max().item() <= (1e-4 if exact else 1e-2) * scale


@pytest.mark.parametrize(("weights", "kernel"), [("int8", "native"), ("int8", "native-a8"), ("int4", "auto")])
def test_a_row_verified_with_others_gets_the_logits_of_a_one_token_step(weights: str, kernel: str) -> None:
    model = _optimized(_model(), weights, True, kernel)
    decoder = decoder_of(model)
    ids = _ids(16)
    with torch.no_grad():
        decoder.allocate(64)
        decoder.forward(ids[:, :10])
        together = decoder.forward(ids[:, 10:16], all_logits=True)[0]  # six rows in one call
        decoder.crop(10)
        alone = torch.stack([decoder.step(ids[:, i : i + 1])[0] for i in range(10, 16)])
    assert torch.equal(together, alone)


def test_a_model_the_kernel_cannot_run_keeps_aten_layers() -> None:
    base = _model()
    base.model.layers[1].mlp.act_fn = torch.nn.GELU()  # not SiLU-gated: the fused layer would compute another model
    model = _optimized(base, "int8", True)
    assert decoder_of(model).native_layers() is None
    with torch.no_grad():
        assert model.generate(_ids(6), max_new_tokens=4, do_sample=False).shape == (1, 10)


# --------------------------------------------------------------------------- the op against its torch reference


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _reference_layer(h, weights, norm1, norm2, eps, k_cache, v_cache, pos, cos, sin, heads, kv_heads, scale):
    """The layer in plain torch ops, on the dequantized weights ``[qkv, o, gate_up, down]`` (each ``[N, K]``)."""
    t, hd = h.shape[0], k_cache.shape[-1]
    q_size, kv_size = heads * hd, kv_heads * hd
    qkv = F.rms_norm(h, (h.shape[1],), norm1, eps) @ weights[0].t()
    q = _rope(qkv[:, :q_size].view(t, heads, hd), cos[:, None], sin[:, None])
    k = _rope(qkv[:, q_size : q_size + kv_size].view(t, kv_heads, hd), cos[:, None], sin[:, None])
    v = qkv[:, q_size + kv_size :].view(t, kv_heads, hd)
    k_cache[0, :, pos : pos + t] = k.transpose(0, 1)
    v_cache[0, :, pos : pos + t] = v.transpose(0, 1)
    keys = k_cache[0, :, : pos + t].repeat_interleave(heads // kv_heads, 0)
    values = v_cache[0, :, : pos + t].repeat_interleave(heads // kv_heads, 0)
    mask = torch.ones(t, pos + t, dtype=torch.bool).tril(diagonal=pos)
    attn = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, scale=scale)
    h = h + attn.transpose(0, 1).reshape(t, q_size) @ weights[1].t()
    gate, up = (F.rms_norm(h, (h.shape[1],), norm2, eps) @ weights[2].t()).chunk(2, dim=-1)
    return h + (F.silu(gate) * up) @ weights[3].t()


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["int8", "int8-a8", "int4", "fp32"]),
    head_dim=st.sampled_from([32, 64]),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    t=st.integers(1, native.SMALL_M),
    pos=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_decode_layer_matches_torch_on_any_shape(kind, head_dim, kv_heads, group, t, pos, seed) -> None:
    torch.manual_seed(seed)
    heads = kv_heads * group
    hidden = 32 * (heads + 1)  # a multiple of 32 (the int4 kernel's run), not of the head size
    q_size, kv_size, inter = heads * head_dim, kv_heads * head_dim, 96
    shapes = [(q_size + 2 * kv_size, hidden), (hidden, q_size), (2 * inter, hidden), (hidden, inter)]
    tensors, kinds, groups, dense = [], [], [], []
    for n, k in shapes:
        w = torch.randn(n, k) / k**0.5
        if kind.startswith("int8"):
            q, s = quantize_int8(w)
            tensors += [q if kind == "int8" else pack_int8_panels(q), s, torch.empty(0)]
            kinds.append(1 if kind == "int8" else 3)
            dense.append(q.float() * s[:, None])
        elif kind == "int4":
            q, s, lo = quantize_int4(w, 32)
            tensors += [pack_int4_panels(q), pack_group_panels(s), pack_group_panels(lo)]
            kinds.append(2)
            dense.append((q.float().view(n, -1, 32) * s[..., None] + lo[..., None]).view(n, k))
        else:
            tensors += [w.t().contiguous(), torch.empty(0), torch.empty(0)]
            kinds.append(0)
            dense.append(w)
        groups.append(32 if kind == "int4" else 0)
    h = torch.randn(t, hidden)
    norm1, norm2 = 1 + 0.1 * torch.randn(hidden), 1 + 0.1 * torch.randn(hidden)
    caches = [torch.randn(1, kv_heads, pos + t + 3, head_dim) for _ in range(2)]  # stale entries past pos: ignored
    angles = torch.arange(pos, pos + t)[:, None] * 0.1 ** torch.arange(head_dim // 2)[None]
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1) for f in (torch.cos, torch.sin))
    scale = head_dim**-0.5
    ref_caches = [c.clone() for c in caches]
    want = _reference_layer(h, dense, norm1, norm2, 1e-5, *ref_caches, pos, cos, sin, heads, kv_heads, scale)
    got = torch.ops.ryzen_native.decode_layer(
        h, tensors, kinds, groups, norm1, norm2, 1e-5, 1e-5, *caches, pos, cos, sin, heads, kv_heads, scale
    )
    tolerance = 1e-4 if kind in ("fp32", "int8") else 2e-2  # int8: weight-only, fp32 activations
    assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()
    for c, r in zip(caches, ref_caches, strict=True):  # the new keys and values are written where torch writes them
        assert (c - r)[:, :, : pos + t].abs().max().item() <= tolerance * r.abs().max().item()


def _quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantizer in torch: per block of 32, d = max|x| / 127, q = round_half_even(x * (1 / d))."""
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.round(blocks * inv[..., None]).to(torch.int8).view_as(x), d


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, native.SMALL_M), blocks=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_activation_quantizer_is_bit_exact(rows: int, blocks: int, seed: int) -> None:
    x = torch.randn(rows, 32 * blocks, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, :32] = 0  # an all-zero block: scale 0, values 0
    q, d = torch.ops.ryzen_native.quantize_q8(x)
    want_q, want_d = _quantize_q8(x)
    assert torch.equal(q, want_q)
    assert torch.equal(d, want_d)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 3 * native.SMALL_M),  # decode and verification, and prompt passes in tiles of rows
    n=st.integers(1, 70),
    blocks=st.integers(1, 9),
    bits=st.sampled_from([8, 4]),
    group_blocks=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_integer_gemv_matches_a_float64_reference(rows, n, blocks, bits, group_blocks, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    k = 32 * blocks * group_blocks
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    xq, xs = _quantize_q8(x)
    xq64 = xq.double().view(rows, -1, 32)
    if bits == 8:
        q, s = quantize_int8(w)
        got = torch.ops.ryzen_native.w8a8_linear(x, pack_int8_panels(q), s)
        dots = torch.einsum("rbi,nbi->rnb", xq64, q.double().view(n, -1, 32))  # exact integer block dots
        terms = dots * xs.double()[:, None] * s.double()[None, :, None]
        magnitude = torch.einsum("rbi,nbi->rnb", xq64.abs(), q.double().abs().view(n, -1, 32))
        magnitude = (magnitude * xs.double()[:, None] * s.double().abs()[None, :, None]).sum(-1)
    else:
        group = 32 * group_blocks
        q, s, lo = quantize_int4(w, group)
        panels, sp, lp = pack_int4_panels(q), pack_group_panels(s), pack_group_panels(lo)
        got = torch.ops.ryzen_native.w4_linear(x, panels, sp, lp, group, n)
        dots = torch.einsum("rbi,nbi->rnb", xq64, q.double().view(n, -1, 32))
        block_scale = s.double().repeat_interleave(group_blocks, dim=1)  # [n, blocks]
        rounded_sums = (xq64.sum(-1) * xs.double()).view(rows, -1, group_blocks).sum(-1)  # of the rounded inputs
        minimum_terms = rounded_sums[:, None] * lo.double()[None]  # [rows, n, groups]
        terms = torch.cat([dots * xs.double()[:, None] * block_scale[None], minimum_terms], dim=-1)
        magnitude = torch.einsum("rbi,nbi->rnb", xq64.abs(), q.double().view(n, -1, 32))
        magnitude = (magnitude * xs.double()[:, None] * block_scale.abs()[None]).sum(-1)
        magnitude += minimum_terms.abs().sum(-1)
    want = terms.sum(-1)
    # fp32 accumulation: the kernel's partial sums (8 lanes a block, then the blocks) round relative to the sum of
    # the products' magnitudes, not to a total that may cancel.
    assert torch.all((got.double() - want).abs() <= 1e-5 * magnitude + 1e-30)


def test_decode_layer_rejects_more_rows_than_its_gemv_takes() -> None:
    h = torch.randn(native.SMALL_M + 1, 64)
    cache = torch.zeros(1, 1, 32, 32)
    with pytest.raises(RuntimeError, match="at most"):
        torch.ops.ryzen_native.decode_layer(
            h, [torch.empty(0)] * 12, [1] * 4, [0] * 4, torch.ones(64), torch.ones(64), 1e-5, 1e-5,
            cache, cache.clone(), 0, torch.ones(h.shape[0], 32), torch.zeros(h.shape[0], 32), 2, 1, 0.1,
        )  # fmt: skip


@given(rows=st.integers(1, 2 * native.SMALL_M), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_integer_gemv_rows_do_not_depend_on_the_rows_beside_them(rows: int, seed: int) -> None:
    """Bit-exact: each row alone gives the bits it gets among others (row tiles of 8 and 4, panels of 16)."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(37, 96, generator=g)
    q8, s8 = quantize_int8(w)
    q4, s4, lo = quantize_int4(w, 32)
    p8, p4, sp, lp = pack_int8_panels(q8), pack_int4_panels(q4), pack_group_panels(s4), pack_group_panels(lo)
    together8 = torch.ops.ryzen_native.w8a8_linear(x, p8, s8)
    together4 = torch.ops.ryzen_native.w4_linear(x, p4, sp, lp, 32, 37)
    for r in range(rows):
        assert torch.equal(torch.ops.ryzen_native.w8a8_linear(x[r : r + 1], p8, s8)[0], together8[r])
        assert torch.equal(torch.ops.ryzen_native.w4_linear(x[r : r + 1], p4, sp, lp, 32, 37)[0], together4[r])


def test_the_operators_pass_torch_library_opcheck() -> None:
    """Schemas, fake kernels and dispatch as torch.compile relies on them (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=g), torch.randn(40, 64, generator=g)
    q8, s8 = quantize_int8(w)
    q4, s4, lo = quantize_int4(w, 32)
    p4, sp, lp = pack_int4_panels(q4), pack_group_panels(s4), pack_group_panels(lo)
    lib = torch.ops.ryzen_native
    cases = [
        (lib.w8_linear.default, (x, q8, s8)),
        (lib.w8a8_linear.default, (x, pack_int8_panels(q8), s8)),
        (lib.w4_linear.default, (x, p4, sp, lp, 32, 40)),
        (lib.w4_dequantize.default, (p4, sp, lp, 32, 40)),
        (lib.quantize_q8.default, (x,)),
        (
            lib.kv_attend.default,
            (torch.randn(4, 2, 16, generator=g), [], 8, torch.randn(2, 5, 16), torch.randn(2, 5, 16), 0.25),
        ),
    ]
    # one fused layer: hidden 64, 2 heads of 32 over 1 kv head, int8 panels, 2 new rows at position 3
    hidden, hd, inter = 64, 32, 96
    weights, kinds = [], []
    for n, k in [(2 * hd + 2 * hd, hidden), (hidden, 2 * hd), (2 * inter, hidden), (hidden, inter)]:
        q, s = quantize_int8(torch.randn(n, k, generator=g) / k**0.5)
        weights += [pack_int8_panels(q), s, torch.empty(0)]
        kinds.append(3)
    caches = [torch.randn(1, 1, 8, hd, generator=g) for _ in range(2)]
    cos, sin = torch.ones(2, hd), torch.zeros(2, hd)
    h, norm = torch.randn(2, hidden, generator=g), torch.ones(hidden)
    cases.append((lib.layer_qkv.default, (h, weights, kinds, [0] * 4, norm, 1e-5, cos, sin, 2, 1)))
    cases.append(
        (
            lib.decode_layer.default,
            (h, weights, kinds, [0] * 4, norm, norm, 1e-5, 1e-5, *caches, 3, cos, sin, 2, 1, 0.2),
        )
    )
    for op, args in cases:
        torch.library.opcheck(op, args)
