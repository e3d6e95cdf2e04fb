"""Perf gates of the KernelOptimizer on SmolLM2-135M-Instruct: decode speed at 2 threads, and accuracy with the
default settings, for prefill (the whole sequence in one forward) and for token-by-token decode (one token per
forward through a KV cache: the rows a decode step hands the kernels).

Speed: paired, interleaved A/B samples of ``generate`` (a 32-token prose prompt, exactly 64 new tokens, batch 1)
against HF ``generate`` on the untouched model (fp32, its default attention, dynamic cache); the seed's gate 3.0x, on
int8 with the defaults (the eager loop, fused native layers). int4 is not gated on speed: on an AVX2 CPU its kernel is
bound by unpacking nibbles, not by bytes (1.4x HF eager, measured here), so it saves memory, not time;
``bench_kernels.py`` reports it.
Accuracy, gate 1% relative top-1 loss, with intervals that decide it:

- prefill against the fp32 reference, on 72 held-out prose blocks of 256 tokens (18k scored positions). The integer
  kernels round activations per block of 32 and flip ~5% of top-1 predictions either way; on 24 blocks the 95%
  interval was +-0.9% wide around a loss near 0, so the verdict depended on the CPU's rounding, not on the kernels.
- token-by-token decode (one token per forward through a KV cache: the rows a decode step hands the kernels) against
  the same optimized model's own prefill of the same blocks. The kernels compute each row alone (row independence),
  so decode must not lose accuracy beyond prefill's, which the test before gates against fp32; comparing decode with
  fp32 directly stacked both noises on 2k tokens and could not decide. The gate here is 3%, not 1%: the int8
  activations turn the other float order into ~3.5% flipped top-1 predictions either way, so 2k decoded tokens give a
  95% interval of about +-1.5% around a loss near 0 (CI on Zen 4: int8 0.26% [-0.82%, 1.32%], int4 0.26%
  [-1.25%, 1.87%], inconclusive at 1%). A stale cache or a wrong position reads tens of percent, so 3% still fails
  them; deciding 1% here would take ~8k decoded tokens (~50 s per weight format) for what the prefill gate decides.

Numbers measured here are in the README; ``python benchmarks/bench_kernels.py --models smollm2`` reproduces them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pytest_ryzen import accuracy_loss, speedup
from ryzen_opt.measure.decode import CachedForward
from ryzen_opt.measure.timing import generate_workload
from ryzen_opt.models import corpus
from ryzen_opt.optimizers.kernels import KernelConfig, kernel_report

pytestmark = pytest.mark.perf

PROMPT_TOKENS, NEW_TOKENS = 32, 64


@speedup(3.0)
def test_int8_decode_beats_hf_generate_at_2_threads(
    ryzen, smollm2, kernel_variant, prose, two_threads, record_property
) -> None:
    reference, _ = smollm2
    # The defaults: one fused native call per layer, eager (compiling the decode step is slower on CPU since the native
    # layers, 1.05 against 0.89 s for these 64 tokens, and costs ~16 s of compile; see SystemConfig.compile_kernels).
    config = KernelConfig(weights="int8")
    optimized = kernel_variant(config)
    weights = config.weights
    prompt = prose[:1, :PROMPT_TOKENS]
    m = ryzen.compare(
        generate_workload(reference, prompt, NEW_TOKENS),
        generate_workload(optimized, prompt, NEW_TOKENS),
        baseline_name=f"HF generate, {reference.config._attn_implementation} attention, dynamic cache, fp32 "
        f"(SmolLM2-135M, {PROMPT_TOKENS}-token prompt + {NEW_TOKENS} new tokens, batch 1, 2 threads)",
        candidate_name=f"KernelOptimizer(weights={weights!r})",
        optimizer="kernel_optimizer",
        min_pairs=5,
        max_pairs=12,
        warmup=1,
        max_time=150.0,
    )
    report = kernel_report(optimized)
    record_property("decode_ms_per_token", m.candidate_median_s / NEW_TOKENS * 1e3)
    record_property("hf_ms_per_token", m.baseline_median_s / NEW_TOKENS * 1e3)
    record_property("kernels", report.kernels)


@pytest.fixture(scope="module")
def prefill_blocks(smollm2) -> torch.Tensor:
    """72 held-out blocks of 256 tokens (18k scored positions): the reference's forward over them runs once for both
    weight formats (``reference_logits``)."""
    reference, tokenizer = smollm2
    return corpus.prose_blocks(tokenizer, "test", blocks=72).to(reference.device)


@accuracy_loss(0.01)
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_prefill_accuracy(ryzen, kernel_variant, reference_logits, prefill_blocks, weights: str) -> None:
    optimized = kernel_variant(KernelConfig(weights=weights))
    m = ryzen.record_accuracy(
        reference_logits,
        optimized,
        prefill_blocks,
        optimizer="kernel_optimizer",
        reference_name="SmolLM2-135M fp32, one forward per block",
        candidate_name=f"KernelOptimizer(weights={weights!r}), one forward per block",
    )
    assert m.tokens >= 18_000


@accuracy_loss(0.03)  # the resolution 2k decoded tokens give (see the module docstring); prefill gates the 1%
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_token_by_token_decode_accuracy(ryzen, kernel_variant, prose, weights: str) -> None:
    optimized = kernel_variant(KernelConfig(weights=weights))
    blocks = prose[:16, :128]  # 16 sequences, one token of each a forward: the kernels' decode path
    m = ryzen.record_accuracy(
        optimized,
        CachedForward(optimized, lambda: DynamicCache(config=optimized.config), chunk=1),
        blocks,
        optimizer="kernel_optimizer",
        reference_name=f"KernelOptimizer(weights={weights!r}), one forward per block (its prefill)",
        candidate_name=f"KernelOptimizer(weights={weights!r}), one token per forward",
    )
    # the same rows, another attention order (measured 0.965 int8): a wrong cache or position reads far below
    assert m.top1_agreement > 0.9, m.top1_agreement
