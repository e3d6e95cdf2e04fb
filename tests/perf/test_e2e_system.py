"""Perf gates of the whole system (issue 9): all four optimizations together against HF ``generate`` fp32.

System: EmbeddingCompressor int8, then KernelOptimizer int4 (int8 LM head), the KVCacheOptimizer's int8 KIVI cache as
the target's cache, and speculative decoding (the zoo: its early-exit draft, optimized the same way; the random 134M:
n-gram prompt lookup, as it has no draft). Baseline: HF ``generate`` on the untouched model, fp32, default attention,
dynamic cache; 32-token prompts, exactly 64 new tokens, batch 1. Accuracy: DESIGN.md's accuracy loss of the optimized
target read through its KV cache (speculative decoding is lossless on top of it) on 64 held-out blocks.
"""

from __future__ import annotations

import pytest
import torch

from pytest_ryzen import accuracy_loss, speedup
from ryzen_opt import zoo
from ryzen_opt.bench import generate_workload
from ryzen_opt.system import OptimizedSystem

pytestmark = pytest.mark.perf

NEW_TOKENS = 64
BASELINE = "HF generate, fp32, default attention, dynamic cache"


def _workloads(reference, system, prompts):
    def baseline() -> None:
        for ids in prompts:
            generate_workload(reference, ids, NEW_TOKENS)()

    def optimized() -> None:
        for ids in prompts:
            system.generate(ids, NEW_TOKENS)

    return baseline, optimized


@speedup(3.0)
@accuracy_loss(0.01)
def test_all_four_on_the_zoo_target(ryzen, device: torch.device) -> None:
    target, tokenizer = zoo.reference_model("target", device=device)
    draft, _ = zoo.reference_model("draft", device=device)
    for model in (target, draft):
        model.generation_config.eos_token_id = None
    system = OptimizedSystem(target, draft)
    blocks = zoo.heldout_blocks(tokenizer, blocks=64).to(device)
    prompts = [blocks[i : i + 1, :32] for i in range(4)]
    baseline, optimized = _workloads(target, system, prompts)
    ryzen.compare(
        baseline,
        optimized,
        baseline_name=f"{BASELINE} (zoo target, 4 prompts x 64 tokens)",
        candidate_name="all four optimizations",
        optimizer="e2e",
        min_pairs=6,
        max_pairs=20,
        warmup=1,
        max_time=90.0,
    )
    ryzen.record_accuracy(
        target,
        system.accuracy_model(),
        blocks,
        optimizer="e2e",
        reference_name="zoo target, fp32",
        candidate_name="all four optimizations (target through its KV cache)",
    )


@speedup(3.0)
def test_all_four_on_the_134m_llama(ryzen, device: torch.device) -> None:
    reference = zoo.llama_134m(device=device)
    system = OptimizedSystem(reference, None)
    prompt = torch.randint(1, 32000, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    baseline, optimized = _workloads(reference, system, [prompt])
    ryzen.compare(
        baseline,
        optimized,
        baseline_name=f"{BASELINE} (134M Llama, 1 prompt x 64 tokens)",
        candidate_name="all four optimizations (n-gram drafting: a random model has no draft)",
        optimizer="e2e",
        min_pairs=6,
        max_pairs=20,
        warmup=1,
        max_time=90.0,
    )
