"""ryzen-opt: LLM inference optimizations for PyTorch / transformers causal LMs, measured and gated.

Importing this package is cheap and never initialises CUDA: the main names below resolve on first use (PEP 562), so
``import ryzen_opt`` (and the pytest plugin, which imports only torch-free modules) does not pay for torch.

The package is in folders by layer; ``docs/architecture.md`` draws them and says what each may import::

    from ryzen_opt import KernelOptimizer, KernelConfig    # the main names, from the root
    from ryzen_opt.optimizers.kernels import Int8Linear    # everything else, from its module
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# name -> the module that defines it. One table: __getattr__, __dir__ and __all__ all read it.
_EXPORTS: dict[str, str] = {
    "KernelConfig": "ryzen_opt.optimizers.kernels",
    "KernelOptimizer": "ryzen_opt.optimizers.kernels",
    "CompressionConfig": "ryzen_opt.optimizers.embeddings",
    "EmbeddingCompressor": "ryzen_opt.optimizers.embeddings",
    "KVCacheConfig": "ryzen_opt.optimizers.kv_cache",
    "KVCacheOptimizer": "ryzen_opt.optimizers.kv_cache",
    "SpecConfig": "ryzen_opt.optimizers.speculative",
    "SpeculativeDecoder": "ryzen_opt.optimizers.speculative",
    "NGramDrafter": "ryzen_opt.optimizers.drafting",
    "ModelDrafter": "ryzen_opt.optimizers.drafting",
    "SystemConfig": "ryzen_opt.optimizers.system",
    "TrainingMetricsCollector": "ryzen_opt.training.metrics",
    "OptimizationValidator": "ryzen_opt.validation.validator",
    "Thresholds": "ryzen_opt.validation.validator",
    "load_model": "ryzen_opt.models.loading",
    "RyzenOptError": "ryzen_opt.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # type checkers see the real names; at run time they resolve lazily
    from ryzen_opt.errors import RyzenOptError
    from ryzen_opt.models.loading import load_model
    from ryzen_opt.optimizers.drafting import ModelDrafter, NGramDrafter
    from ryzen_opt.optimizers.embeddings import CompressionConfig, EmbeddingCompressor
    from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer
    from ryzen_opt.optimizers.kv_cache import KVCacheConfig, KVCacheOptimizer
    from ryzen_opt.optimizers.speculative import SpecConfig, SpeculativeDecoder
    from ryzen_opt.optimizers.system import SystemConfig
    from ryzen_opt.training.metrics import TrainingMetricsCollector
    from ryzen_opt.validation.validator import OptimizationValidator, Thresholds


def lazy_exports(owner: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` that import ``exports[name]`` on first use of ``name``.

    Why lazy: a package's ``__init__`` that imported its modules eagerly would make every ``import
    ryzen_opt.x.leaf`` pay for (and depend on) the whole package, and create import cycles between layers.
    """

    def __getattr__(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {owner!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), name)
        globals_of(owner)[name] = value  # resolved once: later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*globals_of(owner), *exports})

    return __getattr__, __dir__


def moved(old: str, *homes: str) -> Callable[[str], Any]:
    """``__getattr__`` for a module that moved: finds ``name`` in ``homes`` (in order) and warns once per use.

    The old paths (``ryzen_opt.kernels`` and the like, from before the package had folders) keep working for one
    release; the :class:`DeprecationWarning` names the new path, and points at the caller's line (``stacklevel=2``:
    ``from old import name`` calls this from the importing frame).
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for home in homes:
            module = importlib.import_module(home)
            if hasattr(module, name):
                warnings.warn(
                    f"{old}.{name} moved to {home}.{name}; import it from there ({old} goes in ryzen-opt 0.3)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved: see {', '.join(homes)})")

    return __getattr__


def globals_of(module: str) -> dict[str, Any]:
    """The namespace of an imported module (``sys.modules[module].__dict__``)."""
    return vars(sys.modules[module])


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
