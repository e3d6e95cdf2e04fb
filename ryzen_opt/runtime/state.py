"""What an optimizer leaves on a model it optimized, behind one convention and one pair of functions.

An optimizer that changes a model in place records what it did on the model itself (a report, the lean decoder), so
that the next optimizer, the validator or a user holding only the model can find it. Every such record goes through
:func:`attach` and :func:`attached`, stored as the instance attribute ``_ryzen_<key>``: one naming rule, and no
module reads another's underscore attributes. Each optimizer offers a typed accessor on top (``kernel_report``,
``embedding_report``, ``decoder_of``), which is what other modules call.

Records are plain instance attributes, never registered submodules or buffers: they stay out of ``state_dict`` and
``parameters()``, so saving an optimized model and counting its bytes see only the weights.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")

_PREFIX = "_ryzen_"

# The keys in use, one per optimizer that records state; a new one adds its key here.
KERNELS = "kernels"
EMBEDDINGS = "embeddings"
DECODER = "decoder"


def attach(model: Any, key: str, value: Any) -> None:
    """Record ``value`` under ``key`` on ``model`` (replacing an earlier record of that key)."""
    # object.__setattr__: an nn.Module value would otherwise be registered as a submodule of the model.
    object.__setattr__(model, _PREFIX + key, value)


def attached(model: Any, key: str, kind: type[T]) -> T | None:
    """The record under ``key`` on ``model`` if it is a ``kind``, else ``None`` (not optimized that way)."""
    found = getattr(model, _PREFIX + key, None)
    return found if isinstance(found, kind) else None
