"""SpeculativeDecoder, measured: n-gram drafting on SmolLM2 with repeated-context prompts, or the zoo's draft model.

    python benchmarks/bench_speculative.py                  # SmolLM2-135M-Instruct, n-gram drafting
    python benchmarks/bench_speculative.py --model zoo      # the zoo target and its early-exit draft
    python benchmarks/bench_speculative.py --drafter feature  # SmolLM2 and its trained feature draft

``--drafter feature``: SmolLM2 with the feature draft of ``ryzen_opt.optimizers.draft`` (``--draft DIR``, or
``zoo.reference_model("smollm2-draft")``, built on first use) on held-out prompts of three kinds: prose to continue
(the ``test`` split of CPython's documentation, which the draft never saw), held-out Python sources to continue, and
chat instructions unlike the builder's. Per kind and kernel setting: acceptance, per-position acceptance, tokens per
target forward, greedy equality with the target's ``generate``, and the speedup against the same optimized target
alone (paired, 95% CI). Then n-gram drafting on the same prompts, next to it.

``--model smollm2`` (the default): prompts ask the model to repeat a held-out prose passage word for word
(``corpus.copy_prompts``: an edit or a quotation, where the context repeats); for each kernel setting (``none`` and
``int8``, SystemConfig's), n-gram drafting's acceptance, tokens per target forward, greedy equality with the target's
own ``generate``, and speedup against the target alone with the same kernels; then HF's own prompt lookup
(``prompt_lookup_num_tokens=10``) on the plain fp32 model against HF ``generate``, next to ours.

``--model zoo``:
For each kernel setting (the KernelOptimizer's ``weights``: none, int8, int4) and each drafter (the draft model,
n-gram prompt lookup):
- acceptance rate, tokens per target forward, per-position acceptance, near-ties, and whether greedy output equals
  the target's own ``generate`` on every prompt;
- speedup against the target alone with the same kernels (paired ABBA samples, 95% CI; 4 prompts x 64 tokens a call).
Then against HF: assisted generation (``assistant_model=``, and ``prompt_lookup_num_tokens=``) on the plain fp32 models,
next to our decoder with int4 kernels; and the acceptance rate of sampling at temperature 0.8.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.measure.timing import compare
from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.drafting import NGramDrafter
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer
from ryzen_opt.optimizers.speculative import ModelDrafter, SpecConfig, SpeculativeDecoder
from ryzen_opt.validation.reports import atomic_write_json, environment

NEW = 64


def _greedy(model: Any, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)


def _measure(
    target: Any,
    decoder: SpeculativeDecoder,
    prompts: list[torch.Tensor],
    timed: list[torch.Tensor],
    *,
    pairs: int,
    drafter: str,
    weights: str,
) -> tuple[Any, int, Any]:
    """Acceptance over ``prompts``, how many equal the target's own greedy output, and the speedup over the target
    alone (with the same kernels) on ``timed``."""
    stats, equal = None, 0
    for ids in prompts:
        out = decoder.generate(ids, NEW)
        equal += int(torch.equal(out.sequences, _greedy(target, ids)))
        stats = out.stats if stats is None else stats.merge(out.stats)
    assert stats is not None
    m = compare(
        lambda: [_greedy(target, ids) for ids in timed],
        lambda: [decoder.generate(ids, NEW) for ids in timed],
        min_pairs=pairs,
        max_pairs=pairs,
        warmup=1,
        baseline_name=f"target alone, {weights}",
        candidate_name=f"speculative ({drafter}), {weights}",
    )
    return stats, equal, m


@torch.no_grad()
def bench_smollm2(args: argparse.Namespace) -> dict[str, Any]:
    target, tokenizer = zoo.reference_model("smollm2")
    target.generation_config.eos_token_id = None
    passages = corpus.prose_blocks(tokenizer, "test", blocks=args.prompts)[:, :120]
    prompts = corpus.copy_prompts(tokenizer, passages)
    timed = prompts[:4]
    results: dict[str, Any] = {"benchmark": "SpeculativeDecoder, SmolLM2, n-gram", "args": vars(args), "rows": []}
    print(f"== SmolLM2-135M, n-gram drafting, {len(prompts)} copy prompts, {NEW} tokens, {args.threads} thread(s)")
    for weights in args.weights or ["none", "int8"]:
        t = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(target))
        decoder = SpeculativeDecoder(t, NGramDrafter(), SpecConfig())
        stats, equal, m = _measure(t, decoder, prompts, timed, pairs=args.pairs, drafter="n-gram", weights=weights)
        results["rows"].append(
            {
                "weights": weights,
                "drafter": "n-gram",
                "stats": stats.to_dict(),
                "greedy_equal": equal,
                "speedup": m.to_dict(),
            }
        )
        print(
            f"weights={weights:5s} acceptance {stats.acceptance_rate:.3f}, {stats.tokens_per_target_forward:.2f} "
            f"tokens/forward, greedy equal {equal}/{len(prompts)}, near-ties {stats.near_ties}; vs target alone "
            f"{m.describe()} ({m.baseline_median_s / (len(timed) * NEW) * 1e3:.2f} -> "
            f"{m.candidate_median_s / (len(timed) * NEW) * 1e3:.2f} ms/token)"
        )
    m = compare(
        lambda: [_greedy(target, ids) for ids in timed],
        lambda: [_greedy(target, ids, prompt_lookup_num_tokens=10) for ids in timed],
        min_pairs=4,
        max_pairs=4,
        warmup=1,
        baseline_name="HF generate fp32",
        candidate_name="HF prompt lookup (10 tokens), fp32",
    )
    results["hf_prompt_lookup"] = m.to_dict()
    print(f"HF prompt lookup (fp32) vs HF generate: {m.describe()}")
    return results


CHAT = (
    "Write a haiku about the sea in autumn.",
    "How do I reverse a string in Python? Show two ways.",
    "Explain recursion to a ten-year-old.",
    "List five healthy breakfast ideas, one line each.",
    "What should I check before buying a used bicycle?",
    "Write a polite email asking a colleague to review my report.",
    "Why is the sky blue? Answer in one paragraph.",
    "Give me a plan to learn to play the guitar in three months.",
)


def feature_prompts(tokenizer: Any, per_kind: int) -> dict[str, list[torch.Tensor]]:
    """Held-out prompts of three kinds (``[1, T]`` ids): prose, Python code, chat."""
    prose = corpus.prose_blocks(tokenizer, "test", blocks=per_kind)[:, :96]
    code_files = [path for rel, path in corpus.corpus_files() if corpus.is_heldout(rel, 10)]
    code = []
    for path in code_files[:: max(1, len(code_files) // per_kind)][:per_kind]:
        ids = tokenizer(path.read_text(errors="replace")[:2000], add_special_tokens=False)["input_ids"][:96]
        code.append(torch.tensor([ids]))
    chat = []
    for text in CHAT[:per_kind]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)  # fmt: skip
        chat.append(tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids)
    return {"prose": [row[None] for row in prose], "code": code, "chat": chat}


@torch.no_grad()
def bench_smollm2_feature(args: argparse.Namespace) -> dict[str, Any]:
    from ryzen_opt.optimizers.draft import load_draft, reference_draft

    target, tokenizer = zoo.reference_model("smollm2")
    target.generation_config.eos_token_id = None
    head = load_draft(args.draft) if args.draft else reference_draft()[0]
    kinds = feature_prompts(tokenizer, args.prompts)
    results: dict[str, Any] = {"benchmark": "SpeculativeDecoder, SmolLM2, feature draft", "args": vars(args)}
    results["rows"] = []
    print(f"== SmolLM2-135M + feature draft, {args.prompts} prompts per kind, {NEW} tokens, {args.threads} thread(s)")
    for weights in args.weights or ["int8"]:
        t = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(target))
        for kind, prompts in kinds.items():
            for name, drafter in (("feature", head), ("n-gram", NGramDrafter())):
                decoder = SpeculativeDecoder(t, drafter, SpecConfig())
                stats, equal, m = _measure(
                    t, decoder, prompts, prompts[:2], pairs=args.pairs, drafter=name, weights=weights
                )
                results["rows"].append(
                    {
                        "weights": weights,
                        "kind": kind,
                        "drafter": name,
                        "stats": stats.to_dict(),
                        "greedy_equal": equal,
                        "speedup": m.to_dict(),
                    }
                )
                print(
                    f"weights={weights:5s} {kind:5s} {name:8s} acceptance {stats.acceptance_rate:.3f}, "
                    f"{stats.tokens_per_target_forward:.2f} tokens/forward, per position "
                    f"{[round(x, 2) for x in stats.per_position_acceptance[:6]]}, greedy equal "
                    f"{equal}/{len(prompts)}, near-ties {stats.near_ties}; vs target alone {m.describe()} "
                    f"({m.baseline_median_s / (2 * NEW) * 1e3:.2f} -> {m.candidate_median_s / (2 * NEW) * 1e3:.2f} "
                    "ms/token)"
                )
    return results


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "zoo"], default="smollm2")
    parser.add_argument("--drafter", choices=["ngram", "feature"], default="ngram", help="SmolLM2's drafter")
    parser.add_argument("--draft", help="a feature draft directory (default: zoo.reference_model('smollm2-draft'))")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--weights", nargs="+", help="default: none int8 (smollm2), none int8 int4 (zoo)")
    parser.add_argument("--out", default="benchmarks/results/speculative.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        results = bench_smollm2_feature(args) if args.drafter == "feature" else bench_smollm2(args)
        results["environment"] = environment()
        atomic_write_json(Path(args.out), results)
        print(f"\nwritten {args.out}")
        return
    args.weights = args.weights or ["none", "int8", "int4"]
    target, tokenizer = zoo.reference_model("target")
    draft, _ = zoo.reference_model("draft")
    for model in (target, draft):
        model.generation_config.eos_token_id = None
    blocks = corpus.heldout_blocks(tokenizer, blocks=args.prompts)
    prompts = [blocks[i : i + 1, :64] for i in range(args.prompts)]
    timed = prompts[:4]
    results: dict[str, Any] = {"benchmark": "SpeculativeDecoder", "args": vars(args), "rows": []}
    print(f"== zoo target + early-exit draft, {len(prompts)} held-out prompts, {NEW} tokens, {args.threads} thread(s)")
    for weights in args.weights:
        t = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(target))
        d = KernelOptimizer(KernelConfig(weights=weights)).apply_to_model(copy.deepcopy(draft))
        for name, drafter in (("draft model", ModelDrafter(d)), ("n-gram", NGramDrafter())):
            decoder = SpeculativeDecoder(t, drafter, SpecConfig())
            stats, equal, m = _measure(t, decoder, prompts, timed, pairs=args.pairs, drafter=name, weights=weights)
            row = {
                "weights": weights,
                "drafter": name,
                "stats": stats.to_dict(),
                "greedy_equal": equal,
                "speedup": m.to_dict(),
            }
            results["rows"].append(row)
            print(
                f"weights={weights:5s} {name:12s} acceptance {stats.acceptance_rate:.3f}, "
                f"{stats.tokens_per_target_forward:.2f} tokens/forward, per position "
                f"{[round(x, 2) for x in stats.per_position_acceptance[:6]]}, greedy equal {equal}/{len(prompts)}, "
                f"near-ties {stats.near_ties}; vs target alone {m.describe()} "
                f"({m.baseline_median_s / (4 * NEW) * 1e3:.2f} -> "
                f"{m.candidate_median_s / (4 * NEW) * 1e3:.2f} ms/token)"
            )

    print("\n== against HF generate on the plain fp32 models (ms/token, 4 prompts x 64 tokens)")
    ours = SpeculativeDecoder(
        KernelOptimizer(KernelConfig(weights="int4")).apply_to_model(copy.deepcopy(target)),
        KernelOptimizer(KernelConfig(weights="int4")).apply_to_model(copy.deepcopy(draft)),
    )
    assistant = copy.deepcopy(draft)
    assistant.generation_config.num_assistant_tokens = 4
    arms = {
        "HF generate, target alone": lambda: [_greedy(target, ids) for ids in timed],
        "HF assisted (assistant_model=draft)": lambda: [
            _greedy(target, ids, assistant_model=assistant) for ids in timed
        ],
        "HF prompt lookup (10 tokens)": lambda: [_greedy(target, ids, prompt_lookup_num_tokens=10) for ids in timed],
    }
    base = arms["HF generate, target alone"]
    hf_rows = {}
    for name, arm in arms.items():
        m = compare(base, arm, min_pairs=4, max_pairs=4, warmup=1, baseline_name="HF target", candidate_name=name)
        hf_rows[name] = m.to_dict()
        print(f"{name:40s} {m.candidate_median_s / (4 * NEW) * 1e3:6.2f} ms/token, vs HF target alone {m.describe()}")
    m = compare(
        arms["HF assisted (assistant_model=draft)"],
        lambda: [ours.generate(ids, NEW) for ids in timed],
        min_pairs=args.pairs,
        max_pairs=args.pairs,
        warmup=1,
        baseline_name="HF assisted generation, fp32",
        candidate_name="SpeculativeDecoder, int4 kernels",
    )
    hf_rows["ours vs HF assisted"] = m.to_dict()
    print(
        f"{'SpeculativeDecoder (int4 kernels)':40s} {m.candidate_median_s / (4 * NEW) * 1e3:6.2f} ms/token, "
        f"vs HF assisted {m.describe()}"
    )
    results["hf"] = hf_rows

    stats = None
    for i, ids in enumerate(prompts):
        out = ours.generate(ids, NEW, temperature=0.8, seed=i)
        stats = out.stats if stats is None else stats.merge(out.stats)
    assert stats is not None
    results["sampling_t0.8"] = stats.to_dict()
    print(
        f"\nsampling at temperature 0.8: acceptance {stats.acceptance_rate:.3f}, "
        f"{stats.tokens_per_target_forward:.2f} tokens per target forward"
    )
    results["environment"] = environment()
    atomic_write_json(Path(args.out), results)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
