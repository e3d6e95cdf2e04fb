"""KernelOptimizer on SmolLM2-135M (and the compiled step on the tiny zoo, whose compile takes seconds): the fp32 mode
reproduces the reference's tokens, compiled or not; quantized greedy output stays close.

Exact token equality is the contract in fp32 (docs/definitions.md, "correct before fast"): the lean loop runs the same
operations on the same weights, in another memory layout. A divergence is accepted only at a near-tie (a top-2
logit gap under 1e-5), and is then reported by ``greedy_agreement``, not hidden.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ryzen_opt import zoo
from ryzen_opt.bench import greedy_agreement
from ryzen_opt.kernels import KernelConfig, KernelOptimizer, kernel_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target():
    model, tokenizer = zoo.reference_model("smollm2")
    model.generation_config.eos_token_id = None
    return model, zoo.prose_blocks(tokenizer, "test", blocks=16)


@pytest.fixture(scope="module")
def tiny_target():
    model, tokenizer = zoo.reference_model("target", "tiny")
    return model, zoo.heldout_blocks(tokenizer, "tiny", blocks=8)


def _prompts(blocks: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [blocks[i, :32] for i in range(n)]


@pytest.mark.parametrize("compile_step", [False, True], ids=["eager SmolLM2", "compiled tiny zoo"])
def test_fp32_tokens_equal_the_reference(request, compile_step: bool) -> None:
    reference, blocks = request.getfixturevalue("tiny_target" if compile_step else "target")
    optimized = KernelOptimizer(KernelConfig(weights="none", compile=compile_step)).apply_to_model(
        copy.deepcopy(reference)
    )
    if compile_step:
        assert kernel_report(optimized).compile_seconds > 0
    for prompt in _prompts(blocks, 3):
        ids = prompt[None]
        want = reference.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        got = optimized.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        if not torch.equal(got, want):
            # Only a near-tie may explain it; greedy_agreement says whether it was one.
            agreement = greedy_agreement(reference, optimized, [prompt], max_new_tokens=32)
            assert agreement["near_tie_divergences"] == 1, (got, want, agreement)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_greedy_output_stays_close(target, weights: str) -> None:
    reference, blocks = target
    optimized = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(reference))
    agreement = greedy_agreement(reference, optimized, _prompts(blocks, 4), max_new_tokens=32)
    # A floor, not an expected value: one early flip changes a whole continuation, so prefixes are short-tailed.
    assert agreement["mean_prefix_fraction"] >= 0.25, agreement
