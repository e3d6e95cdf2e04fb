"""The gate metrics, defined once: what each measures, which way it must go, and its default's key.

This module is torch-free (standard library only) on purpose: the pytest plugin imports it when pytest loads, and a
user's ``pytest --help`` must not pay for torch. Everything that names a gate metric (the validator, the plugin's
markers and fixture, the final report) reads these tables instead of keeping its own copy.
"""

from __future__ import annotations

from typing import NamedTuple

# How results turn into CI outcomes: strict fails on FAIL and on an unresolved verdict, lenient only on FAIL,
# report never (docs/definitions.md, "gate").
GATE_MODES = ("strict", "lenient", "report")
# The device classes a thresholds profile has sections for; ``--device`` also takes "auto".
DEVICE_CLASSES = ("cpu", "cuda", "rocm", "mps")
DEVICE_CHOICES = ("auto", *DEVICE_CLASSES)


class MetricSpec(NamedTuple):
    """How a gate metric is judged: ``comparison`` "min" (actual >= threshold) or "max" (actual <= threshold)."""

    comparison: str
    unit: str
    threshold_key: str  # the Thresholds field that holds its default
    meaning: str  # one line, for the marker's help and for messages


METRICS: dict[str, MetricSpec] = {
    "speedup": MetricSpec(
        "min", "x", "kernel_speedup", "measured speedup (baseline time / candidate time) must be at least min"
    ),
    "accuracy_loss": MetricSpec(
        "max", "fraction", "accuracy_loss", "relative top-1 accuracy loss against the reference must be at most max"
    ),
    "compression_ratio": MetricSpec(
        "min", "x", "compression_ratio", "original bytes / compressed bytes must be at least min"
    ),
    "memory_reduction": MetricSpec(
        "min", "fraction", "kv_memory_reduction", "1 - optimized/baseline memory must be at least min"
    ),
    "acceptance_rate": MetricSpec(
        "min", "fraction", "acceptance_rate", "speculative draft acceptance rate must be at least min"
    ),
}


class Check(NamedTuple):
    """A named result of ``ryzen-opt run``'s validation (the seed's names): its metric and its Thresholds field."""

    metric: str
    threshold_key: str


CHECKS: dict[str, Check] = {
    "kernel_performance": Check("speedup", "kernel_speedup"),
    "embedding_compression": Check("compression_ratio", "compression_ratio"),
    "kv_cache_optimization": Check("memory_reduction", "kv_memory_reduction"),
    "speculative_decoding": Check("acceptance_rate", "acceptance_rate"),
    "speculative_speedup": Check("speedup", "speculative_speedup"),
    "speculative_copy_speedup": Check("speedup", "copy_speculative_speedup"),
    "end_to_end_system": Check("speedup", "e2e_speedup"),
    "correctness": Check("accuracy_loss", "accuracy_loss"),
}


def threshold_kind(key: str) -> str | None:
    """The metric a thresholds-profile key is a threshold of, read off its name: a key is its metric's name or ends
    with ``_<metric>`` (``kernel_speedup``, ``kv_memory_reduction``, a user's ``attention_speedup``); ``None`` for a
    name that says no metric (a typo such as ``kernel_sped``)."""
    for metric in METRICS:
        if key == metric or key.endswith("_" + metric):
            return metric
    return None


def is_fraction(key: str) -> bool:
    """Whether a threshold key holds a fraction (bounded to (0, 1]) rather than a ratio."""
    metric = threshold_kind(key)
    return metric is not None and METRICS[metric].unit == "fraction"
