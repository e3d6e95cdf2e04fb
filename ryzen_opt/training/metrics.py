"""Metrics of a real training loop: per-batch and per-epoch records, statistics, anomalies and the JSON report.

The seed's ``training_metrics_collector.py`` fed itself simulated numbers; this collector only ever holds what a
training loop (ours in ``ryzen_opt.training.loop``, or a ``transformers.Trainer`` through
:func:`~ryzen_opt.training.callback.trainer_callback`)
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
import sys
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from ryzen_opt.errors import ConfigError
from ryzen_opt.validation import reports

if TYPE_CHECKING:
    import os

from ryzen_opt.training.anomalies import AnomalyConfig, Segment, detect_anomalies
from ryzen_opt.training.records import (
    ANOMALY_KINDS,
    EPOCH_FIELDS,
    Anomaly,
    BatchMetric,
    EpochMetric,
    json_float,
    scalar,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ANOMALY_KINDS",
    "Anomaly",
    "AnomalyConfig",
    "BatchMetric",
    "EpochMetric",
    "TrainingMetricsCollector",
]

_PERCENTILES = (50, 90, 99)


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
        self._segments: list[Segment] = [Segment(experiment_id, model, batch_size, 0, 0)]
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
                metric.loss, metric.grad_norm = scalar(loss), scalar(grad)  # type: ignore[assignment]
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
            Segment(self.experiment_id, self.model, self.batch_size, len(self._batches), len(self._epochs))
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
            "avg_loss": json_float(float(np.mean(finite))) if finite else None,
            "min_loss": min(finite) if finite else None,
            "max_loss": max(finite) if finite else None,
            "final_loss": finite[-1] if finite else None,
            "nonfinite_losses": len(losses) - len(finite),
            "avg_throughput": sample_summary["mean"] if sample_summary else None,
            "throughput": {"samples_per_s": sample_summary, "tokens_per_s": _summary(tokens_s)},
            "total_tokens": sum(tokens) if tokens else None,
            "total_duration_s": json_float(math.fsum(durations)) if durations else None,
            "best_val_loss": min(val) if val else None,
            "best_accuracy": max(acc) if acc else None,
            "final_perplexity": json_float(self._epochs[-1].perplexity) if self._epochs else None,
            **_rank_statistics(self._batches),
        }

    def _segment_ranges(self) -> Iterator[tuple[Segment, int, int, int, int]]:
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
            found.extend(detect_anomalies(self._batches[start:end], self.anomaly_config, seg.experiment_id))
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
            seg = Segment(src.get("experiment_id"), src.get("model"), src.get("batch_size"), b_start, e_start)
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
            names = EPOCH_FIELDS[:-1]
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
