"""The ``transformers.Trainer`` adapter: a ``TrainerCallback`` that records a real Trainer run into a collector.

A module of its own so that ``transformers`` is imported only by a user of the Trainer.
"""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback

from ryzen_opt.training.metrics import TrainingMetricsCollector
from ryzen_opt.training.records import EPOCH_FIELDS, BatchMetric, EpochMetric


def trainer_callback(collector: TrainingMetricsCollector) -> TrainerCallback:
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

    """
    return RyzenMetricsCallback(collector)


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
            if key not in ("eval_loss", "eval_accuracy", *EPOCH_FIELDS)
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
