"""Perf gates of the SpeculativeDecoder (issue 8): the zoo target with its early-exit draft, on held-out code prompts.

The target runs the same kernels in both arms (KernelOptimizer, int4 weights: weight-only, so a token's logits do not
depend on the other tokens verified with it, and greedy output stays the target's token for token); the baseline is
the target alone, the candidate speculative decoding with the early-exit draft (same kernels, its one-token step
compiled). Measured here: acceptance 0.72, 1.31-1.38x with an eager draft, ~1.4-1.6x compiled. Gates: the seed's
acceptance rate 0.60 and speculative speedup 1.2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pytest_ryzen import acceptance_rate, speedup
from ryzen_opt import zoo
from ryzen_opt.kernels import KernelConfig, KernelOptimizer
from ryzen_opt.speculative import SpecConfig, SpeculativeDecoder

pytestmark = pytest.mark.perf

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 64, 64


@pytest.fixture(scope="module")
def setup(device: torch.device):
    target, tokenizer = zoo.reference_model("target", device=device)
    draft, _ = zoo.reference_model("draft", device=device)
    config = KernelConfig(weights="int4")
    target = KernelOptimizer(config).apply_to_model(target)
    # The draft's one-token steps compiled (as OptimizedSystem does): ~half an eager step on a model this small.
    draft = KernelOptimizer(dataclasses.replace(config, compile=True)).apply_to_model(draft)
    blocks = zoo.heldout_blocks(tokenizer, blocks=PROMPTS).to(device)
    prompts = [blocks[i : i + 1, :PROMPT_TOKENS] for i in range(PROMPTS)]
    return target, draft, prompts


@acceptance_rate(0.60)
def test_early_exit_draft_acceptance(ryzen, setup) -> None:
    target, draft, prompts = setup
    decoder = SpeculativeDecoder(target, draft, SpecConfig())
    stats = None
    for ids in prompts:
        out = decoder.generate(ids, NEW_TOKENS)
        want = target.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out.sequences, want) or out.stats.near_ties > 0, "speculative greedy output changed"
        stats = out.stats if stats is None else stats.merge(out.stats)
    assert stats is not None
    ryzen.record_acceptance(
        stats.accepted,
        stats.proposed,
        optimizer="speculative_decoder",
        tokens_per_target_forward=stats.tokens_per_target_forward,
        per_position_acceptance=stats.per_position_acceptance,
        near_ties=stats.near_ties,
    )


@speedup(1.2)
def test_speculative_beats_the_target_alone(ryzen, setup) -> None:
    target, draft, prompts = setup
    decoder = SpeculativeDecoder(target, draft, SpecConfig())
    subset = prompts[:4]

    def alone() -> None:
        for ids in subset:
            target.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    def speculative() -> None:
        for ids in subset:
            decoder.generate(ids, NEW_TOKENS)

    ryzen.compare(
        alone,
        speculative,
        baseline_name="zoo target alone, KernelOptimizer int4 lean loop, greedy (4 prompts x 64 tokens)",
        candidate_name="SpeculativeDecoder, early-exit draft, same kernels",
        optimizer="speculative_decoder",
        min_pairs=6,
        max_pairs=20,
        warmup=1,
        max_time=60.0,
    )
