"""Prompt lookup (n-gram drafting) on the chat tasks users give a small instruct model, SmolLM2-135M-Instruct.

The tasks come from ``corpus.chat_prompts``: ``repeat`` a passage, correct its ``spelling``, add type hints to a
``code`` snippet (answers that copy the prompt), and ``open`` questions (answers that do not). For each task, with the
default int8 kernels (SystemConfig's) on both arms:

- lossless: the speculative output equals the target's own greedy ``generate``, both stopping at EOS (or a near-tie
  is counted);
- acceptance, per-position acceptance, tokens per target forward, and how often drafting stopped for low acceptance
  (``SpecConfig.stop_acceptance``);
- the speedup against the same optimized target alone: paired, interleaved samples of all the task's prompts, 95% CI.

    python benchmarks/bench_spec_tasks.py                         # the test split, every task, the defaults
    python benchmarks/bench_spec_tasks.py --split tune --stop-acceptance 0 0.2 0.3 --max-draft 8 12
    python benchmarks/bench_spec_tasks.py --tasks open --min-ngram 2

``--split tune`` is where the drafter's defaults are chosen; ``test`` is where they are reported.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from typing import Any

import torch

from ryzen_opt.measure.timing import compare
from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.drafting import NGramDrafter
from ryzen_opt.optimizers.kernels import KernelOptimizer
from ryzen_opt.optimizers.speculative import SpecConfig, SpeculativeDecoder, check_lossless
from ryzen_opt.optimizers.system import SystemConfig
from ryzen_opt.validation.reports import atomic_write_json, environment


def run_task(
    target: Any,
    prompts: list[torch.Tensor],
    config: SpecConfig,
    drafter: NGramDrafter,
    new_tokens: int,
    eos: Any,
    max_time: float,
) -> dict[str, Any]:
    """Lossless check, stats and the paired speedup of one task's prompts under one setting."""
    decoder = SpeculativeDecoder(target, drafter, config)
    stats, identical = check_lossless(decoder, target, prompts, new_tokens, eos)  # raises when an output changed

    def alone() -> None:
        for ids in prompts:
            target.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos)

    def speculative() -> None:
        for ids in prompts:
            decoder.generate(ids, new_tokens, eos_token_id=eos)

    m = compare(
        alone,
        speculative,
        baseline_name="target alone",
        candidate_name="n-gram speculation",
        min_pairs=4,
        max_pairs=10,
        warmup=1,
        max_time=max_time,
    )
    return {
        "speedup": m.ratio,
        "ci_low": m.ci_low,
        "ci_high": m.ci_high,
        "pairs": m.n,
        "identical": identical,
        "prompts": len(prompts),
        "stats": stats.to_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(corpus.CHAT_TASKS), choices=corpus.CHAT_TASKS)
    parser.add_argument("--split", default="test", choices=corpus.PROSE_SPLITS)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per task")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stop-acceptance", nargs="+", type=float, default=[SpecConfig().stop_acceptance])
    parser.add_argument("--stop-window", nargs="+", type=int, default=[SpecConfig().stop_window])
    parser.add_argument("--max-draft", nargs="+", type=int, default=[SpecConfig().max_draft_tokens])
    parser.add_argument("--min-ngram", nargs="+", type=int, default=[1])
    parser.add_argument("--match", nargs="+", default=["longest"], choices=["longest", "latest"])
    parser.add_argument("--session", action="store_true", help="NGramDrafter(session=True): a task's prompts in turn")
    parser.add_argument("--max-time", type=float, default=60.0, help="seconds of paired sampling per setting")
    parser.add_argument("--out", default="benchmarks/results/spec_tasks.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = zoo.reference_model("smollm2")
    target = KernelOptimizer(SystemConfig().kernels).apply_to_model(copy.deepcopy(model))
    eos = target.generation_config.eos_token_id
    rows = []
    for task in args.tasks:
        prompts = corpus.chat_prompts(tokenizer, task, args.split, n=args.prompts)
        settings = itertools.product(args.stop_acceptance, args.stop_window, args.max_draft, args.min_ngram, args.match)
        for stop, window, max_draft, min_ngram, match in settings:
            config = SpecConfig(stop_acceptance=stop, stop_window=window, max_draft_tokens=max_draft)
            drafter = NGramDrafter(max_ngram=max(3, min_ngram), min_ngram=min_ngram, match=match, session=args.session)
            row = {
                "task": task,
                "stop_acceptance": stop,
                "stop_window": window,
                "max_draft_tokens": max_draft,
                "min_ngram": min_ngram,
                "match": match,
            }
            row.update(run_task(target, prompts, config, drafter, args.new_tokens, eos, args.max_time))
            rows.append(row)
            s = row["stats"]
            print(
                f"{task:8s} {match} stop {stop:.2f}/{window} max_draft {max_draft:2d} min_ngram {min_ngram}: "
                f"{row['speedup']:.2f}x ({row['ci_low']:.2f}-{row['ci_high']:.2f}, {row['pairs']} pairs), "
                f"acceptance {s['acceptance_rate']:.2f}, {s['tokens_per_target_forward']:.2f} tokens/forward, "
                f"stops {s['stops']}, undrafted {s['undrafted_tokens']}/{s['new_tokens']}, "
                f"identical {row['identical']}/{row['prompts']}",
                flush=True,
            )
            pos = ", ".join(f"{a:.2f}" for a in s["per_position_acceptance"][:12])
            print(f"         per-position acceptance: {pos}", flush=True)
    result = {
        "benchmark": "n-gram speculation on chat tasks, SmolLM2-135M-Instruct, int8 kernels on both arms",
        "settings": vars(args),
        "environment": environment(),
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
