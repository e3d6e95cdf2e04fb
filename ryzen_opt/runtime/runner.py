"""One forward with a KV cache that can be rolled back: what speculative decoding and model drafters run on.

:class:`LeanRunner` drives a model the kernel optimizer gave a static-cache decoder (found through
:func:`~ryzen_opt.runtime.decoder_of`); :class:`HFRunner` any causal LM through HF's forward and a ``Cache`` that
can ``crop``. :func:`runner_for` picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from ryzen_opt.compat import cache_kwargs
from ryzen_opt.runtime.decoder import decoder_of


class Runner(Protocol):
    length: int

    def reset(self, max_len: int) -> None: ...

    def prefill(self, ids: torch.Tensor) -> torch.Tensor: ...

    def extend(self, ids: torch.Tensor) -> torch.Tensor: ...

    def extend_features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rollback(self, length: int) -> None: ...


class LeanRunner:
    """A model optimized by the KernelOptimizer: its static-cache decoder (duck-typed: optimizers don't import
    each other). An optional cache factory attaches a cache with ``attend`` (the KVCacheOptimizer's)."""

    def __init__(self, decoder: Any, cache_factory: Callable[[], Any] | None) -> None:
        self.decoder = decoder
        self.cache_factory = cache_factory

    @property
    def length(self) -> int:
        return int(self.decoder.pos)

    def reset(self, max_len: int) -> None:
        if self.cache_factory is not None:
            self.decoder.attach_cache(self.cache_factory())
        self.decoder.allocate(max_len)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt in one pass, as the target's own ``generate`` runs it; next-token logits ``[1, V]``."""
        return self.decoder.forward(ids).float()

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] == 1 and self.decoder.is_compiled:
            # A compiled one-token step (KernelConfig(compile=True)): about half an eager step on small models.
            return self.decoder.step(ids).float()
        rows = getattr(self.decoder, "native_rows", 0)
        if self.decoder.pos > 0 and rows and ids.shape[1] > rows and self.decoder.native_layers() is not None:
            # A verification longer than the fused layer takes would run ATen's layers, whose attention sums in
            # another order than a one-token step's: in pieces it gets the steps' bits (greedy stays lossless).
            parts = [
                self.decoder.forward(ids[:, i : i + rows], all_logits=True)[0] for i in range(0, ids.shape[1], rows)
            ]
            return torch.cat(parts).float()
        return self.decoder.forward(ids, all_logits=True)[0].float()

    def extend_features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[T, V]`` and the hidden states the head read ``[T, d]`` (eager: the compiled step has none)."""
        logits, features = self.decoder.forward(ids, all_logits=True, features=True)
        return logits[0].float(), features[0].float()

    def rollback(self, length: int) -> None:
        self.decoder.crop(length)

    def close(self) -> None:
        if self.cache_factory is not None:
            self.decoder.attach_cache(None)


class HFRunner:
    """Any causal LM through HF's forward and a ``Cache`` that can ``crop`` (DynamicCache by default)."""

    def __init__(self, model: Any, cache_factory: Callable[[], Any] | None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache_factory = cache_factory or (lambda: DynamicCache(config=model.config))
        self.cache: Any = None
        self.length = 0

    def reset(self, max_len: int) -> None:
        self.cache = self.cache_factory()
        self.length = 0

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.extend(ids)[-1:]

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, **cache_kwargs(self.cache), use_cache=True)
        self.length += ids.shape[1]
        return out.logits[0].float()

    def extend_features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the decoder's last hidden state (after its final norm: what the LM head reads)."""
        out = self.model.get_decoder()(ids, **cache_kwargs(self.cache), use_cache=True)
        self.length += ids.shape[1]
        hidden = out.last_hidden_state[0]
        return self.model.get_output_embeddings()(hidden).float(), hidden.float()

    def rollback(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)
            self.length = length

    def close(self) -> None:
        self.cache = None


def runner_for(model: Any, cache_factory: Callable[[], Any] | None) -> LeanRunner | HFRunner:
    decoder = decoder_of(model)
    if decoder is not None and (cache_factory is None or not decoder.is_compiled):
        return LeanRunner(decoder, cache_factory)
    return HFRunner(model, cache_factory)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device
