"""Drafters: what proposes the tokens a speculative decoder verifies.

- :class:`ModelDrafter`: a smaller model's greedy continuation (a draft model, or a feature draft's head);
- :class:`NGramDrafter`: prompt lookup, copying what followed an earlier occurrence of the text's suffix (the
  longest match by default, from an incremental token index), optionally across earlier requests (``session``).

A drafter only proposes: the decoder's verification keeps the output exactly the target's own (lossless).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from ryzen_opt.errors import ConfigError
from ryzen_opt.ops.sampling import Sampler
from ryzen_opt.runtime.runner import model_device, runner_for


class Drafter(Protocol):
    """What :class:`SpeculativeDecoder` drafts with. A drafter that sets ``needs_features = True`` also gets
    ``observe(features [n, d], next_tokens)``: the target's hidden states (after its final norm) of positions whose
    following tokens are committed, from the prefill and from each verification (a feature draft,
    ``ryzen_opt.optimizers.draft``).
    """

    def propose(self, sequence: list[int], k: int, sampling: Sampler) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` draft tokens after ``sequence``, and their draft distributions ``[n, V]`` (``None``: the
        proposal is deterministic, a point mass)."""
        ...

    def start(self, prompt: list[int], max_len: int) -> None: ...

    def close(self) -> None: ...


def draft_tokens(
    logits: torch.Tensor,
    k: int,
    sampling: Sampler,
    confidence: float,
    step: Callable[[int], torch.Tensor],
) -> tuple[list[int], torch.Tensor | None]:
    """Up to ``k`` draft tokens from a model's next-token ``logits`` ``[V]``, ``step(token)`` giving the logits after
    each one: greedy argmax, or a draw from ``sampling`` (whose distributions are returned for the rejection rule).
    Drafting stops early, after the first token, where the draft's top probability is below ``confidence``."""
    drafts: list[int] = []
    dists = []
    for i in range(k):
        if sampling.greedy:
            if i and confidence and float(logits.softmax(-1).max()) < confidence:
                break
            token = int(logits.argmax())
        else:
            p = sampling.probs(logits)
            if i and confidence and float(p.max()) < confidence:
                break
            token = sampling.draw(p)
            dists.append(p)
        drafts.append(token)
        if i + 1 < k:
            logits = step(token)
    return drafts, (torch.stack(dists) if dists else None)


class ModelDrafter:
    """A draft language model (for the zoo: the target's first layers, an early exit), run through its own cache."""

    def __init__(self, model: Any, cache_factory: Callable[[], Any] | None = None, confidence: float = 0.0) -> None:
        self.model = model
        self.runner = runner_for(model, cache_factory)
        self.tokens: list[int] = []
        self.confidence = confidence

    def start(self, prompt: list[int], max_len: int) -> None:
        self.runner.reset(max_len)
        self.tokens = []

    def propose(self, sequence: list[int], k: int, sampling: Sampler) -> tuple[list[int], torch.Tensor | None]:
        # Roll back to what the draft processed that is still part of the committed sequence (keeping at least the
        # last committed token to feed, whose logits start the draft).
        common = 0
        for a, b in zip(self.tokens, sequence, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(sequence) - 1)
        self.runner.rollback(common)
        self.tokens = list(sequence[:common])
        device = model_device(self.model)
        logits = self.runner.extend(torch.tensor([sequence[common:]], device=device))[-1]
        self.tokens = list(sequence)

        def step(token: int) -> torch.Tensor:
            self.tokens.append(token)
            return self.runner.extend(torch.tensor([[token]], device=device))[-1]

        return draft_tokens(logits, k, sampling, self.confidence, step)

    def close(self) -> None:
        self.runner.close()


NGRAM_MATCHES = ("longest", "latest")


