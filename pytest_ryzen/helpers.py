"""What a test of your own optimization needs besides the markers: a decode workload, a model's bytes, held-out text.

These are the measurements ryzen-opt's own gates use, so a ``@speedup``, ``@compression_ratio`` or
``@accuracy_loss`` test of yours measures the same way. They import torch; ``import pytest_ryzen`` does not (the
plugin loads in every ``pytest`` run, ``--help`` included), and gives these names on first use::

    from pytest_ryzen import decode_workload, heldout_blocks, model_bytes
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from ryzen_opt.measure import memory, workloads
from ryzen_opt.measure.decode import CachedForward
from ryzen_opt.models import corpus

__all__ = ["decode_path", "decode_workload", "heldout_blocks", "model_bytes"]


def decode_workload(model: Any, prompt: torch.Tensor, new_tokens: int, **generate_kwargs: Any) -> Callable[[], Any]:
    """A zero-argument call that runs ``model.generate`` for exactly ``new_tokens`` new tokens, to time with
    ``ryzen.compare`` (or :func:`ryzen_opt.measure.timing.compare`).

    Why not a lambda around ``generate``: a decode that stops at an end-of-sequence token looks fast. This one holds
    EOS off (``min_new_tokens``), is greedy unless told otherwise, checks the length of its first output, and resets a
    cache passed as ``past_key_values`` before every call, so that every call does the same work.
    ``generate_kwargs`` go to ``generate`` (``cache_implementation="static"``, ``past_key_values=cache``, ...); a
    length argument other than ``new_tokens`` (``max_new_tokens``, ``min_new_tokens``, ``max_length``) raises
    ``ryzen_opt.errors.ConfigError``. See :func:`ryzen_opt.measure.workloads.generate_workload`.

    Example::

        base = decode_workload(model, prompt_ids, 64)
        mine = decode_workload(optimized, prompt_ids, 64, cache_implementation="static")
        ryzen.compare(base, mine, optimizer="static cache")  # in a test marked @speedup(1.5)
    """
    return workloads.generate_workload(model, prompt, new_tokens, **generate_kwargs)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer ``model`` holds, each storage counted once (a tied LM head once; a
    quantized module's int8/uint8 buffers included).

    Why: a compression ratio is stored bytes before over stored bytes after, and an optimizer that quantizes moves
    weights from parameters into buffers, so counting parameters alone would miss them. Weights a module keeps
    outside both (``torch.ao.quantization.quantize_dynamic``'s packed parameters) are not counted: a warning names
    those modules. See :func:`ryzen_opt.measure.memory.model_bytes`.

    Example::

        ryzen.record_compression(model_bytes(model), model_bytes(quantized))  # in a test marked @compression_ratio(3.5)
    """
    return memory.model_bytes(model)


def heldout_blocks(tokenizer: Any, blocks: int = 24, block_size: int = 256, split: str = "test") -> torch.Tensor:
    """``[blocks, block_size]`` token ids of English prose no model was tuned on, for an accuracy loss.

    The text is CPython's documentation (``pydoc_data.topics``, shipped with every CPython, so it works offline;
    licence: ``ryzen_opt.models.corpus.PROSE_LICENCE``, the PSF License Version 2), split by topic into two
    disjoint halves. The default ``split="test"`` is where an optimization is judged; choose its defaults (group
    sizes, calibration data, thresholds) on ``split="tune"``, never on ``"test"``, or the reported loss was tuned
    on the text it is measured on. Documents are joined by the tokenizer's end-of-sequence token.
    See :func:`ryzen_opt.models.corpus.prose_blocks`; raises ``ryzen_opt.errors.ConfigError`` for an unknown split
    or more blocks than the split holds.

    Example::

        ids = heldout_blocks(tokenizer)  # [24, 256], to judge on: ryzen.record_accuracy(model, quantized, ids)
        calibration = heldout_blocks(tokenizer, blocks=8, split="tune")  # to choose defaults on
    """
    return corpus.prose_blocks(tokenizer, split, blocks=blocks, block_size=block_size)


def decode_path(model: Any, make_cache: Callable[[], Any] | None = None, chunk: int = 1) -> torch.nn.Module:
    """``model`` read the way a decode reads it: ``chunk`` tokens per forward (one by default) through a KV cache
    from ``make_cache`` (default: a fresh ``transformers.DynamicCache``), as a module whose forward gives every
    position's logits, for ``ryzen.record_accuracy``.

    Why: a prefill (the whole block in one forward) never exercises a cache, so an optimization of the cache or of
    the one-row decode kernels must be judged through this path. Compare against the same model read the same way
    with the full-precision cache, so that only your change differs. See
    :class:`ryzen_opt.measure.decode.CachedForward`.

    Example::

        blocks = heldout_blocks(tokenizer, blocks=8, block_size=128)
        ryzen.record_accuracy(decode_path(model), decode_path(model, my_quantized_cache), blocks)
    """
    if make_cache is None:

        def make_cache() -> Any:
            return DynamicCache(config=model.config)

    return CachedForward(model, make_cache, chunk=chunk)
