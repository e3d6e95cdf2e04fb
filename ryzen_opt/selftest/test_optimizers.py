"""The optimizers on the model under test (see the package docstring for what each check claims and why)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from ryzen_opt.compat import cache_kwargs
from ryzen_opt.measure.accuracy import accuracy
from ryzen_opt.measure.memory import cache_bytes
from ryzen_opt.optimizers.drafting import NGramDrafter
from ryzen_opt.optimizers.embeddings import EmbeddingCompressor
from ryzen_opt.optimizers.kernels import KernelOptimizer
from ryzen_opt.optimizers.kv_cache import KVCacheOptimizer
from ryzen_opt.optimizers.speculative import SpeculativeDecoder
from ryzen_opt.selftest.conftest import max_positions

# Greedy decoding in fp32 may pick another token where the two best logits are this close: batch shapes change the
# order of float additions (a verify forward of k tokens against one token at a time). Anything wider is a bug.
NEAR_TIE = 1e-3
# The margin of the KV-cache check: the full-precision logit of every token chosen through the cache may fall this
# far below the full-precision best. Measured on SmolLM2 (256-token prose prompt, 16 new tokens): the 8-bit and the
# 4-bit cache both decoded exactly its greedy tokens. A broken cache (wrong scales, a lost window) misses by units.
KV_MARGIN = 1.0


def _greedy(model: Any, ids: torch.Tensor, n: int, **kwargs: Any) -> list[int]:
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
    return out[0].tolist()


@torch.no_grad()
def _assert_same_or_near_tie(model: Any, expected: list[int], got: list[int], what: str) -> None:
    """``got == expected``, or they first differ where the model's two candidates are a near tie."""
    if got == expected:
        return
    assert len(got) == len(expected), f"{what}: {len(got)} tokens, expected {len(expected)}"
    j = next(i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b)
    logits = model(input_ids=torch.tensor([expected[:j]])).logits[0, -1].float()
    gap = float(logits[expected[j]] - logits[got[j]])
    assert abs(gap) <= NEAR_TIE, (
        f"{what} differs from the model's own greedy decoding at token {j} ({got[j]} instead of {expected[j]}), and "
        f"that is no near tie: the logits differ by {gap:.4g}"
    )


class _OracleDrafter:
    """Proposes the model's own greedy continuation: a correct verifier accepts every one of these tokens."""

    def __init__(self, continuation: list[int]) -> None:
        self.continuation = continuation

    def start(self, prompt: list[int], max_len: int) -> None:
        pass

    def propose(self, sequence: list[int], k: int, sampling: Any) -> tuple[list[int], None]:
        n = len(sequence)
        if sequence != self.continuation[:n]:
            return [], None
        return self.continuation[n : n + k], None

    def close(self) -> None:
        pass


def _prompts(tokenizer: Any, prose: torch.Tensor) -> dict[str, torch.Tensor]:
    counting = ", ".join(str(i) for i in range(1, 9))
    repeated = tokenizer(f"{counting}, {counting}, {counting}, 1, 2, 3,", return_tensors="pt").input_ids
    return {"repeating": repeated, "prose": prose[:1, :48]}


@pytest.mark.parametrize("which", ["repeating", "prose"])
def test_speculative_ngram_is_lossless(model: Any, tokenizer: Any, prose: torch.Tensor, system_config: Any, which):

    ids = _prompts(tokenizer, prose)[which]
    n = 24
    expected = _greedy(model, ids, n)
    out = SpeculativeDecoder(model, NGramDrafter(), system_config.speculative).generate(ids, n)
    _assert_same_or_near_tie(model, expected, out.sequences[0].tolist(), f"n-gram speculative decoding ({which})")
    if which == "repeating":  # the prompt repeats itself: prompt lookup always has something to propose
        assert out.stats.proposed > 0, "the n-gram drafter proposed nothing on a prompt that repeats itself"


