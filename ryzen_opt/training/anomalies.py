"""Anomaly detection over batch records: causal and deterministic.

Each value is judged against a rolling window of earlier finite values only (median and MAD), and nothing is judged
before ``min_history`` of them exist, so the same run always flags the same batches.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ryzen_opt.errors import ConfigError

if TYPE_CHECKING:
    pass
from ryzen_opt.training.records import Anomaly, BatchMetric, check_keys

# MAD x 1.4826 estimates the standard deviation of normally distributed values (1 / Phi^-1(3/4)).
_MAD_TO_SIGMA = 1.4826


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
        check_keys("anomaly config", data, allowed, ())
        return cls(**data)


@dataclass
class Segment:
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


def detect_anomalies(batches: list[BatchMetric], cfg: AnomalyConfig, source: str | None) -> list[Anomaly]:
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
