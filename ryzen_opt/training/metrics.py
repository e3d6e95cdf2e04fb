"""Metrics of a real training loop: per-batch and per-epoch records, statistics, anomalies and the JSON report.

The seed's ``training_metrics_collector.py`` fed itself simulated numbers; this collector only ever holds what a
training loop (ours in ``ryzen_opt.training.loop``, or a ``transformers.Trainer`` through :func:`trainer_callback`)
recorded. Three rules shape it:

- Recording is on the hot path, so it only appends. A loss or gradient norm given as a device tensor is kept,
  detached, as a tensor: calling ``.item()`` per step would force a device sync and stall the GPU pipeline.
  Tensors become Python floats, in one stacked copy per device, the first time statistics, anomalies or the report
  are computed.
- NaN is not JSON. Non-finite values are exported as ``null``; the anomaly list says which were NaN and which Inf.
- Anomaly detection is causal and deterministic: each value is judged against a rolling window of earlier finite
  values only, and nothing is judged before ``min_history`` of them exist.

Example:
    >>> collector = TrainingMetricsCollector("exp1", model="tiny-llama", batch_size=8)
    >>> collector.record_batch_metric(dict(epoch=0, batch=0, loss=2.3, samples_per_s=410.0, tokens_per_s=52480.0,
    ...                                    learning_rate=3e-4, grad_norm=1.1, duration_s=0.0195))
    >>> collector.compute_statistics()["final_loss"]
    2.3
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from ryzen_opt.errors import ConfigError
from ryzen_opt.validation import reports

if TYPE_CHECKING:
    import os

    import torch
    import transformers

logger = logging.getLogger(__name__)

__all__ = [
    "ANOMALY_KINDS",
    "Anomaly",
    "AnomalyConfig",
    "BatchMetric",
    "EpochMetric",
    "TrainingMetricsCollector",
    "trainer_callback",
]

ANOMALY_KINDS = ("nan_loss", "inf_loss", "nonfinite_grad", "loss_spike", "grad_explosion", "throughput_collapse")
# MAD x 1.4826 estimates the standard deviation of normally distributed values (1 / Phi^-1(3/4)).
_MAD_TO_SIGMA = 1.4826
_PERCENTILES = (50, 90, 99)


def _scalar(value: Any) -> float | None:
    """A Python float from a float, int, numpy scalar or one-element tensor (a device tensor syncs here)."""
    if value is None or type(value) is float:
        return value
    item = getattr(value, "item", None)
    return float(item() if item is not None else value)


def _json_float(value: Any) -> float | None:
    """``value`` as a float when finite, else ``None``: strict JSON has no NaN or Infinity."""
    number = _scalar(value)
    return number if number is not None and math.isfinite(number) else None


def _float_or_nan(value: Any) -> float:
    """Read a required number back from JSON, where ``null`` stands for a non-finite value."""
    return math.nan if value is None else float(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_keys(kind: str, data: Mapping[str, Any], allowed: frozenset[str], required: tuple[str, ...]) -> None:
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
            out[name] = _json_float(out[name])
        if self.rank_step_s is None:
            del out["rank_step_s"]
        else:
            out["rank_step_s"] = [_json_float(v) for v in self.rank_step_s]
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
        _check_keys("batch metric", data, _BATCH_KEYS, ("epoch", "batch", "loss"))
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
        clash = sorted(set(self.extra) & set(_EPOCH_FIELDS))
        if clash:
            raise ConfigError(f"epoch metric extra keys {clash} collide with the named fields {list(_EPOCH_FIELDS)}")

    def to_dict(self) -> dict[str, Any]:
        """The seed's flat shape: named fields first, then the ``extra`` numbers; non-finite values as ``None``."""
        out: dict[str, Any] = {"epoch": int(self.epoch)}
        for name in _EPOCH_FIELDS[1:-1]:
            out[name] = _json_float(getattr(self, name))
        out.update({key: _json_float(value) for key, value in self.extra.items()})
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
        allowed = frozenset(_EPOCH_FIELDS) if strict else frozenset(data)
        _check_keys("epoch metric", data, allowed, ("epoch",))
        extra = {key: _float_or_nan(value) for key, value in (data.get("extra") or {}).items()}
        if not strict:
            extra.update({k: _float_or_nan(v) for k, v in data.items() if k not in _EPOCH_FIELDS})
        numbers = {name: _optional_float(data.get(name)) for name in _EPOCH_FIELDS[1:-1]}
        return cls(epoch=int(data["epoch"]), **numbers, extra=extra)


