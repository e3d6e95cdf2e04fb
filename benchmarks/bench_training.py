"""Does bf16 autocast make training faster on this machine? Paired A/B training steps, fp32 vs bf16 autocast.

The zoo's training loop turns bf16 autocast on where the CPU has AVX-512 BF16 or AMX (``TrainConfig.autocast="auto"``);
this benchmark is the measurement behind that rule. One "call" is a full optimizer step (forward, backward, AdamW) of
the zoo target's shape on a 16 x 256-token batch.

    python benchmarks/bench_training.py [--pairs 8] [--threads 2] [--out benchmarks/results/training_autocast.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from ryzen_opt.measure.timing import compare
from ryzen_opt.models import recipes, zoo
from ryzen_opt.training.loop import make_train_step
from ryzen_opt.validation.reports import atomic_write_json, environment


def zoo_shaped_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    recipe = recipes.get_recipe("default")
    return LlamaForCausalLM(zoo.llama_config(recipe, recipe.layers, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/training_autocast.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = torch.randint(0, 4096, (16, 256), generator=torch.Generator().manual_seed(0))
    m = compare(
        make_train_step(zoo_shaped_model(), batch, bf16=False),
        make_train_step(zoo_shaped_model(), batch, bf16=True),
        min_pairs=args.pairs,
        max_pairs=args.pairs,
        warmup=2,
        baseline_name="training step, fp32",
        candidate_name="training step, bf16 autocast",
    )
    tokens = batch.numel()
    result = {
        "benchmark": "training step: fp32 vs bf16 autocast (zoo target shape, 16 x 256 tokens)",
        "speedup": m.to_dict(),
        "fp32_tokens_per_s": tokens / m.baseline_median_s,
        "bf16_tokens_per_s": tokens / m.candidate_median_s,
        "environment": environment(),
    }
    atomic_write_json(Path(args.out), result)
    print(f"bf16 autocast vs fp32 training step: {m.describe()}")
    print(
        f"fp32 {result['fp32_tokens_per_s']:.0f} tokens/s, bf16 {result['bf16_tokens_per_s']:.0f} tokens/s, "
        f"{m.threads} threads"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
