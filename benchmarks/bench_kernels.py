"""KernelOptimizer, measured: decode speed, bandwidth, prefill speed and accuracy (issue 5).

    python benchmarks/bench_kernels.py                       # everything below, ~15 min on 2 Zen 4 cores
    python benchmarks/bench_kernels.py --sections decode --threads 1 --weights int8

Sections:
- **decode**: batch 1, a 32-token prompt and exactly 64 new tokens (``min_new_tokens`` holds EOS off). Each optimized
  model against HF ``generate`` on an untouched copy (transformers' default attention, dynamic cache, fp32): paired,
  interleaved A/B samples (``ryzen_opt.measure.timing.compare``), median ratio with a 95% bootstrap interval. Tokens/s
  are
  end to end (prefill included, as a user sees them). The bandwidth figure uses the lean loop's own per-step time
  (prefill excluded): weight bytes read per token / seconds per token, against this machine's read bandwidth
  measured in the same run (a sum over 512 MiB).
- **prefill**: the attention path at 512 and 2048 tokens: HF forward (last-token logits, as ``generate`` asks)
  with eager and with default attention against the optimized prefill.
- **accuracy**: the accuracy loss (docs/definitions.md) on SmolLM2's held-out prose ("test" half;
  `--accuracy-model zoo` for the zoo target), each default beside the alternatives it was chosen over, plus greedy
  agreement over 64 tokens.
- **compile**: the compiled decode step: compile seconds and its speed against the eager lean loop.
- **int4**: round-to-nearest against GPTQ at groups of 32 and 64, on SmolLM2 (calibrated on the "tune" half of
  the prose, judged on the "test" half; LM head int8 as by default). SmolLM2's weights come from Q4_1 blocks of 32,
  so at group 32 they already sit on a 4-bit grid and both methods reproduce them; groups of 64 span two blocks
  with different scales and are off the grid, like the weights of a model that never went through a 4-bit file:
  that is where a method's worth shows. Not in the default sections (about 5 minutes).

Results go to ``benchmarks/results/kernels.json`` (gitignored) and a table on the terminal.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.measure.accuracy import MemoLogits, accuracy, greedy_agreement
from ryzen_opt.measure.timing import compare, generate_workload, read_bandwidth_gbs
from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer, kernel_report
from ryzen_opt.runtime import decoder_of
from ryzen_opt.validation.reports import run_sections

PROMPT_TOKENS, NEW_TOKENS = 32, 64


@torch.no_grad()
def lean_step_seconds(model: Any, prompt: torch.Tensor, steps: int = NEW_TOKENS, repeats: int = 5) -> float:
    """Median seconds of one lean decode step (prefill excluded)."""
    decoder = decoder_of(model)
    token = prompt[:, -1:]
    results = []
    for _ in range(repeats):
        decoder.allocate(prompt.shape[1] + steps + 1)
        decoder.forward(prompt)
        start = time.perf_counter()
        for _ in range(steps):
            decoder.step(token)
        results.append((time.perf_counter() - start) / steps)
    return statistics.median(results)


def load_model(name: str) -> tuple[Any, str]:
    if name == "134m":
        return zoo.llama_134m(), "134M Llama (random weights)"
    if name == "smollm2":
        model, _ = zoo.reference_model("smollm2")
        model.generation_config.eos_token_id = None
        return model, "SmolLM2-135M-Instruct (pretrained)"
    target, _ = zoo.reference_model("target")
    target.generation_config.eos_token_id = None
    return target, "zoo target (6.8M Llama, trained)"


def accuracy_data(name: str, blocks: int) -> tuple[Any, torch.Tensor, str]:
    """The model and its held-out text: SmolLM2 on the "test" half of the prose (never tuned on), the zoo on its
    held-out files."""
    if name == "smollm2":
        model, tokenizer = zoo.reference_model("smollm2")
        return model, corpus.prose_blocks(tokenizer, "test", blocks=blocks), "SmolLM2-135M, held-out prose"
    model, tokenizer = zoo.reference_model("target")
    return model, corpus.heldout_blocks(tokenizer, blocks=blocks), "zoo target, held-out files"


def bench_decode(args: argparse.Namespace, results: dict[str, Any]) -> None:
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidth = read_bandwidth_gbs()
        results.setdefault("bandwidth_gbs", {})[str(threads)] = bandwidth
        print(f"\n== decode, {threads} thread(s); measured read bandwidth {bandwidth:.1f} GB/s")
        for model_name in args.models:
            reference, label = load_model(model_name)
            vocab = reference.config.vocab_size
            prompt = torch.randint(1, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
            baseline = generate_workload(reference, prompt, NEW_TOKENS)
            for weights in args.weights:
                optimized = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(reference))
                m = compare(
                    baseline,
                    generate_workload(optimized, prompt, NEW_TOKENS),
                    min_pairs=args.pairs,
                    max_pairs=args.pairs,
                    warmup=1,
                    max_time=args.max_time,
                    baseline_name=f"HF generate, {reference.config._attn_implementation} attention, dynamic cache",
                    candidate_name=f"KernelOptimizer(weights={weights!r})",
                )
                report = kernel_report(optimized)
                step = lean_step_seconds(optimized, prompt)
                gbs = report.bytes_per_token / step / 1e9
                row = {
                    "model": label,
                    "threads": threads,
                    "weights": weights,
                    "speedup": m.to_dict(),
                    "hf_tokens_per_s": NEW_TOKENS / m.baseline_median_s,
                    "tokens_per_s": NEW_TOKENS / m.candidate_median_s,
                    "hf_ms_per_token_end_to_end": m.baseline_median_s / NEW_TOKENS * 1e3,
                    "ms_per_token_end_to_end": m.candidate_median_s / NEW_TOKENS * 1e3,
                    "lean_step_ms": step * 1e3,
                    "bytes_per_token": report.bytes_per_token,
                    "weight_gbs": gbs,
                    "fraction_of_bandwidth": gbs / bandwidth,
                    "kernels": report.kernels,
                }
                results.setdefault("decode", []).append(row)
                print(
                    f"{label:32s} {weights:5s} {m.describe():34s} {row['tokens_per_s']:7.1f} tok/s "
                    f"(HF {row['hf_tokens_per_s']:5.1f}); step {step * 1e3:6.2f} ms, "
                    f"{report.bytes_per_token / 1e6:6.1f} MB/token, {gbs:5.1f} GB/s = {gbs / bandwidth:4.0%} of bw"
                )
                del optimized


@torch.no_grad()
def bench_prefill(args: argparse.Namespace, results: dict[str, Any]) -> None:
    torch.set_num_threads(max(args.threads))
    reference = zoo.llama_134m()
    eager = copy.deepcopy(reference)
    eager.set_attn_implementation("eager")
    print(f"\n== prefill, 134M Llama, {torch.get_num_threads()} thread(s)")
    for weights in args.weights:
        optimized = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(reference))
        decoder = decoder_of(optimized)
        for length in args.prefill:
            ids = torch.randint(1, 32000, (1, length), generator=torch.Generator().manual_seed(1))

            def lean(ids: torch.Tensor = ids, decoder: Any = decoder) -> torch.Tensor:
                decoder.allocate(ids.shape[1])
                return decoder.forward(ids)

            for base_name, base in (("eager", eager), (reference.config._attn_implementation, reference)):
                m = compare(
                    lambda base=base, ids=ids: base(ids, logits_to_keep=1).logits,
                    lean,
                    min_pairs=3,
                    max_pairs=args.prefill_pairs,
                    warmup=1,
                    max_time=args.max_time,
                    baseline_name=f"HF forward, {base_name} attention, fp32",
                    candidate_name=f"KernelOptimizer(weights={weights!r}) prefill",
                )
                results.setdefault("prefill", []).append(
                    {
                        "tokens": length,
                        "weights": weights,
                        "baseline": base_name,
                        "speedup": m.to_dict(),
                        "baseline_s": m.baseline_median_s,
                        "candidate_s": m.candidate_median_s,
                    }
                )
                print(
                    f"prefill {length:5d} {weights:5s} vs HF {base_name:5s}: {m.describe()} "
                    f"({m.baseline_median_s:.2f} s -> {m.candidate_median_s:.2f} s)"
                )
        del optimized


@torch.no_grad()
def bench_accuracy(args: argparse.Namespace, results: dict[str, Any]) -> None:
    torch.set_num_threads(max(args.threads))
    reference, blocks, label = accuracy_data(args.accuracy_model, args.blocks)
    prompts = [blocks[i, :32] for i in range(8)]
    print(f"\n== accuracy, {label}, {blocks.shape[0]} blocks of {blocks.shape[1]} tokens")
    for weights in args.weights:
        heads = {
            "int8": ({}, {"lm_head": "none"}, {"int8_kernel": "fbgemm"}),
            "int4": ({}, {"lm_head": "int4"}, {"lm_head": "none"}, {"group_size": 64}),
        }
        for extra in heads.get(weights, ({},)):
            config = KernelConfig(weights=weights, **extra)
            optimized = KernelOptimizer(config).apply_to_model(copy.deepcopy(reference))
            m = accuracy(reference, optimized, blocks, reference_name="fp32", candidate_name=weights)
            greedy = greedy_agreement(reference, optimized, prompts, max_new_tokens=64)
            results.setdefault("accuracy", []).append(
                {"config": config.to_dict(), "measurement": m.to_dict(), "greedy": greedy}
            )
            label = f"{weights} g{config.group_size} {config.int8_kernel} (head {config.resolved_lm_head()})"
            print(
                f"{label:24s} {m.describe()}; greedy: identical prefix {greedy['mean_prefix_fraction']:.0%} of 64 "
                f"tokens, {greedy['exact_matches']}/{greedy['prompts']} prompts identical"
            )


@torch.no_grad()
def bench_compile(args: argparse.Namespace, results: dict[str, Any]) -> None:
    torch.set_num_threads(max(args.threads))
    reference = zoo.llama_134m()
    prompt = torch.randint(1, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    print(f"\n== torch.compile of the decode step, 134M Llama, {torch.get_num_threads()} thread(s)")
    for weights in args.weights:
        eager = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(reference))
        try:
            compiled = KernelOptimizer(KernelConfig(weights=weights, compile=True)).apply_to_model(
                copy.deepcopy(reference)
            )
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed and goes on
            results.setdefault("compile", []).append({"weights": weights, "error": repr(exc)})
            print(f"{weights:5s}: compile failed: {exc!r}")
            continue
        seconds = kernel_report(compiled).compile_seconds
        m = compare(
            generate_workload(eager, prompt, NEW_TOKENS),
            generate_workload(compiled, prompt, NEW_TOKENS),
            min_pairs=args.pairs,
            max_pairs=args.pairs,
            warmup=1,
            max_time=args.max_time,
            baseline_name="lean decode, eager",
            candidate_name="lean decode, torch.compile",
        )
        results.setdefault("compile", []).append({"weights": weights, "compile_s": seconds, "speedup": m.to_dict()})
        print(f"{weights:5s}: compile {seconds:.1f} s; compiled vs eager lean loop {m.describe()}")


@torch.no_grad()
def bench_int4(args: argparse.Namespace, results: dict[str, Any]) -> None:
    torch.set_num_threads(max(args.threads))
    reference, tokenizer = zoo.reference_model("smollm2")
    blocks = corpus.prose_blocks(tokenizer, "test", blocks=args.blocks)
    calibration = corpus.prose_blocks(tokenizer, "tune", blocks=args.calibration_blocks)
    memo = MemoLogits(reference)
    print(
        f"\n== int4 methods, SmolLM2-135M, {blocks.shape[0]} held-out blocks of {blocks.shape[1]} tokens; GPTQ "
        f"calibrated on {calibration.shape[0]} other blocks"
    )
    for group in args.groups:
        for method in ("rtn", "gptq"):
            config = KernelConfig(weights="int4", group_size=group, int4_method=method)
            started = time.perf_counter()
            optimized = KernelOptimizer(config).apply_to_model(copy.deepcopy(reference), calibration=calibration)
            seconds = time.perf_counter() - started
            m = accuracy(memo, optimized, blocks, reference_name="fp32", candidate_name=f"int4 g{group} {method}")
            results.setdefault("int4", []).append(
                {"config": config.to_dict(), "apply_seconds": seconds, "measurement": m.to_dict()}
            )
            print(f"g{group:<3d} {method:4s} (applied in {seconds:5.1f} s) {m.describe()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["decode", "prefill", "accuracy", "compile"])
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "134m", "zoo"])
    parser.add_argument("--accuracy-model", default="smollm2", choices=["smollm2", "zoo"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--weights", nargs="+", default=["none", "int8", "int4"])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prefill", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--prefill-pairs", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--max-time", type=float, default=300.0)
    parser.add_argument("--groups", nargs="+", type=int, default=[32, 64], help="int4 section (576 % 128 != 0)")
    parser.add_argument("--calibration-blocks", type=int, default=32, help="int4 section: GPTQ's, from the tune half")
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "benchmark": "KernelOptimizer: decode, prefill, accuracy, compile",
        "setting": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "batch": 1},
        "args": vars(args),
    }
    sections = {
        "decode": bench_decode,
        "prefill": bench_prefill,
        "accuracy": bench_accuracy,
        "compile": bench_compile,
        "int4": bench_int4,
    }
    run_sections(sections, args.sections, args, results, Path(args.out))  # rewritten after every section
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
