"""Token streams cut into fixed-length blocks: the held-out data that measurements score and training consumes.

It lives in :mod:`ryzen_opt.measure` (a lower layer than :mod:`ryzen_opt.training`) so that
:mod:`ryzen_opt.measure.accuracy` can accept it without importing the training loop;
:mod:`ryzen_opt.training.loop` re-exports it under its old name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ryzen_opt.errors import ConfigError


class TokenBlocks:
    """A token stream cut into fixed-length blocks; the unit of training and evaluation data.

    Args:
        ids: the whole stream (documents joined with an end-of-text token).
        block_size: tokens per block (the model's training context).
    """

    def __init__(self, ids: torch.Tensor | Sequence[int], block_size: int) -> None:
        stream = torch.as_tensor(ids, dtype=torch.long).flatten()
        n = stream.numel() // block_size
        if n < 1:
            raise ConfigError(f"{stream.numel()} tokens cannot fill one block of {block_size}: give more text")
        self.blocks = stream[: n * block_size].view(n, block_size)
        self.block_size = block_size

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Shuffled batches forever, reshuffled each data epoch with a seeded generator (reproducible)."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=gen)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield self.blocks[order[start : start + batch_size]]

    def fixed_batches(self, batch_size: int, count: int) -> list[torch.Tensor]:
        """The first ``count`` batches in order: the same held-out data at every evaluation."""
        out = []
        for i in range(count):
            chunk = self.blocks[i * batch_size : (i + 1) * batch_size]
            if chunk.shape[0] == 0:
                break
            out.append(chunk)
        return out
