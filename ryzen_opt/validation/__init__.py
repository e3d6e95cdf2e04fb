"""Validation: the gate table (torch-free), the validator, baselines, reports and profiles.

The public names of its modules resolve from the package too, on first use (so importing one module of the
package does not import the rest): ``from ryzen_opt.validation import GATES``.
"""

from ryzen_opt import lazy_exports

_EXPORTS = {
    "GATES": "ryzen_opt.validation.validator",
    "ValidationStatus": "ryzen_opt.validation.validator",
    "ValidationResult": "ryzen_opt.validation.validator",
    "check": "ryzen_opt.validation.validator",
    "is_failing": "ryzen_opt.validation.validator",
    "Thresholds": "ryzen_opt.validation.validator",
    "default_profile_path": "ryzen_opt.validation.validator",
    "load_thresholds": "ryzen_opt.validation.validator",
    "OptimizationValidator": "ryzen_opt.validation.validator",
    "GATE_MODES": "ryzen_opt.validation.gates",
    "DEVICE_CLASSES": "ryzen_opt.validation.gates",
    "DEVICE_CHOICES": "ryzen_opt.validation.gates",
    "MetricSpec": "ryzen_opt.validation.gates",
    "METRICS": "ryzen_opt.validation.gates",
    "Check": "ryzen_opt.validation.gates",
    "CHECKS": "ryzen_opt.validation.gates",
    "threshold_kind": "ryzen_opt.validation.gates",
    "is_fraction": "ryzen_opt.validation.gates",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
