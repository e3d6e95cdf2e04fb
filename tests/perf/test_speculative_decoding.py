"""Perf gates of the SpeculativeDecoder on SmolLM2-135M-Instruct with n-gram drafting (prompt lookup), on the chat
tasks of ``corpus.chat_prompts`` (held-out "test" halves; the drafter's defaults were chosen on "tune" with
``benchmarks/bench_spec_tasks.py --split tune``):

- prompts whose answer copies the prompt: repeat a prose passage, correct its spelling, add type hints to a Python
  function (two of each). Gate: 1.5x the same optimized target alone (``copy_speculative_speedup``). Measured on a
  Zen 4 with ``benchmarks/bench_spec_tasks.py --split test --prompts 2``: repeat 1.69x (95% CI 1.61-1.75), spelling
  1.79x (1.76-1.91), code 2.18x (2.06-2.33); the drafter matches the longest context (``NGramDrafter(match=
  "longest")``), and the passages end at a sentence end;
- open questions, whose answers do not copy: prompt lookup still finds short matches and proposes wrong drafts, and
  each costs its verification, so drafting stops when recent acceptance is low (``SpecConfig.stop_acceptance``).
  Gate 0.75x, a cost guard: the paired intervals of a few 96-token answers on this 2-core machine are +-10-15% wide
  (1.00x-1.04x measured with the rule, 0.96x on the AVX2 path, 0.96x without the rule), too wide to decide a 5% bound
  in CI's time.

Both arms run the same kernels (KernelOptimizer, SystemConfig's int8) and stop at the end of the answer (EOS).
Lossless: greedy output equals the target's own ``generate``, token for token, on every prompt (asserted). The
decoder prefills the whole prompt as ``generate`` does: a prompt token computed inside a verification gets other
bits where activations are rounded to int8, and the outputs left each other on 1 of 3 prompts before.
"""

from __future__ import annotations

import pytest

from pytest_ryzen import speedup
from ryzen_opt.models import corpus
from ryzen_opt.optimizers.drafting import NGramDrafter
from ryzen_opt.optimizers.speculative import SpecConfig, SpeculativeDecoder, check_lossless
from ryzen_opt.optimizers.system import SystemConfig

pytestmark = pytest.mark.perf

NEW_TOKENS = 96


@pytest.fixture(scope="module")
def target(kernel_variant):
    return kernel_variant(SystemConfig().kernels)


def _check_and_time(ryzen, target, tokenizer, prompts, label: str) -> None:
    eos = tokenizer.eos_token_id  # the perf fixture turns the model's own EOS off; answers end at <|im_end|>
    decoder = SpeculativeDecoder(target, NGramDrafter(), SpecConfig())
    stats, _ = check_lossless(decoder, target, prompts, NEW_TOKENS, eos)  # raises when an output changed
    ryzen.record_acceptance(
        stats.accepted,
        stats.proposed,
        optimizer="speculative_decoder",
        tokens_per_target_forward=stats.tokens_per_target_forward,
        per_position_acceptance=stats.per_position_acceptance[:12],
        stops=stats.stops,
        undrafted_tokens=stats.undrafted_tokens,
        new_tokens=stats.new_tokens,
        workload=label,
    )

    def alone() -> None:
        for ids in prompts:
            target.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)

    def speculative() -> None:
        for ids in prompts:
            decoder.generate(ids, NEW_TOKENS, eos_token_id=eos)

    ryzen.compare(
        alone,
        speculative,
        baseline_name=f"SmolLM2 alone, KernelOptimizer int8 lean loop, greedy ({label}, up to {NEW_TOKENS} tokens)",
        candidate_name="SpeculativeDecoder, n-gram drafting, same kernels",
        optimizer="speculative_decoder",
        min_pairs=4,
        max_pairs=10,
        warmup=1,
        max_time=50.0,
    )


@speedup(1.5)  # Thresholds.copy_speculative_speedup, the gate `ryzen-opt run` applies to the same prompts
def test_ngram_drafting_pays_where_the_answer_copies_the_prompt(ryzen, target, smollm2) -> None:
    _, tokenizer = smollm2
    prompts = [ids for task in corpus.COPY_TASKS for ids in corpus.chat_prompts(tokenizer, task, "test", n=2)]
    _check_and_time(ryzen, target, tokenizer, prompts, "repeat, spelling, code: 2 prompts each")


@speedup(0.75)
def test_ngram_drafting_costs_little_on_open_questions(ryzen, target, smollm2) -> None:
    _, tokenizer = smollm2
    prompts = corpus.chat_prompts(tokenizer, "open", "test", n=3)
    _check_and_time(ryzen, target, tokenizer, prompts, "open questions: 3 prompts")
