"""KVCacheOptimizer, measured: stored bytes and decode peaks, accuracy, greedy agreement, a retrieval probe, speed.

    python benchmarks/bench_kv_cache.py                      # SmolLM2-135M-Instruct (the reference), all sections
    python benchmarks/bench_kv_cache.py --sections memory    # stored and peak bytes at 2k and 8k tokens
    python benchmarks/bench_kv_cache.py --model target       # the zoo target (fast, 6 layers)

``--model smollm2`` (the default) measures the real model: memory at 2,048 and 8,192 tokens, accuracy over prose
documents of 2,048 tokens fed 256 at a time (held-out CPython documentation, ``corpus.prose_blocks``' test split),
greedy agreement on prose prompts, and a pass key planted at 90% depth of 2k and 4k tokens of prose
(``kv_cache.passkey_prompt``: retrieved or not). ``--model target`` runs the zoo target as described below.

Sections:
- **memory**: at each context (smollm2: 2k and 8k; target: 1k and 4k), the stored KV bytes of HF's
  ``DynamicCache`` (model dtype) and of each cache
  (codes, scales, residual window counted), the reduction, and the measured peak of live tensor bytes during 16 decode
  steps (``kv_cache.PeakMemory``): through HF's attention (which dequantizes the whole cache every step) and through the
  lean loop's ``attend`` (chunks of ``attend_chunk`` tokens), against the lean loop's own static cache.
- **accuracy**: the accuracy loss of next-token prediction through each cache against the full cache, on the
  zoo target's held-out text in sequences of 512 tokens fed 32 at a time (``CachedForward``): with the default
  residual window of 128, three quarters of each sequence is read from quantized storage.
- **greedy**: agreement of 64-token greedy continuations (prompts of 384 held-out tokens) with the full cache.
- **probe**: a name planted at the start of a long prompt of held-out code and asked for at the end, scored as the
  log-probability gain of the name over a control prompt (the zoo target is too small to copy it back greedily).
- **speed**: decode ms/token of 32 one-token steps after a 2k prompt (``--speed-context``; the prefill not timed):
  HF's forward with ``DynamicCache`` and with each cache, and the lean loop (``--weights``, default int8) with its
  static cache and with each quantized cache (native attention on the codes, and ATen ops for comparison).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from ryzen_opt.compat import cache_kwargs
from ryzen_opt.measure.accuracy import accuracy
from ryzen_opt.measure.decode import CachedForward
from ryzen_opt.measure.passkey import passkey_probe, passkey_prompt
from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer
from ryzen_opt.optimizers.kv_cache import KVCacheConfig, KVCacheOptimizer, PeakMemory, cache_bytes
from ryzen_opt.runtime import decoder_of
from ryzen_opt.validation.reports import run_sections

CONFIGS = {
    "int8": KVCacheConfig(bits=8),
    "int4": KVCacheConfig(bits=4),
    "sink (4 + 1020)": KVCacheConfig(strategy="sink", sink_tokens=4, window=1020),
}


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    model, tokenizer = zoo.reference_model(args.model)
    model.generation_config.eos_token_id = None
    return model, tokenizer


def _heldout_tokens(args: argparse.Namespace, tokenizer: Any) -> torch.Tensor:
    """One long 1-D run of held-out tokens: CPython docs prose for SmolLM2, the zoo's held-out code for the target."""
    if args.model == "smollm2":
        return corpus.prose_blocks(tokenizer, "test", blocks=None, block_size=256).reshape(-1)
    return corpus.heldout_blocks(tokenizer, blocks=None).reshape(-1)


@torch.no_grad()
def _lean_peak(optimized: Any, ids: torch.Tensor, cache: Any, steps: int) -> tuple[int, int]:
    decoder = decoder_of(optimized)
    ids = ids[:, : decoder.limit() - steps - 1]  # the static cache must hold the decode steps too
    with PeakMemory(torch.device("cpu")) as peak:
        decoder.attach_cache(cache)
        decoder.allocate(ids.shape[1] + steps + 1)
        logits = decoder.forward(ids)
        stored = cache_bytes(cache) if cache is not None else 2 * sum(t.numel() * 4 for t in decoder.k_cache)
        peak.mark()
        for _ in range(steps):
            logits = decoder.step(logits.argmax(-1, keepdim=True))
        decoder.attach_cache(None)
    return stored, peak.peak_after_mark


