"""Perf gates of the whole system on SmolLM2-135M-Instruct: all four optimizations together against HF ``generate``.

System (``SystemConfig`` defaults): EmbeddingCompressor int8 on the tied embedding / LM head, KernelOptimizer int8
(native weight-only kernels), the KVCacheOptimizer's int8 KIVI cache as the target's cache, and speculative decoding
with n-gram drafting (SmolLM2 has no draft model yet). Baseline: HF ``generate`` on the untouched model, fp32, default
attention, dynamic cache; two 32-token prose prompts, exactly 64 new tokens each, batch 1, 2 threads. Accuracy:
relative top-1 loss of the optimized target read through its KV cache (speculative decoding is lossless on top of it)
on 24 held-out prose blocks. Gates: the seed's 3.0x and 1%.
"""

from __future__ import annotations

import pytest

from pytest_ryzen import accuracy_loss, speedup
from ryzen_opt.measure.timing import generate_workload
from ryzen_opt.optimizers.system import OptimizedSystem

pytestmark = pytest.mark.perf

NEW_TOKENS = 64


@speedup(3.0)
@accuracy_loss(0.01)
def test_all_four_on_smollm2(ryzen, smollm2, reference_logits, prose, two_threads) -> None:
    target, _ = smollm2
    system = OptimizedSystem(target, None)
    prompts = [prose[i : i + 1, :32] for i in range(2)]

    def baseline() -> None:
        for ids in prompts:
            generate_workload(target, ids, NEW_TOKENS)()

    def optimized() -> None:
        for ids in prompts:
            system.generate(ids, NEW_TOKENS)

    ryzen.compare(
        baseline,
        optimized,
        baseline_name="HF generate, fp32, default attention, dynamic cache (SmolLM2, 2 prompts x 64 tokens)",
        candidate_name="all four optimizations (n-gram drafting)",
        optimizer="e2e",
        min_pairs=5,
        max_pairs=12,
        warmup=1,
        max_time=150.0,
    )
    ryzen.record_accuracy(
        reference_logits,
        system.accuracy_model(),
        prose,
        optimizer="e2e",
        reference_name="SmolLM2-135M fp32",
        candidate_name="all four optimizations (target through its KV cache)",
    )
