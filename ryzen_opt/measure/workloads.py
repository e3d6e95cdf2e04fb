"""Workloads for the A/B sampler (:func:`ryzen_opt.measure.timing.compare`): zero-argument calls that do the same
work every time they run, so that their timings can be paired.

Kept apart from the sampler: a workload knows ``generate``'s arguments, the sampler only calls and times.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch

from ryzen_opt.compat import cache_kwargs, pop_cache_kwarg
from ryzen_opt.errors import ConfigError, MeasurementError

# ``generate``'s length arguments: the workload sets the length itself (exactly ``new_tokens``), so any other would
# change the work being timed. ``max_new_tokens``/``min_new_tokens`` equal to ``new_tokens`` only repeat it.
_LENGTH_KWARGS = ("max_new_tokens", "min_new_tokens", "max_length", "min_length")


def _check_generate_kwargs(new_tokens: int, kwargs: dict[str, Any]) -> None:
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, numbers.Integral) or new_tokens < 1:
        raise ConfigError(f"new_tokens must be an integer >= 1, got {new_tokens!r}")
    for key in _LENGTH_KWARGS:
        if key in kwargs and not (key.endswith("_new_tokens") and kwargs[key] == new_tokens):
            raise ConfigError(
                f"generate_workload runs exactly new_tokens={new_tokens} new tokens; {key}={kwargs[key]!r} would "
                "change the work being timed: set the length with new_tokens, not a generate argument"
            )


def _cache_reset(cache: Any) -> Callable[[], None] | None:
    """``cache.reset`` for a cache given as ``past_key_values`` (``None`` without one), after checking it is empty:
    every call must decode from an empty cache, and a cache already holding a prefix would be silently emptied."""
    if cache is None:  # generate's default: a new cache every call
        return None
    reset = getattr(cache, "reset", None)
    held = cache.get_seq_length() if callable(getattr(cache, "get_seq_length", None)) else 0
    if not callable(reset) or held:
        why = f"it already holds {held} tokens" if callable(reset) else f"a {type(cache).__name__} has no reset()"
        raise ConfigError(
            f"past_key_values: the workload resets the cache before every call (each call must do the same work), "
            f"and {why}; pass an empty transformers Cache (DynamicCache, StaticCache, or one of ryzen_opt's)"
        )
    return reset


def generate_workload(model: Any, prompt: torch.Tensor, new_tokens: int, **generate_kwargs: Any) -> Callable[[], Any]:
    """A zero-argument call for :func:`~ryzen_opt.measure.timing.compare`: ``model.generate`` of exactly
    ``new_tokens`` tokens. It returns what ``generate`` returns (the ids, or a ``GenerateOutput`` with
    ``return_dict_in_generate=True``).

    ``min_new_tokens`` holds EOS off, so every call does the same work whatever the weights predict (a decode that
    stopped early would look fast). The first call checks the output length, so a workload that silently does
    less fails loudly instead of being timed.

    ``generate_kwargs`` go to ``generate`` as given, over the defaults ``do_sample=False`` (greedy) and the model's
    ``pad_token_id`` (0 if it has none): e.g. ``cache_implementation="static"``, ``past_key_values=cache``. A cache
    given as ``past_key_values`` or ``cache`` (transformers 5.24's name; either spelling is passed on under the one the
    installed version expects) is reset before every call (a second ``generate`` into a filled cache would continue
    from the first call's tokens, different work) and is left filled after the last one, so that its bytes can be
    read (:func:`ryzen_opt.measure.memory.cache_bytes`); it must be empty when the workload is built.

    Raises:
        ConfigError: a prompt that is not ``[batch, tokens]``, ``new_tokens`` < 1, a length argument
            (``max_new_tokens``, ``min_new_tokens``, ``max_length``, ``min_length``) other than ``new_tokens``, or
            a ``past_key_values``/``cache`` that cannot be reset or already holds tokens, or both spellings at once.

    Example:
        >>> run = generate_workload(model, ids, 64, cache_implementation="static")  # doctest: +SKIP
        >>> compare(generate_workload(model, ids, 64), run).describe()  # doctest: +SKIP
    """
    if prompt.ndim != 2:
        raise ConfigError(f"prompt must be [batch, tokens] token ids, got shape {tuple(prompt.shape)}")
    _check_generate_kwargs(new_tokens, generate_kwargs)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    kwargs = {"do_sample": False, "pad_token_id": 0 if pad is None else pad, **generate_kwargs}
    kwargs.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    try:
        given, cache = pop_cache_kwarg(kwargs)
    except ValueError as exc:
        raise ConfigError(f"generate_workload: {exc}") from exc
    reset_cache = _cache_reset(cache)
    if given:
        kwargs.update(cache_kwargs(cache))  # under the name the installed transformers expects
    checked = False

    @torch.no_grad()
    def run() -> Any:
        nonlocal checked
        if reset_cache is not None:
            reset_cache()
        out = model.generate(prompt, **kwargs)
        if not checked:
            ids = getattr(out, "sequences", out)  # a GenerateOutput with return_dict_in_generate=True
            if ids.shape[1] != prompt.shape[1] + new_tokens:
                raise MeasurementError(
                    f"generate produced {ids.shape[1] - prompt.shape[1]} new tokens, not {new_tokens}: "
                    "the workload would not be comparable"
                )
            checked = True
        return out

    return run
