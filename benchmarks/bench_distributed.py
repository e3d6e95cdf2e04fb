"""Distributed fine-tuning, measured: equivalence, scaling, gradient-sync overlap, and no_sync accumulation.

    python benchmarks/bench_distributed.py                   # SmolLM2-135M-Instruct, every section (~5 min here)
    python benchmarks/bench_distributed.py --sections overlap --buckets 1 25
    python benchmarks/bench_distributed.py --model tiny      # a 2-layer random Llama: seconds, for a smoke test

Every configuration is a real job: ``python -m torch.distributed.run --standalone --nproc-per-node=N`` on this
script's ``--worker`` mode, which fine-tunes with ``ryzen_opt.training.loop.train`` (DistributedDataParallel over gloo
on
CPU, one thread per rank) on the built-in prose corpus and writes, from rank 0, its per-step losses and times.

Sections:
- **equivalence**: 1 rank with global batch B against 2 ranks with B/2 each (the same global batches): the largest
  relative difference of the per-step losses.
- **scaling**: tokens per second (global; median over the steps after the first), 2 ranks x 1 thread against
  1 rank x 1 thread, and the efficiency ``tps_2 / (2 x tps_1)``. The same two jobs as ``equivalence``.
- **overlap**: ``torch.profiler`` on rank 0 for each ``--buckets`` size (DDP's ``bucket_cap_mb``). For each
  backward, the all-reduce intervals (gloo's ``all_reduce`` events) against the backward's own compute (the
  ``ryzen_opt.train.backward`` span up to its last autograd op): the share of all-reduce time hidden behind compute,
  and the exposed time left after it.
- **accumulation**: ``--accum`` micro-batches per step, gradients synced on the last only (``no_sync`` on the others,
  ``grad_sync="last"``) against synced on every micro-batch (``"every"``): tokens per second of each.

Results go to ``benchmarks/results/distributed.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECTIONS = ("equivalence", "scaling", "overlap", "accumulation")


# ------------------------------------------------------------------------------------------------ the worker
def _model(name: str) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ryzen_opt.models import corpus, zoo
    from ryzen_opt.training import distributed

    if name == "smollm2":
        with distributed.main_first(distributed.current(), "convert SmolLM2 into the cache"):
            model, tok = zoo.reference_model("smollm2")
        ids = corpus.prose_blocks(tok, "tune", blocks=None, block_size=64).flatten()
        return model, ids
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg), torch.randint(0, 256, (64 * 64,), generator=torch.Generator().manual_seed(1))


def _overlap(prof: Any) -> dict[str, Any]:
    """All-reduce time inside each backward's compute, from the profile's events (microseconds)."""
    from ryzen_opt.training.loop import BACKWARD_LABEL

    events = prof.events()
    backward = sorted((e.time_range.start, e.time_range.end, e.thread) for e in events if e.name == BACKWARD_LABEL)
    comm = [(e.time_range.start, e.time_range.end) for e in events if "all_reduce" in e.name.lower()]
    total = hidden = exposed = 0.0
    for start, end, thread in backward:
        # The backward's compute ends with its last autograd op on its own thread; after it, backward() only waits
        # for the buckets still in flight.
        ops = [
            e.time_range.end
            for e in events
            if e.thread == thread
            and start <= e.time_range.start <= end
            and e.name.startswith("autograd::engine::evaluate_function")
        ]
        compute_end = max(ops, default=end)
        inside = [(max(a, start), min(b, end)) for a, b in comm if b > start and a < end]
        for a, b in inside:
            total += b - a
            hidden += max(0.0, min(b, compute_end) - a)
        exposed += max(0.0, end - compute_end)
    return {
        "backwards": len(backward),
        "allreduce_events": len(comm),
        "allreduce_ms": total / 1e3,
        "hidden_ms": hidden / 1e3,
        "hidden_share": hidden / total if total else None,
        "exposed_wait_ms": exposed / 1e3,
    }


def worker(args: argparse.Namespace) -> int:
    import torch

    from ryzen_opt.training import distributed
    from ryzen_opt.training.loop import TokenBlocks, TrainConfig, train
    from ryzen_opt.training.metrics import TrainingMetricsCollector
    from ryzen_opt.validation.reports import atomic_write_json

    torch.set_num_threads(1)
    info, device = distributed.start(torch.device("cpu"))
    model, ids = _model(args.model)
    data = TokenBlocks(ids, args.block)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        accumulation_steps=args.accum,
        grad_sync=args.grad_sync,
        bucket_cap_mb=args.bucket_mb,
        lr=1e-4,
        warmup_steps=0,
        eval_every=args.steps,
        progress=False,
        autocast="off",
    )
    collector = TrainingMetricsCollector("bench-distributed", model=args.model, batch_size=args.batch)
    profile = None
    if args.profile and info.is_main:
        from torch.profiler import ProfilerActivity, schedule
        from torch.profiler import profile as torch_profile

        # The first step warms up (allocations, DDP's bucket rebuild); the rest are recorded.
        profile = torch_profile(
            activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=0, active=args.steps)
        )
    started = time.perf_counter()
    if profile is not None:
        with profile:
            train(model, data, cfg, collector, device=device, step_callback=profile.step)
    else:
        train(model, data, cfg, collector, device=device)
    if info.is_main:
        batches = collector.batch_metrics
        result = {
            "world_size": info.world_size,
            "losses": [m.loss for m in batches],
            "step_s": [m.duration_s for m in batches],
            "rank_step_s": [list(m.rank_step_s) if m.rank_step_s else None for m in batches],
            "tokens_per_step": args.batch * args.block,
            "seconds": time.perf_counter() - started,
        }
        if profile is not None:
            result["overlap"] = _overlap(profile)
        atomic_write_json(Path(args.result), result)
    distributed.shutdown()
    return 0


# ------------------------------------------------------------------------------------------------ the driver
def _job(args: argparse.Namespace, nproc: int, **overrides: Any) -> dict[str, Any]:
    settings = {"batch": args.batch, "accum": 1, "grad_sync": "last", "bucket_mb": 25.0, "profile": False}
    settings.update(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            __file__,
            "--worker",
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--block",
            str(args.block),
            "--result",
            str(result),
            "--batch",
            str(settings["batch"]),
            "--accum",
            str(settings["accum"]),
            "--grad-sync",
            settings["grad_sync"],
            "--bucket-mb",
            str(settings["bucket_mb"]),
        ]
        if settings["profile"]:
            cmd.append("--profile")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        print(f"  {nproc} rank(s): {' '.join(cmd[3:])}", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def _tokens_per_s(job: dict[str, Any]) -> float:
    steps = job["step_s"][1:] or job["step_s"]  # the first step warms up
    return job["tokens_per_step"] / statistics.median(steps)


def section_equivalence(args: argparse.Namespace, results: dict[str, Any]) -> None:
    one = results.setdefault("_jobs", {}).setdefault("one", _job(args, 1))
    two = results["_jobs"].setdefault("two", _job(args, 2))
    worst = max(abs(b - a) / abs(a) for a, b in zip(one["losses"], two["losses"], strict=True))
    results["equivalence"] = {"losses_1_rank": one["losses"], "losses_2_ranks": two["losses"], "max_rel_diff": worst}
    print(f"equivalence: max relative loss difference {worst:.2e} over {len(one['losses'])} steps")


def section_scaling(args: argparse.Namespace, results: dict[str, Any]) -> None:
    one = results.setdefault("_jobs", {}).setdefault("one", _job(args, 1))
    two = results["_jobs"].setdefault("two", _job(args, 2))
    t1, t2 = _tokens_per_s(one), _tokens_per_s(two)
    results["scaling"] = {
        "tokens_per_s_1x1": t1,
        "tokens_per_s_2x1": t2,
        "speedup": t2 / t1,
        "efficiency": t2 / (2 * t1),
        "rank_step_s_2": two["rank_step_s"],
    }
    print(f"scaling: 1 rank {t1:.1f} tok/s, 2 ranks {t2:.1f} tok/s: {t2 / t1:.2f}x, efficiency {t2 / (2 * t1):.0%}")


def section_overlap(args: argparse.Namespace, results: dict[str, Any]) -> None:
    rows = []
    for mb in args.buckets:
        job = _job(args, 2, bucket_mb=mb, profile=True)
        row = {"bucket_cap_mb": mb, "tokens_per_s": _tokens_per_s(job), **job["overlap"]}
        rows.append(row)
        share = row["hidden_share"]
        print(
            f"overlap: bucket {mb:g} MB: all-reduce {row['allreduce_ms']:.0f} ms over {row['backwards']} backwards, "
            f"{'n/a' if share is None else f'{share:.0%}'} hidden behind compute, "
            f"{row['exposed_wait_ms']:.0f} ms exposed; {row['tokens_per_s']:.1f} tok/s"
        )
    results["overlap"] = rows


def section_accumulation(args: argparse.Namespace, results: dict[str, Any]) -> None:
    rows = {}
    for sync in ("last", "every"):
        job = _job(args, 2, batch=args.batch * args.accum, accum=args.accum, grad_sync=sync)
        rows[sync] = {"tokens_per_s": _tokens_per_s(job), "step_s": job["step_s"]}
    gain = rows["last"]["tokens_per_s"] / rows["every"]["tokens_per_s"]
    results["accumulation"] = {"micro_batches": args.accum, **rows, "no_sync_gain": gain}
    print(
        f"accumulation x{args.accum}: no_sync {rows['last']['tokens_per_s']:.1f} tok/s, sync every micro-batch "
        f"{rows['every']['tokens_per_s']:.1f} tok/s: {gain:.2f}x"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per job (the first is a warm-up)")
    p.add_argument("--block", type=int, default=64, help="tokens per row")
    p.add_argument("--batch", type=int, default=4, help="global rows per step")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step in the accumulation section")
    p.add_argument("--buckets", type=float, nargs="+", default=[1.0, 5.0, 25.0, 100.0], help="bucket_cap_mb sizes")
    p.add_argument("--out", default="benchmarks/results/distributed.json")
    # worker mode (started by torchrun)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--grad-sync", default="last", help=argparse.SUPPRESS)
    p.add_argument("--bucket-mb", type=float, default=25.0, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from ryzen_opt.validation.reports import run_sections

    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "result")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    run_sections({name: globals()[f"section_{name}"] for name in SECTIONS}, args.sections, args, results, args.out)
    results.pop("_jobs", None)
    from ryzen_opt.validation.reports import atomic_write_json

    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
