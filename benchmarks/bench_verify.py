"""What a speculative verification costs: a forward of T tokens against a forward of one, on SmolLM2-135M.

A memory-bound decoder should verify several tokens for little more than one step: the weights are read once and
every row is computed from them. This measures it as the lean decoder runs it (``decoder_of(model).forward(ids,
all_logits=True)``, the call the speculative decoder makes), after a prefill of ``--position`` tokens: each arm
crops the cache back to that position and appends T tokens. Paired, interleaved samples
(``ryzen_opt.measure.timing.compare``),
so the cost comes with a 95% interval; it is the inverse of the measured "speedup" of the one-token arm.

    python benchmarks/bench_verify.py                        # int8 and int4, T = 2, 4, 6, 8, 2 threads
    python benchmarks/bench_verify.py --weights int8 --tokens 4 8 --isa avx2

``--isa`` runs another native path of this build (``ryzen_opt.ops.native.runnable_isas()``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json

import torch

from ryzen_opt.measure.timing import compare
from ryzen_opt.models import corpus, zoo
from ryzen_opt.ops import native
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer
from ryzen_opt.runtime import decoder_of


def verification_costs(
    model: torch.nn.Module, prompt: torch.Tensor, tokens: list[int], max_time: float
) -> dict[int, dict[str, float]]:
    """For each T in ``tokens``: the time of a T-token forward over a one-token forward, with its 95% interval."""
    decoder = decoder_of(model)
    if decoder is None:
        raise SystemExit("the optimized model has no lean decoder (KernelConfig(decode='static'))")
    position = prompt.shape[1]
    decoder.allocate(position + max(tokens) + 1)
    with torch.no_grad():
        decoder.forward(prompt[:, :position])
    extra = torch.randint(1, 1000, (1, max(tokens)), generator=torch.Generator().manual_seed(0))

    def forward(t: int):
        def run() -> torch.Tensor:
            decoder.crop(position)
            with torch.no_grad():
                return decoder.forward(extra[:, :t], all_logits=True)

        return run

    out: dict[int, dict[str, float]] = {}
    one = forward(1)
    for t in tokens:
        m = compare(forward(t), one, max_time=max_time, warmup=3, min_pairs=10, max_pairs=200)
        # compare's ratio is (T-token time) / (one-token time): the cost of verifying T tokens in steps.
        out[t] = {
            "cost": m.ratio,
            "ci_low": m.ci_low,
            "ci_high": m.ci_high,
            "one_token_ms": m.candidate_median_s * 1e3,
            "t_tokens_ms": m.baseline_median_s * 1e3,
            "pairs": m.n,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[2, 4, 6, 8])
    parser.add_argument("--position", type=int, default=150, help="tokens prefilled before the verification")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--int8-kernel", default="auto", help="KernelConfig.int8_kernel (auto: the default)")
    parser.add_argument("--isa", default=None, help="a native path of this build (default: the CPU's best)")
    parser.add_argument("--max-time", type=float, default=20.0, help="seconds of sampling per T")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if max(args.tokens) > native.SMALL_M:
        raise SystemExit(f"--tokens: the fused layer verifies at most {native.SMALL_M} tokens")
    torch.set_num_threads(args.threads)
    reference, tokenizer = zoo.reference_model("smollm2")
    prompt = corpus.prose_blocks(tokenizer, "test", blocks=1)[:, : args.position]
    results: dict[str, object] = {"isa": args.isa or native.isa(), "threads": args.threads, "position": args.position}
    scope = native.use_isa(args.isa) if args.isa else contextlib.nullcontext()
    with scope:
        for weights in args.weights:
            model = KernelOptimizer(KernelConfig(weights=weights, int8_kernel=args.int8_kernel)).apply_to_model(
                copy.deepcopy(reference)
            )
            costs = verification_costs(model, prompt, args.tokens, args.max_time)
            results[weights] = costs
            for t, c in costs.items():
                print(
                    f"{weights} {results['isa']} T={t}: {c['cost']:.2f}x a one-token forward "
                    f"(95% CI {c['ci_low']:.2f}-{c['ci_high']:.2f}; {c['t_tokens_ms']:.1f} ms against "
                    f"{c['one_token_ms']:.1f} ms, {c['pairs']} pairs)",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
