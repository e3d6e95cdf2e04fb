"""The feature draft's network: one Llama decoder layer over the target's own hidden states (EAGLE, Li et al. 2024).

:class:`FeatureDraft` is the trainable module (``forward`` for teacher-forced training, ``logits`` through the target's
LM head rows restricted to the draft vocabulary); :class:`FeatureDrafter` wraps a trained one as a
:class:`~ryzen_opt.optimizers.drafting.Drafter` for :class:`~ryzen_opt.optimizers.speculative.SpeculativeDecoder`.
How it is trained, saved and built for a target: :mod:`ryzen_opt.optimizers.draft`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ryzen_opt.errors import ConfigError
from ryzen_opt.ops import native
from ryzen_opt.optimizers.drafting import draft_tokens
from ryzen_opt.optimizers.kernels import Int8Linear


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@dataclass(frozen=True)
class HeadShape:
    """The target's dimensions the head is built with (read from its config)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope_theta: float
    vocab_size: int

    @classmethod
    def of(cls, config: Any) -> HeadShape:
        heads = config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return cls(
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            eps=float(getattr(config, "rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            vocab_size=config.vocab_size,
        )


class FeatureDraft(nn.Module):
    """The draft head: ``(f_t, x_{t+1}) -> f^_{t+1}`` and the draft-vocabulary logits read from it.

    ``vocab_ids`` maps a draft-vocabulary index to the target's token id. ``embed`` and ``head`` are copies of the
    target's embedding and LM-head rows, frozen. :meth:`as_drafter` gives the :class:`FeatureDrafter` that
    ``SpeculativeDecoder`` runs.
    """

    def __init__(self, shape: HeadShape, vocab_ids: torch.Tensor, embed: torch.Tensor, head: torch.Tensor) -> None:
        super().__init__()
        self.shape = shape
        d, hd = shape.hidden, shape.head_dim
        self.register_buffer("vocab_ids", vocab_ids.long().clone(), persistent=True)
        self.embed = nn.Embedding.from_pretrained(embed.detach().float().clone(), freeze=True)
        self.head = nn.Linear(d, len(vocab_ids), bias=False)
        self.head.weight = nn.Parameter(head.detach().float().clone(), requires_grad=False)
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.norm1 = _RMSNorm(d, shape.eps)
        self.q = nn.Linear(d, shape.heads * hd, bias=False)
        self.k = nn.Linear(d, shape.kv_heads * hd, bias=False)
        self.v = nn.Linear(d, shape.kv_heads * hd, bias=False)
        self.o = nn.Linear(shape.heads * hd, d, bias=False)
        self.norm2 = _RMSNorm(d, shape.eps)
        self.gate = nn.Linear(d, shape.intermediate, bias=False)
        self.up = nn.Linear(d, shape.intermediate, bias=False)
        self.down = nn.Linear(shape.intermediate, d, bias=False)
        inv = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    @property
    def config(self) -> Any:
        """What ``SpeculativeDecoder`` checks of a draft: the vocabulary it proposes from."""
        return dataclasses.replace(self.shape)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]

    def forward(
        self,
        features: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``features`` ``[B, T, d]`` and ``next_ids`` ``[B, T]`` at ``positions`` ``[T]``, after the cached ``past``
        keys/values ``[B, Hk, P, hd]`` (causal among the new ones). Returns ``(f^ [B, T, d], k, v)`` with the new keys
        and values ``[B, Hk, T, hd]``."""
        s = self.shape
        b, t, _ = features.shape
        x = self.fc(torch.cat([features, self.embed(next_ids)], dim=-1))
        h = self.norm1(x)
        q = self.q(h).view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = self.rope(positions)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        mask = None
        if t > 1:
            p = keys.shape[2] - t
            mask = torch.ones(t, keys.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=p)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=s.heads != s.kv_heads)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, -1))
        h = self.norm2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return x, k, v

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of (predicted) features."""
        return self.head(features)

    def as_drafter(self, target: Any, confidence: float = 0.0) -> FeatureDrafter:
        if target.config.vocab_size != self.shape.vocab_size:
            raise ConfigError(
                f"target vocabulary {target.config.vocab_size} != the draft's {self.shape.vocab_size}: this draft was "
                "built for another model; build one for this target with `ryzen-opt draft build MODEL`"
            )
        if target.config.hidden_size != self.shape.hidden:
            raise ConfigError(
                f"target hidden size {target.config.hidden_size} != the draft's {self.shape.hidden}: this draft was "
                "built for another model"
            )
        return FeatureDrafter(self.for_inference(), confidence)

    def for_inference(self) -> FeatureDraft:
        """A copy whose linears (head included) run the native int8 weight-only GEMV where the native kernels serve
        this CPU: at one token a step the draft is bound by reading its weights (fp32: 36 MB a step for SmolLM2's,
        3.2 ms here, 83% of it in ``aten::mm``), and the target verifies every token, so the draft's rounding changes
        acceptance, never the output. Elsewhere (GPU, no compiler), the draft itself."""

        if self.fc.weight.device.type != "cpu" or not native.preferred():
            return self
        fast = copy.deepcopy(self)
        for name in ("head", "fc", "q", "k", "v", "o", "gate", "up", "down"):
            linear = getattr(fast, name)
            setattr(fast, name, Int8Linear(linear.weight.detach(), None, "native"))
        return fast.eval()

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class FeatureDrafter:
    """Drafts from a :class:`FeatureDraft` and the target's hidden states, which ``SpeculativeDecoder`` hands it
    through :meth:`observe` after each target forward (``needs_features``).

    The draft's cache holds one entry per observed pair ``(f_t, x_{t+1})``; the entries a round drafts on its own
    predictions are dropped before the next round, so the cache only ever holds what the target computed.
    """

    needs_features = True

    def __init__(self, draft: FeatureDraft, confidence: float = 0.0) -> None:
        self.draft = draft
        self.confidence = confidence
        self.pending_f: list[torch.Tensor] = []
        self.pending_x: list[int] = []
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0  # cache entries of observed pairs
        self.last: torch.Tensor | None = None  # the newest predicted feature (after the last observed pair)

    def start(self, prompt: list[int], max_len: int) -> None:
        self.pending_f, self.pending_x = [], []
        self.keys = self.values = None
        self.length = 0
        self.last = None

    def observe(self, features: torch.Tensor, next_tokens: list[int]) -> None:
        """The target's features ``[n, d]`` of positions whose following tokens ``next_tokens`` are committed."""
        if features.shape[0] != len(next_tokens):
            raise ValueError(f"observe: {features.shape[0]} features for {len(next_tokens)} tokens")
        self.pending_f.extend(features.float())
        self.pending_x.extend(next_tokens)

    def _run(self, f: torch.Tensor, x: list[int], start: int) -> torch.Tensor:
        positions = torch.arange(start, start + len(x))
        past = None if self.keys is None else (self.keys[:, :, :start], self.values[:, :, :start])  # type: ignore[index]
        out, k, v = self.draft(f[None], torch.tensor([x]), positions, past)
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys[:, :, :start], k], 2)
            self.values = torch.cat([self.values[:, :, :start], v], 2)  # type: ignore[index]
        return out[0]

    @torch.no_grad()
    def propose(self, sequence: list[int], k: int, sampling: Any) -> tuple[list[int], torch.Tensor | None]:
        if self.pending_x:
            out = self._run(torch.stack(self.pending_f), self.pending_x, self.length)
            self.length += len(self.pending_x)
            self.pending_f, self.pending_x = [], []
            self.last = out[-1]
        if self.last is None or k < 1:
            return [], None
        state = {"feature": self.last, "position": self.length}

        def full_logits(feature: torch.Tensor) -> torch.Tensor:
            # The draft vocabulary's logits in the full vocabulary (-inf elsewhere: probability 0, never the argmax;
            # vocab_ids ascend, so a tie resolves to the same token as in the draft's own order).
            full = torch.full((self.draft.shape.vocab_size,), -math.inf)
            full[self.draft.vocab_ids] = self.draft.logits(feature).float()
            return full

        def step(token: int) -> torch.Tensor:
            state["feature"] = self._run(state["feature"][None], [token], state["position"])[-1]
            state["position"] += 1
            return full_logits(state["feature"])

        return draft_tokens(full_logits(self.last), k, sampling, self.confidence, step)

    def close(self) -> None:
        self.keys = self.values = None
        self.pending_f, self.pending_x = [], []


# ------------------------------------------------------------------------------------------------ the corpus
