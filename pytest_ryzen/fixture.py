"""The ``ryzen`` fixture: what a test calls to measure, and the records its gates are judged on."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ryzen_opt.measure.accuracy import accuracy
from ryzen_opt.measure.timing import compare as paired_compare
from ryzen_opt.validation.gates import METRICS


class RyzenRecorder:
    """Measures and records for one test. Every ``record_*`` call stores one measurement of one metric.

    A test marked ``@speedup(3.0)`` must record a ``speedup`` (``compare`` does); the plugin checks every marker
    against the matching records after the test body ran.

    Args:
        device: the session's device (``--device``); ``compare`` syncs it around every timed call.
        thresholds: metric -> threshold from this test's markers, so adaptive sampling aims at the right gate.
        lock: take the cross-process perf lock while timing (set under pytest-xdist).
        nodeid: the test, for messages.
        disabled: ``--ryzen-disable``: ``compare`` runs each arm once, untimed, and records nothing (pytest-benchmark's
            ``--benchmark-disable``), so a perf test runs as a quick functional test.
    """

    def __init__(
        self,
        device: torch.device,
        thresholds: dict[str, float],
        *,
        lock: bool,
        nodeid: str,
        disabled: bool = False,
    ) -> None:
        self.device = device
        self.thresholds = thresholds
        self.lock = lock
        self.nodeid = nodeid
        self.disabled = disabled
        self.records: list[dict[str, Any]] = []

    # -- measuring ---------------------------------------------------------------------------------------------
    def compare(
        self,
        baseline: Callable[[], Any],
        candidate: Callable[[], Any],
        *,
        baseline_name: str = "baseline",
        candidate_name: str = "candidate",
        optimizer: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Paired, interleaved A/B timing (``ryzen_opt.measure.timing.compare``); records a ``speedup``.

        The threshold defaults to this test's ``speedup`` marker. Under xdist the sampling holds a cross-process
        lock so that two perf tests never time at once; the record notes how long it waited. Returns the
        :class:`~ryzen_opt.measure.stats.SpeedupMeasurement`, or ``None`` under ``--ryzen-disable`` (each arm ran
        once, untimed).
        """
        if self.disabled:
            baseline()
            candidate()
            return None
        kwargs.setdefault("threshold", self.thresholds.get("speedup"))
        kwargs.setdefault("device", self.device)
        if self.lock:
            kwargs.setdefault("lock", True)
        measurement = paired_compare(
            baseline, candidate, baseline_name=baseline_name, candidate_name=candidate_name, **kwargs
        )
        self._add(
            "speedup",
            measurement.ratio,
            measurement=measurement.to_dict(),
            ci_low=measurement.ci_low,
            ci_high=measurement.ci_high,
            n=measurement.n,
            baseline=baseline_name,
            optimizer=optimizer,
            unit="x",
            details={
                "candidate": candidate_name,
                "lock_wait_s": measurement.lock_wait_s,
                "threads": measurement.threads,
                "baseline_calls": measurement.baseline_calls,
                "candidate_calls": measurement.candidate_calls,
                "baseline_median_s": measurement.baseline_median_s,
                "candidate_median_s": measurement.candidate_median_s,
                "baseline_iqr_s": measurement.baseline_iqr_s,
                "candidate_iqr_s": measurement.candidate_iqr_s,
                "oversubscribed": measurement.oversubscribed,
            },
        )
        return measurement

    def record_accuracy(
        self,
        reference: Any = None,
        candidate: Any = None,
        data: Any = None,
        *,
        measurement: Any = None,
        optimizer: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Measure (``ryzen_opt.measure.accuracy.accuracy``) or take an ``AccuracyMeasurement``; records
        ``accuracy_loss``."""
        if measurement is None:
            if reference is None or candidate is None or data is None:
                raise TypeError("record_accuracy needs reference, candidate and data, or measurement=")
            measurement = accuracy(reference, candidate, data, device=self.device, **kwargs)
        self._add(
            "accuracy_loss",
            measurement.accuracy_loss,
            measurement=measurement.to_dict(),
            ci_low=measurement.ci_low,
            ci_high=measurement.ci_high,
            n=measurement.n,
            baseline=measurement.reference_name,
            optimizer=optimizer,
            unit="fraction",
            # What explains the loss goes with the gate into ryzen's own reports (not only pytest-json-report's).
            details={
                "candidate": measurement.candidate_name,
                "reference_accuracy": measurement.reference_accuracy,
                "candidate_accuracy": measurement.candidate_accuracy,
                "perplexity_ratio": measurement.perplexity_ratio,
                "kl_divergence": measurement.kl_divergence,
                "top1_agreement": measurement.top1_agreement,
                "tokens": measurement.tokens,
            },
        )
        return measurement

    def record_compression(
        self, original_bytes: int, compressed_bytes: int, *, optimizer: str | None = None, **details: Any
    ) -> float:
        """Records ``compression_ratio`` = original bytes / compressed bytes (every stored tensor counted)."""
        if compressed_bytes <= 0 or original_bytes <= 0:
            ratio = float("nan")
        else:
            ratio = original_bytes / compressed_bytes
        self._add(
            "compression_ratio",
            ratio,
            optimizer=optimizer,
            unit="x",
            details={"original_bytes": original_bytes, "compressed_bytes": compressed_bytes, **details},
        )
        return ratio

    def record_memory(
        self, baseline_bytes: int, optimized_bytes: int, *, optimizer: str | None = None, **details: Any
    ) -> float:
        """Records ``memory_reduction`` = 1 - optimized / baseline."""
        reduction = 1.0 - optimized_bytes / baseline_bytes if baseline_bytes > 0 else float("nan")
        self._add(
            "memory_reduction",
            reduction,
            optimizer=optimizer,
            unit="fraction",
            details={"baseline_bytes": baseline_bytes, "optimized_bytes": optimized_bytes, **details},
        )
        return reduction

    def record_acceptance(self, accepted: int, proposed: int, *, optimizer: str | None = None, **details: Any) -> float:
        """Records ``acceptance_rate`` = accepted draft tokens / proposed draft tokens."""
        rate = accepted / proposed if proposed > 0 else float("nan")
        self._add(
            "acceptance_rate",
            rate,
            optimizer=optimizer,
            unit="fraction",
            details={"accepted": accepted, "proposed": proposed, **details},
        )
        return rate

    def record(
        self,
        metric: str,
        value: float,
        *,
        ci_low: float | None = None,
        ci_high: float | None = None,
        n: int | None = None,
        baseline: str | None = None,
        optimizer: str | None = None,
        **details: Any,
    ) -> None:
        """Record any gate metric measured elsewhere (with its confidence interval if it has one)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}: the gate metrics are {', '.join(METRICS)}")
        self._add(
            metric, value, ci_low=ci_low, ci_high=ci_high, n=n, baseline=baseline, optimizer=optimizer, details=details
        )

    # -- storage -----------------------------------------------------------------------------------------------
    def _add(self, metric: str, value: float, **fields: Any) -> None:
        value = float(value)
        record = {
            "metric": metric,
            "value": value if math.isfinite(value) else None,
            "finite": math.isfinite(value),
            "device": str(self.device),
            **{k: v for k, v in fields.items() if v is not None},
        }
        self.records.append(record)

    def measurements(self, metric: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["metric"] == metric]
