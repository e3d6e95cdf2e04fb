"""Perf gates of the KernelOptimizer (issue 5): int8 decode speed on the 134M Llama, int8 accuracy on the zoo target.

Speed: paired, interleaved A/B samples of ``generate`` (32-token prompt, exactly 64 new tokens, batch 1) against
HF ``generate`` on an untouched copy of the same model (transformers' default attention, dynamic cache, fp32).
Measured here (Zen 4, 1-2 threads): 4.3-4.6x; the gate is the seed's 3.0x.

Accuracy: DESIGN.md's accuracy loss on 64 held-out blocks of 256 tokens (16,320 scored positions). Measured here:
int8 -0.25% (95% CI -0.70% to 0.21%), int4 with its int8 LM head 0.04% (-0.45% to 0.53%); gate 1%.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pytest_ryzen import accuracy_loss, speedup
from ryzen_opt import zoo
from ryzen_opt.bench import generate_workload
from ryzen_opt.kernels import KernelConfig, KernelOptimizer, kernel_report

pytestmark = pytest.mark.perf

PROMPT_TOKENS, NEW_TOKENS = 32, 64


@speedup(3.0)
def test_int8_decode_134m_beats_hf_generate(ryzen, device: torch.device, record_property) -> None:
    reference = zoo.llama_134m(device=device)
    optimized = KernelOptimizer(KernelConfig(weights="int8")).apply_to_model(copy.deepcopy(reference))
    prompt = torch.randint(0, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    m = ryzen.compare(
        generate_workload(reference, prompt, NEW_TOKENS),
        generate_workload(optimized, prompt, NEW_TOKENS),
        baseline_name=f"HF generate, {reference.config._attn_implementation} attention, dynamic cache, fp32 "
        f"(134M Llama, {PROMPT_TOKENS}-token prompt + {NEW_TOKENS} new tokens, batch 1)",
        candidate_name="KernelOptimizer(weights='int8'): static-cache lean decode, fused qkv/gate-up",
        optimizer="kernel_optimizer",
        min_pairs=6,
        max_pairs=20,
        warmup=1,
        max_time=120.0,
    )
    report = kernel_report(optimized)
    seconds_per_token = m.candidate_median_s / NEW_TOKENS
    # Context for the gate (pytest's own record_property: lands in junit XML and the json report).
    record_property("decode_tokens_per_s", NEW_TOKENS / m.candidate_median_s)
    record_property("baseline_tokens_per_s", NEW_TOKENS / m.baseline_median_s)
    record_property("weight_gb_per_s", report.bytes_per_token / seconds_per_token / 1e9)
    record_property("kernels", report.kernels)


@accuracy_loss(0.01)
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_accuracy_on_the_zoo_target(ryzen, device: torch.device, weights: str) -> None:
    reference, tokenizer = zoo.reference_model("target", device=device)
    optimized = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(reference))
    m = ryzen.record_accuracy(
        reference,
        optimized,
        zoo.heldout_blocks(tokenizer, blocks=64),
        optimizer="kernel_optimizer",
        reference_name="zoo target, fp32",
        candidate_name=f"KernelOptimizer(weights={weights!r})",
    )
    assert m.tokens >= 16_000