_EPOCH_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EpochMetric))


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
        return {**dataclasses.asdict(self), "value": _json_float(self.value), "threshold": _json_float(self.threshold)}


@dataclass(frozen=True)
class AnomalyConfig:
    """How suspicious a value must be before it is reported.

    The defaults follow common practice for LLM training curves: batch losses are noisy, so a spike is judged by a
    robust z-score (median and MAD resist earlier spikes) rather than mean and standard deviation.
    """

    window: int = 50  # previous finite values each rolling median / MAD is taken over
    min_history: int = 10  # nothing is judged against fewer earlier values than this
    spike_z: float = 6.0  # loss spike: (loss - median) / (1.4826 MAD) above this
    grad_explosion_factor: float = 10.0  # grad norm above this many times the rolling median grad norm
    throughput_collapse_fraction: float = 0.2  # throughput below this fraction of the rolling median

    def __post_init__(self) -> None:
        checks = (
            ("window", "an integer >= 1", isinstance(self.window, int) and self.window >= 1),
            ("min_history", f"an integer in [1, window={self.window}]", isinstance(self.min_history, int)),
            ("spike_z", "a finite number > 0", 0 < self.spike_z < math.inf),
            ("grad_explosion_factor", "a finite number > 1", 1 < self.grad_explosion_factor < math.inf),
            ("throughput_collapse_fraction", "in (0, 1)", 0 < self.throughput_collapse_fraction < 1),
        )
        for name, wanted, ok in checks:
            if not ok or (name == "min_history" and not 1 <= self.min_history <= self.window):
                raise ConfigError(f"AnomalyConfig.{name} must be {wanted}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnomalyConfig:
        allowed = frozenset(f.name for f in dataclasses.fields(cls))
        _check_keys("anomaly config", data, allowed, ())
        return cls(**data)


@dataclass
class _Segment:
    """The records one source collector contributed; rolling windows never cross segments."""

    experiment_id: str | None
    model: str | None
    batch_size: int | None
    batch_start: int
    epoch_start: int


def _median_and_scale(window: deque[float]) -> tuple[float, float]:
    """Median and robust spread (1.4826 MAD), floored so that a flat curve does not divide by ~0."""
    median = statistics.median(window)
    mad = _MAD_TO_SIGMA * statistics.median(abs(x - median) for x in window)
    return median, max(mad, 0.01 * abs(median), 1e-6)


def _detect(batches: list[BatchMetric], cfg: AnomalyConfig, source: str | None) -> list[Anomaly]:
    """Anomalies of one source's batches, in order; every rolling window holds earlier finite values only."""
    hits: list[tuple[int, str, float, float | None, str]] = []
    losses: deque[float] = deque(maxlen=cfg.window)
    grads: deque[float] = deque(maxlen=cfg.window)
    rates: dict[str, deque[float]] = {"tokens/s": deque(maxlen=cfg.window), "samples/s": deque(maxlen=cfg.window)}
    for metric in batches:
        step = -1 if metric.step is None else int(metric.step)
        loss = float(metric.loss)
        if not math.isfinite(loss):
            hits.append((step, "nan_loss" if math.isnan(loss) else "inf_loss", loss, None, f"loss is {loss}"))
        else:
            if len(losses) >= cfg.min_history:
                median, scale = _median_and_scale(losses)
                threshold = median + cfg.spike_z * scale
                if loss > threshold:
                    why = f"robust z {(loss - median) / scale:.1f} over {len(losses)} previous, median {median:.4g}"
                    hits.append((step, "loss_spike", loss, threshold, f"loss {loss:.4g} > {threshold:.4g} ({why})"))
            losses.append(loss)
        grad = None if metric.grad_norm is None else float(metric.grad_norm)
        if grad is not None and not math.isfinite(grad):
            hits.append((step, "nonfinite_grad", grad, None, f"grad norm is {grad}"))
        elif grad is not None:
            if len(grads) >= cfg.min_history:
                median = statistics.median(grads)
                threshold = cfg.grad_explosion_factor * median
                if threshold > 0 and grad > threshold:
                    why = f"grad norm {grad:.4g} > {cfg.grad_explosion_factor:g} x rolling median {median:.4g}"
                    hits.append((step, "grad_explosion", grad, threshold, why))
            grads.append(grad)
        collapsed = False  # one report per step: tokens/s when measured, else samples/s
        for unit, rate in (("tokens/s", metric.tokens_per_s), ("samples/s", metric.samples_per_s)):
            if not (math.isfinite(rate) and rate > 0):  # 0.0 is "not measured"
                continue
            history = rates[unit]
            if len(history) >= cfg.min_history and not collapsed:
                median = statistics.median(history)
                threshold = cfg.throughput_collapse_fraction * median
                if rate < threshold:
                    why = f"{rate:.4g} {unit} < {cfg.throughput_collapse_fraction:g} x rolling median {median:.4g}"
                    hits.append((step, "throughput_collapse", rate, threshold, why))
                    collapsed = True
            history.append(rate)
    return [Anomaly(step, kind, v, t, f"step {step}: {why}", source) for step, kind, v, t, why in hits]


def _rank_statistics(batches: list[BatchMetric]) -> dict[str, Any]:
    """Stragglers: each rank's mean step seconds over the steps that timed every rank, and the slowest rank's mean
    over the fastest's (1.0 is perfectly even). ``None`` for a single process."""
    timed = [m.rank_step_s for m in batches if m.rank_step_s and all(math.isfinite(v) for v in m.rank_step_s)]
    widths = {len(t) for t in timed}
    if not timed or len(widths) != 1:
        return {"rank_step_s": None, "straggler_ratio": None}
    means = [math.fsum(column) / len(timed) for column in zip(*timed, strict=True)]
    ratio = max(means) / min(means) if min(means) > 0 else None
    return {"rank_step_s": means, "straggler_ratio": ratio}


def _summary(values: list[float]) -> dict[str, float] | None:
    """mean, p50, p90, p99 (linear interpolation), min and max; ``None`` with no values."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, _PERCENTILES)
    return {
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


class TrainingMetricsCollector:
    """Collects a training run's batch and epoch metrics; computes statistics and anomalies; writes the report.

    Args:
        experiment_id: names the run in the report (the pytest plugin uses the test's node id).
        model: the model's name or path, for the report.
        batch_size: the per-step batch size, for the report.
        anomaly_config: thresholds of :meth:`detect_anomalies`.

    Example:
        >>> c = TrainingMetricsCollector("run", model="llama-tiny", batch_size=4)
        >>> c.record_batch_metric(BatchMetric(0, 0, 2.5, 100.0, 12800.0, 1e-3, 0.9, 0.04))
        >>> len(c)
        1
    """

    def __init__(
        self,
        experiment_id: str | None = None,
        model: str | None = None,
        batch_size: int | None = None,
        *,
        anomaly_config: AnomalyConfig | None = None,
    ) -> None:
        self.experiment_id = experiment_id
        self.model = model
        self.batch_size = batch_size
        self.anomaly_config = anomaly_config if anomaly_config is not None else AnomalyConfig()
        self.created_at = datetime.now(timezone.utc)
        self._batches: list[BatchMetric] = []
        self._epochs: list[EpochMetric] = []
        self._lazy: list[int] = []  # indices of batches whose loss / grad_norm are not Python floats yet
        self._segments: list[_Segment] = [_Segment(experiment_id, model, batch_size, 0, 0)]
        self._foreign_tail = False  # the last segment came from merge(): own records need a new one
        self.world_size = 1
        self.backend: str | None = None

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def batch_metrics(self) -> tuple[BatchMetric, ...]:
        """The recorded batches, tensors converted to floats (this syncs pending device values)."""
        self._materialize()
        return tuple(self._batches)

    @property
    def epoch_metrics(self) -> tuple[EpochMetric, ...]:
        return tuple(self._epochs)

    def set_distributed(self, world_size: int, backend: str | None) -> None:
        """Say that the records come from ``world_size`` ranks (losses already averaged over them, throughput
        global): the report's metadata carries both, and its statistics each rank's mean step time."""
        if world_size < 1:
            raise ValueError(f"world_size {world_size}: at least 1")
        self.world_size, self.backend = int(world_size), backend

    # -- recording: the hot path, append only ------------------------------------------------------------------

    def record_batch_metric(self, metric: BatchMetric | Mapping[str, Any], *, sync: bool = False) -> None:
        """Append one batch's metrics; costs microseconds and never syncs a device unless ``sync=True``.

        Args:
            metric: a :class:`BatchMetric`, or a mapping of its fields (see :meth:`BatchMetric.from_dict`).
            sync: convert tensor values to floats now (one device sync each) instead of at the first read.

        Raises:
            ConfigError: a mapping with an unknown or missing key.
            ValueError: a loss or grad norm tensor with more than one element.
        """
        if self._foreign_tail:
            self._open_own_segment()
        metric = copy.copy(metric) if isinstance(metric, BatchMetric) else BatchMetric.from_dict(metric)
        loss, grad = metric.loss, metric.grad_norm
        if type(loss) is not float or (grad is not None and type(grad) is not float):
            if sync:
                metric.loss, metric.grad_norm = _scalar(loss), _scalar(grad)  # type: ignore[assignment]
            else:
                metric.loss, metric.grad_norm = _detached(loss, "loss"), _detached(grad, "grad_norm")
                self._lazy.append(len(self._batches))
        if metric.step is None:
            metric.step = len(self._batches)
        self._batches.append(metric)

    def record_epoch_metric(self, metric: EpochMetric | Mapping[str, Any]) -> None:
        """Append one evaluation's metrics (a mapping is read strictly: see :meth:`EpochMetric.from_dict`)."""
        if self._foreign_tail:
            self._open_own_segment()
        if isinstance(metric, EpochMetric):
            metric = dataclasses.replace(metric, extra=dict(metric.extra))
        else:
            metric = EpochMetric.from_dict(metric)
        self._epochs.append(metric)

    def _open_own_segment(self) -> None:
        self._segments.append(
            _Segment(self.experiment_id, self.model, self.batch_size, len(self._batches), len(self._epochs))
        )
        self._foreign_tail = False

    def _materialize(self) -> None:
        """Turn pending tensors into floats: one stacked device-to-host copy per (device, dtype), not one per step."""
        if not self._lazy:
            return
        groups: dict[tuple[Any, Any], list[tuple[BatchMetric, str, Any]]] = {}
        for index in self._lazy:
            metric = self._batches[index]
            for name in ("loss", "grad_norm"):
                value = getattr(metric, name)
                if value is None or type(value) is float:
                    continue
                if hasattr(value, "device") and hasattr(value, "reshape"):
                    groups.setdefault((value.device, value.dtype), []).append((metric, name, value))
                else:
                    setattr(metric, name, float(value))
        if groups:
            import torch

            for items in groups.values():
                values = torch.stack([value.reshape(()) for _, _, value in items]).tolist()
                for (metric, name, _), number in zip(items, values, strict=True):
                    setattr(metric, name, float(number))
        self._lazy.clear()

    # -- analysis ----------------------------------------------------------------------------------------------

    def compute_statistics(self) -> dict[str, Any]:
        """Summary numbers of the run. Losses: finite ones only. Throughput: measured (positive) values only.

        Returns:
            ``total_batches``, ``total_epochs``, ``avg_loss``, ``min_loss``, ``max_loss``, ``final_loss``,
            ``nonfinite_losses``, ``avg_throughput`` (mean samples/s, the seed's name), ``throughput``
            (``samples_per_s`` and ``tokens_per_s``, each mean/p50/p90/p99/min/max or ``None``), ``total_tokens``,
            ``total_duration_s`` (sum of batch durations), ``best_val_loss``, ``best_accuracy``,
            ``final_perplexity`` (the last evaluation's). With nothing recorded: counts 0, everything else ``None``.
        """
        self._materialize()
        losses = [float(m.loss) for m in self._batches]
        finite = [x for x in losses if math.isfinite(x)]
        samples = [m.samples_per_s for m in self._batches if math.isfinite(m.samples_per_s) and m.samples_per_s > 0]
        tokens_s = [m.tokens_per_s for m in self._batches if math.isfinite(m.tokens_per_s) and m.tokens_per_s > 0]
        tokens = [m.tokens for m in self._batches if m.tokens is not None]
        durations = [m.duration_s for m in self._batches if math.isfinite(m.duration_s)]
        val = [e.val_loss for e in self._epochs if e.val_loss is not None and math.isfinite(e.val_loss)]
        acc = [e.accuracy for e in self._epochs if e.accuracy is not None and math.isfinite(e.accuracy)]
        sample_summary = _summary(samples)
        return {
            "total_batches": len(self._batches),
            "total_epochs": len({m.epoch for m in self._batches} | {e.epoch for e in self._epochs}),
            "avg_loss": _json_float(float(np.mean(finite))) if finite else None,
            "min_loss": min(finite) if finite else None,
            "max_loss": max(finite) if finite else None,
            "final_loss": finite[-1] if finite else None,
            "nonfinite_losses": len(losses) - len(finite),
            "avg_throughput": sample_summary["mean"] if sample_summary else None,
            "throughput": {"samples_per_s": sample_summary, "tokens_per_s": _summary(tokens_s)},
            "total_tokens": sum(tokens) if tokens else None,
            "total_duration_s": _json_float(math.fsum(durations)) if durations else None,
            "best_val_loss": min(val) if val else None,
            "best_accuracy": max(acc) if acc else None,
            "final_perplexity": _json_float(self._epochs[-1].perplexity) if self._epochs else None,
            **_rank_statistics(self._batches),
        }

    def _segment_ranges(self) -> Iterator[tuple[_Segment, int, int, int, int]]:
        """(segment, batch start, batch end, epoch start, epoch end) for each segment, in order."""
        for k, seg in enumerate(self._segments):
            nxt = self._segments[k + 1] if k + 1 < len(self._segments) else None
            b_end = nxt.batch_start if nxt else len(self._batches)
            e_end = nxt.epoch_start if nxt else len(self._epochs)
            yield seg, seg.batch_start, b_end, seg.epoch_start, e_end

    def detect_anomalies(self) -> list[Anomaly]:
        """Find NaN/Inf losses, non-finite grad norms, loss spikes, grad-norm explosions and throughput collapses.

        Each finite value is judged against the previous ``window`` finite values of its own source collector
        (causal; nothing is judged before ``min_history`` exist), then joins the window. NaN and Inf are always
        reported. Throughput uses tokens/s when measured, else samples/s. Deterministic; recomputed on each call.
        """
        self._materialize()
        found: list[Anomaly] = []
        for seg, start, end, _, _ in self._segment_ranges():
            found.extend(_detect(self._batches[start:end], self.anomaly_config, seg.experiment_id))
        return found

    # -- serialisation -----------------------------------------------------------------------------------------

    def _sources(self) -> list[dict[str, Any]]:
        """One entry per source collector that contributed records (all of them if none did)."""
        rows = []
        for seg, b_start, b_end, e_start, e_end in self._segment_ranges():
            row = {"experiment_id": seg.experiment_id, "model": seg.model, "batch_size": seg.batch_size}
            rows.append(row | {"batches": b_end - b_start, "epochs": e_end - e_start})
        non_empty = [row for row in rows if row["batches"] or row["epochs"]]
        return non_empty or rows[:1]

    def to_dict(self) -> dict[str, Any]:
        """The report without its environment block (:meth:`export_metrics` adds it). Strict-JSON values only."""
        stats = self.compute_statistics()
        return {
            "schema_version": reports.SCHEMA_VERSION,
            "metadata": {
                "experiment_id": self.experiment_id,
                "timestamp": self.created_at.isoformat(timespec="seconds"),
                "model": self.model,
                "total_epochs": stats["total_epochs"],
                "batch_size": self.batch_size,
                "sources": self._sources(),
                "anomaly_config": self.anomaly_config.to_dict(),
                "world_size": self.world_size,
                "backend": self.backend,
            },
            "statistics": stats,
            "epoch_metrics": [e.to_dict() for e in self._epochs],
            "batch_metrics": [m.to_dict() for m in self._batches],
            "anomalies": [a.to_dict() for a in self.detect_anomalies()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingMetricsCollector:
        """Rebuild a collector from :meth:`to_dict` output or a written report.

        Values exported as ``null`` come back as NaN, or as Inf where the report's anomalies say so, so the
        statistics and anomalies of the copy equal the original's.
        """
        meta = data.get("metadata", {})
        config = meta.get("anomaly_config")
        config = AnomalyConfig.from_dict(config) if config else None
        collector = cls(meta.get("experiment_id"), meta.get("model"), meta.get("batch_size"), anomaly_config=config)
        collector.set_distributed(int(meta.get("world_size") or 1), meta.get("backend"))
        if meta.get("timestamp"):
            collector.created_at = datetime.fromisoformat(meta["timestamp"])
        nonfinite = {(a.get("source"), a["step"], a["kind"]): a.get("message", "") for a in data.get("anomalies", [])}
        batches = [BatchMetric.from_dict(row) for row in data.get("batch_metrics", [])]
        epochs = [EpochMetric.from_dict(row, strict=False) for row in data.get("epoch_metrics", [])]
        sources = meta.get("sources") or [{"experiment_id": collector.experiment_id, "batches": len(batches)}]
        if sum(int(s.get("batches", 0)) for s in sources) != len(batches):
            raise ConfigError(f"metadata.sources counts {sources} do not add up to {len(batches)} batch metrics")
        segments, b_start, e_start = [], 0, 0
        for src in sources:
            seg = _Segment(src.get("experiment_id"), src.get("model"), src.get("batch_size"), b_start, e_start)
            for metric in batches[b_start : b_start + int(src.get("batches", 0))]:
                loss_note = nonfinite.get((seg.experiment_id, metric.step, "inf_loss"))
                if loss_note is not None and metric.loss is not None and math.isnan(float(metric.loss)):
                    metric.loss = _nonfinite_from_message(loss_note)
                grad_note = nonfinite.get((seg.experiment_id, metric.step, "nonfinite_grad"))
                if grad_note is not None and metric.grad_norm is None:
                    metric.grad_norm = _nonfinite_from_message(grad_note)
            segments.append(seg)
            b_start += int(src.get("batches", 0))
            e_start += int(src.get("epochs", 0))
        collector._batches, collector._epochs = batches, epochs
        collector._lazy = [i for i, m in enumerate(batches) if type(m.loss) is not float or type(m.grad_norm) is int]
        collector._segments = segments
        return collector

    def merge(self, other: TrainingMetricsCollector) -> TrainingMetricsCollector:
        """Append ``other``'s records to this collector (in place) and return ``self``.

        Used to gather several tests' collectors into one session report. Each source keeps its experiment id
        (``metadata.sources``) and its own rolling windows: anomaly detection never compares one source's losses
        with another's. This collector's anomaly config applies to all.
        """
        if other is self:
            raise ValueError("cannot merge a collector into itself")
        other._materialize()
        b_offset, e_offset = len(self._batches), len(self._epochs)
        self._segments.extend(
            dataclasses.replace(seg, batch_start=seg.batch_start + b_offset, epoch_start=seg.epoch_start + e_offset)
            for seg in other._segments
        )
        self._batches.extend(copy.copy(m) for m in other._batches)
        self._epochs.extend(dataclasses.replace(e, extra=dict(e.extra)) for e in other._epochs)
        self._foreign_tail = True
        return self

    def export_metrics(self, path: str | os.PathLike[str]) -> Path:
        """Write ``training_metrics_report.json`` atomically (readers see the old file or the new, never half).

        Returns:
            The path written.
        """
        report = self.to_dict()
        report["environment"] = reports.environment()
        written = reports.atomic_write_json(path, report)
        count = len(report["anomalies"])
        log = logger.warning if count else logger.info
        log("wrote %s: %d batches, %d epochs, %d anomalies", written, len(self._batches), len(self._epochs), count)
        return written

    def print_summary(self, file: TextIO | None = None, *, last_epochs: int = 5) -> None:
        """Print a plain-text table of the statistics, the last epochs and the anomaly count to ``file``."""
        out = sys.stdout if file is None else file
        stats = self.compute_statistics()
        anomalies = self.detect_anomalies()

        def fmt(value: Any) -> str:
            return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

        lines = [
            f"Training metrics: {self.experiment_id or '-'} (model {self.model or '-'}, batch {fmt(self.batch_size)})",
            f"  {'batches':<18}{stats['total_batches']:>10}    epochs {stats['total_epochs']}",
            f"  {'loss':<18}avg {fmt(stats['avg_loss'])}  min {fmt(stats['min_loss'])}  max {fmt(stats['max_loss'])}"
            f"  final {fmt(stats['final_loss'])}  non-finite {stats['nonfinite_losses']}",
        ]
        for key, label in (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s")):
            summary = stats["throughput"][key]
            cells = "  ".join(f"{k} {fmt(v)}" for k, v in summary.items()) if summary else "not measured"
            lines.append(f"  {label:<18}{cells}")
        lines.append(f"  {'tokens':<18}{fmt(stats['total_tokens'])}    time {fmt(stats['total_duration_s'])} s")
        if self._epochs:
            names = _EPOCH_FIELDS[:-1]
            lines.append("  " + "".join(f"{name:>12}" for name in names))
            for epoch in self._epochs[-last_epochs:]:
                lines.append("  " + "".join(f"{fmt(getattr(epoch, name)):>12}" for name in names))
        kinds = {kind: sum(a.kind == kind for a in anomalies) for kind in ANOMALY_KINDS}
        detail = ", ".join(f"{kind}: {n}" for kind, n in kinds.items() if n)
        lines.append(f"  anomalies: {len(anomalies)}" + (f" ({detail})" if detail else ""))
        print("\n".join(lines), file=out)


def _nonfinite_from_message(message: str) -> float:
    """The value an anomaly message ("... is -inf") names; JSON could not hold it. NaN when it names none."""
    try:
        value = float(message.rsplit(" ", 1)[-1])
    except ValueError:
        return math.nan
    return value if not math.isfinite(value) else math.nan


def _detached(value: Any, name: str) -> Any:
    """A tensor detached from autograd (no sync, no copy); anything else unchanged."""
    if value is None or not hasattr(value, "detach"):
        return value
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    return value.detach() if value.requires_grad else value


# -- transformers.Trainer adapter --------------------------------------------------------------------------------


def trainer_callback(collector: TrainingMetricsCollector) -> transformers.TrainerCallback:
    """A ``transformers.TrainerCallback`` that records a real ``Trainer`` run into ``collector``.

    - ``on_log`` with a ``loss`` -> one :class:`BatchMetric` for the logging window (``logging_steps`` optimizer
      steps): loss, learning rate and grad norm from the logs; ``duration_s`` is the summed time between
      ``on_step_begin`` and ``on_step_end`` in the window; samples/s from ``train_batch_size x
      gradient_accumulation_steps x world_size`` per step; tokens/s from ``state.num_input_tokens_seen``
      (set ``include_num_input_tokens_seen``). What the args and state do not tell is ``0.0`` ("not measured"),
      never estimated.
    - ``on_evaluate`` -> one :class:`EpochMetric`: ``eval_loss`` -> ``val_loss``, ``perplexity = exp(eval_loss)``,
      ``accuracy`` from ``eval_accuracy`` (else ``None``), ``train_loss`` the mean logged loss since the previous
      evaluation, other numeric metrics in ``extra``.

    ``transformers`` is imported here, not when ``ryzen_opt.training.metrics`` is.
    """
    return _callback_class()(collector)


def _samples_per_step(args: Any) -> int | None:
    per_device = getattr(args, "train_batch_size", None) or getattr(args, "per_device_train_batch_size", None)
    if not per_device:
        return None
    accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
    world = getattr(args, "world_size", 1) or 1
    return int(per_device) * int(accumulation) * int(world)


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf  # exp(709.8) overflows a float64


def _epoch_index(state: Any) -> int:
    """The epoch of the last finished step: ``state.epoch`` is fractional and reaches 1.0 as epoch 0 ends."""
    return max(math.ceil(state.epoch or 0.0) - 1, 0)


@cache
def _callback_class() -> Callable[[TrainingMetricsCollector], transformers.TrainerCallback]:
    from transformers import TrainerCallback

    class RyzenMetricsCallback(TrainerCallback):
        """Records a Trainer run into a :class:`TrainingMetricsCollector` (see :func:`trainer_callback`)."""

        def __init__(self, collector: TrainingMetricsCollector) -> None:
            self.collector = collector
            self._reset(tokens_seen=0, step=0)

        def _reset(self, tokens_seen: int, step: int) -> None:
            self._step_started: float | None = None
            self._window_s = 0.0
            self._window_steps = 0
            self._tokens_at_log = tokens_seen
            self._epoch_start_step = step
            self._losses_since_eval: list[float] = []
            self._last_eval = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._reset(int(getattr(state, "num_input_tokens_seen", 0) or 0), int(state.global_step))

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._epoch_start_step = int(state.global_step)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._step_started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._step_started is not None:
                self._window_s += time.perf_counter() - self._step_started
                self._window_steps += 1
                self._step_started = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not logs or "loss" not in logs:
                return
            elapsed, steps = self._window_s, self._window_steps
            per_step = _samples_per_step(args)
            seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            tokens = seen - self._tokens_at_log if seen > self._tokens_at_log else None
            loss = float(logs["loss"])
            grad = logs.get("grad_norm")
            self.collector.record_batch_metric(
                BatchMetric(
                    epoch=_epoch_index(state),
                    batch=max(int(state.global_step) - self._epoch_start_step - 1, 0),
                    loss=loss,
                    samples_per_s=per_step * steps / elapsed if per_step and elapsed > 0 else 0.0,
                    tokens_per_s=tokens / elapsed if tokens and elapsed > 0 else 0.0,
                    learning_rate=float(logs.get("learning_rate", math.nan)),
                    grad_norm=None if grad is None else float(grad),
                    duration_s=elapsed,
                    step=int(state.global_step),
                    tokens=tokens,
                )
            )
            if math.isfinite(loss):
                self._losses_since_eval.append(loss)
            self._window_s, self._window_steps, self._tokens_at_log = 0.0, 0, seen

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            metrics = metrics or {}
            now = time.perf_counter()
            eval_loss = metrics.get("eval_loss")
            val_loss = None if eval_loss is None else float(eval_loss)
            accuracy = metrics.get("eval_accuracy")
            train = self._losses_since_eval
            extra = {
                key: float(value)
                for key, value in metrics.items()
                if key not in ("eval_loss", "eval_accuracy", *_EPOCH_FIELDS)
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            }
            self.collector.record_epoch_metric(
                EpochMetric(
                    epoch=_epoch_index(state),
                    train_loss=math.fsum(train) / len(train) if train else None,
                    val_loss=val_loss,
                    accuracy=None if accuracy is None else float(accuracy),
                    perplexity=None if val_loss is None else _safe_exp(val_loss),
                    duration_s=now - self._last_eval,
                    extra=extra,
                )
            )
            self._losses_since_eval, self._last_eval = [], now

    return RyzenMetricsCallback
