"""Training: the loop, its metrics collector and the HF callback, and distributed set-up.

The public names of its modules resolve from the package too, on first use (so importing one module of the
package does not import the rest): ``from ryzen_opt.training import BACKWARD_LABEL``.
"""

from ryzen_opt import lazy_exports

_EXPORTS = {
    "BACKWARD_LABEL": "ryzen_opt.training.loop",
    "TrainingDivergedError": "ryzen_opt.training.loop",
    "TrainConfig": "ryzen_opt.training.loop",
    "lr_at": "ryzen_opt.training.loop",
    "use_bf16_autocast": "ryzen_opt.training.loop",
    "TokenBlocks": "ryzen_opt.training.loop",
    "evaluate": "ryzen_opt.training.loop",
    "train": "ryzen_opt.training.loop",
    "save_checkpoint": "ryzen_opt.training.loop",
    "make_train_step": "ryzen_opt.training.loop",
    "TrainingMetricsCollector": "ryzen_opt.training.metrics",
    "trainer_callback": "ryzen_opt.training.callback",
    "RyzenMetricsCallback": "ryzen_opt.training.callback",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