@torch.no_grad()
def bench_memory(args: argparse.Namespace, results: dict[str, Any]) -> None:
    model, _ = _model(args)
    optimized = KernelOptimizer(KernelConfig()).apply_to_model(copy.deepcopy(model))
    c = model.config
    shape = f"{c.num_hidden_layers} layers, {c.num_key_value_heads} kv heads x {c.hidden_size // c.num_attention_heads}"
    print(f"\n== KV memory, {args.model} ({shape})")
    for context in args.contexts:
        ids = torch.randint(1, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
        static_stored, static_peak = _lean_peak(optimized, ids, None, 16)
        for name, config in CONFIGS.items():
            report = KVCacheOptimizer(config).memory_report(model, context, decode_steps=16)
            cache = KVCacheOptimizer(config).make_cache(model)
            lean = _lean_peak(optimized, ids, cache, 16) if config.strategy == "quantized" else None
            report["lean"] = None if lean is None else {"stored_bytes": lean[0], "decode_peak_bytes": lean[1]}
            report["lean_static"] = {"stored_bytes": static_stored, "decode_peak_bytes": static_peak}
            results.setdefault("memory", []).append({"name": name, **report})
            base, opt = report["baseline"], report["optimized"]
            line = (
                f"{context:5d} tokens {name:16s} stored {base['stored_bytes'] / 2**20:6.2f} -> "
                f"{opt['stored_bytes'] / 2**20:6.2f} MiB (reduction {report['reduction']:.1%}); decode peak, HF "
                f"attention: {base['decode_peak_bytes'] / 2**20:6.2f} -> {opt['decode_peak_bytes'] / 2**20:6.2f} MiB"
            )
            if lean is not None:
                line += (
                    f"; lean loop: static {static_peak / 2**20:5.2f} MiB, attend {lean[1] / 2**20:5.2f} MiB "
                    f"(stored {lean[0] / 2**20:.2f})"
                )
            print(line)


@torch.no_grad()
def bench_accuracy(args: argparse.Namespace, results: dict[str, Any]) -> None:
    torch.set_num_threads(max(args.threads))
    model, tokenizer = _model(args)
    heldout = _heldout_tokens(args, tokenizer)
    length, chunk = (2048, 256) if args.model == "smollm2" else (512, 32)
    seqs = heldout[: (heldout.numel() // length) * length].reshape(-1, length)[: args.sequences]
    reference = CachedForward(model, lambda: DynamicCache(config=model.config), chunk=chunk)
    print(f"\n== accuracy through the cache, {args.model}, {seqs.shape[0]} x {length} tokens fed {chunk} at a time")
    for name, config in CONFIGS.items():
        optimizer = KVCacheOptimizer(config)
        candidate = CachedForward(model, lambda optimizer=optimizer: optimizer.make_cache(model), chunk=chunk)
        m = accuracy(reference, candidate, seqs, batch_size=1, reference_name="DynamicCache", candidate_name=name)
        results.setdefault("accuracy", []).append(
            {"name": name, "config": config.to_dict(), "measurement": m.to_dict()}
        )
        print(f"{name:16s} {m.describe()}")


@torch.no_grad()
def _greedy(model: Any, ids: torch.Tensor, cache: Any, new: int) -> torch.Tensor:
    out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, ids.shape[1] :]


@torch.no_grad()
def bench_greedy(args: argparse.Namespace, results: dict[str, Any]) -> None:
    model, tokenizer = _model(args)
    heldout = _heldout_tokens(args, tokenizer)
    prompts = [heldout[i * 997 : i * 997 + 384][None] for i in range(args.prompts)]
    print(f"\n== greedy agreement over 64 tokens, {len(prompts)} prompts of 384 held-out tokens")
    for name, config in CONFIGS.items():
        prefixes = []
        for ids in prompts:
            want = _greedy(model, ids, DynamicCache(config=model.config), 64)
            got = _greedy(model, ids, KVCacheOptimizer(config).make_cache(model), 64)
            diff = (want != got).nonzero()
            prefixes.append(int(diff[0, 0]) if diff.numel() else 64)
        results.setdefault("greedy", []).append({"name": name, "identical_prefixes": prefixes})
        print(f"{name:16s} identical prefix {statistics.mean(prefixes) / 64:.0%} of 64 tokens; per prompt {prefixes}")


@torch.no_grad()
def _value_logprob(model: Any, make_cache: Any, ids: torch.Tensor, n_value: int) -> float:
    """Mean log-probability of the last ``n_value`` tokens of ``ids``, teacher-forced, read through the cache."""
    logits = CachedForward(model, make_cache, chunk=32)(ids).logits[0, -n_value - 1 : -1].float()
    return float(logits.log_softmax(-1).gather(1, ids[0, -n_value:, None]).mean())


@torch.no_grad()
def bench_probe(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if args.model == "smollm2":
        return bench_passkey(args, results)
    return bench_logprob_probe(args, results)


@torch.no_grad()
def bench_passkey(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """SmolLM2 answers a question: a pass key planted at 90% depth of prose, asked for at the end, must come back in
    its greedy answer through every cache the full cache retrieves it with."""
    model, tokenizer = _model(args)
    filler = corpus.prose_texts("test")
    caches = [("full (DynamicCache)", lambda: DynamicCache(config=model.config))] + [
        (n, lambda c=c: KVCacheOptimizer(c).make_cache(model)) for n, c in CONFIGS.items()
    ]
    print("\n== pass key retrieval: a key planted at 90% depth of prose, asked for at the end")
    for length in args.probe_lengths or [2048, 4096]:
        for key in ("48213", "7391"):
            prompt = passkey_prompt(tokenizer, filler, length, key)
            row: dict[str, Any] = {"context": length, "prompt_tokens": int(prompt.shape[1]), "key": key}
            for name, make in caches:
                row[name] = passkey_probe(model, tokenizer, prompt, key, make)
            results.setdefault("probe", []).append(row)
            summary = ", ".join(
                f"{n} {'retrieved' if row[n]['passed'] else 'MISSED ' + repr(row[n]['answer'])}" for n, _ in caches
            )
            print(f"{row['prompt_tokens']:5d} tokens, key {key}: {summary}")


@torch.no_grad()
def bench_logprob_probe(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The zoo target is a 6.8M code model: its greedy output does not copy a planted string back (measured: not at
    64 tokens, even with the full cache), so recall is measured as a log-probability gain instead. The prompt plants
    ``_SECRET_NAME = 'frobnicate_widget_cache'``, then held-out code, then ``_SECRET_NAME = 'frobnicate``; the score is
    how much more likely ``_widget_cache`` is than after a control prompt that planted another name. A cache that lost
    the plant shows the control's score (gain 0)."""
    model, tokenizer = _model(args)
    filler = corpus.heldout_blocks(tokenizer, blocks=None).reshape(-1)
    plant = tokenizer("_SECRET_NAME = 'frobnicate_widget_cache'\n", return_tensors="pt").input_ids
    control = tokenizer("_SECRET_NAME = 'configure_logging_handler'\n", return_tensors="pt").input_ids
    tail = tokenizer("\n_SECRET_NAME = 'frobnicate", return_tensors="pt").input_ids
    value = tokenizer("_widget_cache", return_tensors="pt").input_ids
    caches = [("full (DynamicCache)", lambda: DynamicCache(config=model.config))] + [
        (n, lambda c=c: KVCacheOptimizer(c).make_cache(model)) for n, c in CONFIGS.items()
    ]
    print("\n== retrieval probe: log-probability gain of a planted name, asked for at the end of a long prompt")
    for length in args.probe_lengths or [64, 256, 1024, 2048]:
        middle = filler[: max(0, length - plant.shape[1] - tail.shape[1] - value.shape[1])][None]
        row: dict[str, Any] = {"prompt_tokens": plant.shape[1] + middle.shape[1] + tail.shape[1]}
        for name, make in caches:
            planted = _value_logprob(model, make, torch.cat([plant, middle, tail, value], 1), value.shape[1])
            baseline = _value_logprob(model, make, torch.cat([control, middle, tail, value], 1), value.shape[1])
            row[name] = {"logprob_planted": planted, "logprob_control": baseline, "gain": planted - baseline}
        results.setdefault("probe", []).append(row)
        summary = ", ".join(f"{k} {v['gain']:+.2f}" for k, v in row.items() if k != "prompt_tokens")
        print(f"{row['prompt_tokens']:5d} tokens, gain in nats/token: {summary}")


@torch.no_grad()
def bench_speed(args: argparse.Namespace, results: dict[str, Any]) -> None:
    torch.set_num_threads(max(args.threads))
    model, _ = _model(args)
    optimized = KernelOptimizer(KernelConfig(weights=args.weights)).apply_to_model(copy.deepcopy(model))
    context = args.speed_context
    ids = torch.randint(1, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    new = 32
    threads = torch.get_num_threads()
    print(
        f"\n== decode after {context} tokens, {args.weights} weights, {new} new tokens, {threads} thread(s), "
        "median of 3"
    )

    def timed(model_: Any, make_cache: Any) -> float:
        """Decode ms/token over ``new`` one-token steps after the prompt's prefill (not timed), median of 3 rounds:
        HF's forward with the cache for ``model``, the lean loop with it attached for ``optimized``."""
        runs = []
        for _ in range(4):  # the first round warms up
            cache = make_cache()
            decoder = decoder_of(model_)
            if decoder is not None:
                decoder.attach_cache(cache)
                decoder.allocate(ids.shape[1] + new + 1)
                token = decoder.forward(ids).argmax(-1, keepdim=True)
                start = time.perf_counter()
                for _ in range(new):
                    token = decoder.step(token).argmax(-1, keepdim=True)
                runs.append(time.perf_counter() - start)
                decoder.attach_cache(None)
                continue
            cache = cache if cache is not None else DynamicCache(config=model_.config)
            token = model_(ids, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new):
                token = model_(token, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs[1:]) / new * 1e3

    rows = {"HF, DynamicCache": timed(model, lambda: None)}
    rows["lean loop, static cache"] = timed(optimized, lambda: None)
    for name, config in CONFIGS.items():
        rows[f"HF, {name}"] = timed(model, lambda c=config: KVCacheOptimizer(c).make_cache(model))
        if config.strategy == "quantized":
            rows[f"lean loop, {name}"] = timed(optimized, lambda c=config: KVCacheOptimizer(c).make_cache(model))
            aten = replace(config, native_attend=False)
            rows[f"lean loop, {name}, ATen attend"] = timed(
                optimized, lambda c=aten: KVCacheOptimizer(c).make_cache(model)
            )
    results["speed_ms_per_token"] = rows
    results["speed_setup"] = {"context": context, "weights": args.weights, "threads": threads, "new_tokens": new}
    static = rows["lean loop, static cache"]
    for name, ms in rows.items():
        cost = f"  {ms / static - 1:+.0%} against the static cache" if name.startswith("lean loop, int") else ""
        print(f"{name:34s} {ms:6.2f} ms/token{cost}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["memory", "accuracy", "greedy", "probe", "speed"])
    parser.add_argument("--model", choices=["smollm2", "target"], default="smollm2")
    parser.add_argument("--speed-context", type=int, default=2048, help="prompt tokens before the timed decode")
    parser.add_argument("--weights", default="int8", help="KernelConfig.weights of the lean loop (speed section)")
    parser.add_argument("--contexts", nargs="+", type=int, help="default: 2048 8192 (smollm2), 1024 4096 (target)")
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--sequences", type=int, help="default: 4 of 2,048 tokens (smollm2), 32 of 512 (target)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--probe-lengths", nargs="+", type=int, help="default: 2048 4096 (smollm2), 64..2048 (target)")
    parser.add_argument("--out", default="benchmarks/results/kv_cache.json")
    args = parser.parse_args()
    smollm2 = args.model == "smollm2"
    args.contexts = args.contexts or ([2048, 8192] if smollm2 else [1024, 4096])
    args.sequences = args.sequences or (4 if smollm2 else 32)
    torch.set_num_threads(max(args.threads))
    results: dict[str, Any] = {"benchmark": "KVCacheOptimizer", "args": vars(args)}
    sections = {
        "memory": bench_memory,
        "accuracy": bench_accuracy,
        "greedy": bench_greedy,
        "probe": bench_probe,
        "speed": bench_speed,
    }
    run_sections(sections, args.sections, args, results, Path(args.out))  # rewritten after every section
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
