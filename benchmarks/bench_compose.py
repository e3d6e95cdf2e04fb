"""How the four optimizations compose: each alone and all four together, against HF ``generate`` fp32.

    python benchmarks/bench_compose.py [--models smollm2 zoo 134m] [--prompts 4] [--pairs 6]

SmolLM2 (the default) is drafted by n-gram lookup on copy prompts (``corpus.copy_prompts``: held-out prose to repeat);
the zoo target by its early-exit draft on held-out code; the random-weight 134M Llama has no draft.

The same measurement as ``ryzen-opt run``'s validation stage (``ryzen_opt.optimizers.system.compose``): 32-token
prompts,
exactly 64 new tokens, batch 1, paired ABBA samples with a 95% CI. Results go to ``benchmarks/results/compose.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.system import compose
from ryzen_opt.validation.reports import atomic_write_json, environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "zoo", "134m"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/compose.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"benchmark": "compose: each optimizer alone and all four vs HF generate"}
    for name in args.models:
        if name == "smollm2":
            target, tokenizer = zoo.reference_model("smollm2")
            target.generation_config.eos_token_id = None
            draft = None
            passages = corpus.prose_blocks(tokenizer, "test", blocks=args.prompts)[:, :120]
            prompts = corpus.copy_prompts(tokenizer, passages)
        elif name == "zoo":
            target, tokenizer = zoo.reference_model("target")
            draft, _ = zoo.reference_model("draft")
            for model in (target, draft):
                model.generation_config.eos_token_id = None
            blocks = corpus.heldout_blocks(tokenizer, blocks=args.prompts)
            prompts = [blocks[i : i + 1, :32] for i in range(args.prompts)]
        else:
            target, draft = zoo.llama_134m(), None
            prompts = [torch.randint(1, 32000, (1, 32), generator=torch.Generator().manual_seed(0))]
        speeds = compose(target, draft, prompts, pairs=args.pairs)
        results[name] = {arm: m.to_dict() for arm, m in speeds.items()}
        print(f"\n== {name}: speedup over HF generate fp32 ({len(prompts)} prompt(s) x 64 tokens)")
        for arm, m in speeds.items():
            print(f"{arm:12s} {m.describe()}")
    results["environment"] = environment()
    atomic_write_json(Path(args.out), results)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
