"""Perf gates of the EmbeddingCompressor on SmolLM2-135M-Instruct's tied 49,152 x 576 embedding / LM head (21% of
its parameters): compression ratio (original bytes over every stored byte, scales included; the seed's gate 2.0) and
relative top-1 loss on 24 held-out prose blocks (gate 1%). ``python benchmarks/bench_embeddings.py --model smollm2``
sweeps the methods.
"""

from __future__ import annotations

import copy

import pytest

from pytest_ryzen import accuracy_loss, compression_ratio
from ryzen_opt.optimizers.embeddings import CompressionConfig, EmbeddingCompressor

pytestmark = pytest.mark.perf


@compression_ratio(2.0)
@accuracy_loss(0.01)
def test_int8_embedding_and_lm_head(ryzen, smollm2, reference_logits, prose) -> None:
    reference, _ = smollm2
    compressor = EmbeddingCompressor(CompressionConfig(method="int8"))
    compressed = compressor.apply_to_model(copy.deepcopy(reference))
    report = compressor.compression_report()
    assert report["tied"], "SmolLM2 ties its embedding and LM head: one table must serve both"
    ryzen.record_compression(
        report["original_bytes"],
        report["compressed_bytes"],
        optimizer="embedding_compressor",
        method=report["method"],
        sqnr_db=report["tensors"][0]["sqnr_db"],
    )
    ryzen.record_accuracy(
        reference_logits,
        compressed,
        prose,
        optimizer="embedding_compressor",
        reference_name="SmolLM2-135M fp32",
        candidate_name="EmbeddingCompressor(method='int8')",
    )
