"""The training stage: fine-tune the target (held-out loss must go down), or report the zoo recipe's training."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.models import corpus, zoo
from ryzen_opt.run.config import TrainingSection
from ryzen_opt.run.context import RunContext
from ryzen_opt.run.setup import fine_tunes
from ryzen_opt.training.loop import TokenBlocks, TrainConfig, evaluate, train, use_bf16_autocast
from ryzen_opt.training.metrics import EpochMetric, TrainingMetricsCollector
from ryzen_opt.validation.reports import atomic_write_json


def run_training(ctx: RunContext) -> dict[str, Any]:
    """Fine-tune the target (on ``[training] text_files``, or on the built-in prose corpus for any target but the zoo),
    or report the zoo recipe's training (measured when the zoo was trained; the report says when)."""
    cfg = ctx.config
    out = ctx.out
    out.mkdir(parents=True, exist_ok=True)
    if fine_tunes(cfg):
        ctx.variants = None  # built from the weights before training: validation builds them again, once
        return fine_tune(ctx)

    path = zoo.build(cfg.zoo_recipe)
    report = json.loads((path / "training_metrics_report.json").read_text())
    if ctx.dist.is_main:
        atomic_write_json(out / "training_metrics_report.json", report)
    build = json.loads((path / "build.json").read_text())
    return {"mode": "zoo recipe", "zoo": str(path), "recipe": cfg.zoo_recipe, "build": build}


# The built-in fine-tuning corpus for a target without [training] text_files.
BUILTIN_CORPUS = "CPython's documentation, the 'tune' half (ryzen_opt.models.zoo.prose_texts('tune'))"


def fine_tune(ctx: RunContext) -> dict[str, Any]:
    """Fine-tune the target on its blocks but the held-out ones; their loss must go down (else RyzenOptError)."""
    cfg = ctx.config.training
    ids, source = _training_tokens(ctx, cfg)
    train_blocks, heldout, n_heldout = _split_heldout(ids, cfg)
    config = _train_config(cfg, n_heldout)
    label = ctx.config.model.target
    collector = TrainingMetricsCollector(
        experiment_id="ryzen-opt run: fine-tune", model=label, batch_size=cfg.batch_size
    )
    ctx.say(
        f"training: {cfg.steps} steps of {cfg.batch_size} x {cfg.block_size} tokens on {len(train_blocks)} blocks; "
        f"held-out loss on the last {n_heldout} blocks before and after"
    )
    before = _heldout_before(ctx, config, heldout, collector)
    summary = _train_and_export(ctx, train_blocks, heldout, config, collector)
    ctx.target.zero_grad(set_to_none=True)
    ctx.target.eval()
    after = summary["final_eval"]
    data = {
        "mode": "fine-tune",
        "corpus": source,
        "tokens": int(ids.numel()),
        "train_blocks": len(train_blocks),
        "heldout_blocks": n_heldout,
        "steps": cfg.steps,
        "seconds": summary["seconds"],
        "heldout_before": before,
        "heldout_after": after,
        "world_size": summary.get("world_size", 1),
        "backend": summary.get("backend"),
    }
    if not after["loss"] < before["loss"]:
        raise RyzenOptError(
            f"fine-tuning did not lower the held-out loss: {before['loss']:.4f} before, {after['loss']:.4f} after "
            f"{cfg.steps} steps at lr {cfg.lr:g} on {len(train_blocks)} blocks ({n_heldout} held out); try a lower "
            "[training] lr, more steps, or more text"
        )
    ctx.say(f"training: held-out loss {before['loss']:.4f} -> {after['loss']:.4f}")
    return data


def _training_tokens(ctx: RunContext, cfg: TrainingSection) -> tuple[torch.Tensor, Any]:
    """The token stream to fine-tune on, and where it came from: ``text_files`` joined, or the built-in corpus."""
    if cfg.text_files:
        texts = []
        for name in cfg.text_files:
            p = Path(name)
            if not p.is_file():
                raise ConfigError(f"[training] text_files: {name!r} does not exist")
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
        ids = ctx.tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
        return ids, list(cfg.text_files)
    ctx.say(f"training: no [training] text_files; fine-tuning on the built-in corpus: {BUILTIN_CORPUS}")
    ids = corpus.prose_blocks(ctx.tokenizer, "tune", blocks=None, block_size=cfg.block_size).flatten()
    return ids, BUILTIN_CORPUS


def _split_heldout(ids: torch.Tensor, cfg: TrainingSection) -> tuple[TokenBlocks, TokenBlocks, int]:
    """Cut the stream into blocks and hold out the last ones (at most a tenth): training blocks, held-out, count."""
    if ids.numel() < 2 * cfg.block_size:
        raise ConfigError(
            f"[training] the text holds {ids.numel()} tokens: need at least 2 blocks of {cfg.block_size} "
            "(one to train on, one held out)"
        )
    blocks = TokenBlocks(ids, cfg.block_size).blocks
    n_heldout = max(1, min(cfg.heldout_blocks, len(blocks) // 10))
    train_blocks = TokenBlocks(blocks[:-n_heldout].flatten(), cfg.block_size)
    heldout = TokenBlocks(blocks[-n_heldout:].flatten(), cfg.block_size)
    return train_blocks, heldout, n_heldout


def _train_config(cfg: TrainingSection, n_heldout: int) -> TrainConfig:
    """The training loop's configuration for ``[training]``: one evaluation, at the end, of every held-out block."""
    return TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=cfg.steps // 10,
        eval_every=cfg.steps,  # one evaluation, at the end, of every held-out block
        eval_batches=math.ceil(n_heldout / cfg.batch_size),
        progress=True,
        accumulation_steps=cfg.accumulation_steps,
        bucket_cap_mb=cfg.bucket_cap_mb,
    )


def _heldout_before(
    ctx: RunContext, config: TrainConfig, heldout: TokenBlocks, collector: TrainingMetricsCollector
) -> dict[str, float]:
    """Evaluate the held-out blocks before training (as ``train`` will after) and record it as step 0."""
    started = time.perf_counter()
    bf16 = use_bf16_autocast(config, ctx.device)
    before = evaluate(ctx.target, heldout.fixed_batches(config.batch_size, config.eval_batches), ctx.device, bf16)
    collector.record_epoch_metric(
        EpochMetric(
            epoch=0,
            train_loss=None,
            val_loss=before["loss"],
            accuracy=before["accuracy"],
            perplexity=before["perplexity"],
            duration_s=time.perf_counter() - started,
            extra={"step": 0.0},  # before training: the baseline the fine-tune must improve on
        )
    )
    return before


def _train_and_export(
    ctx: RunContext,
    train_blocks: TokenBlocks,
    heldout: TokenBlocks,
    config: TrainConfig,
    collector: TrainingMetricsCollector,
) -> dict[str, Any]:
    """Train the target; the metrics report is written (by rank 0) whether training succeeded or not."""
    try:
        return train(ctx.target, train_blocks, config, collector, heldout=heldout, device=ctx.device)
    finally:
        # Written on failure too (a NaN is then the report's anomaly), by rank 0 only: it holds every rank's
        # reduced losses and step times.
        if ctx.dist.is_main:
            collector.export_metrics(ctx.out / "training_metrics_report.json")
