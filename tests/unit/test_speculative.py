"""SpeculativeDecoder: greedy output equals the target's, the sampler keeps the target's distribution, caches roll back.

Why these checks are exact: in fp32 the target's logits for a token are the same whether it is verified alone or among
k drafts, up to float rounding; greedy outputs may then differ only at a near-tie (top-2 gap < 1e-5), which the decoder
counts. The sampler test is statistical: with a fixed seed, the empirical distribution of the first emitted token over
N draws is compared with the target's by a chi-square test (as vLLM's rejection-sampler test does); a wrong rule
(e.g. accepting every draft, or resampling from q instead of max(0, q - p)) moves it far outside the test's tolerance.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from ryzen_opt.compat import cache_kwargs
from ryzen_opt.errors import ConfigError
from ryzen_opt.optimizers.drafting import NGramDrafter
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer
from ryzen_opt.optimizers.kv_cache import KVCacheConfig, KVCacheOptimizer
from ryzen_opt.optimizers.speculative import ModelDrafter, SpecConfig, SpecStats, SpeculativeDecoder, rejection_sample

VOCAB = 64


def _llama(layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    target = _llama(2, 0)
    draft = copy.deepcopy(target)  # the target's first layer as an early-exit draft, as the zoo's draft is
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    return target, draft


def _greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def _assert_lossless(out, want: torch.Tensor) -> None:
    if not torch.equal(out.sequences, want):
        assert out.stats.near_ties > 0, (out.sequences, want)


@settings(max_examples=15)
@given(
    prompt=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=24),
    k=st.integers(1, 6),
    adaptive=st.booleans(),
    new=st.integers(1, 20),
    ngram=st.sampled_from(["", "latest", "longest", "session"]),
)
def test_greedy_speculative_output_equals_the_targets(models, prompt, k, adaptive, new, ngram):
    target, draft = models
    ids = torch.tensor([prompt])
    if ngram:
        match = "latest" if ngram == "latest" else "longest"
        drafter = NGramDrafter(match=match, session=ngram == "session")
        if ngram == "session":  # an earlier request in the history
            SpeculativeDecoder(target, drafter).generate(ids, max_new_tokens=4)
    else:
        drafter = ModelDrafter(draft)
    config = SpecConfig(num_draft_tokens=k, adaptive=adaptive, max_draft_tokens=max(k, 8))
    out = SpeculativeDecoder(target, drafter, config).generate(ids, max_new_tokens=new)
    _assert_lossless(out, _greedy(target, ids, new))
    stats = out.stats
    assert stats.new_tokens == new
    assert 0 <= stats.accepted <= stats.proposed
    assert sum(stats.per_position_proposed) == stats.proposed
    assert sum(stats.per_position_accepted) == stats.accepted
    assert all(1 <= n <= config.max_draft_tokens for n in stats.draft_lengths)


def test_lean_loop_target_and_draft_stay_lossless(models):
    target, draft = models
    lean_target = KernelOptimizer(KernelConfig()).apply_to_model(copy.deepcopy(target))
    lean_draft = KernelOptimizer(KernelConfig()).apply_to_model(copy.deepcopy(draft))
    decoder = SpeculativeDecoder(lean_target, lean_draft, SpecConfig(num_draft_tokens=3))
    for seed in range(4):
        ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(seed))
        out = decoder.generate(ids, max_new_tokens=24)
        _assert_lossless(out, _greedy(target, ids, 24))
        assert out.stats.target_forwards < 24  # several tokens per target forward: the draft is the target's start


def test_works_with_the_kv_cache_optimizers_cache(models):
    target, draft = models
    kv = KVCacheOptimizer(KVCacheConfig(bits=8, group_size=8, residual_length=16))
    decoder = SpeculativeDecoder(
        target, draft, SpecConfig(num_draft_tokens=4), target_cache_factory=lambda: kv.make_cache(target)
    )
    ids = torch.randint(1, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    out = decoder.generate(ids, max_new_tokens=30)
    want = target.generate(
        ids, **cache_kwargs(kv.make_cache(target)), max_new_tokens=30, min_new_tokens=30, do_sample=False
    )
    _assert_lossless(out, want)


def test_eos_stops_generation(models):
    target, draft = models
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    free = _greedy(target, ids, 12)
    eos = int(free[0, 8 + 4])
    out = SpeculativeDecoder(target, draft).generate(ids, max_new_tokens=12, eos_token_id=eos)
    stop = free[0, 8:].tolist().index(eos)
    assert out.sequences[0, 8:].tolist() == free[0, 8 : 8 + stop + 1].tolist()


def test_ngram_drafter_proposes_what_followed_the_last_match():
    drafter = NGramDrafter(max_ngram=2)
    tokens, dists = drafter.propose([5, 6, 7, 8, 9, 1, 5, 6], 3, None)
    assert tokens == [7, 8, 9]
    assert dists is None
    assert drafter.propose([1, 2, 3], 3, None) == ([], None)


def test_longest_match_picks_the_occurrence_with_the_longer_context():
    text = [4, 1, 2, 3, 9, 8, 5, 1, 2, 3, 7, 6, 4, 1, 2, 3]
    # "1 2 3" occurs twice; "4 1 2 3" once: the text is copying the first occurrence, which "latest" misses
    assert NGramDrafter(match="latest").propose(text, 2, None)[0] == [7, 6]
    assert NGramDrafter(match="longest").propose(text, 2, None)[0] == [9, 8]
    text2 = [5, 2, 3, 9, 8, 1, 2, 3, 7, 6, 1, 2, 3]
    assert NGramDrafter(match="longest").propose(text2, 2, None)[0] == [7, 6]
    assert NGramDrafter(max_ngram=4, min_ngram=4, match="longest").propose(text2, 2, None)[0] == []
    # incremental: the index follows the text as it grows, and a new request starts afresh
    drafter = NGramDrafter(match="longest")
    drafter.start([4, 5, 6], 16)
    assert drafter.propose([4, 5, 6], 2, None)[0] == []
    assert drafter.propose([4, 5, 6, 4], 2, None)[0] == [5, 6]
    with pytest.raises(ConfigError, match="match='nearest'"):
        NGramDrafter(match="nearest")


def test_session_lookup_drafts_from_an_earlier_request():
    drafter = NGramDrafter(match="longest", session=True)
    drafter.start([1, 2], 16)
    drafter.propose([1, 2, 30, 31, 32, 33], 2, None)
    drafter.start([7, 30], 16)  # the earlier request's text is now history
    assert drafter.propose([7, 30], 3, None)[0] == [31, 32, 33]
    alone = NGramDrafter(match="longest")
    alone.start([7, 30], 16)
    assert alone.propose([7, 30], 3, None)[0] == []


# ------------------------------------------------------------------------------------------------ sampling


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy.stats import chisquare

    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token the target gives probability 0 was emitted"
    kept = probs[keep].astype(np.float64)
    expected = kept / kept.sum() * counts.sum()
    return float(chisquare(counts[keep], expected).pvalue)


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampler_keeps_the_target_distribution(k):
    generator = torch.Generator().manual_seed(0)
    q = torch.tensor([0.05, 0.30, 0.0, 0.15, 0.40, 0.10])  # the target, with a zero
    p = torch.tensor([0.40, 0.05, 0.20, 0.15, 0.10, 0.10])  # a draft that disagrees with it
    target_probs = q.expand(k + 1, -1).contiguous()
    draft_probs = p.expand(k, -1).contiguous()
    n = 20_000
    first = np.zeros(6)
    for _ in range(n):
        drafts = torch.multinomial(p, k, replacement=True, generator=generator).tolist()
        tokens, accepted = rejection_sample(target_probs, draft_probs, drafts, generator)
        assert len(tokens) == accepted + 1
        first[tokens[0]] += 1
    assert _chi_square_p(first, q.numpy()) > 1e-3
    # The test has power: a broken rule that accepts every draft emits p's distribution, far from q.
    broken = np.bincount(torch.multinomial(p, n, replacement=True, generator=generator).numpy(), minlength=6)
    assert 0.5 * np.abs(broken / n - q.numpy()).sum() > 0.3
    assert 0.5 * np.abs(first / n - q.numpy()).sum() < 0.02


def test_a_point_mass_draft_keeps_the_target_distribution():
    generator = torch.Generator().manual_seed(1)
    q = torch.tensor([0.5, 0.2, 0.2, 0.1])
    n = 20_000
    counts = np.zeros(4)
    for _ in range(n):
        tokens, _ = rejection_sample(q.expand(2, -1), torch.tensor([[0.0, 0.0, 1.0, 0.0]]), [2], generator)
        counts[tokens[0]] += 1
    assert _chi_square_p(counts, q.numpy()) > 1e-3


def test_seeded_sampling_repeats_and_respects_top_k(models):
    target, draft = models
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    decoder = SpeculativeDecoder(target, draft)
    a = decoder.generate(ids, 16, temperature=0.8, top_p=0.9, seed=7)
    b = decoder.generate(ids, 16, temperature=0.8, top_p=0.9, seed=7)
    assert torch.equal(a.sequences, b.sequences)
    top1 = decoder.generate(ids, 16, temperature=1.0, top_k=1, seed=1)
    _assert_lossless(top1, _greedy(target, ids, 16))


# ---------------------------------------------------------------------------------------------- errors


def test_batch_larger_than_one_gets_a_clear_error(models):
    target, draft = models
    with pytest.raises(ConfigError, match="batch size 1"):
        SpeculativeDecoder(target, draft).generate(torch.ones(2, 4, dtype=torch.long), 4)


def test_mismatched_vocabularies_and_bad_configs_are_refused(models):
    target, _ = models
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    ).eval()
    with pytest.raises(ConfigError, match="vocabulary"):
        SpeculativeDecoder(target, other)
    with pytest.raises(ConfigError, match="min_draft_tokens"):
        SpecConfig(num_draft_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        SpeculativeDecoder(target, NGramDrafter()).generate(torch.ones(1, 3, dtype=torch.long), 2, temperature=-1)


def test_stats_merge_adds_position_by_position():
    a = SpecStats(proposed=3, accepted=2, per_position_proposed=[2, 1], per_position_accepted=[2, 0])
    b = SpecStats(proposed=2, accepted=1, per_position_proposed=[1, 0, 1], per_position_accepted=[1, 0, 0])
    m = a.merge(b)
    assert (m.proposed, m.accepted) == (5, 3)
    assert m.per_position_proposed == [3, 1, 1]
    assert m.per_position_accepted == [3, 0, 0]
    assert m.to_dict()["acceptance_rate"] == pytest.approx(0.6)


class _WrongDrafter:
    """Proposes k tokens the target never emits next (the target's own choice plus one, mod the vocabulary)."""

    def __init__(self, target) -> None:
        self.target = target

    def start(self, prompt, max_len) -> None:
        pass

    def propose(self, sequence, k, sampling):
        with torch.no_grad():
            nxt = int(self.target(torch.tensor([sequence])).logits[0, -1].argmax())
        return [(nxt + 1) % VOCAB] * k, None

    def close(self) -> None:
        pass


def test_drafting_stops_when_recent_drafts_are_rejected_and_output_stays_the_targets(models):
    target, _ = models
    ids = torch.tensor([[3, 5, 7, 9]])
    config = SpecConfig(num_draft_tokens=2, stop_acceptance=0.2, stop_window=3, stop_pause=4)
    out = SpeculativeDecoder(target, _WrongDrafter(target), config).generate(ids, max_new_tokens=30)
    _assert_lossless(out, _greedy(target, ids, 30))
    stats = out.stats
    assert stats.accepted == 0
    # 3 rejected rounds stop it for 4 tokens, 3 more for 8, 3 more for 16 (cut at 30 tokens)
    assert stats.stops >= 2
    assert stats.undrafted_tokens >= 4 + 8
    assert stats.to_dict()["stops"] == stats.stops
    # without the rule every round drafts
    never = SpeculativeDecoder(target, _WrongDrafter(target), SpecConfig(num_draft_tokens=2, stop_acceptance=0.0))
    stats_never = never.generate(ids, max_new_tokens=30).stats
    assert stats_never.stops == 0
    assert stats_never.undrafted_tokens == 0
    assert stats_never.target_forwards == 30  # one token per forward, a wasted draft in each


def test_a_drafter_that_is_right_never_stops(models):
    target, _ = models
    ids = torch.tensor([[3, 5, 7, 9]])
    want = _greedy(target, ids, 24)
    future = want[0].tolist()

    class Oracle:
        def start(self, prompt, max_len):
            pass

        def propose(self, sequence, k, sampling):
            return future[len(sequence) : len(sequence) + k], None

        def close(self):
            pass

    out = SpeculativeDecoder(target, Oracle(), SpecConfig(stop_window=2)).generate(ids, max_new_tokens=24)
    _assert_lossless(out, want)
    assert out.stats.stops == 0
    assert out.stats.acceptance_rate == 1.0


def test_stopping_rule_settings_are_checked():
    with pytest.raises(ConfigError, match="stop_acceptance"):
        SpecConfig(stop_acceptance=1.0)
    with pytest.raises(ConfigError, match="stop_window"):
        SpecConfig(stop_window=0)
