"""A real causal-LM training loop: AdamW, warm-up + cosine, clipping, bf16 autocast, held-out evaluation.

The loop is deliberately plain (gpt-fast / nanoGPT style): a few functions and one small state holder, no Trainer.
Every number it hands the :class:`~ryzen_opt.training.metrics.TrainingMetricsCollector` is measured from the step
that produced it.

Budget training by steps, not seconds (CPU_BASELINES.md): equal steps give byte-identical weights on the same
machine and software, while a time budget varies with load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from ryzen_opt.device import cpu_info
from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.measure.token_blocks import TokenBlocks  # re-exported: its home was here
from ryzen_opt.training import distributed
from ryzen_opt.training.metrics import BatchMetric, EpochMetric

logger = logging.getLogger(__name__)

_AUTOCAST_CHOICES = ("auto", "bf16", "off")
_GRAD_SYNC_CHOICES = ("last", "every")
# The profiler label around each backward (DDP's gradient all-reduce runs inside it): benchmarks measure overlap by it.
BACKWARD_LABEL = "ryzen_opt.train.backward"


class TrainingDivergedError(RyzenOptError, FloatingPointError):
    """The loss became NaN or Inf; the message names the step and what to try."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Frozen, validated, JSON round-trippable (``to_dict`` / ``from_dict``).

    Attributes:
        steps: optimizer steps in total (the budget; steps, not seconds, so runs are reproducible).
        batch_size: sequences per step.
        lr: peak learning rate, reached after ``warmup_steps`` of linear warm-up, then cosine decay.
        min_lr_ratio: the cosine floor as a fraction of ``lr`` (decaying to 0 wastes the last steps).
        warmup_steps: linear warm-up; Adam's early moment estimates are noisy, a ramp avoids early blow-ups.
        weight_decay: AdamW decay on matrices only (not norms, biases or embeddings, as in nanoGPT).
        betas: AdamW betas; beta2=0.95 is the usual choice for short LM runs (GPT-3, nanoGPT).
        grad_clip: max global grad norm; 0 disables clipping.
        eval_every: evaluate every this many steps (and at the end). Each evaluation is one
            ``EpochMetric`` ("epoch" = evaluation period, the seed's name); its ``extra`` holds the data epochs seen.
        eval_batches: held-out batches per evaluation (fixed, so evaluations are comparable).
        autocast: ``"auto"`` uses bf16 autocast where the hardware has fast bf16 (AVX-512 BF16 / AMX on CPU, or a
            bf16-capable GPU), ``"bf16"`` forces it, ``"off"`` trains in fp32. Measured 1.4-1.7x on Zen 4.
        seed: seeds weights' init (by the caller), data order and dropout.
        threads: ``torch.set_num_threads`` for the run; ``None`` keeps the current setting.
        log_every: batch metrics are recorded every step; the progress bar updates every ``log_every`` steps.
        checkpoint_dir: where ``save_pretrained`` checkpoints go (the end of training, and every
            ``checkpoint_every`` steps if set); ``None`` saves nothing.
        checkpoint_every: steps between checkpoints; ``None`` saves only at the end.
        progress: show a tqdm progress bar.
        accumulation_steps: micro-batches per optimizer step: ``batch_size`` rows are split into this many forwards
            and backwards whose gradients add up before one step (memory, not maths: the step is the same).
        grad_sync: under DistributedDataParallel, ``"last"`` all-reduces gradients only on the last micro-batch of a
            step (``no_sync`` on the others, DDP's own advice); ``"every"`` syncs each micro-batch (the same
            gradients, more traffic: kept to measure what ``no_sync`` saves).
        bucket_cap_mb: DDP's gradient bucket size. Smaller buckets start all-reducing earlier in the backward (more
            overlap) but each costs a collective's latency.

    Under ``torchrun`` (see :mod:`ryzen_opt.training.distributed`) ``batch_size`` is the *global* batch: each of the
    ``world_size`` ranks takes ``batch_size / world_size`` of its rows, so 2 ranks train on the batches 1 rank would.
    """

    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    autocast: str = "auto"
    seed: int = 0
    threads: int | None = None
    log_every: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    progress: bool = True
    accumulation_steps: int = 1
    grad_sync: str = "last"
    bucket_cap_mb: float = 25.0

    def __post_init__(self) -> None:
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "accumulation_steps": self.accumulation_steps,
            "eval_every": self.eval_every,
            "eval_batches": self.eval_batches,
            "log_every": self.log_every,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name} = {value!r}: must be a positive integer")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"TrainConfig.lr = {self.lr!r}: must be a positive finite number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"TrainConfig.min_lr_ratio = {self.min_lr_ratio!r}: must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ConfigError(f"TrainConfig.warmup_steps = {self.warmup_steps!r}: must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError(f"TrainConfig.grad_clip = {self.grad_clip!r}: must be >= 0 (0 disables clipping)")
        if self.autocast not in _AUTOCAST_CHOICES:
            raise ConfigError(f"TrainConfig.autocast = {self.autocast!r}: allowed values are {_AUTOCAST_CHOICES}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"TrainConfig.threads = {self.threads!r}: must be >= 1 or None")
        if self.grad_sync not in _GRAD_SYNC_CHOICES:
            raise ConfigError(f"TrainConfig.grad_sync = {self.grad_sync!r}: allowed values are {_GRAD_SYNC_CHOICES}")
        if not (math.isfinite(self.bucket_cap_mb) and self.bucket_cap_mb > 0):
            raise ConfigError(f"TrainConfig.bucket_cap_mb = {self.bucket_cap_mb!r}: a positive number of MB")
        if self.batch_size % self.accumulation_steps:
            raise ConfigError(
                f"TrainConfig.batch_size = {self.batch_size} does not split into accumulation_steps = "
                f"{self.accumulation_steps} equal micro-batches: make batch_size a multiple of it"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"TrainConfig.betas = {self.betas!r}: two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig key(s) {unknown}: allowed keys are {sorted(known)}")
        values = dict(data)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at the last step (nanoGPT's schedule)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def use_bf16_autocast(config: TrainConfig, device: torch.device) -> bool:
    """Decide autocast from the hardware: bf16 pays only where bf16 matmuls are fast (CPU_BASELINES.md)."""
    if config.autocast == "off":
        return False
    if config.autocast == "bf16":
        return True
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        flags = cpu_info()["flags"]
        return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    return False


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        # Matrices decay; norms, biases and embeddings do not (nanoGPT's split).
        (decay if param.ndim >= 2 and "embed" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device, bf16: bool = False
) -> dict[str, float]:
    """Held-out loss, perplexity and next-token top-1 accuracy of the model's main head.

    Under torchrun the ranks split the batches (rank ``r`` takes batches ``r, r + world, ...``) and add up their sums,
    so every rank returns the same numbers, computed once.

    Returns:
        ``{"loss", "perplexity", "accuracy", "tokens"}``; the loss is the token-weighted mean cross-entropy.
    """
    info = distributed.current()
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in list(batches)[info.rank :: info.world_size]:
        ids = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits
        logits = logits[:, :-1].float()
        target = ids[:, 1:]
        total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    if was_training:
        model.train()
    if info.active:
        total_loss, correct, count = distributed.all_sum(info, [total_loss, correct, count], "evaluation")
        correct, count = int(correct), int(count)
    loss = total_loss / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(count, 1), "tokens": count}


def train(
    model: nn.Module,
    data: TokenBlocks,
    config: TrainConfig,
    collector: Any | None = None,
    *,
    heldout: TokenBlocks | None = None,
    device: torch.device | str | None = None,
    step_callback: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` and record every step in ``collector``.

    ``model(input_ids=..., labels=...)`` must return an object with ``.loss`` and ``.logits``, as every
    ``transformers`` causal LM does (a wrapper may add auxiliary losses to ``.loss``).

    Args:
        model: the model, already on ``device``.
        data: training blocks.
        config: see :class:`TrainConfig`.
        collector: a ``TrainingMetricsCollector``; ``None`` records nothing.
        heldout: held-out blocks for evaluation; ``None`` skips evaluation.
        device: where batches go; defaults to the model's device.
        step_callback: called after every optimizer step (a ``torch.profiler`` schedule's ``step``, for one).

    Returns:
        A summary: steps, tokens, seconds, tokens/s, whether bf16 autocast was used, and the last evaluation.

    Raises:
        TrainingDivergedError: the loss became NaN or Inf; the message names the step.
    """
    info = distributed.current()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rows = _rows_per_micro_batch(config, info)
    torch.manual_seed(config.seed)
    bf16 = use_bf16_autocast(config, dev)
    # Keyword arguments evaluate left to right: DDP's start (a collective), then the optimizer, the data, the bar.
    loop = _TrainLoop(
        model=model,
        forward=_wrap_for_ranks(model, dev, config, info, collector),
        optimizer=torch.optim.AdamW(
            _param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, fused=False, foreach=True
        ),
        config=config,
        info=info,
        dev=dev,
        bf16=bf16,
        collector=collector,
        step_callback=step_callback,
        batches=data.batches(config.batch_size, config.seed),
        eval_data=heldout.fixed_batches(config.batch_size, config.eval_batches) if heldout is not None else [],
        tokens_per_step=config.batch_size * data.block_size,
        steps_per_data_epoch=max(1, len(data) // config.batch_size),
        bar=_progress_bar(config, info),
    )
    # Training needs autograd even when the caller sits in torch.no_grad() (e.g. an evaluation that builds the
    # zoo on first use); without this the first backward() fails with "does not require grad".
    with torch.enable_grad():
        model.train()
        loop.period_start = time.perf_counter()
        run_start = loop.period_start
        logger.info(
            "training %d steps, batch %d x %d tokens (%d rank(s) x %d micro-batch(es) of %d), bf16 autocast=%s",
            config.steps,
            config.batch_size,
            data.block_size,
            info.world_size,
            config.accumulation_steps,
            rows,
            bf16,
        )
        loop.run()
    model.eval()
    if config.checkpoint_dir and info.is_main:
        save_checkpoint(model, Path(config.checkpoint_dir) / "final")
    return loop.summary(time.perf_counter() - run_start)


def _rows_per_micro_batch(config: TrainConfig, info: distributed.DistInfo) -> int:
    """Each rank's rows per micro-batch; a ConfigError when the global batch does not split evenly."""
    rows = config.batch_size // config.accumulation_steps // info.world_size
    if rows < 1 or config.batch_size % (config.accumulation_steps * info.world_size):
        raise ConfigError(
            f"TrainConfig.batch_size = {config.batch_size} cannot be split into {info.world_size} rank(s) x "
            f"{config.accumulation_steps} micro-batch(es) of equal rows: make it a multiple of "
            f"{info.world_size * config.accumulation_steps}"
        )
    return rows


def _wrap_for_ranks(
    model: nn.Module, dev: torch.device, config: TrainConfig, info: distributed.DistInfo, collector: Any | None
) -> nn.Module:
    """What the steps call forward on: the model itself, or under torchrun its DistributedDataParallel wrapper."""
    if not info.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    with distributed.collective(info, "DistributedDataParallel's start (broadcast of rank 0's weights)"):
        forward = DistributedDataParallel(
            model,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            bucket_cap_mb=config.bucket_cap_mb,
            # The models' buffers (RoPE frequencies) are constants: syncing them each forward is a wasted
            # collective, and one that a rank-0-only evaluation would wait on forever.
            forward_sync_buffers=False,
        )
    if collector is not None:
        collector.set_distributed(info.world_size, info.backend)
    return forward


def _progress_bar(config: TrainConfig, info: distributed.DistInfo) -> Any | None:
    """A tqdm bar over the steps, on rank 0 only and only if ``config.progress``; else ``None``."""
    if not (config.progress and info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, desc="train", unit="step", dynamic_ncols=True)


@dataclass
class _TrainLoop:
    """One ``train`` call's state from step to step, so that each phase of a step can be a short method."""

    model: nn.Module
    forward: nn.Module  # the model, or its DistributedDataParallel wrapper under torchrun
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    info: distributed.DistInfo
    dev: torch.device
    bf16: bool
    collector: Any | None
    step_callback: Callable[[], None] | None
    batches: Iterator[torch.Tensor]
    eval_data: list[torch.Tensor]
    tokens_per_step: int
    steps_per_data_epoch: int
    bar: Any | None
    last_eval: dict[str, float] = field(default_factory=dict)
    period_losses: list[float] = field(default_factory=list)
    period_start: float = 0.0

    def run(self) -> None:
        """Every step in order; under torchrun a peer's death (a RuntimeError here) becomes a RankFailedError."""
        step = 0
        try:
            for step in range(self.config.steps):
                self.run_step(step)
        except RuntimeError as exc:
            if not self.info.active or isinstance(exc, RyzenOptError):
                raise
            info = self.info
            # A peer died mid-step: DDP's gradient all-reduce (inside backward) is where the others notice.
            raise distributed.RankFailedError(
                f"rank {info.rank} of {info.world_size}: training failed at step {step} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Another rank has probably "
                "died or stopped with an error: its own log (torchrun prefixes each line with the rank) says why"
            ) from exc
        finally:
            if self.bar is not None:
                self.bar.close()
            self.forward = self.model  # DDP's hooks go with it; the model is the caller's again

    def run_step(self, step: int) -> None:
        """One optimizer step, then its record, progress, callback, and the evaluation or checkpoint if one is due."""
        t0 = time.perf_counter()
        lr = lr_at(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_value = self._loss_of_all_ranks(step, lr, t0)
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        own = time.perf_counter() - t0
        # Each rank's step time: the slowest sets the pace (stragglers show in rank_step_s).
        durations = [v[0] for v in distributed.all_gather_floats(self.info, [own], f"step {step}'s timing")]
        self.period_losses.append(loss_value)
        self._record_step(step, loss_value, lr, grad_norm, durations)
        self._show_progress(step, loss_value, lr, max(durations))
        if self.step_callback is not None:
            self.step_callback()
        if (step + 1) % self.config.eval_every == 0 or step == self.config.steps - 1:
            self._end_period(step)
        self._maybe_checkpoint(step)

    def _loss_of_all_ranks(self, step: int, lr: float, t0: float) -> float:
        """Forward and backward on this rank's share of the next batch; the mean loss of all ranks, checked finite."""
        mine = distributed.shard_batch(next(self.batches), self.info).to(self.dev)
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = _forward_backward(self.forward, mine, self.config, self.bf16, self.info)
        # One host sync per step: needed to stop at the first NaN, not later. Every rank's loss is gathered,
        # so a NaN on any rank stops all of them at this step (and is the anomaly in every rank's record).
        losses = [v[0] for v in distributed.all_gather_floats(self.info, [loss_value], f"step {step}'s loss")]
        loss_value = math.fsum(losses) / len(losses)
        bad = [r for r, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            self._diverged(step, losses, bad, loss_value, lr, t0)
        return loss_value

    def _diverged(
        self, step: int, losses: list[float], bad: list[int], loss_value: float, lr: float, t0: float
    ) -> NoReturn:
        """Record the step whose loss is NaN or Inf (the report's anomaly), then stop with what to try."""
        if self.collector is not None:
            self.collector.record_batch_metric(
                BatchMetric(
                    step // self.config.eval_every,
                    step % self.config.eval_every,
                    loss_value,
                    0.0,
                    0.0,
                    lr,
                    None,
                    time.perf_counter() - t0,
                    step=step,
                    tokens=self.tokens_per_step,
                )
            )
        where = f" on rank(s) {bad}" if self.info.active else ""
        raise TrainingDivergedError(
            f"loss became {losses[bad[0]]} at step {step}{where} (lr {lr:.3g}). Lower TrainConfig.lr, "
            "keep grad_clip > 0, or check the data for empty or corrupt batches."
        )

    def _record_step(self, step: int, loss_value: float, lr: float, grad_norm: float, durations: list[float]) -> None:
        """Hand the step's measurements to the collector (if any), timed by the slowest rank."""
        if self.collector is None:
            return
        duration = max(durations)
        self.collector.record_batch_metric(
            BatchMetric(
                epoch=step // self.config.eval_every,
                batch=step % self.config.eval_every,
                step=step,
                loss=loss_value,
                samples_per_s=self.config.batch_size / duration,
                tokens_per_s=self.tokens_per_step / duration,
                learning_rate=lr,
                grad_norm=grad_norm,
                duration_s=duration,
                tokens=self.tokens_per_step,
                rank_step_s=tuple(durations) if self.info.active else None,
            )
        )

    def _show_progress(self, step: int, loss_value: float, lr: float, duration: float) -> None:
        """Advance the progress bar, refreshing its loss, lr and tokens/s every ``log_every`` steps and at the end."""
        if self.bar is None:
            return
        if step % self.config.log_every == 0 or step == self.config.steps - 1:
            tok_s = f"{self.tokens_per_step / duration:.0f}"
            self.bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2g}", tok_s=tok_s)
        self.bar.update(1)

    def _end_period(self, step: int) -> None:
        """Close an evaluation period: evaluate the held-out data (if any), record the period, start the next."""
        if self.eval_data:
            self.last_eval = evaluate(self.model, self.eval_data, self.dev, self.bf16)
            loss_, acc_ = self.last_eval["loss"], self.last_eval["accuracy"]
            logger.info("step %d: held-out loss %.4f, top-1 %.4f", step + 1, loss_, acc_)
        if self.collector is not None:
            self.collector.record_epoch_metric(
                EpochMetric(
                    epoch=step // self.config.eval_every,
                    train_loss=sum(self.period_losses) / len(self.period_losses),
                    val_loss=self.last_eval.get("loss"),
                    accuracy=self.last_eval.get("accuracy"),
                    perplexity=self.last_eval.get("perplexity"),
                    duration_s=time.perf_counter() - self.period_start,
                    extra={"step": float(step + 1), "data_epochs": (step + 1) / self.steps_per_data_epoch},
                )
            )
        self.period_losses = []
        self.period_start = time.perf_counter()

    def _maybe_checkpoint(self, step: int) -> None:
        """Save a checkpoint every ``checkpoint_every`` steps (rank 0 only), when ``checkpoint_dir`` is set."""
        config = self.config
        if (
            self.info.is_main
            and config.checkpoint_dir
            and config.checkpoint_every
            and (step + 1) % config.checkpoint_every == 0
        ):
            save_checkpoint(self.model, Path(config.checkpoint_dir) / f"step-{step + 1}")

    def summary(self, seconds: float) -> dict[str, Any]:
        """What ``train`` returns: the run's totals and throughput, the last evaluation and the ranks."""
        config, info = self.config, self.info
        return {
            "steps": config.steps,
            "tokens": config.steps * self.tokens_per_step,
            "seconds": seconds,
            "tokens_per_s": config.steps * self.tokens_per_step / seconds,
            "bf16_autocast": self.bf16,
            "data_epochs": config.steps / self.steps_per_data_epoch,
            "final_eval": self.last_eval,
            "world_size": info.world_size,
            "backend": info.backend,
        }


def _forward_backward(forward: nn.Module, rows: torch.Tensor, config: TrainConfig, bf16: bool, info: Any) -> float:
    """Forward and backward over this rank's rows, in ``accumulation_steps`` micro-batches; the mean loss.

    Under DDP the gradient all-reduce runs inside the last micro-batch's backward (``grad_sync="last"``, the others
    under ``no_sync``) or inside every one (``"every"``). The loss is not checked here: every rank must reach the
    same collectives, so the NaN check comes after, on all ranks' losses at once.
    """
    parts = rows.chunk(config.accumulation_steps)
    total = 0.0
    for i, ids in enumerate(parts):
        last = i == len(parts) - 1
        skip_sync = info.active and not last and config.grad_sync == "last"
        sync_context = forward.no_sync() if skip_sync else contextlib.nullcontext()  # type: ignore[operator]
        with sync_context:
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = forward(input_ids=ids, labels=ids).loss
            if len(parts) > 1:
                loss = loss / len(parts)
            with torch.profiler.record_function(BACKWARD_LABEL):  # where the profile finds the backward
                loss.backward()
        total += loss.item()
    return total


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """``save_pretrained`` when the model has it (every transformers model does); else a logged skip."""
    saver = getattr(model, "save_pretrained", None)
    if saver is None:
        logger.warning("%s has no save_pretrained(); checkpoint to %s skipped", type(model).__name__, path)
        return
    path.mkdir(parents=True, exist_ok=True)
    saver(path)


def make_train_step(model: nn.Module, batch: torch.Tensor, *, bf16: bool, lr: float = 1e-4) -> Callable[[], None]:
    """One full optimizer step (forward, backward, AdamW) on a fixed batch, as a callable to time.

    Used by the autocast benchmark and perf test, which compare fp32 and bf16 steps with ``bench.compare``.
    """
    device = next(model.parameters()).device
    ids = batch.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step
