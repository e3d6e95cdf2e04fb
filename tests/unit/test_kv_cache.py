"""KVCacheOptimizer: the quantizer's bound, Cache behaviour against DynamicCache, attention on the stored form, and
the memory accounting.

Tolerances and why: a stored value is within half a quantization step of the original (``|error| <= scale / 2``,
``scale = (max - min) / (2^bits - 1)`` of its group). Tokens still in the residual window are stored exactly, so a
cache holding fewer than ``residual_length + group_size`` tokens must return them bit for bit. ``attend`` computes the
same attention as SDPA over the dequantized cache, in another order (chunked online softmax): 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ryzen_opt.compat import cache_kwargs
from ryzen_opt.errors import ConfigError
from ryzen_opt.measure.decode import CachedForward
from ryzen_opt.ops import native
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer
from ryzen_opt.optimizers.kv_cache import (
    KVCacheConfig,
    KVCacheOptimizer,
    QuantizedKVCache,
    QuantizedLayer,
    SinkKVCache,
    cache_bytes,
    quantize_groups,
    sdpa_reference,
)


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def _kv(t: int, seed: int, heads: int = 2, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, t, dim, generator=g), torch.randn(1, heads, t, dim, generator=g)


@given(
    bits=st.sampled_from([4, 8]),
    rows=st.integers(1, 6),
    group=st.integers(2, 70),
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_quantizer_error_is_at_most_half_a_step(bits, rows, group, magnitude, seed):
    x = torch.randn(rows, group, generator=torch.Generator().manual_seed(seed)) * magnitude
    q, scale, lo = quantize_groups(x, dim=1, bits=bits)
    assert int(q.max()) <= 2**bits - 1
    err = (q.float() * scale + lo - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-4) + 1e-6 * magnitude).all())


@given(
    bits=st.sampled_from([4, 8]),
    steps=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    crop=st.integers(0, 60),
    seed=st.integers(0, 2**16),
)
def test_update_seq_length_crop_and_reset_behave_like_dynamic_cache(bits, steps, crop, seed):
    ours = QuantizedKVCache(2, KVCacheConfig(bits=bits, group_size=8, residual_length=16))
    ref = DynamicCache()
    total = 0
    for i, t in enumerate(steps):
        for layer in range(2):
            k, v = _kv(t, seed + 31 * i + layer)
            got_k, got_v = ours.update(k, v, layer)
            want_k, want_v = ref.update(k, v, layer)
            assert got_k.shape == want_k.shape
            assert got_v.shape == want_v.shape
            # Whatever is still in the residual window comes back exactly.
            window = ours.layers[layer].keys.shape[-2]
            if window:
                assert torch.equal(ours.layers[layer].keys, want_k[..., -window:, :])
        total += t
        assert ours.get_seq_length() == ref.get_seq_length() == total
    remove = min(crop, total)
    ours.crop(-remove)
    ref.crop(-remove)
    assert ours.get_seq_length() == ref.get_seq_length() == total - remove
    with pytest.raises(ValueError, match="positive"):
        ours.crop(1)
    ours.reset()
    assert ours.get_seq_length() == 0
    k, v = _kv(3, seed)
    got_k, _ = ours.update(k, v, 0)
    assert torch.equal(got_k, k)


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_values_stay_within_their_quantization_bound(bits):
    layer = QuantizedLayer(bits, group_size=8, residual_length=8)
    k, v = _kv(40, 0)
    layer.update(k, v)
    got_k, got_v = layer.update(k[..., :0, :], v[..., :0, :])
    step = 2 * max(k.abs().max(), v.abs().max()) / (2**bits - 1)
    assert float((got_k - k).abs().max()) <= step / 2 * 1.01
    assert float((got_v - v).abs().max()) <= step / 2 * 1.01
    assert len(layer.chunks) == 4  # 40 tokens, 8 kept in the window: 32 quantized in groups of 8


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "aten"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("past", "new"), [(0, 5), (37, 1), (100, 3)])
def test_attend_equals_attention_over_the_dequantized_cache(monkeypatch, past, new, bits, use_native):
    if use_native and not native.preferred():
        pytest.skip("no native kernels on this machine (see the log)")
    if not use_native:
        monkeypatch.setattr(native, "preferred", lambda: False)
    layer = QuantizedLayer(bits, group_size=8, residual_length=16)
    if past:
        layer.update(*_kv(past, 1))
    stored_k, stored_v = layer.update(*(t[..., :0, :] for t in _kv(1, 2)))
    q = torch.randn(1, 4, new, 16)  # 4 query heads over 2 kv heads (GQA)
    k, v = _kv(new, 3)
    want = sdpa_reference(q, torch.cat([stored_k, k], 2), torch.cat([stored_v, v], 2), 0.25)
    with torch.no_grad():
        got = layer.attend(q, k, v, 0.25, chunk_tokens=16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer.get_seq_length() == past + new


@pytest.mark.skipif(not native.preferred(), reason="no native kernels on this machine (see the log)")
@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    past=st.integers(0, 90),
    new=st.integers(1, 8),
    group=st.sampled_from([2, 4, 8, 16]),
    kv_heads=st.integers(1, 3),
    q_per_kv=st.integers(1, 3),
    dim=st.sampled_from([8, 16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_native_attention_on_the_stored_form_matches_the_dequantized_cache(
    bits, past, new, group, kv_heads, q_per_kv, dim, seed
):
    """``ryzen_native::kv_attend`` reads the codes; the reference dequantizes them and runs SDPA. Same dequantized
    values, another order of sums (fp32): 1e-5. Value groups narrower than the head (group < dim) included."""
    layer = QuantizedLayer(bits, group_size=group, residual_length=2 * group)
    if past:
        layer.update(*_kv(past, seed, kv_heads, dim))
    stored_k, stored_v = layer.update(*(t[..., :0, :] for t in _kv(1, seed + 1, kv_heads, dim)))
    q = torch.randn(1, kv_heads * q_per_kv, new, dim, generator=torch.Generator().manual_seed(seed + 2))
    k, v = _kv(new, seed + 3, kv_heads, dim)
    want = sdpa_reference(q, torch.cat([stored_k, k], 2), torch.cat([stored_v, v], 2), dim**-0.5)
    with torch.no_grad():
        got = layer.attend(q, k, v, dim**-0.5, chunk_tokens=16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer.get_seq_length() == past + new
    native_tokens = sum(t.shape[1] for t in layer._flat[::6])  # the native entries follow the chunks
    assert native_tokens == len(layer.chunks) * group


@pytest.mark.skipif(not native.preferred(), reason="no native kernels on this machine (see the log)")
@pytest.mark.parametrize("bits", [8, 4])
def test_native_attention_after_a_crop_into_merged_chunks(bits):
    """Every 8 chunks merge into one native entry (their tensors become views of it); a crop into such a block
    brings chunks back to the residual, and attention, native or dequantized, still sees exactly what is stored."""
    layer = QuantizedLayer(bits, group_size=4, residual_length=4)
    layer.update(*_kv(4 * 20, 5))  # 19 chunks: two merged blocks and three single chunks
    assert len(layer._blocks) == 2
    layer.crop(-30)
    assert len(layer._blocks) == 1
    assert layer.get_seq_length() == 50
    for step in range(10):  # decode past the point where the second block forms again
        stored_k, stored_v = layer.update(*(t[..., :0, :] for t in _kv(1, 6)))
        q = torch.randn(1, 4, 2, 16, generator=torch.Generator().manual_seed(step))
        k, v = _kv(2, 7 + step)
        want = sdpa_reference(q, torch.cat([stored_k, k], 2), torch.cat([stored_v, v], 2), 0.25)
        with torch.no_grad():
            got = layer.attend(q, k, v, 0.25, chunk_tokens=16)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(layer._blocks) == 2
    assert layer.get_seq_length() == 70


def test_stored_bytes_count_codes_scales_and_the_window():
    cache = QuantizedKVCache(1, KVCacheConfig(bits=8, group_size=8, residual_length=8))
    cache.update(*_kv(24, 0), 0)  # 16 quantized (2 chunks) + 8 in the window
    b, h, d, chunks, g = 1, 2, 16, 2, 8
    codes = 2 * chunks * g * b * h * d  # keys and values, one byte per element
    key_scales = chunks * 2 * b * h * d * 4  # scale and min per channel per chunk, fp32
    value_scales = chunks * 2 * b * h * g * (d // g) * 4  # scale and min per token per group of 8 channels, fp32
    window = 2 * 8 * b * h * d * 4  # keys and values of the 8 newest tokens, fp32
    assert cache.stored_bytes() == codes + key_scales + value_scales + window
    assert cache_bytes(cache) == cache.stored_bytes()


def test_generate_accepts_the_cache_and_the_sink_cache_stays_bounded():
    model = _model()
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    optimizer = KVCacheOptimizer(KVCacheConfig(bits=8, group_size=8, residual_length=8))
    cache = optimizer.make_cache(model, max_len=128)
    out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 50)
    assert cache.get_seq_length() == 49
    sink = KVCacheOptimizer(KVCacheConfig(strategy="sink", sink_tokens=2, window=16)).make_cache(model)
    assert isinstance(sink, SinkKVCache)
    out = model.generate(ids, **cache_kwargs(sink), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 50)
    assert all(layer.keys.shape[-2] == 18 for layer in sink.layers)


def test_which_caches_attend_on_their_stored_form():
    """The seam between the KV cache and the lean loop is public and typed: ``AttendingCache``."""
    from transformers import DynamicCache

    from ryzen_opt.runtime import AttendingCache, attends_on_storage

    model = _model()
    quantized = KVCacheOptimizer(KVCacheConfig(bits=8, group_size=8, residual_length=8)).make_cache(model)
    assert isinstance(quantized, AttendingCache)
    assert attends_on_storage(quantized)
    plain = DynamicCache(config=model.config)
    assert not attends_on_storage(plain)
    assert not attends_on_storage(None)


def test_the_lean_loop_with_the_cache_equals_hf_with_the_cache():
    model = _model()
    optimized = KernelOptimizer(KernelConfig()).apply_to_model(copy.deepcopy(model))
    kv = KVCacheOptimizer(KVCacheConfig(bits=4, group_size=8, residual_length=8))
    ids = torch.randint(1, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    hf = model.generate(ids, **cache_kwargs(kv.make_cache(model)), max_new_tokens=12, do_sample=False)
    lean = optimized.generate(ids, **cache_kwargs(kv.make_cache(model)), max_new_tokens=12, do_sample=False)
    assert torch.equal(hf, lean)


def test_cached_forward_with_a_dynamic_cache_equals_one_forward():
    model = _model()
    ids = torch.randint(1, 256, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    got = CachedForward(model, DynamicCache, chunk=16)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_memory_report_measures_a_reduction():
    report = KVCacheOptimizer(KVCacheConfig(bits=8, group_size=32, residual_length=32)).memory_report(
        _model(), context_len=256, decode_steps=2
    )
    assert report["baseline"]["stored_bytes"] == 2 * 2 * 2 * 256 * 16 * 4  # layers x (k, v) x heads x T x dim x 4 B
    assert 0.5 < report["reduction"] < 0.75
    assert report["baseline"]["decode_peak_bytes"] > 0


def test_config_errors():
    with pytest.raises(ConfigError, match="choose 8 or 4"):
        KVCacheConfig(bits=2)
    with pytest.raises(ConfigError, match="at least one group"):
        KVCacheConfig(group_size=64, residual_length=32)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['nbits'\]"):
        KVCacheConfig.from_dict({"nbits": 4})
    with pytest.raises(ConfigError, match="exceeds the model's 1024 positions"):
        KVCacheOptimizer().make_cache(_model(), max_len=4096)
