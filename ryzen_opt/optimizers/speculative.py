"""SpeculativeDecoder: lossless speculative decoding with a draft model or n-gram (prompt-lookup) drafting.

A drafter proposes ``k`` tokens; the target scores all of them in one forward; the longest acceptable prefix is kept,
plus one token from the target (a correction, or a bonus when every draft was accepted). Why it is lossless:

- **Greedy** (``temperature=0``): a draft token is kept only if it is the target's own argmax at that position, and
  the extra token is the target's argmax, so the output is the target's greedy output token for token. The one
  exception is a near-tie, a top-2 logit gap under 1e-5, where the target's one-token and several-token forwards can
  round differently; such positions are counted in ``stats.near_ties``, never hidden.
- **Sampling** follows Leviathan et al. 2023 / Chen et al. 2023: draft token ``x`` drawn from the draft's ``p`` is
  accepted with probability ``min(1, q(x) / p(x))`` (``q`` the target's distribution after the same temperature /
  top-k / top-p); on rejection the token is drawn from ``norm(max(0, q - p))``; after ``k`` acceptances a bonus token
  is drawn from ``q``. The output then follows ``q`` exactly. The n-gram drafter proposes deterministically
  (``p`` = a point mass), for which the same rule reads: accept with probability ``q(x)``, else draw from ``q``
  without ``x``.

Caches roll back by position after a rejection: the KernelOptimizer's static cache by moving its position (stale
entries are overwritten later), HF caches (``DynamicCache``, the KVCacheOptimizer's) through ``crop``. The draft length
adapts with HF's heuristic (+2 after a fully accepted round, -1 otherwise).

On this CPU, verifying ``k`` tokens costs more than one decode step (fp32 ``F.linear`` with 8 rows takes ~4x one
row), so the verify path is the one that measured cheapest: the KernelOptimizer's lean loop when the target has one
(int8 verify of 4 tokens: 1.1x a single step), HF's forward otherwise.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ryzen_opt.configs import ConfigMixin
from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.measure.accuracy import NEAR_TIE_GAP
from ryzen_opt.ops.sampling import Sampler
from ryzen_opt.optimizers.drafting import ModelDrafter
from ryzen_opt.optimizers.kernels import kernel_report_or_none
from ryzen_opt.runtime.runner import model_device, runner_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecConfig(ConfigMixin):
    """How :class:`SpeculativeDecoder` drafts and verifies.

    Attributes:
        num_draft_tokens: draft length ``k`` of the first round.
        adaptive: HF's heuristic: ``k + 2`` after a round where every draft was accepted, ``k - 1`` otherwise.
        min_draft_tokens, max_draft_tokens: bounds of the adaptive ``k``. 7 by default: a verification of the last
            token and 7 drafts is 8 rows, one fused native call per layer; longer ones run in pieces (measured on
            the "tune" chat tasks with int8 kernels: repeat 2.39x against 1.99x with 12, spelling 1.84x against 1.63x).
        draft_confidence: a draft model stops proposing (after its first token) when its own top probability falls
            below this: a token it is unsure of is likely rejected, and every rejected draft cost a draft step
            (HF's ``assistant_confidence_threshold`` plays the same role). 0 turns it off. Any stopping rule keeps
            the output exact: verification does not depend on why drafting stopped.
        stop_acceptance, stop_window, stop_pause: stop drafting when it does not pay. After ``stop_window`` rounds
            with drafts whose acceptance (accepted / proposed) is below ``stop_acceptance``, the next
            ``stop_pause`` tokens come from plain one-token steps; each further stop doubles the pause. On a
            question whose answer does not repeat its prompt every rejected draft costs its verification, so
            without the rule prompt lookup makes such answers slower; the pause ends so that a copy that starts
            later (a preamble, then the quoted text) is still found. ``SpecStats.stops`` and
            ``undrafted_tokens`` say it happened. ``stop_acceptance = 0`` turns it off.
    """

    num_draft_tokens: int = 4
    adaptive: bool = True
    min_draft_tokens: int = 1
    max_draft_tokens: int = 7
    draft_confidence: float = 0.0
    stop_acceptance: float = 0.2
    stop_window: int = 8
    stop_pause: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.min_draft_tokens <= self.num_draft_tokens <= self.max_draft_tokens:
            raise ConfigError(
                "SpecConfig: need 1 <= min_draft_tokens <= num_draft_tokens <= max_draft_tokens, got "
                f"{self.min_draft_tokens}, {self.num_draft_tokens}, {self.max_draft_tokens}"
            )
        if not 0.0 <= self.draft_confidence < 1.0:
            raise ConfigError(f"SpecConfig.draft_confidence = {self.draft_confidence}: must be in [0, 1)")
        if not 0.0 <= self.stop_acceptance < 1.0:
            raise ConfigError(
                f"SpecConfig.stop_acceptance = {self.stop_acceptance}: must be in [0, 1) (0 never stops drafting)"
            )
        if self.stop_window < 1 or self.stop_pause < 1:
            raise ConfigError(
                f"SpecConfig: stop_window ({self.stop_window}) and stop_pause ({self.stop_pause}) must be >= 1"
            )


@dataclass
class SpecStats:
    """What a speculative generation did. ``acceptance_rate`` = accepted / proposed draft tokens."""

    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    new_tokens: int = 0
    per_position_proposed: list[int] = field(default_factory=list)
    per_position_accepted: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    near_ties: int = 0
    stops: int = 0  # times drafting stopped for low acceptance (SpecConfig.stop_acceptance)
    undrafted_tokens: int = 0  # tokens generated by plain steps while it was stopped

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [
            a / p if p else 0.0 for a, p in zip(self.per_position_accepted, self.per_position_proposed, strict=True)
        ]

    def _count_position(self, index: int, accepted: bool) -> None:
        while len(self.per_position_proposed) <= index:
            self.per_position_proposed.append(0)
            self.per_position_accepted.append(0)
        self.per_position_proposed[index] += 1
        self.per_position_accepted[index] += int(accepted)

    def merge(self, other: SpecStats) -> SpecStats:
        """The stats of two generations together (sums; per-position counts added position by position)."""
        out = SpecStats()
        for name in (
            "proposed",
            "accepted",
            "target_forwards",
            "new_tokens",
            "near_ties",
            "stops",
            "undrafted_tokens",
            "draft_seconds",
            "verify_seconds",
        ):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.draft_lengths = self.draft_lengths + other.draft_lengths
        for source in (self, other):
            for i, (p, a) in enumerate(zip(source.per_position_proposed, source.per_position_accepted, strict=True)):
                out._count_position(i, False)
                out.per_position_proposed[i] += p - 1
                out.per_position_accepted[i] += a
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            acceptance_rate=self.acceptance_rate,
            tokens_per_target_forward=self.tokens_per_target_forward,
            per_position_acceptance=self.per_position_acceptance,
        )
        return data


@dataclass
class SpecOutput:
    """``sequences``: prompt + new tokens ``[1, T]`` (as HF's ``generate`` returns them); ``stats``: the statistics."""

    sequences: torch.Tensor
    stats: SpecStats


# ---------------------------------------------------------------------------------------------- decoder


def _check_generate_args(input_ids: torch.Tensor, max_new_tokens: int, temperature: float) -> None:
    """Refuse what :meth:`SpeculativeDecoder.generate` cannot serve before any cache is touched."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ConfigError(
            f"SpeculativeDecoder serves batch size 1; got input_ids of shape {tuple(input_ids.shape)}. "
            "Loop over the batch, or use HF generate(assistant_model=...) for batches."
        )
    if input_ids.shape[1] < 1 or max_new_tokens < 1:
        raise ConfigError("SpeculativeDecoder.generate needs a non-empty prompt and max_new_tokens >= 1")
    if temperature < 0:
        raise ConfigError(f"temperature = {temperature}: must be >= 0 (0 = greedy)")


def verify_draft(
    logits: torch.Tensor,
    drafts: list[int],
    dists: torch.Tensor | None,
    sampling: Sampler,
    stats: SpecStats,
) -> tuple[list[int], int]:
    """``(tokens to append, number of drafts accepted)`` from the target's ``logits`` ``[k + 1, V]``: the rule that
    makes speculation lossless (see the module docstring). ``dists`` ``[k, V]`` are the draft's probabilities, None
    for a deterministic drafter; near-ties of a greedy verification are counted in ``stats``."""
    if sampling.greedy:
        top2 = logits.topk(2, dim=-1)
        choice = top2.indices[:, 0].tolist()
        gaps = (top2.values[:, 0] - top2.values[:, 1]).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == choice[accepted]:
            accepted += 1
        stats.near_ties += sum(gap < NEAR_TIE_GAP for gap in gaps[: accepted + 1])
        return drafts[:accepted] + [choice[accepted]], accepted
    target_probs = sampling.probs(logits)
    for i, token in enumerate(drafts):
        q = target_probs[i]
        p_token = float(dists[i, token]) if dists is not None else 1.0
        if sampling.uniform() < min(1.0, float(q[token]) / p_token):
            continue
        residual = q - dists[i] if dists is not None else q.clone()
        if dists is None:
            residual[token] = 0.0
        residual = residual.clamp_min(0.0)
        total = float(residual.sum())
        # An all-zero residual only happens when q <= p everywhere, i.e. q == p: then rejection had probability 0.
        return drafts[:i] + [sampling.draw(residual / total if total > 0 else q)], i
    return drafts + [sampling.draw(target_probs[len(drafts)])], len(drafts)


@dataclass
class _Generation:
    """One ``generate`` call's settings and growing sequence, shared by its prefill and its draft-verify rounds."""

    prompt: list[int]
    sequence: list[int]
    max_new_tokens: int
    sampling: Sampler
    eos: set[int]
    device: torch.device
    features: bool  # the drafter drafts from the target's hidden states (``needs_features``)
    stats: SpecStats = field(default_factory=SpecStats)

    @property
    def produced(self) -> int:
        """Tokens generated so far."""
        return len(self.sequence) - len(self.prompt)


class _DraftSchedule:
    """The next round's draft length: HF's adaptive ``k`` and the low-acceptance pause of :class:`SpecConfig`."""

    def __init__(self, config: SpecConfig) -> None:
        self.config = config
        self.k = config.num_draft_tokens
        self.recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=config.stop_window)
        self.paused_until, self.pause = 0, config.stop_pause

    def budget(self, produced: int, remaining: int, stats: SpecStats) -> int:
        """Drafts to propose now: ``k``, less if the end is near, 0 while drafting is paused (counted in stats)."""
        budget = min(self.k, remaining - 1)  # the target adds one token of its own
        if produced < self.paused_until:
            budget = 0
            stats.undrafted_tokens += 1
        return budget

    def update(self, proposed: int, accepted: int, produced: int, stats: SpecStats) -> None:
        """After a round: pause drafting when recent acceptance does not pay for it, then adapt ``k``."""
        if proposed and self.config.stop_acceptance > 0:
            self.recent.append((proposed, accepted))
            if len(self.recent) == self.recent.maxlen:
                rate = sum(a for _, a in self.recent) / sum(p for p, _ in self.recent)
                if rate < self.config.stop_acceptance:
                    stats.stops += 1
                    self.paused_until = produced + self.pause
                    self.pause *= 2
                    self.recent.clear()
        if self.config.adaptive and proposed:
            if accepted == proposed:
                self.k = min(self.config.max_draft_tokens, self.k + 2)
            else:
                self.k = max(self.config.min_draft_tokens, self.k - 1)


class SpeculativeDecoder:
    """Speculative decoding of ``target`` with ``drafter`` (a :class:`ModelDrafter`, an :class:`NGramDrafter`, or a
    draft model, which is wrapped in a ModelDrafter). ``generate`` is the verb.

    ``target_cache_factory`` gives the target's cache (e.g. ``lambda: kv.make_cache(target)`` with the
    KVCacheOptimizer); by default HF's ``DynamicCache``, or the KernelOptimizer's static cache if the target has one.
    """

    def __init__(
        self,
        target: Any,
        drafter: Any,
        config: SpecConfig | None = None,
        *,
        target_cache_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.target = target
        self.config = config or SpecConfig()
        if hasattr(drafter, "propose"):
            self.drafter = drafter
        elif hasattr(drafter, "as_drafter"):  # a feature draft: it drafts from the target's hidden states
            self.drafter = drafter.as_drafter(target, confidence=self.config.draft_confidence)
        else:
            self.drafter = ModelDrafter(drafter, confidence=self.config.draft_confidence)
        self.runner = runner_for(target, target_cache_factory)
        report = kernel_report_or_none(target)
        if report is not None and "fbgemm" in report.kernels and report.config.get("weights") == "int8":
            # Measured on the zoo target (int8 fbgemm): greedy output equal to generate() on 7 of 8 prompts, no tie.
            logger.warning(
                "the target uses fbgemm's dynamic int8 linears, which quantize activations per tensor: a token's "
                "logits then depend on the other tokens verified with it, so greedy output can differ from the "
                "target's generate() beyond near-ties. Measured greedy equality on the zoo target: "
                "weights='int4' 8 of 8 prompts, 'none' 8 of 8, int8 fbgemm 7 of 8, int8_kernel='int8pack' 4 of 8."
            )
        if isinstance(self.drafter, ModelDrafter):
            t_vocab = target.config.vocab_size
            d_vocab = self.drafter.model.config.vocab_size
            if t_vocab != d_vocab:
                raise ConfigError(f"target vocabulary {t_vocab} != draft vocabulary {d_vocab}: they must share one")

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> SpecOutput:
        """Generate up to ``max_new_tokens`` after ``input_ids`` ``[1, T]``; stops after an EOS token
        (``eos_token_id``, default: none, so that a run has a known length)."""
        _check_generate_args(input_ids, max_new_tokens, temperature)
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        sampling = Sampler(temperature, top_k, top_p, generator)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        device = model_device(self.target)
        prompt = input_ids[0].tolist()
        max_len = len(prompt) + max_new_tokens + self.config.max_draft_tokens + 2
        self.runner.reset(max_len)
        self.drafter.start(prompt, max_len)
        try:
            features = bool(getattr(self.drafter, "needs_features", False))
            gen = _Generation(prompt, list(prompt), max_new_tokens, sampling, eos, device, features)
            self._prefill(gen)
            self._speculative_decode(gen)
        finally:
            self._close()
        gen.stats.new_tokens = gen.produced
        return SpecOutput(torch.tensor([gen.sequence], dtype=input_ids.dtype, device=input_ids.device), gen.stats)

    def _prefill(self, gen: _Generation) -> None:
        """Run the whole prompt in one target pass and commit the first token, as the target's generate() would."""
        # The whole prompt in one pass, as the target's own generate() runs it, and the first token from its
        # logits: with activations rounded to int8 a prompt token computed inside a verification instead would
        # get other bits (another attention order), and greedy output could leave the target's. From then on the
        # target has processed everything but the last committed token, which opens the next verification.
        prompt_ids = torch.tensor([gen.prompt], device=gen.device)
        if gen.features:
            logits, hidden = self.runner.extend_features(prompt_ids)
            logits = logits[-1:]
        else:
            logits = self.runner.prefill(prompt_ids)
        gen.stats.target_forwards += 1
        first, _ = verify_draft(logits, [], None, gen.sampling, gen.stats)
        gen.sequence.extend(first)
        if gen.features:
            self.drafter.observe(hidden, gen.prompt[1:] + first)

    def _speculative_decode(self, gen: _Generation) -> None:
        """Draft-verify rounds until ``max_new_tokens`` are produced or an EOS token is committed."""
        schedule = _DraftSchedule(self.config)
        while gen.produced < gen.max_new_tokens and gen.sequence[-1] not in gen.eos:
            remaining = gen.max_new_tokens - gen.produced
            drafts, dists = self._draft(gen, schedule, remaining)
            new, accepted, hidden = self._verify_round(gen, drafts, dists)
            if self._commit(gen, new[:remaining], hidden):
                break
            schedule.update(len(drafts), accepted, gen.produced, gen.stats)

    def _draft(
        self, gen: _Generation, schedule: _DraftSchedule, remaining: int
    ) -> tuple[list[int], torch.Tensor | None]:
        """The drafter's proposal for this round (none while drafting is paused), timed into ``draft_seconds``."""
        started = time.perf_counter()
        budget = schedule.budget(gen.produced, remaining, gen.stats)
        drafts, dists = self.drafter.propose(gen.sequence, budget, gen.sampling) if budget > 0 else ([], None)
        gen.stats.draft_seconds += time.perf_counter() - started
        return drafts, dists

    def _verify_round(
        self, gen: _Generation, drafts: list[int], dists: torch.Tensor | None
    ) -> tuple[list[int], int, torch.Tensor | None]:
        """Check ``drafts`` with one target forward (rolled back to the kept tokens): ``(new, accepted, features)``."""
        started = time.perf_counter()
        stats = gen.stats
        committed = len(gen.sequence)
        verify_ids = torch.tensor([[gen.sequence[-1], *drafts]], device=gen.device)
        hidden = None
        if gen.features:
            logits, hidden = self.runner.extend_features(verify_ids)
        else:
            logits = self.runner.extend(verify_ids)
        stats.target_forwards += 1
        new, accepted = verify_draft(logits, drafts, dists, gen.sampling, stats)
        self.runner.rollback(committed + accepted)  # keep what the target processed of the kept tokens
        stats.verify_seconds += time.perf_counter() - started
        stats.proposed += len(drafts)
        stats.accepted += accepted
        if drafts:
            stats.draft_lengths.append(len(drafts))
        for i in range(len(drafts)):
            stats._count_position(i, i < accepted)
        return new, accepted, hidden

    def _commit(self, gen: _Generation, new: list[int], hidden: torch.Tensor | None) -> bool:
        """Append ``new`` up to its first EOS token (the drafter sees the features if it needs them); True at an EOS."""
        stop = next((i for i, t in enumerate(new) if t in gen.eos), None)
        if stop is not None:
            new = new[: stop + 1]
        gen.sequence.extend(new)
        if gen.features:
            self.drafter.observe(hidden[: len(new)], new)  # type: ignore[index]  # set whenever gen.features
        return stop is not None

    def _close(self) -> None:
        """Release the drafter's and the runner's per-generation state, also after an error."""
        self.drafter.close()
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()


def check_lossless(
    decoder: SpeculativeDecoder,
    target: Any,
    prompts: list[torch.Tensor],
    new_tokens: int,
    eos_token_id: int | list[int] | None = None,
) -> tuple[SpecStats, int]:
    """Greedy speculative output against the target's own ``generate`` on each prompt: ``(merged stats, number of
    prompts whose outputs are identical)``.

    Raises:
        RyzenOptError: an output differs with no near-tie to explain it (speculation must be lossless).
    """
    stats: SpecStats | None = None
    identical = 0
    for ids in prompts:
        out = decoder.generate(ids, new_tokens, eos_token_id=eos_token_id)
        want = target.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos_token_id)
        same = torch.equal(out.sequences, want)
        if not same and out.stats.near_ties == 0:
            raise RyzenOptError(
                f"speculative greedy output differs from the target's own on a {ids.shape[1]}-token prompt with no "
                "near-tie: a bug in the decoder or the drafter's verification; please report it"
            )
        identical += int(same)
        stats = out.stats if stats is None else stats.merge(out.stats)
    if stats is None:
        raise ConfigError("check_lossless needs at least one prompt")
    return stats, identical


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: list[int],
    generator: torch.Generator,
) -> tuple[list[int], int]:
    """The sampling rule alone (for tests and other decoders): ``target_probs`` ``[k + 1, V]`` (already warped),
    ``draft_probs`` ``[k, V]``, the ``k`` draft tokens drawn from them. Returns ``(tokens, accepted)``."""
    sampling = Sampler(1.0, None, None, generator)
    sampling.probs = lambda logits: logits  # type: ignore[method-assign]  # inputs are probabilities already
    return verify_draft(target_probs, draft_tokens, draft_probs, sampling, SpecStats())
