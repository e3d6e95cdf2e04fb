"""The validation stage: every optimizer against its baseline, and all four together, on real measurements.

Each model's variants are built once and every measurement of the model shares them; the results are checked
against the thresholds into ``validation_report.json``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ryzen_opt.measure.accuracy import MemoLogits, accuracy
from ryzen_opt.measure.decode import CachedForward
from ryzen_opt.measure.timing import compare
from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.drafting import NGramDrafter
from ryzen_opt.optimizers.kv_cache import KVCacheOptimizer
from ryzen_opt.optimizers.speculative import SpeculativeDecoder, check_lossless
from ryzen_opt.optimizers.system import Variants, build_variants, compose
from ryzen_opt.run.context import RunContext
from ryzen_opt.validation.validator import OptimizationValidator, load_thresholds

# A reference's logits over the held-out blocks are kept (and reused by every candidate it is compared with) up to
# this size. SmolLM2's 49,152-token vocabulary over the default 48 blocks of 256 is 2.4 GB; kept, they save three of
# the reference's fp32 passes over the blocks (~35 s each on 2 AVX2 cores). Above it, the reference runs per
# candidate: slower, never wrong.
MEMO_BYTES = 3 << 30


def memo_logits(model: Any, blocks: Any) -> Any:
    """``model`` as a module whose logits for each input are computed once: the fp32 reference of the kernel, the
    embedding and the end-to-end accuracy comparisons is the same forward over the same blocks. Returns ``model``
    itself when the logits of ``blocks`` would not fit in ``MEMO_BYTES``."""

    if blocks.numel() * model.config.vocab_size * 4 > MEMO_BYTES:
        return model
    return MemoLogits(model)


def speculative_workloads(ctx: RunContext, validator: Any, target: Any) -> dict[str, Any]:
    """N-gram speculation on chat requests, against ``target`` alone (the same kernels): a copy-heavy set (answers
    that copy the prompt: ``corpus.COPY_TASKS``), gated (``copy_speculative_speedup``, lossless), and an open set
    (questions), reported: prompt lookup pays where the answer repeats its prompt, and what it costs elsewhere is
    the other half of the claim."""

    v, tokenizer = ctx.config.validation, ctx.tokenizer
    if v.spec_task_prompts == 0:
        why = "[validation] spec_task_prompts = 0"
    elif not getattr(tokenizer, "chat_template", None):
        why = "the target's tokenizer has no chat template, and the copy-heavy tasks are chat requests"
    else:
        why = ""
    if why:
        validator.validate_speculative_copy(None, reason=why)
        return {"skipped": why}
    eos = tokenizer.eos_token_id
    n = v.spec_task_prompts
    sets = {
        "copy-heavy": [p for task in corpus.COPY_TASKS for p in corpus.chat_prompts(tokenizer, task, "test", n=n)],
        "open": corpus.chat_prompts(tokenizer, "open", "test", n=n),
    }
    out: dict[str, Any] = {}
    for name, prompts in sets.items():
        decoder = SpeculativeDecoder(target, NGramDrafter(), ctx.config.system.speculative)
        ctx.say(f"validation: n-gram speculation on {len(prompts)} {name} chat prompts")
        stats, identical = check_lossless(decoder, target, prompts, v.spec_new_tokens, eos)
        speed = compare(
            lambda prompts=prompts: [
                target.generate(ids, max_new_tokens=v.spec_new_tokens, do_sample=False, eos_token_id=eos)
                for ids in prompts
            ],
            lambda prompts=prompts, decoder=decoder: [
                decoder.generate(ids, v.spec_new_tokens, eos_token_id=eos) for ids in prompts
            ],
            min_pairs=v.pairs,  # as the stage's other speculative figure: 4 pairs decided 1.5x (CI 1.71-1.90)
            max_pairs=v.pairs,
            warmup=1,
            baseline_name="target alone, same kernels",
            candidate_name=f"n-gram speculation ({name})",
        )
        tasks = corpus.COPY_TASKS if name == "copy-heavy" else ("open",)
        workload = (
            f"{name} chat requests ({', '.join(tasks)}; {v.spec_task_prompts} each, 'test' half), "
            f"up to {v.spec_new_tokens} new tokens, greedy"
        )
        out[name] = {
            "workload": workload,
            "stats": stats.to_dict(),
            "identical": identical,
            "prompts": len(prompts),
            "speedup": speed.to_dict(),
        }
        if name == "copy-heavy":
            validator.validate_speculative_copy(
                speed, lossless=True, baseline="target alone, same kernels", workload=workload
            )
    return out


@dataclass
class ModelUnderTest:
    """What every measurement of one model shares, so its variants are built once and its inputs picked once."""

    label: str
    reference: Any
    draft: Any | None
    variants: Variants
    prompts: list[torch.Tensor]
    blocks: torch.Tensor | None  # held-out text for accuracy; None for random weights


class Phases:
    """Where the stage's minutes go, kept in the report: (phase, start) marks, one per phase, shown on a bar."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = [("build", time.perf_counter())]
        self.bar: Any = None

    def show(self, label: str) -> None:
        """Open the bar once the model is built, so the build is not counted as a step."""
        # The timed arms (one step: they share each round), then speculative, KV memory, compression and accuracy.
        self.bar = tqdm(total=5, desc=f"validation [{label}]", unit="step", leave=False, disable=None)

    def step(self, what: str) -> None:
        """Start phase ``what``: mark its start and advance the bar, so the report says where the time went."""
        self.marks.append((what, time.perf_counter()))
        self.bar.set_postfix_str(what)
        self.bar.update(1)

    def seconds(self) -> dict[str, float]:
        """Close the bar and return each phase's seconds, in order, for the report."""
        self.bar.close()
        self.marks.append(("end", time.perf_counter()))
        return {a: round(t1 - t0, 1) for (a, t0), (_, t1) in itertools.pairwise(self.marks)}


