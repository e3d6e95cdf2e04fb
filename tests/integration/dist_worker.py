"""A training job for the distributed tests, started by torchrun (or as one plain process).

It trains a small random Llama with ``ryzen_opt.training.loop.train`` and writes, from rank 0 only, the per-step losses
and the collector's report to ``--out``. ``--fault nan|die`` makes ``--fault-rank`` return a NaN loss, or exit
abruptly, at ``--fault-step``: what the failure tests need.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ryzen_opt.errors import RyzenOptError
from ryzen_opt.training import distributed
from ryzen_opt.training.loop import TokenBlocks, TrainConfig, train
from ryzen_opt.training.metrics import TrainingMetricsCollector
from ryzen_opt.validation.reports import atomic_write_json


class Faulty(nn.Module):
    """The model, with a fault planted on one rank at one forward."""

    def __init__(self, model: nn.Module, fault: str, rank: int, step: int) -> None:
        super().__init__()
        self.model, self.fault, self.fault_rank, self.fault_step, self.calls = model, fault, rank, step, 0

    def forward(self, **kwargs):  # type: ignore[no-untyped-def]
        out = self.model(**kwargs)
        hit = self.fault != "none" and distributed.current().rank == self.fault_rank and self.calls == self.fault_step
        self.calls += 1
        if hit and self.fault == "die":
            os._exit(7)
        if hit and self.fault == "nan":
            out.loss = out.loss * float("nan")
        return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--fault", choices=("none", "nan", "die"), default="none")
    p.add_argument("--fault-rank", type=int, default=1)
    p.add_argument("--fault-step", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    info, device = distributed.start(torch.device("cpu"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Faulty(LlamaForCausalLM(config), args.fault, args.fault_rank, args.fault_step)
    ids = torch.randint(0, 128, (48 * 32,), generator=torch.Generator().manual_seed(1))
    data, heldout = TokenBlocks(ids[: 40 * 32], 32), TokenBlocks(ids[40 * 32 :], 32)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        accumulation_steps=args.accum,
        lr=1e-2,
        warmup_steps=0,
        eval_every=args.steps,
        eval_batches=2,
        progress=False,
        autocast="off",
    )
    collector = TrainingMetricsCollector("dist-test", model="tiny-llama", batch_size=args.batch)
    try:
        summary = train(model, data, cfg, collector, heldout=heldout, device=device)
    except RyzenOptError as exc:
        print(f"rank {info.rank} ERROR {type(exc).__name__}: {exc}", flush=True)
        return 3
    finally:
        if info.is_main:
            collector.export_metrics(Path(args.out) / "training_metrics_report.json")
    if info.is_main:
        losses = [m.loss for m in collector.batch_metrics]
        atomic_write_json(Path(args.out) / "result.json", {"losses": losses, "summary": summary})
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