class NGramDrafter:
    """Prompt lookup: propose what followed an earlier occurrence of the text's end. No model, no cost but a search.

    Args:
        max_ngram, min_ngram: with ``match="latest"``, the suffix lengths tried, longest first; with
            ``"longest"``, ``min_ngram`` is the shortest match that drafts.
        match: ``"longest"`` (the default; on the replayed chat tasks it drafted as many tokens per target forward
            as ``"latest"`` or more: ``benchmarks/bench_draft_strategies.py``) or ``"latest"``: the latest earlier
            occurrence of the last ``max_ngram`` (down to ``min_ngram``) tokens, as HF's ``prompt_lookup_num_tokens``
            does (Saxena 2023). ``"longest"``: the earlier position whose preceding tokens match the longest suffix
            of the text (up to ``max_context``), the latest on ties, as a suffix tree finds it (SuffixDecoding,
            Oliaro et al. 2024). When a phrase occurs twice, the longer context tells which occurrence the answer is
            copying.
        session: also look up the earlier prompts and answers this drafter has seen (SuffixDecoding's history
            across requests), up to ``session_tokens`` of them: a user who edits one code base, or answers in one
            format, repeats themselves across requests.
    """

    def __init__(
        self,
        max_ngram: int = 3,
        min_ngram: int = 1,
        *,
        match: str = "longest",
        max_context: int = 64,
        session: bool = False,
        session_tokens: int = 16384,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"NGramDrafter: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if match not in NGRAM_MATCHES:
            raise ConfigError(f"NGramDrafter: match={match!r}; choose one of {NGRAM_MATCHES}")
        if max_context < 1 or session_tokens < 1:
            raise ConfigError("NGramDrafter: max_context and session_tokens must be >= 1")
        self.max_ngram, self.min_ngram, self.match = max_ngram, min_ngram, match
        self.max_context, self.session, self.session_tokens = max_context, session, session_tokens
        self._history: list[int] = []  # earlier requests' tokens (session=True)
        self._history_index: dict[int, list[int]] = {}
        self._last: list[int] = []  # the text of the request in progress, as last seen
        self._index: dict[int, list[int]] = {}  # token -> positions of the request's text with a token after them
        self._indexed = 0

    def start(self, prompt: list[int], max_len: int) -> None:
        if self.session and self._last:
            self._history = (self._history + self._last)[-self.session_tokens :]
            self._history_index = {}
            for j, token in enumerate(self._history[:-1]):
                self._history_index.setdefault(token, []).append(j)
        self._last, self._index, self._indexed = [], {}, 0

    def propose(self, sequence: list[int], k: int, sampling: Sampler) -> tuple[list[int], torch.Tensor | None]:
        self._last = sequence
        if self.match == "latest":
            return self._latest(sequence, k), None
        return self._longest(sequence, k), None

    def _latest(self, sequence: list[int], k: int) -> list[int]:
        n_tokens = len(sequence)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            tail = sequence[-n:]
            for start in range(n_tokens - n - 1, -1, -1):
                if sequence[start : start + n] == tail:
                    follow = sequence[start + n : start + n + k]
                    if follow:
                        return follow
        return []

    def _longest(self, sequence: list[int], k: int) -> list[int]:
        if len(sequence) < self._indexed:  # another text than the one indexed (a drafter driven by hand)
            self._index, self._indexed = {}, 0
        for j in range(self._indexed, len(sequence) - 1):  # positions with a token after them
            self._index.setdefault(sequence[j], []).append(j)
        self._indexed = max(self._indexed, len(sequence) - 1)
        if not sequence:
            return []
        best, best_len = None, self.min_ngram - 1
        for corpus, index in ((sequence, self._index), (self._history, self._history_index)):
            # latest first within a corpus, the request's own text before the history: ties go to the latest
            for j in reversed(index.get(sequence[-1], ())):
                limit = min(self.max_context, len(sequence), j + 1)
                length = 1
                while length < limit and corpus[j - length] == sequence[-1 - length]:
                    length += 1
                if length > best_len:
                    best, best_len = (corpus, j + 1), length
                    if length == self.max_context:
                        break
        if best is None:
            return []
        corpus, start = best
        return corpus[start : start + k]

    def close(self) -> None:
        pass
