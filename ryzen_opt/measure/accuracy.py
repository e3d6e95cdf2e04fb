"""Accuracy measures: how much an optimized model's predictions moved away from the reference's.

Accuracy loss (docs/definitions.md) is the relative loss of next-token top-1 accuracy on held-out text,
``(acc_ref - acc_cand) / acc_ref``, reported beside the perplexity ratio, the mean KL divergence from the
reference's distribution, top-1 agreement and, for generation, how far greedy output agrees. Why each piece:

- **Both models see the same tokens, scored position by position.** Every statistic is a sum over the same
  positions, so the comparison is paired: noise in *which* text was held out is shared by both arms.
- **Paired bootstrap over sequences** (Efron & Tibshirani 1993, ch. 13; resampling units as in Koehn 2004,
  "Statistical Significance Tests for Machine Translation Evaluation"): positions inside one sequence are
  correlated, sequences are roughly independent, so sequences are the resampling unit. Each resample recomputes
  *both* accuracies on the same sequences; the interval therefore reflects only how the two models differ,
  not how hard the held-out text happens to be. That is what makes a 1% gate testable on a few thousand tokens.
- **Logits in the model's own dtype, statistics in float32/float64**: the measurement must see what the
  optimized model really computes (bf16, int8 dequantized, ...), but a log-softmax or a sum over thousands of
  positions in bf16 would add error of its own. Log-softmax runs in float32, per-sequence sums in float64.
- **Near-ties are counted, not hidden**: where the reference's top-2 logits are within 1e-5, the argmax is
  decided by rounding; any numerically different candidate may flip it. Tiny random models have exact ties.

``accuracy`` and ``AccuracyMeasurement`` are re-exported by :mod:`ryzen_opt.measure.timing`, the home of every
measurement; this module imports nothing from it at import time so that either can be imported first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ryzen_opt.errors import ConfigError, MeasurementError
from ryzen_opt.measure.token_blocks import TokenBlocks

logger = logging.getLogger(__name__)

# A top-2 logit gap below this is a near-tie (docs/definitions.md, "lossless"): the argmax there is decided by rounding.
NEAR_TIE_GAP = 1e-5
# Cap on elements of one bootstrap block (n_boot x n indices), as in the A/B sampler.
_BOOT_BLOCK_ELEMENTS = 2_000_000
# exp() of a mean NLL above this overflows a double: such a "perplexity" is no measurement.
_MAX_LOG_PPL = 700.0


@dataclass(frozen=True)
class AccuracyMeasurement:
    """How far a candidate model's next-token predictions are from the reference's, on the same held-out text.

    ``accuracy_loss`` is ``(reference_accuracy - candidate_accuracy) / reference_accuracy`` (negative when the
    candidate is better); ``ci_low``/``ci_high`` its paired-bootstrap interval over the ``n`` sequences at
    ``confidence``. ``tokens`` counts scored positions (each sequence of length T scores T - 1).
    ``kl_divergence`` is the mean per-token KL(p_ref || p_cand) in nats; ``top1_agreement`` the fraction of
    positions where both argmaxes agree; ``near_ties`` the positions where the reference's top-2 logit gap
    is below 1e-5. ``value`` is ``accuracy_loss``, so a validator can read it like any measurement.
    """

    reference_accuracy: float
    candidate_accuracy: float
    accuracy_loss: float
    ci_low: float
    ci_high: float
    n: int  # sequences
    tokens: int
    reference_perplexity: float
    candidate_perplexity: float
    perplexity_ratio: float  # candidate / reference
    kl_divergence: float
    top1_agreement: float
    near_ties: int
    confidence: float = 0.95
    reference_name: str = "reference"
    candidate_name: str = "candidate"

    def __post_init__(self) -> None:
        for name in ("n", "tokens", "near_ties"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.n < 1 or self.tokens < 1 or self.near_ties < 0:
            raise ValueError(
                f"AccuracyMeasurement needs n >= 1, tokens >= 1, near_ties >= 0; got n={self.n}, "
                f"tokens={self.tokens}, near_ties={self.near_ties}"
            )
        check_confidence(self.confidence)
        if self.ci_low > self.ci_high:  # False for NaN: to_dict() is where non-finite values are refused
            raise ValueError(f"ci_low ({self.ci_low!r}) must not exceed ci_high ({self.ci_high!r})")

    @property
    def value(self) -> float:
        """The gated quantity: ``accuracy_loss``."""
        return self.accuracy_loss

    @property
    def n_sequences(self) -> int:
        """The resampling unit's count (same as ``n``)."""
        return self.n

    def describe(self) -> str:
        """One line, e.g. ``accuracy loss 0.42% (95% CI -0.10% to 0.95%, 64 seqs; top-1 0.3012 -> 0.2999, ...)``."""
        text = (
            f"accuracy loss {self.accuracy_loss * 100:.2f}% ({self.confidence * 100:g}% CI "
            f"{self.ci_low * 100:.2f}% to {self.ci_high * 100:.2f}%, {self.n} seqs; "
            f"top-1 {self.reference_accuracy:.4f} -> {self.candidate_accuracy:.4f}, "
            f"KL {self.kl_divergence:.4g}, agreement {self.top1_agreement:.3f}"
        )
        if self.near_ties:
            text += f", {self.near_ties} near-ties"
        return text + ")"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``json.dumps(..., allow_nan=False)`` accepts it); inverse of :meth:`from_dict`.

        Raises:
            ValueError: a field is NaN or infinite (it would not be JSON, and it is not a measurement).
        """
        data = asdict(self)
        for name, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"AccuracyMeasurement.{name} is {value}: not finite, so not a reportable measurement")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMeasurement:
        """Rebuild a measurement from :meth:`to_dict` output (e.g. a report read back); unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown AccuracyMeasurement fields: {sorted(unknown)}")
        return cls(**dict(data))


