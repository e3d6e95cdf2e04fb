"""Deprecated alias: this module moved to :mod:`ryzen_opt.validation.baselines` (see ``docs/architecture.md``).

``from ryzen_opt.baselines import X`` keeps working for one release, with a :class:`DeprecationWarning` that names
X's new module. It goes in ryzen-opt 0.3.
"""

from ryzen_opt import moved

__getattr__ = moved(__name__, "ryzen_opt.validation.baselines")
