"""Speculative decoding with a compiled draft (KernelConfig(compile=True)) stays lossless, on the tiny zoo (its draft
compiles in seconds).

The draft's one-token steps run through ``torch.compile`` (half an eager step on a model this small); its rollbacks
move the shared position only. The target's greedy output must not change: the draft decides what is proposed, never
what is kept.
"""

from __future__ import annotations

import pytest
import torch

from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer
from ryzen_opt.optimizers.speculative import SpecConfig, SpeculativeDecoder

pytestmark = pytest.mark.slow


def test_compiled_draft_keeps_the_targets_greedy_output() -> None:
    target, tokenizer = zoo.reference_model("target", "tiny")
    draft, _ = zoo.reference_model("draft", "tiny")
    target = KernelOptimizer(KernelConfig(weights="none")).apply_to_model(target)
    draft = KernelOptimizer(KernelConfig(weights="none", compile=True)).apply_to_model(draft)
    decoder = SpeculativeDecoder(target, draft, SpecConfig())
    blocks = corpus.heldout_blocks(tokenizer, "tiny", blocks=4)
    for i in range(4):
        ids = blocks[i : i + 1, :48]
        out = decoder.generate(ids, 48)
        want = target.generate(ids, max_new_tokens=48, min_new_tokens=48, do_sample=False)
        assert torch.equal(out.sequences, want) or out.stats.near_ties > 0
        assert out.stats.acceptance_rate > 0.3  # a compiled draft that proposed garbage would be caught here
