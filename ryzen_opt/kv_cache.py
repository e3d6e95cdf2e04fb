"""Deprecated alias: this module moved to :mod:`ryzen_opt.optimizers.kv_cache` (see ``docs/architecture.md``).

``from ryzen_opt.kv_cache import X`` keeps working for one release, with a :class:`DeprecationWarning` that names
X's new module. It goes in ryzen-opt 0.3.
"""

from ryzen_opt import moved

__getattr__ = moved(
    __name__,
    "ryzen_opt.optimizers.kv_cache",
    "ryzen_opt.measure.decode",
    "ryzen_opt.measure.memory",
    "ryzen_opt.measure.passkey",
)
