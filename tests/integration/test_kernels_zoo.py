"""KernelOptimizer on SmolLM2-135M (and the compiled step on the tiny zoo, whose compile takes seconds): the fp32 mode
reproduces the reference's tokens, compiled or not; the quantized modes' next-token predictions stay close to it.

Exact token equality is the contract in fp32 (docs/definitions.md, "correct before fast"): the lean loop runs the same
operations on the same weights, in another memory layout. A divergence is accepted only at a near-tie (a top-2
logit gap under 1e-5), and is then reported by ``greedy_agreement``, not hidden.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ryzen_opt.measure.accuracy import accuracy, greedy_agreement
from ryzen_opt.measure.stats import bootstrap_ci
from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer, kernel_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target():
    model, tokenizer = zoo.reference_model("smollm2")
    model.generation_config.eos_token_id = None
    return model, corpus.prose_blocks(tokenizer, "test", blocks=16)


@pytest.fixture(scope="module")
def tiny_target():
    model, tokenizer = zoo.reference_model("target", "tiny")
    return model, corpus.heldout_blocks(tokenizer, "tiny", blocks=8)


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


# Floors on the lower end of the 95% interval of teacher-forced top-1 agreement with the fp32 reference, over the 16
# held-out blocks (4080 positions). Measured with the current code (2-core CPU, AVX-512): int8 0.953 [0.947, 0.959],
# int4 0.968 [0.964, 0.973] (per-channel int8 moves more argmaxes than int4 in groups of 32; the "dequant" int8 kernel
# reads the same 0.953, so that is the rounding of the weights, not a kernel). Another CPU's kernels round differently
# by far less than the 5 points of margin, while a broken or coarser quantizer lands well under the floor: int4 in
# groups of 256 (where the shapes allow, int8 elsewhere) reads 0.768 [0.751, 0.787].
AGREEMENT_FLOOR = {"int8": 0.90, "int4": 0.90}


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_predictions_stay_close(target, weights: str) -> None:
    """Teacher-forced, every position of every block: the quantized model's argmax agrees with the fp32 reference's.

    Replaces a floor on greedy continuations' shared-prefix fraction (4 continuations: one early flip changed a whole
    continuation, so it read 0.234 on one CPU against a floor of 0.25): agreement over thousands of positions, each
    scored on the reference's context, has an interval, and the blocks are its resampling unit (positions inside a
    block are correlated, blocks roughly independent), as in ``ryzen_opt.measure.accuracy``.
    """
    reference, blocks = target
    optimized = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(reference))
    per_block = [accuracy(reference, optimized, blocks[i : i + 1]) for i in range(len(blocks))]
    agreement = np.array([m.top1_agreement for m in per_block])  # equal-length blocks: their mean is the pooled one
    ci_low, ci_high = bootstrap_ci(agreement, statistic=np.mean)
    measured = f"{weights} top-1 agreement {agreement.mean():.4f} [95% CI {ci_low:.4f}, {ci_high:.4f}]"
    measured += f" over {sum(m.tokens for m in per_block)} positions; per block {np.round(agreement, 3).tolist()}"
    assert ci_low >= AGREEMENT_FLOOR[weights], measured
