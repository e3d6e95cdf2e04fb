"""Sampling: the one definition of the logit warping HF ``generate`` applies (temperature, then top-k, then top-p).

The lean decode loop (:mod:`ryzen_opt.optimizers.kernels`) draws from it, and speculative decoding
(:mod:`ryzen_opt.optimizers.speculative`)
warps both models' logits with it: its rejection sampling is lossless only when the target's distribution is exactly
the one ``generate`` would sample from.
"""

from __future__ import annotations

import torch


def warped_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Probabilities over the last dimension after HF's warpers, in HF's order.

    - temperature: logits are divided by it (floored at 1e-6: a temperature of 0 is greedy, which callers decide
      before sampling);
    - top-k: all but the ``top_k`` largest scores get probability 0 (ties at the k-th are kept);
    - top-p (nucleus): the smallest set of most likely tokens whose mass reaches ``top_p`` is kept, the token that
      crosses ``top_p`` included.
    """
    scores = logits.float() / max(float(temperature), 1e-6)
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(-1)
        remove = probs.cumsum(-1) - probs > top_p  # keep the token that crosses top_p
        sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return scores.softmax(-1)


class Sampler:
    """HF's warping (:func:`warped_probs`) and the random draws, from one generator (``None``: torch's global one).

    The lean decode loop draws its tokens with it, and speculative decoding warps both models' logits and makes its
    accept/reject draws with it, so that one seed reproduces a run.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.greedy = temperature == 0
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The warped distribution over the last dimension."""
        return warped_probs(logits, self.temperature, self.top_k, self.top_p)

    def draw(self, probs: torch.Tensor) -> int:
        """One token from a distribution ``[V]`` or ``[1, V]``."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        """One draw from U[0, 1)."""
        return float(torch.rand((), generator=self.generator))

    def next_token(self, logits: torch.Tensor) -> int:
        """Greedy (temperature 0) or one warped draw from ``logits`` ``[V]`` or ``[1, V]``."""
        return int(logits.reshape(-1).argmax()) if self.greedy else self.draw(self.probs(logits))