def tag(result: Any, optimizer: str, model: str) -> None:
    """Label a validation result with its optimizer and model, so the report can say which failed where."""
    result.details.update(optimizer=optimizer, model=model)


def prepare_model(ctx: RunContext, model_name: str) -> ModelUnderTest:
    """Build ``model_name``'s variants once (the target reuses setup's build) and pick its prompts and blocks."""

    cfg, v = ctx.config, ctx.config.validation
    if model_name == "target":
        reference, draft, label = ctx.target, ctx.draft, "target"
        blocks = validation_blocks(ctx, v.accuracy_blocks)
        prompts = [blocks[i % blocks.shape[0] : i % blocks.shape[0] + 1, :32] for i in range(v.prompts)]
        if ctx.variants is None:
            ctx.say(f"validation [{label}]: building the four optimizers, each alone and all together (once)")
            ctx.variants = build_variants(reference, draft, cfg.system)
        return ModelUnderTest(label, reference, draft, ctx.variants, prompts, blocks)
    reference = zoo.llama_134m(device=ctx.device)
    generator = torch.Generator().manual_seed(0)
    # One prompt: HF generate on the 134M takes ~2 s per 64 tokens, and the ratio is stable across prompts.
    prompts = [torch.randint(1, 32000, (1, 32), generator=generator).to(ctx.device)]
    variants = build_variants(reference, None, cfg.system)
    return ModelUnderTest("134m", reference, None, variants, prompts, None)


def measure_speed(
    ctx: RunContext, validator: OptimizationValidator, model: ModelUnderTest, phases: Phases
) -> dict[str, Any]:
    """Time each optimizer alone and all four together against HF generate, and gate the kernels and the system."""

    cfg, v = ctx.config, ctx.config.validation
    baseline = "HF generate, fp32, default attention, dynamic cache"
    speeds = compose(
        model.reference,
        model.draft,
        model.prompts,
        new_tokens=v.new_tokens,
        config=cfg.system,
        pairs=v.pairs,
        progress=phases.step,
        variants=model.variants,
    )
    data: dict[str, Any] = {"speedups_vs_hf": {k: m.to_dict() for k, m in speeds.items()}}
    # Which gates apply where is the issues' definition: the kernel speedup (3x) is a claim about a model big enough
    # to be bound by streaming weights (the 134M, a real target such as SmolLM2); the zoo target's 6.8M are bound by
    # per-token overhead, so there the kernels' speedup is reported (speedups_vs_hf) but not gated. Speculative
    # decoding's gates are about a trained draft (the zoo's); n-gram drafting on arbitrary text is reported, not gated.
    label = model.label
    if label == "134m" or cfg.model.target != "zoo":
        tag(validator.validate_kernel_performance(speeds["kernels"], baseline=baseline), "kernel_optimizer", label)
    workload = f"{len(model.prompts)} held-out prose prompt(s) of 32 tokens, {v.new_tokens} new tokens each, greedy"
    data["workload"] = workload
    tag(validator.validate_end_to_end_system(speeds["all four"], baseline=baseline, workload=workload), "e2e", label)
    return data