def test_speculative_accepts_what_the_model_would_say(model: Any, prose: torch.Tensor, system_config: Any):

    ids = prose[:1, :32]
    n = 24
    expected = _greedy(model, ids, n)
    out = SpeculativeDecoder(model, _OracleDrafter(expected), system_config.speculative).generate(ids, n)
    got = out.sequences[0].tolist()
    _assert_same_or_near_tie(model, expected, got, "speculative decoding with the model's own continuation as drafts")
    if got == expected:
        assert out.stats.proposed > 0
        assert out.stats.accepted == out.stats.proposed, (
            f"{out.stats.accepted} of {out.stats.proposed} drafts accepted, though each was the model's own greedy "
            "token: verification rejects correct drafts"
        )
        assert out.stats.target_forwards < n, "every token took its own target forward: nothing was verified in bulk"


def _check_accuracy(m: Any, what: str) -> None:
    # Not shown to lose more than 1% (the CI's lower end; a few blocks give a wide interval), and agreeing with the
    # model on most tokens: a broken optimizer loses far more and agrees on far fewer.
    assert m.ci_low <= 0.01, f"{what} loses more than 1% top-1: {m.describe()}"
    assert m.top1_agreement >= 0.85, f"{what} agrees with the model on {m.top1_agreement:.1%} of tokens only"


def test_kernels_keep_accuracy(model: Any, reference: Any, prose: torch.Tensor, system_config: Any):

    optimized = KernelOptimizer(system_config.kernels).apply_to_model(copy.deepcopy(model))
    m = accuracy(reference, optimized, prose, reference_name="model", candidate_name="KernelOptimizer")
    _check_accuracy(m, f"KernelOptimizer({system_config.kernels.to_dict()})")


def test_embedding_compression_keeps_accuracy(model: Any, reference: Any, prose: torch.Tensor, system_config: Any):

    compressor = EmbeddingCompressor(system_config.embeddings)
    optimized = compressor.apply_to_model(copy.deepcopy(model))
    assert compressor.compression_report()["ratio"] > 1.0
    m = accuracy(reference, optimized, prose, reference_name="model", candidate_name="EmbeddingCompressor")
    _check_accuracy(m, f"EmbeddingCompressor({system_config.embeddings.to_dict()})")


@torch.no_grad()
def test_kv_cache_stores_less_and_decodes_within_a_margin(model: Any, prose: torch.Tensor, system_config: Any):
    from transformers import DynamicCache

    kv = system_config.kv_cache
    n = 16
    # Long enough that the cache compresses: past the quantized cache's full-precision window, or the sink's window.
    length = kv.residual_length + 2 * kv.group_size if kv.strategy == "quantized" else kv.sink_tokens + kv.window + 64
    if length + n > max_positions(model):
        pytest.skip(f"the model's {max_positions(model)} positions are too few for a {length}-token prompt")
    stream = prose.flatten()
    ids = stream.repeat(length // stream.numel() + 1)[:length].unsqueeze(0)
    cache = KVCacheOptimizer(kv).make_cache(model)
    got = _greedy(model, ids, n, **cache_kwargs(cache))
    dynamic = DynamicCache(config=model.config)
    expected = _greedy(model, ids, n, **cache_kwargs(dynamic))
    assert cache_bytes(cache) < cache_bytes(dynamic), (
        f"the {kv.strategy} cache stores {cache_bytes(cache)} bytes, HF's dynamic cache {cache_bytes(dynamic)}"
    )
    if kv.strategy != "quantized" or got == expected:
        return  # the sink cache drops context by design: what it decodes is not the full model's
    # Every token chosen through the cache is one the full-precision model ranks within KV_MARGIN of its best.
    logits = model(input_ids=torch.tensor([got])).logits[0, length - 1 : -1].float()
    chosen = torch.tensor(got[length:])
    deficit = logits.max(-1).values - logits.gather(-1, chosen[:, None])[:, 0]
    assert float(deficit.max()) <= KV_MARGIN, (
        f"decoding through the {kv.bits}-bit cache chose tokens the model scores up to {float(deficit.max()):.3g} "
        f"below its best (allowed {KV_MARGIN}); greedy tokens {got[length:]} vs {expected[length:]}"
    )
