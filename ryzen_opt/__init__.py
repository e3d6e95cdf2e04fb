"""ryzen-opt: LLM inference optimizations for PyTorch / transformers causal LMs, measured and gated.

Importing this package is cheap and never initialises CUDA; the optimizers live in their own modules.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"
__all__ = ["__version__"]
