"""Deprecated alias: this module moved to :mod:`ryzen_opt.optimizers.speculative` (see ``docs/architecture.md``).

``from ryzen_opt.speculative import X`` keeps working for one release, with a :class:`DeprecationWarning` that names
X's new module. It goes in ryzen-opt 0.3.
"""

from ryzen_opt import moved

__getattr__ = moved(
    __name__,
    "ryzen_opt.optimizers.speculative",
    "ryzen_opt.optimizers.drafting",
)
