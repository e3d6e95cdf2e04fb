"""``model.generate`` on the lean loop: an instance-bound ``generate`` that serves what the lean loop can (batch 1,
greedy or plain sampling, no padding) and hands everything else to HF's own ``generate``, so the interface stays HF's.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

from ryzen_opt.compat import cache_kwargs, pop_cache_kwarg
from ryzen_opt.ops.sampling import Sampler
from ryzen_opt.runtime.decoder import StaticDecoder, attends_on_storage

logger = logging.getLogger(__name__)

_SERVED_KWARGS = {
    "input_ids",
    "attention_mask",
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "generation_config",
    "min_new_tokens",
    "use_cache",
}


def bind_generate(model: Any, decoder: StaticDecoder) -> None:
    """Give ``model`` (the instance, never its class) a ``generate`` that runs the lean loop when it can, HF's
    otherwise (the reason is logged at DEBUG)."""
    hf_generate = model.generate  # bound method of the class: the fallback

    def generate(self: nn.Module, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if inputs is not None:
            kwargs["input_ids"] = inputs
        _, cache = pop_cache_kwarg(kwargs)  # either spelling; None asks for nothing: the lean loop's own cache
        own = attends_on_storage(cache) and cache.get_seq_length() == 0
        if cache is not None and not own:
            kwargs.update(cache_kwargs(cache))  # a cache the lean loop cannot use: HF's generate gets it
        reason = why_not_served(self, decoder, kwargs)
        if reason is not None:
            logger.debug("lean runtime: HF generate (%s)", reason)
            if own:
                kwargs.update(cache_kwargs(cache))
            return hf_generate(**kwargs)
        if not own:
            return lean_generate(self, decoder, **kwargs)
        # A cache that attends on its own storage (KVCacheOptimizer's quantized cache): the lean loop uses it.
        decoder.attach_cache(cache)
        try:
            return lean_generate(self, decoder, **kwargs)
        finally:
            decoder.attach_cache(None)

    model.generate = types.MethodType(generate, model)


def _settings(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def pick(name: str, default: Any = None) -> Any:
        if name in kwargs:  # an explicit argument wins, even None (HF: eos_token_id=None means no EOS)
            return kwargs[name] if kwargs[name] is not None or name == "eos_token_id" else default
        value = getattr(gen_config, name, None) if gen_config is not None else None
        return default if value is None else value

    return {
        name: pick(name, default)
        for name, default in (
            ("max_new_tokens", None),
            ("max_length", 20),
            ("do_sample", False),
            ("temperature", 1.0),
            ("top_k", None),
            ("top_p", None),
            ("eos_token_id", None),
            ("min_new_tokens", 0),
        )
    }


def why_not_served(model: nn.Module, decoder: StaticDecoder, kwargs: dict[str, Any]) -> str | None:
    """Why the lean loop cannot serve this ``generate`` call (HF's then does), or ``None`` when it can."""
    extra = sorted(set(kwargs) - _SERVED_KWARGS)
    if extra:
        return f"options {extra}"
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return "no 2-D input_ids"
    if ids.shape[0] != 1:
        return f"batch {ids.shape[0]}"
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return "padding in attention_mask"
    gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if gen_config is not None:
        for name, neutral in (("num_beams", 1), ("num_return_sequences", 1), ("repetition_penalty", 1.0)):
            value = getattr(gen_config, name, neutral)
            if value not in (None, neutral):
                return f"{name}={value}"
    total = ids.shape[1] + (_settings(model, kwargs)["max_new_tokens"] or 0)
    if total > decoder.limit():
        return f"{total} positions exceed the static cache limit {decoder.limit()}"
    window = decoder.arch.sliding_window
    if window is not None and total > window:
        return f"{total} positions exceed the sliding window {window}"
    return None


def _eos_set(eos: Any) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, torch.Tensor):
        return {int(x) for x in eos.flatten().tolist()}
    if isinstance(eos, int):
        return {eos}
    return {int(x) for x in eos}


@torch.no_grad()
def lean_generate(model: nn.Module, decoder: StaticDecoder, **kwargs: Any) -> torch.Tensor:
    """HF ``generate``'s greedy search and multinomial sampling on the lean loop; the same ids ``[1, T + new]``."""
    settings = _settings(model, kwargs)
    ids: torch.Tensor = kwargs["input_ids"].to(decoder.device)
    prompt_len = ids.shape[1]
    new = settings["max_new_tokens"]
    if new is None:
        new = max(0, settings["max_length"] - prompt_len)
    if new == 0:
        return ids
    eos = _eos_set(settings["eos_token_id"])
    min_new = int(settings["min_new_tokens"] or 0)
    temperature = settings["temperature"] if settings["do_sample"] else 0.0
    sampler = Sampler(temperature, settings["top_k"], settings["top_p"])
    decoder.allocate(prompt_len + new)
    out = torch.empty(1, prompt_len + new, dtype=ids.dtype, device=ids.device)
    out[:, :prompt_len] = ids
    logits = decoder.forward(ids)
    produced = 0
    for produced in range(1, new + 1):
        if produced <= min_new and eos:
            logits[:, list(eos)] = float("-inf")
        token = sampler.next_token(logits)
        out[0, prompt_len + produced - 1] = token
        if produced == new or token in eos:
            break
        logits = decoder.step(out[:, prompt_len + produced - 1 : prompt_len + produced])
    return out[:, : prompt_len + produced]