def check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ConfigError(f"confidence must be strictly between 0 and 1, got {confidence!r}")


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _iter_batches(heldout: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """``[B, T]`` LongTensor batches of ``heldout``: blocks in order, or one variable-length sequence each."""
    if isinstance(heldout, TokenBlocks):
        heldout = heldout.blocks
    if isinstance(heldout, torch.Tensor):
        if heldout.ndim != 2:
            raise ConfigError(
                f"held-out tensor must be [N, T] token blocks, got shape {tuple(heldout.shape)}; "
                "give a list of 1-D tensors for sequences of different lengths"
            )
        rows = list(heldout.split(batch_size))
    elif isinstance(heldout, Sequence) and not isinstance(heldout, (str, bytes)):
        rows = []
        for i, seq in enumerate(heldout):
            seq = torch.as_tensor(seq)
            if seq.ndim != 1:
                raise ConfigError(f"held-out sequence {i} must be 1-D, got shape {tuple(seq.shape)}")
            rows.append(seq[None])
    else:
        raise ConfigError(
            f"held-out data must be TokenBlocks, an [N, T] LongTensor or a list of 1-D LongTensors, "
            f"got {type(heldout).__name__}"
        )
    if not rows:
        raise ConfigError("held-out data is empty: give at least one sequence of 2 or more tokens")
    for batch in rows:
        if batch.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"held-out tokens must be integer ids (LongTensor), got {batch.dtype}")
        if batch.shape[1] < 2:
            raise ConfigError(
                f"a held-out sequence has {batch.shape[1]} token(s): next-token accuracy needs at least 2"
            )
        yield batch.long()


def _logits(model: nn.Module, ids: torch.Tensor, name: str) -> torch.Tensor:
    out = model(input_ids=ids)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor) or logits.shape[:2] != ids.shape or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{name} must return logits of shape [B, T, V] for input {tuple(ids.shape)}, got {shape}")
    return logits


# Positions scored at a time: a [16, vocab] slice of both logits (SmolLM2: 3 MB each) stays in cache through the
# softmaxes, arg-maxes and sums, where whole [8, 255, vocab] batches (400 MB each) streamed through memory once per
# statistic: measured on SmolLM2-sized logits, 0.56 s a batch against 1.9 s, plus 1 s of separate finiteness checks.
_SCORE_ROWS = 16