def measure_speculation(
    ctx: RunContext, validator: OptimizationValidator, model: ModelUnderTest, phases: Phases
) -> dict[str, Any]:
    """Speculative decoding against its own baseline (the target alone, same kernels), gated for a trained draft."""

    cfg, v = ctx.config, ctx.config.validation
    # Speculative decoding against its own baseline: the target alone with the same kernels, so the drafting target
    # has those kernels only too; a draft model drafts with its kernels (the system's, compiled once).
    kernels_only = model.variants.kernels
    drafter = model.variants.system.draft if model.variants.system.draft is not None else NGramDrafter()
    spec = SpeculativeDecoder(kernels_only, drafter, cfg.system.speculative)
    phases.step("speculative vs the target alone")
    stats = None
    for ids in model.prompts:
        out = spec.generate(ids, v.new_tokens)
        stats = out.stats if stats is None else stats.merge(out.stats)
    spec_speed = compare(
        lambda: [
            kernels_only.generate(ids, max_new_tokens=v.new_tokens, min_new_tokens=v.new_tokens, do_sample=False)
            for ids in model.prompts
        ],
        lambda: [spec.generate(ids, v.new_tokens) for ids in model.prompts],
        min_pairs=v.pairs,
        max_pairs=v.pairs,
        warmup=1,
        baseline_name="target alone, same kernels",
        candidate_name="speculative decoding",
    )
    data = {
        "drafter": "draft model" if model.draft is not None else "n-gram prompt lookup",
        "stats": stats.to_dict() if stats else None,
        "speedup": spec_speed.to_dict(),
    }
    if model.draft is not None:
        tag(
            validator.validate_speculative_decoding(
                stats.acceptance_rate if stats else None,
                speedup=spec_speed,
                baseline="target alone, same kernels",
                reason=None if stats and stats.proposed else "the drafter proposed nothing",
            ),
            "speculative_decoder",
            model.label,
        )
        tag(validator.results[-1], "speculative_decoder", model.label)
    return data


def measure_kv_memory(
    ctx: RunContext, validator: OptimizationValidator, model: ModelUnderTest, phases: Phases
) -> tuple[KVCacheOptimizer, dict[str, Any]]:
    """KV memory at the configured context, gated on its reduction; the optimizer is returned for accuracy."""

    v = ctx.config.validation
    phases.step("KV cache memory")
    context = min(v.context_len, getattr(model.reference.config, "max_position_embeddings", v.context_len))
    kv = KVCacheOptimizer(ctx.config.system.kv_cache)
    report = kv.memory_report(model.reference, context, decode_steps=4)
    tag(
        validator.validate_kv_cache_optimization(report["reduction"], context_len=context),
        "kv_cache_optimizer",
        model.label,
    )
    return kv, report


def measure_compression(validator: OptimizationValidator, model: ModelUnderTest, phases: Phases) -> dict[str, Any]:
    """The embedding compressor's ratio (measured when the variants were built), against its gate."""

    phases.step("embedding compression")
    report = model.variants.embeddings_report
    tag(validator.validate_embedding_compression(report["ratio"]), "embedding_compressor", model.label)
    return report


