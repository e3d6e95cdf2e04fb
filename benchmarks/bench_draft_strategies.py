"""Which drafting strategy gives the most tokens per target forward, on SmolLM2-135M-Instruct's chat tasks.

Under greedy decoding what a drafter earns is exact without timing anything: the target's own greedy answer is
computed once, and each strategy is replayed against it. A round proposes one or more candidate continuations of
the committed text; the target accepts the longest prefix that one of them shares with its answer, then adds its
own token. A tree of candidates is verified in one forward of as many rows as the tree has nodes (plus the last
committed token), so strategies are compared at the same **row budget** (the fused native layer verifies up to 8
rows in one call), and the rows each round spends are converted to time with verification costs measured in this
run (``bench_verify.verification_costs``).

Strategies:

- ``latest``: ``NGramDrafter(match="latest")``: the latest earlier occurrence of the last 3 (down to 1) tokens.
- ``longest``: ``NGramDrafter(match="longest")``: suffix lookup, the earlier position whose preceding context
  matches the longest suffix of the text (ties: the latest), as a suffix tree finds it (SuffixDecoding, Oliaro et al.
  2024).
- ``tree2`` / ``tree3``: the 2 or 3 best distinct continuations by that match length, merged into a token tree
  (Medusa, SpecInfer, EAGLE-2 verify trees with a tree attention mask).
- ``session``: ``NGramDrafter(match="longest", session=True)``: over the earlier prompts and answers of the same
  task too (the task's prompts, in order, are one session).

    python benchmarks/bench_draft_strategies.py                  # the tune split, every task
    python benchmarks/bench_draft_strategies.py --split test --rows 4 8

Every figure is from this run: the target's answers, the replays, and the verification costs.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch

from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.drafting import NGramDrafter
from ryzen_opt.optimizers.kernels import KernelOptimizer
from ryzen_opt.optimizers.system import SystemConfig
from ryzen_opt.validation.reports import atomic_write_json, environment

Candidates = list[list[int]]
MAX_CONTEXT = 64  # match lengths are counted up to this many tokens


def matches(text: list[int], corpus: list[int]) -> list[tuple[int, int]]:
    """``(match length, position)`` for every position ``j`` of ``corpus`` whose preceding tokens end like
    ``text``: ``corpus[j - L : j] == text[-L:]``, longest first, then latest. ``corpus`` may be ``text`` itself."""
    if not text:
        return []
    last, out = text[-1], []
    end = len(corpus) - 1 if corpus is text else len(corpus)
    for j in range(end - 1, -1, -1):
        if corpus[j] != last:
            continue
        length = 1
        while (
            length < MAX_CONTEXT and j - length >= 0 and length < len(text) and corpus[j - length] == text[-1 - length]
        ):
            length += 1
        out.append((length, j + 1))
    out.sort(key=lambda m: (-m[0], -m[1]))
    return out


def best(text: list[int], k: int, corpus: list[int], m: int) -> Candidates:
    """The ``m`` best distinct continuations of ``text`` found in ``corpus``, by match length."""
    out: Candidates = []
    for _, j in matches(text, corpus):
        follow = corpus[j : j + k]
        if follow and follow not in out:
            out.append(follow)
            if len(out) == m:
                break
    return out


def tree_rows(candidates: Candidates) -> int:
    """Nodes of the token tree the candidates make (shared prefixes merged)."""
    return len({tuple(c[: i + 1]) for c in candidates for i in range(len(c))})


def fit(candidates: Candidates, rows: int) -> Candidates:
    """Trim the candidates (later ones first) until the tree fits ``rows - 1`` draft rows."""
    candidates = [list(c) for c in candidates]
    while candidates and tree_rows(candidates) > rows - 1:
        last = candidates[-1]
        last.pop()
        if not last:
            candidates.pop()
    return candidates


class Lookup:
    """A strategy as the decoder drives it: ``start`` a request, then ``candidates`` each round."""

    def __init__(self, drafter: NGramDrafter | None = None, trees: int = 0) -> None:
        self.drafter, self.trees = drafter, trees

    def start(self, prompt: list[int]) -> None:
        if self.drafter is not None:
            self.drafter.start(prompt, len(prompt) + 4096)

    def candidates(self, text: list[int], k: int) -> Candidates:
        if self.drafter is not None:
            follow, _ = self.drafter.propose(text, k, None)
            return [follow] if follow else []
        return best(text, k, text, self.trees)


STRATEGIES: dict[str, Callable[[], Lookup]] = {
    "latest": lambda: Lookup(NGramDrafter(match="latest")),
    "longest": lambda: Lookup(NGramDrafter(match="longest")),
    "tree2": lambda: Lookup(trees=2),
    "tree3": lambda: Lookup(trees=3),
    "session": lambda: Lookup(NGramDrafter(match="longest", session=True)),
}


def replay(strategy: Lookup, prompt: list[int], answer: list[int], rows: int) -> dict[str, Any]:
    """Rounds, rows and accepted tokens of one answer under one strategy, with SpeculativeDecoder's adaptive
    draft length (start at 4, +2 after a fully accepted round, -1 otherwise, within 1..rows-1)."""
    strategy.start(prompt)
    done, rounds, spent, k = 0, [], 0, min(4, rows - 1)
    while done < len(answer):
        text = prompt + answer[:done]
        cands = fit(strategy.candidates(text, k), rows)  # each branch k long, the tree within the row budget
        truth = answer[done:]
        accepted = 0
        for c in cands:
            n = 0
            while n < len(c) and n < len(truth) and c[n] == truth[n]:
                n += 1
            accepted = max(accepted, n)
        rounds.append(1 + tree_rows(cands))
        spent += 1
        done += accepted + 1
        if cands:
            k = min(rows - 1, k + 2) if accepted == max(len(c) for c in cands) else max(1, k - 1)
    if strategy.drafter is not None:  # the answer's last tokens, as the decoder's sequence would hold them
        strategy.drafter.propose(prompt + answer, 0, None)
    return {"forwards": spent, "tokens": len(answer), "rows": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(corpus.CHAT_TASKS), choices=corpus.CHAT_TASKS)
    parser.add_argument("--split", default="tune", choices=corpus.PROSE_SPLITS)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per task (one session per task)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rows", nargs="+", type=int, default=[8], help="row budgets of one verification")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cost-time", type=float, default=10.0, help="seconds of sampling per verification size")
    parser.add_argument("--out", default="benchmarks/results/draft_strategies.json")
    args = parser.parse_args()
    if max(args.rows) > 8 or min(args.rows) < 2:
        raise SystemExit("--rows: between 2 and 8 (the fused layer verifies at most 8 rows in one call)")

    from bench_verify import verification_costs

    torch.set_num_threads(args.threads)
    model, tokenizer = zoo.reference_model("smollm2")
    target = KernelOptimizer(SystemConfig().kernels).apply_to_model(copy.deepcopy(model))
    eos = target.generation_config.eos_token_id
    probe = corpus.prose_blocks(tokenizer, "test", blocks=1)[:, :150]
    costs = {1: 1.0} | {
        t: c["cost"] for t, c in verification_costs(target, probe, list(range(2, 9)), args.cost_time).items()
    }
    print(
        "verification cost (a forward of r rows over one row): " + ", ".join(f"{r}: {c:.2f}" for r, c in costs.items())
    )
    rows_out = []
    for task in args.tasks:
        prompts = corpus.chat_prompts(tokenizer, task, args.split, n=args.prompts)
        answers = []
        for ids in prompts:
            out = target.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=eos)
            answers.append(out[0, ids.shape[1] :].tolist())
        for budget in args.rows:
            for name, strategy in STRATEGIES.items():
                forwards = tokens = 0
                time_steps = 0.0
                used: list[int] = []
                lookup = strategy()  # one per task: the task's prompts are one session
                for ids, answer in zip(prompts, answers, strict=True):
                    r = replay(lookup, ids[0].tolist(), answer, budget)
                    forwards += r["forwards"]
                    tokens += r["tokens"]
                    time_steps += sum(costs[n] for n in r["rows"])
                    used += r["rows"]
                row = {
                    "task": task,
                    "rows": budget,
                    "strategy": name,
                    "tokens_per_forward": tokens / forwards,
                    "mean_rows": sum(used) / len(used),
                    "modelled_speedup": tokens / time_steps,
                }
                rows_out.append(row)
                print(
                    f"{task:8s} rows {budget} {name:8s}: {row['tokens_per_forward']:.2f} tokens/forward, "
                    f"{row['mean_rows']:.1f} rows, "
                    f"modelled {row['modelled_speedup']:.2f}x the target alone",
                    flush=True,
                )
    result = {
        "benchmark": "drafting strategies replayed on the int8 target's greedy answers, SmolLM2-135M-Instruct",
        "settings": vars(args),
        "environment": environment(),
        "verification_costs": costs,
        "rows": rows_out,
        "note": "modelled speedup = tokens / the sum of each round's measured verification cost (in one-row steps)",
    }
    atomic_write_json(args.out, result)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