def _score_batch(
    ref_logits: torch.Tensor, cand_logits: torch.Tensor, ids: torch.Tensor, names: tuple[str, str], index: int
) -> dict[str, np.ndarray]:
    """Per-row sums of every statistic over the scored positions ``[:, :-1]`` of one batch.

    Raises:
        MeasurementError: a model's logits are not finite (``names`` says whose, ``index`` which batch).
    """
    target = ids[:, 1:].to(ref_logits.device)
    rows, positions = target.shape
    sums = {
        key: torch.zeros(rows, dtype=torch.float64 if key in ("nll_ref", "nll_cand", "kl") else torch.int64)
        for key in ("correct_ref", "correct_cand", "agree", "near_ties", "nll_ref", "nll_cand", "kl")
    }
    for b in range(rows):
        for s in range(0, positions, _SCORE_ROWS):
            e = min(positions, s + _SCORE_ROWS)
            lr = ref_logits[b, s:e].float()
            lc = cand_logits[b, s:e].to(lr.device).float()
            for name, logits in zip(names, (lr, lc), strict=True):
                if not bool(torch.isfinite(logits).all()):
                    raise MeasurementError(f"{name} produced non-finite logits in held-out batch {index}")
            t = target[b, s:e, None]
            logp_r = F.log_softmax(lr, dim=-1)
            logp_c = F.log_softmax(lc, dim=-1)
            pred_r, pred_c = lr.argmax(-1), lc.argmax(-1)
            top2 = lr.topk(2, dim=-1).values
            sums["correct_ref"][b] += int((pred_r == t[:, 0]).sum())
            sums["correct_cand"][b] += int((pred_c == t[:, 0]).sum())
            sums["agree"][b] += int((pred_r == pred_c).sum())
            sums["near_ties"][b] += int((top2[:, 0] - top2[:, 1] < NEAR_TIE_GAP).sum())
            sums["nll_ref"][b] += float(-logp_r.gather(-1, t).sum(dtype=torch.float64))
            sums["nll_cand"][b] += float(-logp_c.gather(-1, t).sum(dtype=torch.float64))
            sums["kl"][b] += float((logp_r.exp() * (logp_r - logp_c)).sum(-1).sum(dtype=torch.float64))
    per_row = {key: value.numpy() for key, value in sums.items()}
    per_row["tokens"] = np.full(rows, positions, dtype=np.int64)
    return per_row


def _paired_bootstrap_loss(
    correct_ref: np.ndarray, correct_cand: np.ndarray, confidence: float, n_boot: int, seed: int
) -> tuple[float, float]:
    """Percentile interval of ``(C_ref - C_cand) / C_ref`` over paired resamples of sequences."""
    n = correct_ref.size
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BOOT_BLOCK_ELEMENTS // n)
    losses = []
    for start in range(0, n_boot, rows_per_block):
        idx = rng.integers(0, n, size=(min(rows_per_block, n_boot - start), n))
        ref_sum = correct_ref[idx].sum(axis=1)
        cand_sum = correct_cand[idx].sum(axis=1)
        ok = ref_sum > 0  # a resample the reference got entirely wrong has no relative loss
        losses.append((ref_sum[ok] - cand_sum[ok]) / ref_sum[ok])
    stats = np.concatenate(losses)
    if stats.size < n_boot:
        logger.warning(
            "%d of %d bootstrap resamples had no correct reference prediction and were dropped: "
            "the interval rests on very few correct tokens",
            n_boot - stats.size,
            n_boot,
        )
    if stats.size == 0:
        raise MeasurementError("no bootstrap resample had a correct reference prediction: give more held-out text")
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _perplexity(nll_sum: float, tokens: int, name: str) -> float:
    mean_nll = nll_sum / tokens
    if not mean_nll <= _MAX_LOG_PPL:
        raise MeasurementError(f"{name}'s mean NLL is {mean_nll:.4g} nats/token: its perplexity overflows")
    return math.exp(mean_nll)


def accuracy(
    reference: nn.Module,
    candidate: nn.Module,
    heldout: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    reference_name: str = "reference",
    candidate_name: str = "candidate",
) -> AccuracyMeasurement:
    """Measure ``candidate`` against ``reference`` on held-out token sequences (docs/definitions.md, "accuracy loss").

    Both are causal LMs called as ``model(input_ids=ids)`` returning ``.logits`` of shape ``[B, T, V]`` (a
    plain tensor or tuple works too). Position ``t``'s logits predict token ``t + 1``. They run in eval mode
    under ``torch.no_grad()`` in their own dtype; their training/eval mode is restored afterwards.

    Args:
        reference: the unoptimized model.
        candidate: the optimized model (same vocabulary).
        heldout: a :class:`~ryzen_opt.measure.token_blocks.TokenBlocks`, an ``[N, T]`` LongTensor (batched
            ``batch_size`` rows at a time, in order), or a list of 1-D LongTensors of any lengths >= 2
            (one sequence per forward, so no padding ever touches the logits).
        batch_size: rows per forward for block input.
        max_batches: score only the first this many batches (sequences, for list input); ``None`` for all.
        device: where the token ids go; ``None`` sends them to each model's own device.
        confidence: of the paired-bootstrap interval of the accuracy loss.
        n_boot: bootstrap resamples.
        seed: of the bootstrap's ``numpy.random.default_rng``: the same data give the same interval.

    Raises:
        MeasurementError (from :mod:`ryzen_opt.measure.timing`): the reference predicted no token correctly (a relative
            loss is undefined), or a model produced non-finite logits.
        ConfigError: malformed held-out data, arguments, or logits of mismatched shape.
    """
    _check_accuracy_args(confidence, batch_size, max_batches, n_boot)
    names = (reference_name, candidate_name)
    parts = _score_heldout(reference, candidate, heldout, batch_size, max_batches, device, names)
    per_seq = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    result = _summarize(per_seq, confidence, n_boot, seed, names)
    logger.info("%s vs %s: %s", candidate_name, reference_name, result.describe())
    return result