def measure_accuracy(
    ctx: RunContext, validator: OptimizationValidator, model: ModelUnderTest, kv: KVCacheOptimizer, phases: Phases
) -> dict[str, Any]:
    """Each optimizer and the system against the fp32 forward on held-out text; ``{}`` (skipped) for random weights."""

    # Accuracy: only a trained model's held-out text can say anything.
    phases.step("accuracy")
    reference, blocks, label = model.reference, model.blocks, model.label
    if blocks is None:
        for optimizer in ("kernel_optimizer", "embedding_compressor", "kv_cache_optimizer", "e2e"):
            tag(
                validator.validate_correctness(None, reason="random weights: accuracy is measured on the target"),
                optimizer,
                label,
            )
        return {}
    ctx.say(f"validation [{label}]: accuracy on {blocks.shape[0]} held-out blocks")
    # Every candidate against the one fp32 forward (computed once, memoized). Cached candidates read their
    # cache in chunks of 64: with the quantized cache's 128-token full-precision window, the second half of
    # each 256-token block attends to quantized keys and values. (A full-precision cache read the same way
    # agrees with the plain forward to float rounding; it is no longer run as a separate reference: ~40 s.)
    plain = memo_logits(reference, blocks)
    comparisons = {
        "kernel_optimizer": (plain, model.variants.kernels),
        "embedding_compressor": (plain, model.variants.embeddings),
        "kv_cache_optimizer": (plain, CachedForward(reference, lambda: kv.make_cache(reference), chunk=64)),
        "e2e": (plain, model.variants.system.accuracy_model(chunk=64)),
    }
    accuracies = {}
    for optimizer, (reference_model, candidate) in comparisons.items():
        m = accuracy(reference_model, candidate, blocks, reference_name="fp32 reference", candidate_name=optimizer)
        accuracies[optimizer] = m.to_dict()
        tag(validator.validate_correctness(m), optimizer, label)
    text = "the zoo's held-out files" if ctx.config.model.target == "zoo" else "CPython's docs, the 'test' half"
    return {"accuracy": accuracies, "accuracy_text": text}


def validate_model(ctx: RunContext, validator: Any, model_name: str) -> tuple[str, dict[str, Any]]:
    """One model's measurements (see ``run_validation``); returns ``(label, measurements)``.

    Each optimized variant is built once (``build_variants``; for the target, setup's build is reused when training
    left the target as it was) and every measurement of this model shares it.
    """

    phases = Phases()  # the "build" phase starts now
    model = prepare_model(ctx, model_name)
    label = model.label
    ctx.say(f"validation [{label}]: each optimizer alone and all four together vs HF generate")
    phases.show(label)
    model_data = measure_speed(ctx, validator, model, phases)
    model_data["speculative"] = measure_speculation(ctx, validator, model, phases)
    if label == "target":
        model_data["speculative_tasks"] = speculative_workloads(ctx, validator, model.variants.kernels)
        tag(validator.results[-1], "speculative_decoder", label)
    kv, model_data["kv_memory"] = measure_kv_memory(ctx, validator, model, phases)
    model_data["compression"] = measure_compression(validator, model, phases)
    model_data.update(measure_accuracy(ctx, validator, model, kv, phases))
    model_data["seconds"] = phases.seconds()
    return label, model_data


def run_validation(ctx: RunContext) -> dict[str, Any]:
    """Each optimizer against its baseline and all four together against HF generate (speed, accuracy, ratio,
    KV reduction, acceptance), checked against the thresholds into ``validation_report.json``."""

    v = ctx.config.validation
    validator = OptimizationValidator(load_thresholds(device_class=ctx.device.type), device=ctx.device)
    ctx.validator = validator
    data: dict[str, Any] = {}
    try:
        for model_name in v.models:
            label, model_data = validate_model(ctx, validator, model_name)
            data[label] = model_data
    finally:
        ctx.variants = None  # the optimized copies are not needed after validation: free their memory
    validator.export_validation_report(ctx.out / "validation_report.json")
    ctx.validation = data
    summary = validator.summary()
    failing = validator.failures("strict")
    return {
        "models": list(v.models),
        "summary": summary,
        "failing": [f"{r.name} ({r.details.get('model')})" for r in failing],
        "measurements": data,
    }


def validation_blocks(ctx: RunContext, n: int) -> Any:
    """Held-out blocks for accuracy: the zoo's held-out files for the zoo target; for any other target, English prose
    from CPython's docs, the half that neither training nor any default was tuned on (``corpus.prose_blocks``)."""

    if ctx.config.model.target == "zoo":
        return corpus.heldout_blocks(ctx.tokenizer, ctx.config.zoo_recipe, blocks=n).to(ctx.device)
    return corpus.prose_blocks(ctx.tokenizer, "test", blocks=n).to(ctx.device)
