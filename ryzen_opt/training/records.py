"""What a training run records: per-batch and per-epoch metrics and anomalies, as plain dataclasses.

NaN is not JSON: non-finite values go out as ``null``, and :class:`Anomaly` says which were NaN and which Inf.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ryzen_opt.errors import ConfigError

if TYPE_CHECKING:
    import torch


ANOMALY_KINDS = ("nan_loss", "inf_loss", "nonfinite_grad", "loss_spike", "grad_explosion", "throughput_collapse")


def scalar(value: Any) -> float | None:
    """A Python float from a float, int, numpy scalar or one-element tensor (a device tensor syncs here)."""
    if value is None or type(value) is float:
        return value
    item = getattr(value, "item", None)
    return float(item() if item is not None else value)


def json_float(value: Any) -> float | None:
    """``value`` as a float when finite, else ``None``: strict JSON has no NaN or Infinity."""
    number = scalar(value)
    return number if number is not None and math.isfinite(number) else None


def _float_or_nan(value: Any) -> float:
    """Read a required number back from JSON, where ``null`` stands for a non-finite value."""
    return math.nan if value is None else float(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def check_keys(kind: str, data: Mapping[str, Any], allowed: frozenset[str], required: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown {kind} key(s) {unknown}: allowed keys are {sorted(allowed)}")
    missing = [key for key in required if key not in data]
    if missing:
        raise ConfigError(f"{kind} is missing required key(s) {missing}")


@dataclass
class BatchMetric:
    """One optimizer step (or one logging window of steps) as the training loop measured it.

    ``loss`` and ``grad_norm`` may be 0-dim tensors: the collector keeps them unsynced until they are needed.
    ``samples_per_s`` / ``tokens_per_s`` of ``0.0`` mean "not measured", never "zero throughput".
    ``step`` is the global step; the collector assigns the record's running index when it is ``None``.
    """

    epoch: int
    batch: int
    loss: float | torch.Tensor
    samples_per_s: float
    tokens_per_s: float
    learning_rate: float
    grad_norm: float | torch.Tensor | None
    duration_s: float
    step: int | None = None
    tokens: int | None = None
    rank_step_s: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; NaN and Inf become ``None`` (the collector's anomaly list says which they were).
        ``rank_step_s`` (each rank's own step seconds, distributed runs only) is left out when there is none."""
        out = {name: getattr(self, name) for name in _BATCH_FIELDS}
        for name in ("loss", "samples_per_s", "tokens_per_s", "learning_rate", "grad_norm", "duration_s"):
            out[name] = json_float(out[name])
        if self.rank_step_s is None:
            del out["rank_step_s"]
        else:
            out["rank_step_s"] = [json_float(v) for v in self.rank_step_s]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchMetric:
        """Build from a mapping of the fields, as the seed's code passed them.

        ``epoch``, ``batch`` and ``loss`` are required; a missing throughput or duration is ``0.0`` (not measured),
        a missing learning rate NaN. The legacy key ``throughput`` means ``samples_per_s``. ``None`` in a numeric
        field reads back as NaN (that is how non-finite values are exported).

        Raises:
            ConfigError: on an unknown key (named, with the allowed ones) or a missing required key.
        """
        check_keys("batch metric", data, _BATCH_KEYS, ("epoch", "batch", "loss"))
        if "throughput" in data and "samples_per_s" in data:
            raise ConfigError("batch metric has both 'throughput' (legacy) and 'samples_per_s': give one")
        samples = data.get("samples_per_s", data.get("throughput", 0.0))
        loss, grad, step, tokens = data["loss"], data.get("grad_norm"), data.get("step"), data.get("tokens")
        return cls(
            epoch=int(data["epoch"]),
            batch=int(data["batch"]),
            loss=math.nan if loss is None else loss,
            samples_per_s=_float_or_nan(samples),
            tokens_per_s=_float_or_nan(data.get("tokens_per_s", 0.0)),
            learning_rate=_float_or_nan(data.get("learning_rate")),
            grad_norm=grad,
            duration_s=_float_or_nan(data.get("duration_s", 0.0)),
            step=None if step is None else int(step),
            tokens=None if tokens is None else int(tokens),
            rank_step_s=None if data.get("rank_step_s") is None else tuple(map(_float_or_nan, data["rank_step_s"])),
        )


_BATCH_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(BatchMetric))


_BATCH_KEYS = frozenset((*_BATCH_FIELDS, "throughput"))


@dataclass
class EpochMetric:
    """One evaluation on held-out data: ``accuracy`` is next-token top-1, ``perplexity`` is ``exp(val_loss)``.

    ``None`` means "not measured". ``extra`` holds further numbers (the seed's ``compression_ratio``); the report
    writes them beside the named fields, so their names must not collide with them.
    """

    epoch: int
    train_loss: float | None
    val_loss: float | None
    accuracy: float | None
    perplexity: float | None
    duration_s: float | None
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = sorted(set(self.extra) & set(EPOCH_FIELDS))
        if clash:
            raise ConfigError(f"epoch metric extra keys {clash} collide with the named fields {list(EPOCH_FIELDS)}")

    def to_dict(self) -> dict[str, Any]:
        """The seed's flat shape: named fields first, then the ``extra`` numbers; non-finite values as ``None``."""
        out: dict[str, Any] = {"epoch": int(self.epoch)}
        for name in EPOCH_FIELDS[1:-1]:
            out[name] = json_float(getattr(self, name))
        out.update({key: json_float(value) for key, value in self.extra.items()})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> EpochMetric:
        """Build from a mapping of the fields (``epoch`` required, the rest default to ``None``).

        Args:
            data: the fields, with further numbers under ``extra``.
            strict: reject unknown keys (the default, which catches typos). ``strict=False`` reads the report's
                flat shape back, where unknown keys are the ``extra`` numbers.

        Raises:
            ConfigError: on an unknown key in strict mode, or a missing ``epoch``.
        """
        allowed = frozenset(EPOCH_FIELDS) if strict else frozenset(data)
        check_keys("epoch metric", data, allowed, ("epoch",))
        extra = {key: _float_or_nan(value) for key, value in (data.get("extra") or {}).items()}
        if not strict:
            extra.update({k: _float_or_nan(v) for k, v in data.items() if k not in EPOCH_FIELDS})
        numbers = {name: _optional_float(data.get(name)) for name in EPOCH_FIELDS[1:-1]}
        return cls(epoch=int(data["epoch"]), **numbers, extra=extra)


EPOCH_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EpochMetric))


@dataclass
class Anomaly:
    """Something in the curve a person should look at. ``threshold`` is in the unit of ``value``.

    ``source`` is the experiment id of the collector the batch came from (merged reports hold several).
    """

    step: int
    kind: str
    value: float | None
    threshold: float | None
    message: str
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "value": json_float(self.value), "threshold": json_float(self.threshold)}