def _check_accuracy_args(confidence: float, batch_size: int, max_batches: int | None, n_boot: int) -> None:
    """Refuse bad arguments of :func:`accuracy` before any model runs."""
    check_confidence(confidence)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1 or None, got {max_batches!r}")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot!r}")


def _paired_logits(
    reference: nn.Module,
    candidate: nn.Module,
    batch: torch.Tensor,
    devices: tuple[torch.device, torch.device],
    names: tuple[str, str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' logits for one batch, refused unless they share a shape and a vocabulary worth a top-1."""
    reference_name, candidate_name = names
    ref_logits = _logits(reference, batch.to(devices[0]), reference_name)
    cand_logits = _logits(candidate, batch.to(devices[1]), candidate_name)
    if ref_logits.shape != cand_logits.shape:
        raise ConfigError(
            f"{reference_name} and {candidate_name} logits differ in shape: "
            f"{tuple(ref_logits.shape)} vs {tuple(cand_logits.shape)} (different vocabularies?)"
        )
    if ref_logits.shape[-1] < 2:
        raise ConfigError(f"a vocabulary of {ref_logits.shape[-1]} token(s) has no top-1 to measure")
    return ref_logits, cand_logits


def _score_heldout(
    reference: nn.Module,
    candidate: nn.Module,
    heldout: Any,
    batch_size: int,
    max_batches: int | None,
    device: torch.device | str | None,
    names: tuple[str, str],
) -> list[dict[str, np.ndarray]]:
    """Per-batch statistics of both models in eval mode and without gradients; their modes are restored after."""
    modes = [(model, model.training) for model in (reference, candidate)]
    parts: list[dict[str, np.ndarray]] = []
    try:
        for model, _ in modes:
            model.eval()
        ref_dev = torch.device(device) if device is not None else _model_device(reference)
        cand_dev = torch.device(device) if device is not None else _model_device(candidate)
        with torch.no_grad():
            for i, batch in enumerate(_iter_batches(heldout, batch_size)):
                if max_batches is not None and i >= max_batches:
                    break
                ref_logits, cand_logits = _paired_logits(reference, candidate, batch, (ref_dev, cand_dev), names)
                parts.append(_score_batch(ref_logits, cand_logits, batch, names, i))
    finally:
        for model, was_training in modes:
            model.train(was_training)
    return parts


def _summarize(
    per_seq: dict[str, np.ndarray], confidence: float, n_boot: int, seed: int, names: tuple[str, str]
) -> AccuracyMeasurement:
    """The measurement from per-sequence sums: accuracies, their bootstrap interval, perplexities, KL, agreement."""
    reference_name, candidate_name = names
    correct_ref = per_seq["correct_ref"].astype(np.int64)
    correct_cand = per_seq["correct_cand"].astype(np.int64)
    n = int(correct_ref.size)
    tokens = int(per_seq["tokens"].sum())
    c_ref, c_cand = int(correct_ref.sum()), int(correct_cand.sum())
    if c_ref == 0:
        raise MeasurementError(
            f"{reference_name} predicted none of {tokens} held-out tokens correctly: accuracy loss "
            "(acc_ref - acc_cand) / acc_ref is undefined; give more or more in-domain held-out text"
        )
    ci_low, ci_high = _paired_bootstrap_loss(correct_ref, correct_cand, confidence, n_boot, seed)
    ref_ppl = _perplexity(float(per_seq["nll_ref"].sum()), tokens, reference_name)
    cand_ppl = _perplexity(float(per_seq["nll_cand"].sum()), tokens, candidate_name)
    return AccuracyMeasurement(
        reference_accuracy=c_ref / tokens,
        candidate_accuracy=c_cand / tokens,
        accuracy_loss=(c_ref - c_cand) / c_ref,
        ci_low=ci_low,
        ci_high=ci_high,
        n=n,
        tokens=tokens,
        reference_perplexity=ref_ppl,
        candidate_perplexity=cand_ppl,
        perplexity_ratio=cand_ppl / ref_ppl,
        # KL >= 0; a float32 rounding residue of identical-but-for-rounding distributions must not read negative.
        kl_divergence=max(0.0, float(per_seq["kl"].sum()) / tokens),
        top1_agreement=int(per_seq["agree"].sum()) / tokens,
        near_ties=int(per_seq["near_ties"].sum()),
        confidence=confidence,
        reference_name=reference_name,
        candidate_name=candidate_name,
    )


def _pad_token_id(model: nn.Module) -> int:
    config = getattr(model, "generation_config", None)
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _greedy(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """New tokens of a greedy run of exactly ``max_new_tokens``, and the scores each was the argmax of."""
    ids = prompt[None].to(_model_device(model))
    generate: Any = model.generate  # transformers' GenerationMixin; nn.Module's typing does not know it
    out = generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # end-of-text is masked until then: both runs have the same length
        do_sample=False,
        num_beams=1,  # a generation_config asking for beams would make this not greedy
        pad_token_id=_pad_token_id(model),
        return_dict_in_generate=True,
        output_scores=True,
    )
    return out.sequences[0, ids.shape[1] :].cpu(), [s[0].float().cpu() for s in out.scores]


def greedy_agreement(
    reference: nn.Module,
    candidate: nn.Module,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """How far the candidate's greedy continuations agree with the reference's, prompt by prompt.

    Each prompt (a 1-D LongTensor) is continued greedily by both models for exactly ``max_new_tokens``
    tokens (end-of-text suppressed until then, for both). Per prompt: the length of the identical prefix of
    new tokens, and whether the reference's top-2 score gap at the first divergence was a near-tie (< 1e-5),
    where a flip is rounding, not error (docs/definitions.md, "lossless").

    Returns:
        A JSON-safe dict: ``max_new_tokens``, ``prompts`` (count), ``prefix_lengths`` (list of int),
        ``mean_prefix_fraction`` (mean of prefix_length / max_new_tokens), ``exact_matches`` (prompts whose
        continuations are identical), ``exact_match_rate``, ``near_tie_divergences`` (divergences at a
        near-tie) and ``per_prompt`` (``prompt_tokens``, ``identical_prefix``, ``diverged_at_near_tie``).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise ConfigError("greedy_agreement needs at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, torch.Tensor) or prompt.ndim != 1 or prompt.numel() == 0:
            raise ConfigError(f"prompt {i} must be a non-empty 1-D LongTensor")
    modes = [(model, model.training) for model in (reference, candidate)]
    per_prompt = []
    try:
        for model, _ in modes:
            model.eval()
        for prompt in prompts:
            ref_new, ref_scores = _greedy(reference, prompt.long(), max_new_tokens)
            cand_new, _ = _greedy(candidate, prompt.long(), max_new_tokens)
            common = min(ref_new.numel(), cand_new.numel())
            diff = (ref_new[:common] != cand_new[:common]).nonzero()
            prefix = int(diff[0, 0]) if diff.numel() else common
            near_tie = False
            if prefix < common:
                top2 = ref_scores[prefix].topk(2).values
                near_tie = bool(top2[0] - top2[1] < NEAR_TIE_GAP)
            exact = prefix == common and ref_new.numel() == cand_new.numel()
            per_prompt.append(
                {
                    "prompt_tokens": int(prompt.numel()),
                    "identical_prefix": prefix,
                    "exact_match": exact,
                    "diverged_at_near_tie": near_tie,
                }
            )
    finally:
        for model, was_training in modes:
            model.train(was_training)
    prefixes = [p["identical_prefix"] for p in per_prompt]
    exact_matches = sum(p["exact_match"] for p in per_prompt)
    return {
        "max_new_tokens": int(max_new_tokens),
        "prompts": len(per_prompt),
        "prefix_lengths": prefixes,
        "mean_prefix_fraction": float(np.mean(prefixes)) / max_new_tokens,
        "exact_matches": int(exact_matches),
        "exact_match_rate": exact_matches / len(per_prompt),
        "near_tie_divergences": sum(p["diverged_at_near_tie"] for p in per_prompt),
        "per_prompt": per_prompt,
    }


class MemoLogits(nn.Module):
    """``model`` with its logits computed once per input: when several candidates are compared with one reference on
    the same held-out blocks, the reference's forward runs once. Keeps every input's logits: mind the memory
    (``[B, T, vocab]`` float32 per input)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.memo: dict[tuple[tuple[int, ...], bytes], torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        key = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes())
        if key not in self.memo:
            self.memo[key] = self.model(input_ids=input_ids).logits
        return self.memo[key]
