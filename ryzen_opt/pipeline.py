"""Deprecated alias: this module moved to :mod:`ryzen_opt.run.pipeline` (see ``docs/architecture.md``).

``from ryzen_opt.pipeline import X`` keeps working for one release, with a :class:`DeprecationWarning` that names
X's new module. It goes in ryzen-opt 0.3.
"""

from ryzen_opt import moved

__getattr__ = moved(
    __name__, "ryzen_opt.run.pipeline", "ryzen_opt.run.config", "ryzen_opt.run.context", "ryzen_opt.run.report"
)
