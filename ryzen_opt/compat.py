"""Where ``transformers`` versions differ, in one place.

ryzen-opt supports the ``transformers`` range stated in ``pyproject.toml`` (tested: 5.23 and the newest 5.x, see
``constraints.txt`` and ``make test-latest``). Each difference it has to bridge lives here, named with the versions:

- **The cache keyword.** Up to 5.23, models and ``generate`` take the KV cache as ``past_key_values=`` and return it
  as ``output.past_key_values``. From 5.24 the name is ``cache=`` / ``output.cache``; the old name still works but logs
  a deprecation (an error under ``filterwarnings = error``). :func:`cache_kwargs` and :func:`output_cache` speak the
  installed version's name; :func:`pop_cache_kwarg` accepts either from a caller.
- **Cache layers' lazy initialisation.** 5.23's ``DynamicLayer.lazy_initialization`` set ``layer.dtype``; 5.24 stopped
  doing so. ryzen-opt's own layers (``kv_cache``) subclass only the documented ``CacheLayerMixin`` and set every
  attribute they read themselves, so they do not depend on what a release's ``DynamicLayer`` happens to set.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)

# 5.24 renamed the cache argument of every model's forward and of generate (past_key_values -> cache).
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0.dev0") else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name the installed ``transformers`` expects (``model(ids, **cache_kwargs(c))``)."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model's forward returned (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    return getattr(output, CACHE_KWARG)


def pop_cache_kwarg(kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """Remove a cache passed under either name from ``kwargs``: ``(given, cache)``.

    Callers of a patched ``generate`` may use either spelling whatever the installed version; both at once is the
    same error transformers raises.
    """
    given = [name for name in _CACHE_NAMES if name in kwargs]
    if len(given) > 1:
        raise ValueError("You cannot specify both `cache` and `past_key_values`; use `cache` only.")
    if not given:
        return False, None
    return True, kwargs.pop(given[0])
