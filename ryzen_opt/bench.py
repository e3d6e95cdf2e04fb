"""Deprecated alias: this module moved to :mod:`ryzen_opt.measure.timing` (see ``docs/architecture.md``).

``from ryzen_opt.bench import X`` keeps working for one release, with a :class:`DeprecationWarning` that names
X's new module. It goes in ryzen-opt 0.3.
"""

from ryzen_opt import moved

__getattr__ = moved(
    __name__,
    "ryzen_opt.measure.timing",
    "ryzen_opt.measure.stats",
    "ryzen_opt.measure.memory",
    "ryzen_opt.errors",
)
