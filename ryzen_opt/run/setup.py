"""The setup stage: resolve the device, load the models, and check that all four optimizers build on them."""

from __future__ import annotations

import dataclasses
from typing import Any

from ryzen_opt.device import resolve_device
from ryzen_opt.errors import ConfigError
from ryzen_opt.models import zoo
from ryzen_opt.models.loading import load_model
from ryzen_opt.optimizers.system import build_variants
from ryzen_opt.run.config import RunConfig
from ryzen_opt.run.context import RunContext
from ryzen_opt.training import distributed


def run_setup(ctx: RunContext) -> dict[str, Any]:
    """Resolve the device, load the models, and build all four optimizers (each alone and together) to check each
    initializes. What is built is kept for validation unless training changes the target."""

    cfg = ctx.config
    # Under torchrun: join the process group (each rank on its own GPU, if any); one process: nothing happens.
    ctx.dist, ctx.device = distributed.start(resolve_device(cfg.device))
    if ctx.dist.active:
        ctx.say(f"distributed: rank {ctx.dist.rank} of {ctx.dist.world_size} ({ctx.dist.backend})")
    target = cfg.model.target
    # Rank 0 converts or trains a missing model into the cache; the others load what it wrote.
    with distributed.main_first(ctx.dist, "fill the model cache"):
        if target == "zoo":
            ctx.say(f"zoo {cfg.zoo_recipe!r}: loading (trains on first use, ~10 min for 'default' on 2 cores)")
            ctx.target, ctx.tokenizer = zoo.reference_model("target", cfg.zoo_recipe, device=ctx.device)
        elif target == "smollm2":
            ctx.say("SmolLM2-135M-Instruct: loading (converted from its GGUF once, ~45 s; then a few seconds)")
            ctx.target, ctx.tokenizer = zoo.reference_model("smollm2", device=ctx.device)
        else:
            ctx.target, ctx.tokenizer = load_model(target, device=ctx.device)
    if ctx.tokenizer is None:
        raise ConfigError(
            f"[model] target = {target!r} has no tokenizer files: training and validation tokenize text. Save the "
            "tokenizer beside the weights (tokenizer.save_pretrained(dir))"
        )
    if not ctx.dist.is_main:  # ranks 1.. only train: the draft and the optimizers are rank 0's
        return {"device": str(ctx.device), "target": target, "rank": ctx.dist.rank}
    drafter = cfg.model.drafter
    if drafter == "zoo":
        ctx.draft, _ = zoo.reference_model("draft", cfg.zoo_recipe, device=ctx.device)
    elif drafter != "ngram":
        ctx.draft, _ = load_model(drafter, device=ctx.device, tokenizer=False)
    for model in (ctx.target, ctx.draft):
        if model is not None:
            model.generation_config.eos_token_id = None  # measured runs generate exactly the tokens asked for
    if fine_tunes(cfg):
        # Training changes the weights, so validation builds the variants again: here they are only built to check
        # that each optimizer initializes on this model, without any compile validation may do.
        ctx.say("setup: building the four optimizers, each alone and all together (a check; rebuilt after training)")
        unc = dataclasses.replace(cfg.system, compile_kernels=False, compile_draft=False)
        applied = build_variants(ctx.target, ctx.draft, unc).system.applied
    else:
        ctx.say("setup: building the four optimizers, each alone and all together")
        ctx.variants = build_variants(ctx.target, ctx.draft, cfg.system)
        applied = ctx.variants.system.applied
    return {
        "device": str(ctx.device),
        "target": target,
        "draft": drafter,
        "parameters": sum(p.numel() for p in ctx.target.parameters()),
        "applied": applied,
        "distributed": ctx.dist.to_dict(),
    }


def fine_tunes(cfg: RunConfig) -> bool:
    """Whether the training stage changes the target's weights: always, but for the zoo target without text files
    (its recipe's training is reported instead)."""
    return bool(cfg.training.text_files) or cfg.model.target != "zoo"
