"""Zoo recipes: what a tiny reference model is trained from, in a frozen dataclass per recipe.

A recipe fixes the tokenizer size, the architecture and the training; the zoo's cache directory is named by a
hash of it (``zoo.recipe_hash``), so a changed recipe retrains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ryzen_opt.errors import ConfigError
from ryzen_opt.training.loop import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the zoo's weights. Its hash names the cache directory.

    Attributes:
        name: ``default`` (the reference models) or ``tiny`` (seconds, for unit tests).
        vocab_size: BPE vocabulary. 4096 gives ~3.6 characters/token on this corpus; larger doubles the LM head.
        block_size: training context in tokens.
        hidden, layers, heads, kv_heads, intermediate: the target's Llama shape.
        draft_layers: the early exit: the draft is the target's first ``draft_layers`` layers.
        exit_loss_weight: weight of the cross-entropy at the exit (teaches the draft the data).
        distill_weight: weight of KL(target || exit), the teacher detached (teaches the draft to agree).
        max_train_chars: cap on training text (the tiny recipe); ``None`` uses the whole corpus.
        heldout_every: a file is held out when ``md5(relative path) % heldout_every == 0``.
        train: the training loop's configuration.
        seed: weight initialisation.
    """

    name: str = "default"
    vocab_size: int = 4096
    block_size: int = 256
    hidden: int = 256
    layers: int = 6
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 704
    draft_layers: int = 2
    exit_loss_weight: float = 0.5
    distill_weight: float = 1.0
    max_train_chars: int | None = None
    heldout_every: int = 20
    max_position_embeddings: int = 4096
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.draft_layers < self.layers:
            raise ConfigError(f"Recipe.draft_layers = {self.draft_layers}: must be in [1, layers={self.layers})")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ConfigError(
                f"Recipe: hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads} don't divide"
            )
        if self.vocab_size < 260:
            raise ConfigError(f"Recipe.vocab_size = {self.vocab_size}: byte-level BPE needs at least 257 + merges")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train"] = self.train.to_dict()
        return data


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        name="default",
        # 900 steps x 16 x 256 tokens = 3.7M tokens, ~1.5 passes over the corpus; ~10 min on 2 Zen 4 cores.
        train=TrainConfig(
            steps=900,
            batch_size=16,
            lr=3e-3,
            warmup_steps=60,
            eval_every=150,
            eval_batches=8,
            min_lr_ratio=0.05,
            progress=True,
        ),
    ),
    "tiny": Recipe(
        name="tiny",
        vocab_size=512,
        block_size=64,
        hidden=64,
        layers=2,
        heads=2,
        kv_heads=2,
        intermediate=128,
        draft_layers=1,
        max_train_chars=400_000,
        max_position_embeddings=512,
        train=TrainConfig(
            steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, eval_batches=4, progress=False
        ),
    ),
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ConfigError(f"unknown zoo recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe]
