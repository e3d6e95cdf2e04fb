"""EmbeddingCompressor: round-trip bounds, structure, tied sharing, the fast paths and a save/load round trip.

Error bounds and why: int8 and int4 round to the nearest step, so each element's error is at most half a step
(``scale / 2``); the stored scales are what the bound is computed from. int4 stores scale and zero in bf16 (ATen's
kernel takes them so), which adds their rounding: ``|q - 8| * scale * 2^-8 + |zero| * 2^-8``. The LM head's kernels
take bf16 activations: their outputs are compared with the dequantized matrix at the bf16 tolerance (relative ~1e-2
on a sum).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ryzen_opt.errors import ConfigError
from ryzen_opt.optimizers.embeddings import (
    CompressedEmbedding,
    CompressedLMHead,
    CompressionConfig,
    EmbeddingCompressor,
    Int4Table,
    Int8Table,
    LowRankTable,
    UnsupportedEmbeddingError,
    lowrank_rank,
)


def _llama(tied: bool, vocab: int = 320, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def _compress(model, **config):
    compressor = EmbeddingCompressor(CompressionConfig(**config))
    return compressor.apply_to_model(model), compressor.compression_report()


# ------------------------------------------------------------------------------------------- properties


@given(
    rows=st.integers(1, 130),
    width=st.integers(1, 150),
    magnitude=st.floats(1e-3, 1e2),
    seed=st.integers(0, 2**16),
)
def test_int8_table_round_trip_is_within_half_a_step(rows, width, magnitude, seed):
    w = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * magnitude
    table = Int8Table(w)
    err = (table.dequantize() - w).abs()
    assert bool((err <= table.scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all())
    ids = torch.randint(0, rows, (5,), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(table.lookup(ids, torch.float32), table.dequantize()[ids])


@given(
    rows=st.integers(1, 130),
    width=st.integers(1, 150),  # widths the group does not divide are zero-padded
    group_size=st.sampled_from([16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_int4_table_round_trip_is_within_half_a_step_at_any_size(rows, width, group_size, seed):
    w = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    table = Int4Table(w, group_size)
    sz = table.scales_and_zeros.float()  # [G, padded_rows, 2]
    scale = sz[:, :rows, 0].t().repeat_interleave(group_size, dim=1)[:, :width]
    zero = sz[:, :rows, 1].t().repeat_interleave(group_size, dim=1)[:, :width]
    err = (table.dequantize() - w).abs()
    assert table.dequantize().shape == (rows, width)
    # Half a step, plus the bf16 rounding of the stored scale (times |q - 8| <= 8) and of the zero.
    assert bool((err <= scale / 2 + 8 * scale * 2**-8 + zero.abs() * 2**-8 + 1e-6).all())
    ids = torch.randint(0, rows, (2, 3), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(table.lookup(ids, torch.float32), table.dequantize()[ids])


@pytest.mark.parametrize("table_cls", ["int8", "int4", "lowrank"])
def test_lm_head_matmul_matches_the_dequantized_matrix(table_cls):
    torch.manual_seed(0)
    w, h = torch.randn(192, 96), torch.randn(2, 3, 96)
    table = {"int8": lambda: Int8Table(w), "int4": lambda: Int4Table(w, 32), "lowrank": lambda: LowRankTable(w, 40)}[
        table_cls
    ]()
    want = h @ table.dequantize().t()
    got = table.matmul(h)
    assert got.shape == (2, 3, 192)
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_lowrank_rank_meets_the_target_ratio():
    rank = lowrank_rank(4096, 256, 2.0)
    assert (4096 + 256) * rank <= 4096 * 256 / 2 < (4096 + 256) * (rank + 1)
    table = LowRankTable(torch.randn(4096, 256), rank)
    assert 4096 * 256 * 4 / table.stored_bytes() >= 2.0
    with pytest.raises(ConfigError, match="no rank"):
        lowrank_rank(8, 8, 1000.0)


# -------------------------------------------------------------------------------------------- structure


def test_tied_weights_are_compressed_once_and_shared():
    model, report = _compress(_llama(tied=True), method="int8")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, CompressedEmbedding) and isinstance(head, CompressedLMHead)  # noqa: PT018
    assert embedding.table is head.table
    assert report["tied"] is True
    assert len(report["tensors"]) == 1
    # fp32 [320, 64] -> int8 [320, 64] + fp32 scale [320]
    assert report["original_bytes"] == 320 * 64 * 4
    assert report["compressed_bytes"] == 320 * 64 + 320 * 4
    assert report["ratio"] == pytest.approx(320 * 64 * 4 / (320 * 64 + 320 * 4))
    # No untie: no fp32 copy of the matrix is left anywhere in the model.
    assert not any(t.shape == (320, 64) and t.dtype == torch.float32 for t in model.state_dict().values())


def test_untied_head_and_embedding_each_get_a_table():
    model, report = _compress(_llama(tied=False), method="int4", group_size=32)
    assert report["tied"] is False
    assert [t["name"] for t in report["tensors"]] == ["embedding", "lm_head"]
    assert model.get_input_embeddings().table is not model.get_output_embeddings().table
    table = model.get_output_embeddings().table
    assert table.qweight.dtype == torch.uint8
    assert table.scales_and_zeros.shape == (64 // 32, 320, 2)  # 320 rows: a multiple of 64, no padding
    assert table.scales_and_zeros.dtype == torch.bfloat16
    for t in report["tensors"]:
        assert t["sqnr_db"] > 15  # int4 g32 on Gaussian weights: ~21 dB


def test_compressed_model_runs_forward_and_generate_close_to_the_reference():
    ref = _llama(tied=True)
    model, _ = _compress(copy.deepcopy(ref), method="int8")
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert float((got - want).norm() / want.norm()) < 2e-2
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 15)


def test_lookup_never_rebuilds_the_full_matrix(monkeypatch):
    model, _ = _compress(_llama(tied=True), method="int4", group_size=32)
    table = model.get_input_embeddings().table
    monkeypatch.setattr(type(table), "dequantize", lambda self: pytest.fail("forward rebuilt the full matrix"))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_gpt2_and_bert_are_supported():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    _, report = _compress(gpt2, method="int8")
    assert report["tied"] is True
    bert = BertModel(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).eval()
    _, report = _compress(bert, method="int8")
    assert [t["name"] for t in report["tensors"]] == ["embedding"]  # an encoder: no LM head


def test_save_load_round_trip():
    model, _ = _compress(_llama(tied=True), method="int4", group_size=32)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh, _ = _compress(_llama(tied=True, vocab=320), method="int4", group_size=32)
    # Scramble the fresh model's table so that only loading can make the outputs agree.
    fresh.get_input_embeddings().table.qweight.zero_()
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    assert fresh.get_input_embeddings().table is fresh.get_output_embeddings().table


# ---------------------------------------------------------------------------------------------- errors


def test_config_errors_name_the_choices():
    with pytest.raises(ConfigError, match=r"method = 'pq'.*'int8', 'int4', 'lowrank'"):
        CompressionConfig(method="pq")
    with pytest.raises(ConfigError, match="'lowrank' only"):
        CompressionConfig(method="int8", rank=4)
    with pytest.raises(ConfigError, match="nothing to compress"):
        CompressionConfig(embedding=False, lm_head=False)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bits'\]"):
        CompressionConfig.from_dict({"bits": 4})


def test_applying_twice_and_reporting_before_applying_are_refused():
    compressor = EmbeddingCompressor(CompressionConfig())
    with pytest.raises(ConfigError, match="before apply_to_model"):
        compressor.compression_report()
    model = compressor.apply_to_model(_llama(tied=True))
    with pytest.raises(ConfigError, match="already compressed"):
        EmbeddingCompressor().apply_to_model(model)


def test_a_head_that_is_not_linear_gets_a_clear_error():
    model = _llama(tied=False)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(64, 320))
    with pytest.raises(UnsupportedEmbeddingError, match="not nn.Linear"):
        EmbeddingCompressor().apply_to_model(model)


def test_int8_lookup_matches_f_embedding_of_the_dequantized_table():
    w = torch.randn(70, 33)
    table = Int8Table(w)
    ids = torch.tensor([[0, 69, 5]])
    torch.testing.assert_close(table.lookup(ids, torch.float32), F.embedding(ids, table.dequantize()))
