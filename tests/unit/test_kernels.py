"""KernelOptimizer: quantizers, kernel linears, the lean static-cache decoder and the patched ``generate``.

Tolerances and why:
- fp32 with ``weights="none"``: the lean loop runs the same ops as HF on the same weights (transposed storage only
  changes the GEMM's summation order), so logits agree to 1e-5 and greedy tokens are identical.
- quantized kernels are compared with their own dequantized weight: the native kernels' GEMM path computes that
  product in fp32 (only the summation order differs: 1e-5); the int4 GEMV and ``native-a8`` (up to ``native.SMALL_M``
  rows) round activations to int8 per block of 32 as llama.cpp's Q8_0 does (~0.5% RMS on Gaussian inputs: 1e-2;
  exactness of the integer path itself is tested in test_native_layer.py); int8pack/ATen's int4 take bf16
  activations (8-bit mantissa: relative error ~2^-8 per product, ~1e-2 on a sum); fbgemm also rounds activations to
  7-8 bits per tensor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ryzen_opt.errors import ConfigError
from ryzen_opt.ops import native
from ryzen_opt.ops.quant import (
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
from ryzen_opt.optimizers.kernels import (
    DenseLinear,
    FusedSlice,
    Int4Linear,
    Int8Linear,
    KernelConfig,
    KernelOptimizer,
    UnsupportedModelError,
    iter_kernel_modules,
    kernel_report,
)
from ryzen_opt.runtime import decoder_of

VOCAB = 512


def _llama(cls=LlamaForCausalLM, config_cls=LlamaConfig, **extra):
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )
    return cls(config).eval()


def _gpt2():
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


ARCHS = {
    "llama": lambda: _llama(),
    "mistral": lambda: _llama(MistralForCausalLM, MistralConfig),
    "qwen2": lambda: _llama(Qwen2ForCausalLM, Qwen2Config),
    "gpt2": _gpt2,
}


def _pair(arch: str, **config):
    torch.manual_seed(0)
    ref = ARCHS[arch]()
    opt = KernelOptimizer(KernelConfig(**config)).apply_to_model(copy.deepcopy(ref))
    return ref, opt


def _ids(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- config


def test_config_rejects_bad_values_naming_the_choices():
    with pytest.raises(ConfigError, match=r"weights = 'int3'.*'none', 'bf16', 'int8', 'int4'"):
        KernelConfig(weights="int3")
    with pytest.raises(ConfigError, match="group_size"):
        KernelConfig(group_size=48)
    with pytest.raises(ConfigError, match="attention"):
        KernelConfig(attention="flash")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bits'\]"):
        KernelConfig.from_dict({"bits": 8})
    assert KernelConfig.from_dict({"weights": "int8"}) == KernelConfig(weights="int8")


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        KernelConfig().weights = "int8"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- quantizers


@given(
    n=st.integers(1, 40),
    k=st.integers(1, 70),
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_int8_round_trip_error_is_at_most_half_a_step(n, k, magnitude, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * magnitude
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8
    assert scale.shape == (n,)
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all())


@given(
    n=st.integers(1, 24),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**16),
)
def test_int4_round_trip_error_is_at_most_half_a_step(n, groups, group_size, seed):
    w = torch.randn(n, groups * group_size, generator=torch.Generator().manual_seed(seed))
    q, scale, lo = quantize_int4(w, group_size)
    assert int(q.max()) <= 15
    assert int(q.min()) >= 0
    assert scale.shape == lo.shape == (n, groups)
    err = (dequantize_int4(q, scale, lo, group_size) - w).abs().reshape(n, groups, group_size)
    assert bool((err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-7).all())


def test_zero_rows_stay_exactly_zero():
    w = torch.zeros(3, 64)
    q, scale = quantize_int8(w)
    assert bool((q == 0).all())
    assert bool((scale == 1).all())
    q4, s4, lo4 = quantize_int4(w, 32)
    assert bool((dequantize_int4(q4, s4, lo4, 32) == 0).all())


def test_int4_rejects_a_width_the_group_does_not_divide():
    with pytest.raises(ConfigError, match="not a multiple of group_size 64"):
        quantize_int4(torch.randn(16, 96), 64)


def _correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Activations like a transformer's: correlated channels and one outlier channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ (0.3 * torch.randn(k, k, generator=g) + torch.eye(k))
    x[:, 3] *= 10
    return x


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 48), groups=st.integers(1, 3), group_size=st.sampled_from([32, 64]), seed=st.integers(0, 999))
def test_gptq_moves_the_layer_output_less_than_round_to_nearest(n, groups, group_size, seed):
    # GPTQ minimizes ||X (W - Wq)^T||^2 column by column: on the calibration inputs themselves, its output error is
    # below round-to-nearest's (the optimal-brain-surgeon update can only lower the quadratic it is derived from;
    # allow 1% for the groups' min/max being taken after earlier updates).
    k = groups * group_size
    x = _correlated_inputs(512, k, seed)
    w = 0.05 * torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))
    rtn = dequantize_int4(*quantize_int4(w, group_size), group_size)
    q, scale, lo = gptq_int4(w, x.t() @ x, group_size)
    assert int(q.max()) <= 15
    assert scale.shape == lo.shape == (n, groups)
    gptq = dequantize_int4(q, scale, lo, group_size)
    assert ((x @ (w - gptq).t()) ** 2).sum() <= 1.01 * ((x @ (w - rtn).t()) ** 2).sum()


def test_gptq_keeps_weights_that_already_sit_on_the_grid():
    # SmolLM2's weights come from Q4_1 blocks of 32: every rounding error is zero, so GPTQ must change nothing.
    w = dequantize_int4(*quantize_int4(torch.randn(16, 64), 32), 32)
    x = _correlated_inputs(256, 64, 0)
    got = dequantize_int4(*gptq_int4(w, x.t() @ x, 32), 32)
    torch.testing.assert_close(got, w, rtol=0, atol=1e-6)


def test_gptq_rejects_a_hessian_of_the_wrong_shape():
    with pytest.raises(ConfigError, match="Hessian of shape"):
        gptq_int4(torch.randn(4, 64), torch.eye(32), 32)


def test_gptq_needs_calibration_and_uses_it():
    model = _llama()
    config = KernelConfig(weights="int4", int4_method="gptq", decode="hf")
    with pytest.raises(ConfigError, match="needs calibration text"):
        KernelOptimizer(config).apply_to_model(copy.deepcopy(model))
    with pytest.raises(ConfigError, match=r"\[N, T\] LongTensor"):
        KernelOptimizer(config).apply_to_model(copy.deepcopy(model), calibration=torch.randn(2, 8))
    calibration = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        rtn = KernelOptimizer(KernelConfig(weights="int4", decode="hf")).apply_to_model(copy.deepcopy(model))(ids)
        gptq = KernelOptimizer(config).apply_to_model(copy.deepcopy(model), calibration=calibration)(ids)
    # Random weights are off the grid: the calibrated method must differ from RTN (it ran) and stay close to fp32.
    assert not torch.equal(gptq.logits, rtn.logits)
    assert _rel_err(gptq.logits, want) < 0.1


# ---------------------------------------------------------------------------------------- kernel linears


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize(
    ("kernel", "tolerance"),
    [("native", 1e-5), ("native-a8", 1e-5), ("fbgemm", 2e-2), ("int8pack", 2e-2), ("dequant", 1e-5)],
)
@pytest.mark.parametrize("rows", [1, 3, 20])  # decode and verification (<= 8 rows), and a prompt pass
def test_int8_linear_matches_its_dequantized_weight(kernel, tolerance, rows):
    if kernel == "native-a8":
        # The integer kernel rounds activations to int8 per block of 32 (max|x| / 127): an input moves by at most
        # max|x| / 254, ~0.5% RMS of a Gaussian block, and the output's relative error is of that order.
        tolerance = 1e-2
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 64), torch.randn(48), torch.randn(rows, 5, 64)
    module = Int8Linear(w, b, kernel)
    want = F.linear(x, module.dequantized_weight(), b)
    got = module(x)
    assert got.shape == (rows, 5, 48)
    assert got.dtype == torch.float32
    assert _rel_err(got, want) < tolerance
    assert module.weight_bytes() == 48 * 64 + 48 * 4 + 48 * 4  # int8 weight, fp32 scales, fp32 bias


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("group", [32, 64])
def test_int4_linear_matches_its_dequantized_weight(monkeypatch, use_native, group):
    if not use_native:
        monkeypatch.setattr(native, "ops", lambda: None)  # a machine without a compiler: ATen's kernel
    torch.manual_seed(0)
    w, x = torch.randn(32, 128), torch.randn(3, 128)
    module = Int4Linear(w, None, group)
    assert module.kernel == ("native-int4" if use_native else "int4pack-cpu")
    # native: activations rounded to int8 per block of 32 (~0.5% RMS, see the int8 test); ATen: bf16 activations.
    tolerance = 1e-2 if use_native else 2e-2
    assert _rel_err(module(x), x @ module.dequantized_weight().t()) < tolerance
    # Two nibbles a byte, plus fp32 scale and minimum per group.
    assert module.weight_bytes() == 32 * 128 // 2 + 2 * 32 * (128 // group) * 4


def test_native_int4_layout_round_trips_and_decoding_a_row_is_independent_of_the_batch():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (8, 96))
    assert torch.equal(unpack_int4_panels(pack_int4_panels(q), 8).long(), q)
    module = Int4Linear(torch.randn(40, 96), None, 32)
    x = torch.randn(6, 96)
    alone = torch.cat([module(x[i : i + 1]) for i in range(6)])
    # Up to SMALL_M rows, each row runs the same GEMV code: a token's logits do not depend on its batch.
    assert torch.equal(module(x), alone)


def test_dense_linear_is_f_linear():
    torch.manual_seed(0)
    w, b, x = torch.randn(24, 16), torch.randn(24), torch.randn(4, 16)
    torch.testing.assert_close(DenseLinear(w, b)(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- the optimized model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp32_mode_keeps_the_reference_logits_and_tokens(arch):
    ref, opt = _pair(arch, weights="none")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        decoder = decoder_of(opt)
        assert decoder is not None
        assert not decoder.is_compiled  # compile=False: the public seam says so
        assert decoder_of(ref) is None  # an unoptimized model has none
        decoder.allocate(64)
        torch.testing.assert_close(decoder.forward(ids, all_logits=True), ref(ids).logits, rtol=1e-5, atol=1e-5)
    want = ref.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = opt.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_lean_loop_runs_the_same_modules_as_hf_forward(arch, weights):
    _, opt = _pair(arch, weights=weights, group_size=32)
    ids = _ids()
    with torch.no_grad():
        decoder = decoder_of(opt)
        decoder.allocate(64)
        torch.testing.assert_close(decoder.forward(ids, all_logits=True), opt(ids).logits, rtol=1e-5, atol=1e-5)
    want = {"native-a8"} if weights == "int8" else {"native-int4", "native-a8"}  # int4 keeps an int8 LM head
    assert set(kernel_report(opt).kernels) == want


def test_incremental_decode_equals_a_full_prefill_and_crop_rolls_back():
    _, opt = _pair("llama", weights="none")
    decoder = decoder_of(opt)
    ids = _ids(10)
    with torch.no_grad():
        decoder.allocate(32)
        full = decoder.forward(ids, all_logits=True)
        decoder.allocate(32)
        decoder.forward(ids[:, :6])
        steps = [decoder.step(ids[:, i : i + 1]) for i in range(6, 10)]
        torch.testing.assert_close(torch.stack(steps, 1)[0], full[0, 6:], rtol=1e-5, atol=1e-5)
        # Roll back two positions, then append several tokens at once (the explicit-mask path).
        decoder.crop(8)
        again = decoder.forward(ids[:, 8:10], all_logits=True)
        torch.testing.assert_close(again[0], full[0, 8:10], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="crop"):
        decoder.crop(99)


def test_fusion_reads_each_fused_weight_once_in_hf_forward():
    _, opt = _pair("llama", weights="int8")
    attn = opt.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedSlice)
    assert isinstance(attn.k_proj, FusedSlice)
    fused = attn.q_proj.fused[0].linear
    calls = []
    fused.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        opt(_ids())
    assert len(calls) == 1
    # One stored copy: named_modules lists the fused linear once, no q/k/v copies.
    names = [name for name, _ in iter_kernel_modules(opt)]
    assert sum("layers.0.self_attn" in n for n in names) == 2  # fused qkv + o_proj


def test_fusion_is_recomputed_under_grad_and_for_a_modified_input():
    _, opt = _pair("llama", weights="none")
    attn = opt.model.layers[0].self_attn
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        q1 = attn.q_proj(x).clone()
        x.add_(1.0)  # same object, new version: the cache must not answer
        q2 = attn.q_proj(x)
    assert not torch.allclose(q1, q2)


def test_patches_the_instance_not_the_class():
    ref, opt = _pair("llama", weights="int8")
    assert "generate" in vars(opt)
    assert LlamaForCausalLM.generate is type(ref).generate
    assert "generate" not in vars(ref)
    assert type(opt) is LlamaForCausalLM


def test_requests_the_lean_loop_does_not_serve_go_to_hf_generate():
    _, opt = _pair("llama", weights="int8", decode="static")
    _, hf_loop = _pair("llama", weights="int8", decode="hf")
    batch = torch.cat([_ids(8, 1), _ids(8, 2)])
    got = opt.generate(batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = hf_loop.generate(batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    out = opt.generate(_ids(), max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert hasattr(out, "sequences")


def test_eos_stops_like_hf_and_min_new_tokens_holds_it_off():
    ref, opt = _pair("llama", weights="none")
    ids = _ids()
    free = ref.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 3])
    for kwargs in ({}, {"min_new_tokens": 10}):
        want = ref.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=eos, **kwargs)
        got = opt.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=eos, **kwargs)
        assert torch.equal(got, want)


def test_sampling_with_top_k_1_is_greedy_and_seeded_sampling_repeats():
    _, opt = _pair("llama", weights="none")
    ids = _ids()
    greedy = opt.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(opt.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, eos_token_id=None), greedy)
    torch.manual_seed(3)
    a = opt.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, temperature=0.8, eos_token_id=None)
    torch.manual_seed(3)
    b = opt.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, temperature=0.8, eos_token_id=None)
    assert torch.equal(a, b)
    assert a.shape == (1, ids.shape[1] + 8)
    assert int(a.max()) < VOCAB


def test_unsupported_architecture_gets_a_clear_error():
    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(UnsupportedModelError, match=r"llama, mistral, qwen2, gpt2.*model_type='opt'"):
        KernelOptimizer(KernelConfig()).apply_to_model(model)


def test_applying_twice_is_refused():
    _, opt = _pair("llama")
    with pytest.raises(ConfigError, match="already optimized"):
        KernelOptimizer().apply_to_model(opt)


def test_report_counts_bytes_and_keeps_the_lm_head_when_asked():
    _, fp32 = _pair("llama", weights="none")
    _, int8 = _pair("llama", weights="int8")
    _, keep_head = _pair("llama", weights="int8", lm_head="none")
    r32, r8, rkeep = kernel_report(fp32), kernel_report(int8), kernel_report(keep_head)
    assert r32.bytes_per_token == r32.weight_bytes_before  # same bytes, only the layout changed
    assert 0.25 < r8.bytes_per_token / r32.bytes_per_token < 0.28  # 1 byte + per-row fp32 scales of 4 bytes
    assert rkeep.kernels == {"native-a8": 8, "dense-float32": 1}
    assert rkeep.to_dict()["config"]["lm_head"] == "none"
    assert r8.attention == "sdpa"
    assert r8.decode.startswith("static")


def test_int4_falls_back_to_int8_for_shapes_its_kernel_cannot_take():
    torch.manual_seed(0)
    model = _llama()
    opt = KernelOptimizer(KernelConfig(weights="int4", group_size=128)).apply_to_model(model)
    report = kernel_report(opt)
    # in=64 is not a multiple of 128: every projection reading the 64-wide hidden state stays int8.
    assert report.fallbacks
    assert "stored as int8" in report.fallbacks[0]
    assert "native-a8" in report.kernels  # the int8 kernel of an int4 model: activations rounded as int4's are


def test_gpt2_conv1d_is_converted():
    _, opt = _pair("gpt2", weights="int8")
    block = opt.transformer.h[0]
    assert isinstance(block.attn.c_attn, Int8Linear)
    assert isinstance(block.mlp.c_fc, Int8Linear)


def test_hf_forward_works_under_inference_mode_and_grad():
    ref, opt = _pair("llama", weights="none")
    ids = _ids()
    with torch.inference_mode():
        torch.testing.assert_close(opt(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(opt(ids).logits.detach(), ref(ids).logits.detach(), rtol=1e-5, atol=1e-5)


def test_an_optimized_model_survives_deepcopy_and_the_original_being_freed():
    _, opt = _pair("llama", weights="int8")
    ids = _ids()
    with torch.no_grad():
        want = opt(ids).logits
        clone = copy.deepcopy(opt)
        del opt
        import gc

        gc.collect()
        torch.testing.assert_close(clone(ids).logits, want)


def test_int4_keeps_an_int8_lm_head_unless_told_otherwise():
    _, auto = _pair("llama", weights="int4", group_size=32)
    _, all4 = _pair("llama", weights="int4", group_size=32, lm_head="int4")
    assert isinstance(auto.lm_head, Int8Linear)
    assert isinstance(all4.lm_head, Int4Linear)
    assert KernelConfig(weights="int8").resolved_lm_head() == "int8"
    with pytest.raises(ConfigError, match="lm_head"):
        KernelConfig(lm_head="int2")


@given(
    rows=st.integers(1, 5),
    pairs=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_nibble_layouts_round_trip_and_match_their_definition(rows: int, pairs: int, seed: int) -> None:
    """The one definition of each layout: plain int4 pairs (any even width, any leading shape), and the native
    kernels' panels of 16 rows (int8: 4 inputs of each row side by side, stored + 128; int4: 8 inputs, i low and
    i + 4 high; per-group values: the panel's 16 rows side by side)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, 3, 2 * pairs), generator=g, dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (rows, 3, pairs)
    assert torch.equal(packed[..., 0] & 15, q[..., 0])
    assert torch.equal(packed[..., 0] >> 4, q[..., 1])
    assert torch.equal(unpack_nibbles(packed), q)
    k = 32 * (1 + pairs % 4)
    codes = torch.randint(0, 16, (rows, k), generator=g)
    panels = pack_int4_panels(codes)
    assert panels.shape == (-(-rows // 16), k // 8, 64)
    # row j's inputs 8 s + i (low nibble) and 8 s + 4 + i (high) at byte 4 j + i of step s
    assert int(panels[0, 1, 4 * (rows - 1) + 2]) & 15 == int(codes[rows - 1, 8 + 2])
    assert int(panels[0, 1, 4 * (rows - 1) + 2]) >> 4 == int(codes[rows - 1, 8 + 6])
    assert torch.equal(unpack_int4_panels(panels, rows).long(), codes)
    q8 = torch.randint(-127, 128, (rows, k), generator=g, dtype=torch.int8)
    p8 = pack_int8_panels(q8)
    assert int(p8[0, 2, 4 * (rows - 1) + 3]) == int(q8[rows - 1, 8 + 3]) + 128
    assert torch.equal(unpack_int8_panels(p8, rows), q8)
    values = torch.randn(rows, 1 + pairs % 5, generator=g)
    assert torch.equal(unpack_group_panels(pack_group_panels(values), rows), values)
