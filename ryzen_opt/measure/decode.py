"""Decode-path accuracy: a model's logits as the decode loop computes them, chunk by chunk over a cache.

:class:`CachedForward` wraps a model and a cache factory into a module whose forward reads its input through the
cache in chunks, so ``accuracy(reference, CachedForward(model, make_cache))`` measures what a cache changes.
"""

from __future__ import annotations

from typing import Any

import torch

from ryzen_opt.compat import cache_kwargs
from ryzen_opt.errors import ConfigError


class CachedForward(torch.nn.Module):
    """``model`` read through a cache: ``forward(input_ids)`` feeds the sequence ``chunk`` tokens at a time, each chunk
    attending to what the cache stored of the previous ones, and returns every position's logits.

    This is how accuracy with a KV cache is measured (docs/definitions.md, "accuracy loss"; reference = the same
    procedure with HF's full-precision ``DynamicCache``): the logits are the ones a decode would see, quantization
    error included, while the scoring stays teacher-forced over held-out text.
    """

    def __init__(self, model: Any, make_cache: Any, chunk: int = 32) -> None:
        super().__init__()
        if chunk < 1:
            raise ConfigError(f"chunk = {chunk}: at least 1")
        self.model = model
        self.make_cache = make_cache
        self.chunk = chunk

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> Any:
        from types import SimpleNamespace

        cache = self.make_cache()
        logits = []
        for start in range(0, input_ids.shape[1], self.chunk):
            out = self.model(input_ids[:, start : start + self.chunk], **cache_kwargs(cache), use_cache=True)
            logits.append(out.logits)
        return SimpleNamespace(logits=torch.cat(logits, dim=1))
