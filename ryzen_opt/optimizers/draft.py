"""A trained draft for a pretrained target: a feature-level draft head (EAGLE, Li et al. 2024), built here.

A real user brings a pretrained model with no smaller sibling. Untrained early exits of SmolLM2 agree with the full
model 5-16% of the time, so a draft must be trained, and on a CPU it must also be cheap. The head that fits both:

- it reads the **target's own last hidden state** ``f_t`` (after the final norm, the vector the LM head reads) and the
  embedding of the token that followed, ``x_{t+1}``; one linear layer mixes them, one Llama decoder layer (attention
  over the draft's own short cache, SwiGLU MLP) predicts the target's next hidden state ``f_{t+1}``;
- the target's LM head, restricted to the ``draft_vocab`` tokens the target emits most often on the build corpus, turns
  it into a draft token. A full 49,152-row head would cost a fifth of a target step per draft token;
- drafting continues on its own predictions: ``(f^_{t+1}, x^_{t+2}) -> f^_{t+2}``, and so on.

What is reused from the target: its token embedding and LM head rows (copied into the draft, frozen), and its hidden
states, which the verification forward computes anyway. The target's KV cache is not shared: the draft layer is not a
target layer and keeps its own (one layer, 3 KV heads: a few KB per token).

Training follows EAGLE: the target runs once over the build corpus (teacher forcing) to record ``f``; the head learns
``f_{t+1}`` (smooth L1) and the target's next-token distribution over the draft vocabulary (cross-entropy, weight
``cls_weight``), with uniform noise on its input features so that it tolerates its own errors when it drafts on its
own predictions. The corpus: held-in prose (CPython's documentation, the ``tune`` split), Python sources, and chat
answers the target itself writes to instructions (its own outputs are what the draft must predict).

Builds are deterministic for a given machine and library set, cached like the zoo (a temporary directory renamed into
place, a manifest checked on load), and bounded by ``budget_seconds``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ryzen_opt.configs import ConfigMixin
from ryzen_opt.errors import ConfigError, ModelLoadError
from ryzen_opt.locking import file_lock
from ryzen_opt.models import corpus, zoo
from ryzen_opt.models.cache import cache_root, manifest_files, verify
from ryzen_opt.models.loading import load_model
from ryzen_opt.optimizers.feature_draft import FeatureDraft, HeadShape
from ryzen_opt.runtime import SUPPORTED_MODEL_TYPES, UnsupportedModelError, model_type
from ryzen_opt.validation.reports import atomic_write_json

logger = logging.getLogger(__name__)

DRAFT_FORMAT = 1  # bump when the saved layout or the training changes meaning
WEIGHTS = "draft.pt"
CONFIG = "draft_config.json"
# A budget that leaves the head fewer training blocks or optimizer steps than these cannot give a useful draft: the
# build stops with an error saying so rather than caching a draft that only costs time.
MIN_TRAIN_BLOCKS = 8
MIN_STEPS = 20


# Held-out teacher-forced agreement that `ryzen-opt draft build smollm2 --budget B` reached, by B in seconds, on
# 2-core x86 machines (docs/draft.md: 600 and 1,200 s on Zen 3, 2026-12-01; 3,600 s on Zen 4, 2026-12-03). Each
# doubling of the budget bought 0.08-0.09. What `expected_agreement` reads; a forecast, never a measurement.
BUDGET_CURVE: tuple[tuple[float, float], ...] = ((600.0, 0.362), (1200.0, 0.441), (3600.0, 0.592))


def expected_agreement(budget_seconds: float) -> float:
    """The held-out agreement a SmolLM2 draft built in ``budget_seconds`` on two cores may expect, read off
    :data:`BUDGET_CURVE` (linear in log2 of the budget between its points, its end slopes beyond, clipped to
    [0, 1]). A forecast for the default config: other models, configs and machines differ."""
    points = sorted(BUDGET_CURVE)
    x = math.log2(max(budget_seconds, 1.0))
    xs = [math.log2(b) for b, _ in points]
    i = 0 if x <= xs[1] else len(points) - 2
    for j in range(len(points) - 1):
        if xs[j] <= x <= xs[j + 1]:
            i = j
    slope = (points[i + 1][1] - points[i][1]) / (xs[i + 1] - xs[i])
    return min(1.0, max(0.0, points[i][1] + slope * (x - xs[i])))


@dataclass(frozen=True)
class DraftConfig(ConfigMixin):
    """How :func:`build_draft` trains a feature draft. Frozen: one config, one draft.

    Attributes:
        budget_seconds: the whole build (data, target features, training); training stops when it runs out.
        data_share: the share of the budget for collecting text and the target's features (the rest trains).
        chat_tokens: tokens of chat answers the target writes itself (0: none; models without a chat template skip).
        block_size: tokens per training sequence.
        draft_vocab: the draft's vocabulary: the target's most frequent next tokens on the build corpus.
        batch_size, lr, weight_decay: AdamW on the head.
        cls_weight: weight of the next-token cross-entropy beside the feature regression (EAGLE: 0.1).
        feature_noise: uniform noise on the input features, as a fraction of their RMS (EAGLE's U(-0.1, 0.1)).
        max_tokens: at most this many corpus tokens get features (bounds memory: 4 bytes x hidden size each).
        seed: data order and initialisation.
        probes: held-out agreement measured this many times during training (the build's learning curve; 0: none).
    """

    budget_seconds: float = 1200.0
    data_share: float = 0.4
    chat_tokens: int = 8192
    block_size: int = 256
    draft_vocab: int = 8192
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    cls_weight: float = 0.1
    feature_noise: float = 0.1
    max_tokens: int = 400_000
    seed: int = 0
    probes: int = 0

    def __post_init__(self) -> None:
        if not self.budget_seconds > 0:
            raise ConfigError(f"DraftConfig.budget_seconds = {self.budget_seconds:g}: must be > 0")
        if not 0.05 <= self.data_share <= 0.9:
            raise ConfigError(f"DraftConfig.data_share = {self.data_share}: between 0.05 and 0.9")
        if self.block_size < 16 or self.batch_size < 1 or self.draft_vocab < 16 or self.max_tokens < self.block_size:
            raise ConfigError("DraftConfig: block_size >= 16, batch_size >= 1, draft_vocab >= 16, max_tokens >= block")
        if self.chat_tokens < 0 or self.lr <= 0 or self.cls_weight < 0 or self.feature_noise < 0:
            raise ConfigError("DraftConfig: chat_tokens, lr, cls_weight and feature_noise must be >= 0 (lr > 0)")


# Instructions for the chat answers the target writes itself: generic, filled from the offline corpus's topics.
_CHAT_TEMPLATES = (
    "Explain what the Python module `{name}` is used for, with a short example.",
    "Write a Python function that uses `{name}`, and explain how it works.",
    "What are common mistakes when using `{name}` in Python?",
    "Summarize the following text in a few sentences:\n\n{passage}",
    "Answer briefly: what does this part of the Python documentation say?\n\n{passage}",
    "Give three tips for writing clear, readable code.",
    "Write a short story about a programmer who learns to use `{name}`.",
    "Describe the difference between a list and a tuple, then mention `{name}`.",
)


def _chat_prompts(tokenizer: Any, count: int) -> list[list[int]]:

    names = sorted({rel.split("/")[0].removesuffix(".py") for rel, _ in corpus.corpus_files()})
    passages = [t[:600] for t in corpus.prose_texts("tune")]
    prompts = []
    for i in range(count):
        template = _CHAT_TEMPLATES[i % len(_CHAT_TEMPLATES)]
        text = template.format(name=names[(i * 7) % len(names)], passage=passages[(i * 5) % len(passages)])
        chat = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


@torch.no_grad()
def _chat_answers(model: Any, tokenizer: Any, tokens: int, deadline: float, batch: int = 16) -> list[list[int]]:
    """Greedy chat answers of the target (prompt + answer ids), ``tokens`` new tokens in all or until ``deadline``."""
    if tokens <= 0 or getattr(tokenizer, "chat_template", None) is None:
        return []
    per_answer = 160
    prompts = _chat_prompts(tokenizer, max(batch, math.ceil(tokens / per_answer)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[int]] = []
    written = 0
    for start in range(0, len(prompts), batch):
        if written >= tokens or time.perf_counter() > deadline:
            break
        group = prompts[start : start + batch]
        width = max(map(len, group))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=per_answer, do_sample=False, pad_token_id=pad
        )
        for p, row in zip(group, gen, strict=True):
            answer = row[width:].tolist()
            if tokenizer.eos_token_id in answer:
                answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
            out.append(p + answer)
            written += len(answer)
    logger.info("draft corpus: %d chat answers, %d tokens written by the target", len(out), written)
    return out


def _corpus_ids(tokenizer: Any, chat: list[list[int]], max_tokens: int) -> list[int]:
    """Chat answers, then prose and Python sources interleaved, joined by the end-of-sequence token, capped."""

    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in chat:
        ids.extend(doc)
        ids.append(sep)
    prose = corpus.prose_texts("tune")
    code = [path for rel, path in corpus.corpus_files() if not corpus.is_heldout(rel, 10)]
    for i in range(max(len(prose), len(code))):
        for text in ([prose[i]] if i < len(prose) else []) + (
            [code[i].read_text(errors="replace")] if i < len(code) else []
        ):
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids.append(sep)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


@torch.no_grad()
def _features(model: Any, blocks: torch.Tensor, deadline: float, batch: int = 8) -> torch.Tensor:
    """The target's last hidden states (after its final norm) ``[N, T, d]`` for as many blocks as time allows."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = []
    for start in range(0, len(blocks), batch):
        if out and time.perf_counter() > deadline:
            break
        out.append(base(input_ids=blocks[start : start + batch]).last_hidden_state.float())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------- training


@torch.no_grad()
def target_argmax(model: Any, features: torch.Tensor) -> torch.Tensor:
    """The target's next-token argmax (full vocabulary) at positions ``1..T-1`` of ``features`` ``[N, T, d]``:
    computed once, so that :func:`agreement` can be taken during training without paying for the full head."""
    head = model.get_output_embeddings()
    return torch.stack([head(features[i, 1:]).argmax(-1) for i in range(len(features))])


@torch.no_grad()
def agreement(
    draft: FeatureDraft, model: Any, ids: torch.Tensor, features: torch.Tensor, want: torch.Tensor | None = None
) -> float:
    """Teacher-forced first-token agreement: how often the draft's token from ``(f_t, x_{t+1})`` equals the target's
    argmax at ``t + 1`` (full vocabulary), over ``ids`` ``[N, T]`` with their ``features`` (``want``: that argmax,
    from :func:`target_argmax`, if already computed). An upper-bound estimate of the first draft position's
    acceptance; the speculative benchmark measures the real one."""
    was_training = draft.training
    draft.eval()
    want = target_argmax(model, features) if want is None else want
    positions = torch.arange(ids.shape[1] - 1)
    hits = total = 0
    for i in range(len(ids)):
        pred, _, _ = draft(features[i : i + 1, :-1], ids[i : i + 1, 1:], positions)
        tokens = draft.vocab_ids[draft.logits(pred).argmax(-1)]
        hits += int((tokens[0] == want[i]).sum())
        total += want[i].numel()
    draft.train(was_training)
    return hits / max(1, total)


def fit_head(
    draft: FeatureDraft,
    ids: torch.Tensor,
    features: torch.Tensor,
    config: DraftConfig,
    deadline: float,
    *,
    progress: bool = False,
    probe: Callable[[], float] | None = None,
    probes: int = 0,
) -> dict[str, Any]:
    """Train ``draft`` on token blocks ``ids`` ``[N, T]`` and the target's ``features`` ``[N, T, d]`` until
    ``deadline`` (``time.perf_counter()``): smooth L1 on the next feature, plus ``cls_weight`` x the cross-entropy
    against the target's next-token distribution over the draft vocabulary; noisy input features; AdamW with a
    warm-up and a cosine decay over the time left.

    ``probe`` (a held-out agreement) is taken ``probes`` times at even steps of the training time: the learning
    curve the build reports (``curve``). A point inside one build is not what a build with that smaller budget
    gives (its learning rate has not decayed yet); it shows whether the head was still learning when time ran out.
    """

    gen = torch.Generator().manual_seed(config.seed)
    params = draft.trainable()
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    rms = float(features.pow(2).mean().sqrt())
    positions = torch.arange(ids.shape[1] - 1)
    budget = max(1.0, deadline - time.perf_counter())
    bar = tqdm(total=round(budget), desc="draft: train", unit="s", dynamic_ncols=True, disable=not progress)
    started = time.perf_counter()
    steps, losses = 0, []
    curve: list[dict[str, float]] = []
    next_probe = 1
    draft.train()
    while time.perf_counter() < deadline:
        if probe is not None and probes and (time.perf_counter() - started) >= next_probe * budget / (probes + 1):
            t0 = time.perf_counter()
            curve.append({"train_seconds": t0 - started, "steps": steps, "agreement": probe()})
            deadline += time.perf_counter() - t0  # the probe's time is not the head's training time
            logger.info("draft: step %d, %.0f s of training: held-out agreement %.3f", steps, t0 - started,
                        curve[-1]["agreement"])  # fmt: skip
            next_probe += 1
        pick = torch.randint(0, len(ids), (config.batch_size,), generator=gen)
        f, x = features[pick], ids[pick]
        noise = (torch.rand(f[:, :-1].shape, generator=gen) * 2 - 1) * (config.feature_noise * rms)
        pred, _, _ = draft(f[:, :-1] + noise, x[:, 1:], positions)
        want = f[:, 1:]
        loss = F.smooth_l1_loss(pred, want)
        if config.cls_weight:
            with torch.no_grad():
                target_p = draft.logits(want).softmax(-1)
            loss = loss + config.cls_weight * -(target_p * draft.logits(pred).log_softmax(-1)).sum(-1).mean()
        # cosine decay over the time budget, after a short warm-up
        frac = (time.perf_counter() - started) / budget
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (steps + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"draft training diverged at step {steps} (loss {value}); lower DraftConfig.lr")
        losses.append(value)
        steps += 1
        bar.n = min(round(budget), round(time.perf_counter() - started))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", step=steps, refresh=False)
        bar.refresh()
    bar.close()
    draft.eval()
    return {
        "steps": steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "curve": curve,
    }


def _check_target(model: Any) -> None:
    kind = model_type(model, who="the draft builder")
    if kind == "gpt2":  # the head's attention is RoPE; GPT-2 has learned positions
        raise UnsupportedModelError(
            "the draft builder supports the RoPE decoders "
            f"({', '.join(t for t in SUPPORTED_MODEL_TYPES if t != 'gpt2')}); this model is GPT-2"
        )


def train_draft(
    model: Any, tokenizer: Any, config: DraftConfig | None = None, *, progress: bool = False
) -> tuple[FeatureDraft, dict[str, Any]]:
    """Train a :class:`FeatureDraft` for ``model`` (an HF causal LM, fp32, CPU) within ``config.budget_seconds``."""
    config = config or DraftConfig()
    _check_target(model)
    started = time.perf_counter()
    end = started + config.budget_seconds
    data_deadline = started + config.budget_seconds * config.data_share
    torch.manual_seed(config.seed)
    model.eval()
    chat = _chat_answers(
        model, tokenizer, config.chat_tokens, started + 0.5 * config.budget_seconds * config.data_share
    )
    flat = _corpus_ids(tokenizer, chat, config.max_tokens)
    n = len(flat) // config.block_size
    if n < 4:
        raise ConfigError(f"the draft corpus holds {len(flat)} tokens: fewer than 4 blocks of {config.block_size}")
    blocks = torch.tensor(flat[: n * config.block_size]).view(n, config.block_size)
    # held-out: every 16th block, for the agreement estimate; the rest trains (chat answers come first: spread them)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    blocks = blocks[order]
    features = _features(model, blocks, data_deadline)
    blocks = blocks[: len(features)]
    held = torch.arange(len(blocks)) % 16 == 0
    if int((~held).sum()) < MIN_TRAIN_BLOCKS:
        raise ConfigError(
            f"budget too small to reach a useful draft: {config.budget_seconds:g} s gave target features for "
            f"{len(blocks)} blocks of {config.block_size} tokens, fewer than {MIN_TRAIN_BLOCKS + 1}; raise "
            "budget_seconds (or data_share)"
        )
    counts = torch.bincount(blocks[~held].flatten(), minlength=model.config.vocab_size)
    vocab = min(config.draft_vocab, model.config.vocab_size)
    vocab_ids = counts.topk(vocab).indices.sort().values
    shape = HeadShape.of(model.config)
    head_w = model.get_output_embeddings().weight[vocab_ids]
    draft = FeatureDraft(shape, vocab_ids, model.get_input_embeddings().weight, head_w)
    n_train, n_held = int((~held).sum()), int(held.sum())
    data_s, train_s = time.perf_counter() - started, end - time.perf_counter()
    logger.info(
        "draft: %d training and %d held-out blocks of %d tokens with target features (%.0f s); training %.0f s",
        n_train, n_held, config.block_size, data_s, train_s,
    )  # fmt: skip
    held_ids, held_features = blocks[held], features[held]
    want = target_argmax(model, held_features)
    probe_n = min(32, len(held_ids))  # the probes' share of the held-out blocks: a few seconds each

    def probe() -> float:
        return agreement(draft, model, held_ids[:probe_n], held_features[:probe_n], want[:probe_n])

    summary = fit_head(
        draft, blocks[~held], features[~held], config, end, progress=progress, probe=probe, probes=config.probes
    )
    if summary["steps"] < MIN_STEPS:
        raise ConfigError(
            f"budget too small to reach a useful draft: {config.budget_seconds:g} s left time for "
            f"{summary['steps']} training steps, fewer than {MIN_STEPS}; raise budget_seconds (or lower data_share)"
        )
    summary["heldout_agreement"] = agreement(draft, model, held_ids, held_features, want)
    summary["blocks"] = {"train": int((~held).sum()), "heldout": int(held.sum()), "size": config.block_size}
    summary["chat_answers"] = len(chat)
    summary["draft_vocab"] = vocab
    summary["vocab_coverage"] = float(counts[vocab_ids].sum() / counts.sum())
    summary["seconds"] = time.perf_counter() - started
    logger.info("draft: held-out teacher-forced agreement %.3f", summary["heldout_agreement"])
    return draft, summary


# ------------------------------------------------------------------------------------------- saving, the cache


def save_draft(draft: FeatureDraft, path: Path, extra: dict[str, Any] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(draft.state_dict(), path / WEIGHTS)
    atomic_write_json(
        path / CONFIG, {"format": DRAFT_FORMAT, "shape": dataclasses.asdict(draft.shape), **(extra or {})}
    )


def load_draft(path: str | os.PathLike[str]) -> FeatureDraft:
    """A saved :class:`FeatureDraft` (``ryzen-opt draft build`` writes one)."""
    path = Path(path)
    try:
        meta = json.loads((path / CONFIG).read_text())
        state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{path} is not a draft directory ({exc}); build one with `ryzen-opt draft build`"
        ) from exc
    if meta.get("format") != DRAFT_FORMAT:
        raise ModelLoadError(f"{path}: draft format {meta.get('format')}, expected {DRAFT_FORMAT}: rebuild it")
    shape = HeadShape(**meta["shape"])
    draft = FeatureDraft(shape, state["vocab_ids"], state["embed.weight"], state["head.weight"])
    draft.load_state_dict(state)
    return draft.eval()


def _model_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(model_dir.glob("*")):
        if f.suffix in (".json", ".safetensors", ".txt", ".model") and f.is_file():
            digest.update(f.name.encode())
            digest.update(str(f.stat().st_size).encode())
            with open(f, "rb") as handle:
                digest.update(handle.read(1 << 20))  # the head of each file: enough to tell models apart, fast
    return digest.hexdigest()


def draft_dir(model_dir: Path, config: DraftConfig) -> Path:

    trained = {k: v for k, v in config.to_dict().items() if k != "probes"}  # probes measure, they do not train
    key = json.dumps({"model": _model_digest(model_dir), "config": trained, "format": DRAFT_FORMAT})
    return cache_root() / "drafts" / f"{model_dir.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def build_draft(
    model_dir: str | os.PathLike[str],
    config: DraftConfig | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    loader: Callable[[Path], tuple[Any, Any]] | None = None,
) -> Path:
    """Build (or find in the cache) the feature draft of the local model at ``model_dir``; return its directory.

    Interrupted builds (Ctrl-C included) leave nothing in the cache: the draft is written to a temporary directory
    and renamed into place when complete, under a file lock.
    """

    config = config or DraftConfig()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} is not a local model directory (no config.json); save_pretrained one first")
    final = draft_dir(model_dir, config)
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f"{final.name}.lock"):
        problem = None if force else (verify(final) if final.exists() else "not built yet")
        if problem is None:
            return final
        if final.exists():
            logger.warning("draft cache %s is unusable (%s): rebuilding", final, "forced" if force else problem)
            shutil.rmtree(final)
        model, tokenizer = (loader or (lambda d: load_model(d, dtype=torch.float32)))(model_dir)
        if tokenizer is None:
            raise ModelLoadError(f"{model_dir} has no tokenizer: the draft's corpus is tokenized with the target's own")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            draft, summary = train_draft(model, tokenizer, config, progress=progress)
            save_draft(draft, tmp, {"model_dir": str(model_dir), "config": config.to_dict(), "build": summary})
            atomic_write_json(tmp / "manifest.json", {"files": manifest_files(tmp)})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def reference_draft(config: DraftConfig | None = None, *, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(draft, tokenizer)``: SmolLM2-135M-Instruct's feature draft (built on first use within ``config``'s budget,
    20 minutes by default, then cached) and the target's tokenizer. Pass the draft to ``SpeculativeDecoder(target,
    draft)``; the target is ``zoo.reference_model("smollm2")``."""
    root = zoo.smollm2_dir()
    return load_draft(build_draft(root, config, progress=True)).to(device), AutoTokenizer.from_pretrained(root)
