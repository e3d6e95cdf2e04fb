"""The orchestrator behind ``ryzen-opt run``: setup -> training -> validation -> testing -> final report.

Each stage is a function of the run context that returns what it measured. A failed stage marks the final report
INCOMPLETE with the reason, later stages are SKIPPED, and the report still holds everything measured before. Ctrl-C
is a failure too ("interrupted"): the final report is written (atomically, as every report is) before the run exits,
so no report is ever left half-written.

The config is TOML; every table maps onto one dataclass, and a wrong key or value is an error naming the key and
what is allowed (``RunConfig.from_dict``). The embedded default needs no file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from ryzen_opt.training import distributed
from ryzen_opt.configs import ConfigMixin
from ryzen_opt.optimizers.embeddings import CompressionConfig
from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.optimizers.kernels import KernelConfig
from ryzen_opt.optimizers.kv_cache import KVCacheConfig
from ryzen_opt.validation.reports import SCHEMA_VERSION, atomic_write_json, environment
from ryzen_opt.optimizers.speculative import SpecConfig
from ryzen_opt.optimizers.system import SystemConfig

logger = logging.getLogger(__name__)


class StageStatus(str, Enum):
    DONE = "DONE"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    NOT_BUILT = "NOT_BUILT"


# ------------------------------------------------------------------------------------------------ config


# ``[model] target`` keywords; anything else is a local directory, a .gguf file or a hub id.
TARGET_KEYWORDS = ("smollm2", "zoo")
DRAFT_KEYWORDS = ("auto", "zoo", "ngram")


def _check_model_source(key: str, value: str, keywords: tuple[str, ...]) -> None:
    """A ``[model]`` value that names a local path must exist: that is the error to report, before any other."""
    from ryzen_opt.models.loading import _looks_like_path

    if value in keywords:
        return
    if not value.strip():
        raise ConfigError(f"[model] {key} is empty: give {', '.join(map(repr, keywords))}, a directory or a hub id")
    path = Path(value).expanduser()
    if path.exists():
        return
    if _looks_like_path(value) or value.endswith(".gguf"):
        raise ConfigError(
            f"[model] {key} = {value!r}: {str(path.absolute())!r} does not exist. Pass a directory written by "
            "save_pretrained() (it holds config.json), a .gguf file, a hub id ('org/name'), or one of "
            f"{', '.join(map(repr, keywords))}"
            + (" (the default: SmolLM2-135M-Instruct, the reference model)" if key == "target" else "")
        )


@dataclass(frozen=True)
class ModelSection(ConfigMixin):
    """``[model]``: ``target`` is ``"smollm2"`` (the default: SmolLM2-135M-Instruct, the real reference model,
    ``zoo.reference_model("smollm2")``), ``"zoo"`` (the tiny models trained here), or a local HF directory, a ``.gguf``
    file or a hub id. ``draft`` is ``"auto"`` (the default: the zoo's draft for the zoo target, n-gram drafting for any
    other until a trained draft exists), ``"zoo"`` (the zoo's early exit, only with the zoo target), ``"ngram"`` (prompt
    lookup, no model) or a directory / hub id. A path that does not exist is an error naming it."""

    target: str = "smollm2"
    draft: str = "auto"

    def __post_init__(self) -> None:
        _check_model_source("target", self.target, TARGET_KEYWORDS)
        _check_model_source("draft", self.draft, DRAFT_KEYWORDS)
        if self.draft == "zoo" and self.target != "zoo":
            raise ConfigError(
                f"[model] draft = 'zoo' needs target = 'zoo' (target is {self.target!r}): use draft = 'auto' "
                "or 'ngram', or give a draft model's path"
            )

    @property
    def drafter(self) -> str:
        """What drafts, ``"auto"`` resolved: ``"zoo"``, ``"ngram"``, or the draft's path / hub id."""
        if self.draft == "auto":
            return "zoo" if self.target == "zoo" else "ngram"
        return self.draft


@dataclass(frozen=True)
class TrainingSection(ConfigMixin):
    """``[training]``: fine-tune the target on ``text_files``, or, without them, on the built-in corpus (English prose
    from CPython's documentation, ``zoo.prose_texts("tune")``: the half that accuracy is never measured on). The zoo
    target without ``text_files`` is not fine-tuned: its recipe's own training (cached) is what this stage reports.

    The text is cut into ``block_size``-token blocks; the last ``heldout_blocks`` of them (at most a tenth) are held
    out, and their loss is measured before and after ``steps`` steps of ``batch_size`` blocks. The stage fails when
    the held-out loss did not go down.

    Defaults: sized for SmolLM2 (135M, fp32 training: no fast bf16 on AVX2) to take about 2 minutes on 2 idle cores
    (an estimate: six forward and backward passes over 512 tokens and two forwards over the 4 held-out blocks; on this
    machine, with another benchmark sharing both cores, the stage took 350 s). Measured on SmolLM2 and the built-in
    corpus: these defaults (6 steps, lr 1e-4) took the held-out loss from 2.492 to 2.353 (twice: 2.359 in the run); 8
    steps of 4 blocks at lr 5e-5, from 2.455 to 2.298 (on 16 held-out blocks).

    Under ``torchrun`` (docs/distributed.md) ``batch_size`` is the global batch, split over the ranks, and
    ``accumulation_steps`` splits each rank's share into micro-batches (DDP syncs on the last one); ``bucket_cap_mb``
    is DDP's gradient bucket size.
    """

    text_files: tuple[str, ...] = ()
    steps: int = 6
    batch_size: int = 2
    block_size: int = 256
    lr: float = 1e-4
    heldout_blocks: int = 4
    accumulation_steps: int = 1
    bucket_cap_mb: float = 25.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_files", tuple(self.text_files))
        if self.steps < 1 or self.batch_size < 1 or self.block_size < 8 or not self.lr > 0 or self.heldout_blocks < 1:
            raise ConfigError(
                "[training] steps, batch_size and heldout_blocks must be >= 1, block_size >= 8 and lr > 0"
            )


@dataclass(frozen=True)
class ValidationSection(ConfigMixin):
    """``[validation]``: which models to measure (``"target"``: the configured target, after training; ``"134m"``: the
    random-weight 134M Llama, speed only; ``"zoo"`` is read as ``"target"``, its old name), how many prompts, tokens and
    A/B pairs, held-out blocks for accuracy, KV context length.

    The defaults are the perf gates' 64 new tokens on one prompt with 4 rounds, and 48 held-out blocks of 256
    tokens (the stage took 6 minutes on 2 idle AVX2 cores, the compile included; the report's ``seconds`` says where
    they went): HF generate fp32 takes ~75 ms a token there and runs once per round, shared by the five arms
    (``bench.compare_arms``); accuracy runs five forwards over the held-out blocks (the reference once, memoized,
    and four candidates; ~4 minutes). Measured on the fine-tuned SmolLM2:
    with 8 or 24 blocks the int8 kernels' interval was too wide to decide a 1% gate (24: 0.46%, CI -0.35% to 1.23%,
    INCONCLUSIVE); with 48, 0.11% (-0.30% to 0.54%). With 32 new tokens the prompt pass weighed enough to keep all
    four at 2.8x where the perf gate measures 4.1x at 64.

    ``spec_task_prompts`` chat requests per task (``zoo.chat_prompts``, "test" halves) measure speculation on a
    copy-heavy set (repeat, spelling, code: gated by ``copy_speculative_speedup``) and an open one (reported), each
    answer up to ``spec_new_tokens``; 0 leaves them out. Targets without a chat template skip them.
    """

    models: tuple[str, ...] = ("target",)
    prompts: int = 1
    new_tokens: int = 64
    pairs: int = 4
    accuracy_blocks: int = 48
    context_len: int = 1024
    spec_task_prompts: int = 2
    spec_new_tokens: int = 96

    def __post_init__(self) -> None:
        if self.spec_task_prompts < 0 or self.spec_new_tokens < 1:
            raise ConfigError("[validation] spec_task_prompts >= 0 (0: not measured), spec_new_tokens >= 1")
        models = tuple(dict.fromkeys("target" if m == "zoo" else m for m in self.models))
        object.__setattr__(self, "models", models)
        bad = sorted(set(models) - {"target", "134m"})
        if bad:
            raise ConfigError(
                f"[validation] models: unknown {bad}; allowed values are 'target' (the configured [model] target), "
                "'134m' (a random-weight 134M Llama, speed only)"
            )
        if min(self.prompts, self.new_tokens, self.accuracy_blocks) < 1 or self.pairs < 3 or self.context_len < 64:
            raise ConfigError("[validation] prompts, new_tokens, accuracy_blocks >= 1, pairs >= 3, context_len >= 64")


@dataclass(frozen=True)
class TestingSection(ConfigMixin):
    """``[testing]``: run pytest in a subprocess with the ryzen plugin. Without ``paths`` (the default) it runs the
    suite that ships in the package (``pytest --pyargs ryzen_opt.selftest``, with its own ini so that the current
    directory's pytest config does not apply) on the model that was just validated, which the stage saves to
    ``<output_dir>/model``; it works from any directory. With ``paths``, it runs those (relative to the current
    directory) instead. ``pytest_args`` are passed on (default: the perf gates are left out, since the validation stage
    just measured the same things)."""

    enabled: bool = True
    paths: tuple[str, ...] = ()
    pytest_args: tuple[str, ...] = ("-m", "not perf", "-q", "-p", "no:cacheprovider")
    timeout_s: int = 1800

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "pytest_args", tuple(self.pytest_args))


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "training": TrainingSection,
    "validation": ValidationSection,
    "testing": TestingSection,
    "kernels": KernelConfig,
    "embeddings": CompressionConfig,
    "kv_cache": KVCacheConfig,
    "speculative": SpecConfig,
}
_TOP_LEVEL = ("device", "output_dir", "zoo_recipe")


@dataclass(frozen=True)
class RunConfig:
    """What ``ryzen-opt run`` does. Every field has a default, so the embedded default needs no file.

    Attributes:
        device: ``auto``, ``cpu``, ``cuda``, ``rocm`` or ``mps`` (see ``ryzen_opt.device.resolve_device``).
        output_dir: where the reports go.
        zoo_recipe: the reference-model recipe (``default`` or ``tiny``) when the target is the zoo.
        model, training, validation, testing: the tables above; kernels, embeddings, kv_cache, speculative: the four
            optimizers' configs (``KernelConfig``, ``CompressionConfig``, ``KVCacheConfig``, ``SpecConfig``).
    """

    device: str = "auto"
    output_dir: str = "ryzen_results"
    zoo_recipe: str = "default"
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    testing: TestingSection = field(default_factory=TestingSection)
    system: SystemConfig = field(default_factory=SystemConfig)

    def __post_init__(self) -> None:
        from ryzen_opt.device import DEVICE_CHOICES

        if self.device.split(":")[0] not in DEVICE_CHOICES:
            raise ConfigError(f"config key 'device' = {self.device!r}: allowed values are {', '.join(DEVICE_CHOICES)}")
        if not self.output_dir:
            raise ConfigError("config key 'output_dir' must be a non-empty path")
        if self.zoo_recipe not in ("default", "tiny"):
            raise ConfigError(f"config key 'zoo_recipe' = {self.zoo_recipe!r}: allowed values are 'default', 'tiny'")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from a parsed TOML document; unknown keys and wrong types are errors that name the key."""
        allowed = (*_TOP_LEVEL, "compile_draft", "compile_kernels", *_SECTIONS)
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}: allowed keys are {', '.join(allowed)}"
            )
        top: dict[str, Any] = {}
        for key in _TOP_LEVEL:
            if key in data:
                if not isinstance(data[key], str):
                    raise ConfigError(
                        f"config key {key!r} must be a string, got {type(data[key]).__name__} {data[key]!r}"
                    )
                top[key] = data[key]
        sections: dict[str, Any] = {}
        for name, section_cls in _SECTIONS.items():
            table = data.get(name, {})
            if not isinstance(table, Mapping):
                raise ConfigError(f"config key {name!r} must be a table ([{name}]), got {type(table).__name__}")
            sections[name] = _section(name, section_cls, table)
        flags: dict[str, bool] = {}
        for key in ("compile_draft", "compile_kernels"):
            flags[key] = data.get(key, True)
            if not isinstance(flags[key], bool):
                raise ConfigError(f"config key {key!r} must be true or false, got {flags[key]!r}")
        system = SystemConfig(
            **flags,
            kernels=sections.pop("kernels"),
            embeddings=sections.pop("embeddings"),
            kv_cache=sections.pop("kv_cache"),
            speculative=sections.pop("speculative"),
        )
        return cls(**top, **sections, system=system)

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a TOML file; a syntax error names the file and the line."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {key: getattr(self, key) for key in _TOP_LEVEL}
        for name in ("model", "training", "validation", "testing"):
            data[name] = getattr(self, name).to_dict()
        data.update(self.system.to_dict())
        return data


def _section(name: str, section_cls: Any, table: Mapping[str, Any]) -> Any:
    """One table -> its dataclass, with each value's type checked against the field's default. The four optimizer
    tables start from :class:`SystemConfig`'s defaults (e.g. int4 kernels), not from each config's own."""
    import dataclasses

    base = getattr(SystemConfig(), name, None)
    defaults = base if base is not None else section_cls()
    known = {f.name for f in fields(section_cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"[{name}] unknown key(s) {unknown}: allowed keys are {sorted(known)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(defaults, key)
        if value is None and default is None:  # an optional field left unset (TOML itself has no null)
            continue
        expected: tuple[type, ...]
        if isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, float):
            expected = (int, float)
        elif isinstance(default, int) or (default is None and key in ("max_cache_len", "rank")):
            expected = (int,)
        elif default is None:
            expected = (int, float)
        elif isinstance(default, tuple):
            expected = (list, tuple)
        else:
            expected = (type(default),)
        if isinstance(value, bool) and bool not in expected:
            expected_names = "/".join(t.__name__ for t in expected)
            raise ConfigError(f"[{name}] {key} = {value!r}: expected {expected_names}")
        if not isinstance(value, expected):
            expected_names = "/".join(dict.fromkeys("array" if t in (list, tuple) else t.__name__ for t in expected))
            raise ConfigError(f"[{name}] {key} = {value!r}: expected {expected_names}, got {type(value).__name__}")
        values[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    try:
        return dataclasses.replace(defaults, **values)
    except ConfigError as exc:
        message = str(exc)  # the sections' own checks name their table already; the optimizers' configs do not
        raise ConfigError(message if message.startswith(f"[{name}]") else f"[{name}] {message}") from exc


# ------------------------------------------------------------------------------------------------ stages


@dataclass
class StageResult:
    name: str
    status: StageStatus
    duration_s: float = 0.0
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "duration_s": round(self.duration_s, 3),
            "reason": self.reason,
            "data": self.data,
        }


@dataclass
class RunContext:
    config: RunConfig
    device: Any = None
    target: Any = None
    draft: Any = None
    tokenizer: Any = None
    variants: Any = None  # ryzen_opt.optimizers.system.Variants of the target as it is now; None once training changed it
    validation: dict[str, Any] = field(default_factory=dict)
    validator: Any = None
    results: dict[str, StageResult] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None
    dist: distributed.DistInfo = distributed.SINGLE  # this process's rank under torchrun (one process: rank 0 of 1)

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    def say(self, message: str) -> None:
        logger.info(message)
        if self.progress is not None:
            self.progress(message)


def _setup(ctx: RunContext) -> dict[str, Any]:
    """Resolve the device, load the models, and build all four optimizers (each alone and together) to check each
    initializes. What is built is kept for validation unless training changes the target."""
    from ryzen_opt.models import zoo
    from ryzen_opt.device import resolve_device
    from ryzen_opt.models.loading import load_model
    from ryzen_opt.optimizers.system import build_variants

    cfg = ctx.config
    # Under torchrun: join the process group (each rank on its own GPU, if any); one process: nothing happens.
    ctx.dist, ctx.device = distributed.start(resolve_device(cfg.device))
    if ctx.dist.active:
        ctx.say(f"distributed: rank {ctx.dist.rank} of {ctx.dist.world_size} ({ctx.dist.backend})")
    target = cfg.model.target
    # Rank 0 converts or trains a missing model into the cache; the others load what it wrote.
    with distributed.main_first(ctx.dist, "fill the model cache"):
        if target == "zoo":
            ctx.say(f"zoo {cfg.zoo_recipe!r}: loading (trains on first use, ~10 min for 'default' on 2 cores)")
            ctx.target, ctx.tokenizer = zoo.reference_model("target", cfg.zoo_recipe, device=ctx.device)
        elif target == "smollm2":
            ctx.say("SmolLM2-135M-Instruct: loading (converted from its GGUF once, ~45 s; then a few seconds)")
            ctx.target, ctx.tokenizer = zoo.reference_model("smollm2", device=ctx.device)
        else:
            ctx.target, ctx.tokenizer = load_model(target, device=ctx.device)
    if ctx.tokenizer is None:
        raise ConfigError(
            f"[model] target = {target!r} has no tokenizer files: training and validation tokenize text. Save the "
            "tokenizer beside the weights (tokenizer.save_pretrained(dir))"
        )
    if not ctx.dist.is_main:  # ranks 1.. only train: the draft and the optimizers are rank 0's
        return {"device": str(ctx.device), "target": target, "rank": ctx.dist.rank}
    drafter = cfg.model.drafter
    if drafter == "zoo":
        ctx.draft, _ = zoo.reference_model("draft", cfg.zoo_recipe, device=ctx.device)
    elif drafter != "ngram":
        ctx.draft, _ = load_model(drafter, device=ctx.device, tokenizer=False)
    for model in (ctx.target, ctx.draft):
        if model is not None:
            model.generation_config.eos_token_id = None  # measured runs generate exactly the tokens asked for
    if _fine_tunes(cfg):
        # Training changes the weights, so validation builds the variants again: here they are only built to check
        # that each optimizer initializes on this model, without any compile validation may do.
        ctx.say("setup: building the four optimizers, each alone and all together (a check; rebuilt after training)")
        unc = dataclasses.replace(cfg.system, compile_kernels=False, compile_draft=False)
        applied = build_variants(ctx.target, ctx.draft, unc).system.applied
    else:
        ctx.say("setup: building the four optimizers, each alone and all together")
        ctx.variants = build_variants(ctx.target, ctx.draft, cfg.system)
        applied = ctx.variants.system.applied
    return {
        "device": str(ctx.device),
        "target": target,
        "draft": drafter,
        "parameters": sum(p.numel() for p in ctx.target.parameters()),
        "applied": applied,
        "distributed": ctx.dist.to_dict(),
    }


def _fine_tunes(cfg: RunConfig) -> bool:
    """Whether the training stage changes the target's weights: always, but for the zoo target without text files
    (its recipe's training is reported instead)."""
    return bool(cfg.training.text_files) or cfg.model.target != "zoo"


def _training(ctx: RunContext) -> dict[str, Any]:
    """Fine-tune the target (on ``[training] text_files``, or on the built-in prose corpus for any target but the zoo),
    or report the zoo recipe's training (measured when the zoo was trained; the report says when)."""
    cfg = ctx.config
    out = ctx.out
    out.mkdir(parents=True, exist_ok=True)
    if _fine_tunes(cfg):
        ctx.variants = None  # built from the weights before training: validation builds them again, once
        return _fine_tune(ctx)
    from ryzen_opt.models import zoo

    path = zoo.build(cfg.zoo_recipe)
    report = json.loads((path / "training_metrics_report.json").read_text())
    if ctx.dist.is_main:
        atomic_write_json(out / "training_metrics_report.json", report)
    build = json.loads((path / "build.json").read_text())
    return {"mode": "zoo recipe", "zoo": str(path), "recipe": cfg.zoo_recipe, "build": build}


# The built-in fine-tuning corpus for a target without [training] text_files.
BUILTIN_CORPUS = "CPython's documentation, the 'tune' half (ryzen_opt.models.zoo.prose_texts('tune'))"


def _fine_tune(ctx: RunContext) -> dict[str, Any]:
    """Fine-tune the target on its blocks but the held-out ones; their loss must go down (else RyzenOptError)."""
    import math

    from ryzen_opt.models import zoo
    from ryzen_opt.training.metrics import EpochMetric, TrainingMetricsCollector
    from ryzen_opt.training.loop import TokenBlocks, TrainConfig, evaluate, train, use_bf16_autocast

    cfg = ctx.config.training
    if cfg.text_files:
        texts = []
        for name in cfg.text_files:
            p = Path(name)
            if not p.is_file():
                raise ConfigError(f"[training] text_files: {name!r} does not exist")
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
        ids = ctx.tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
        corpus: Any = list(cfg.text_files)
    else:
        ctx.say(f"training: no [training] text_files; fine-tuning on the built-in corpus: {BUILTIN_CORPUS}")
        ids = zoo.prose_blocks(ctx.tokenizer, "tune", blocks=None, block_size=cfg.block_size).flatten()
        corpus = BUILTIN_CORPUS
    if ids.numel() < 2 * cfg.block_size:
        raise ConfigError(
            f"[training] the text holds {ids.numel()} tokens: need at least 2 blocks of {cfg.block_size} "
            "(one to train on, one held out)"
        )
    blocks = TokenBlocks(ids, cfg.block_size).blocks
    n_heldout = max(1, min(cfg.heldout_blocks, len(blocks) // 10))
    train_blocks = TokenBlocks(blocks[:-n_heldout].flatten(), cfg.block_size)
    heldout = TokenBlocks(blocks[-n_heldout:].flatten(), cfg.block_size)
    config = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=cfg.steps // 10,
        eval_every=cfg.steps,  # one evaluation, at the end, of every held-out block
        eval_batches=math.ceil(n_heldout / cfg.batch_size),
        progress=True,
        accumulation_steps=cfg.accumulation_steps,
        bucket_cap_mb=cfg.bucket_cap_mb,
    )
    label = ctx.config.model.target
    collector = TrainingMetricsCollector(
        experiment_id="ryzen-opt run: fine-tune", model=label, batch_size=cfg.batch_size
    )
    ctx.say(
        f"training: {cfg.steps} steps of {cfg.batch_size} x {cfg.block_size} tokens on {len(train_blocks)} blocks; "
        f"held-out loss on the last {n_heldout} blocks before and after"
    )
    started = time.perf_counter()
    bf16 = use_bf16_autocast(config, ctx.device)
    before = evaluate(ctx.target, heldout.fixed_batches(config.batch_size, config.eval_batches), ctx.device, bf16)
    collector.record_epoch_metric(
        EpochMetric(
            epoch=0,
            train_loss=None,
            val_loss=before["loss"],
            accuracy=before["accuracy"],
            perplexity=before["perplexity"],
            duration_s=time.perf_counter() - started,
            extra={"step": 0.0},  # before training: the baseline the fine-tune must improve on
        )
    )
    try:
        summary = train(ctx.target, train_blocks, config, collector, heldout=heldout, device=ctx.device)
    finally:
        # Written on failure too (a NaN is then the report's anomaly), by rank 0 only: it holds every rank's
        # reduced losses and step times.
        if ctx.dist.is_main:
            collector.export_metrics(ctx.out / "training_metrics_report.json")
    ctx.target.zero_grad(set_to_none=True)
    ctx.target.eval()
    after = summary["final_eval"]
    data = {
        "mode": "fine-tune",
        "corpus": corpus,
        "tokens": int(ids.numel()),
        "train_blocks": len(train_blocks),
        "heldout_blocks": n_heldout,
        "steps": cfg.steps,
        "seconds": summary["seconds"],
        "heldout_before": before,
        "heldout_after": after,
        "world_size": summary.get("world_size", 1),
        "backend": summary.get("backend"),
    }
    if not after["loss"] < before["loss"]:
        raise RyzenOptError(
            f"fine-tuning did not lower the held-out loss: {before['loss']:.4f} before, {after['loss']:.4f} after "
            f"{cfg.steps} steps at lr {cfg.lr:g} on {len(train_blocks)} blocks ({n_heldout} held out); try a lower "
            "[training] lr, more steps, or more text"
        )
    ctx.say(f"training: held-out loss {before['loss']:.4f} -> {after['loss']:.4f}")
    return data


# A reference's logits over the held-out blocks are kept (and reused by every candidate it is compared with) up to
# this size. SmolLM2's 49,152-token vocabulary over the default 48 blocks of 256 is 2.4 GB; kept, they save three of
# the reference's fp32 passes over the blocks (~35 s each on 2 AVX2 cores). Above it, the reference runs per
# candidate: slower, never wrong.
_MEMO_BYTES = 3 << 30


def _memo_logits(model: Any, blocks: Any) -> Any:
    """``model`` as a module whose logits for each input are computed once: the fp32 reference of the kernel, the
    embedding and the end-to-end accuracy comparisons is the same forward over the same blocks. Returns ``model``
    itself when the logits of ``blocks`` would not fit in ``_MEMO_BYTES``."""
    from ryzen_opt.measure.accuracy import MemoLogits

    if blocks.numel() * model.config.vocab_size * 4 > _MEMO_BYTES:
        return model
    return MemoLogits(model)


def _speculative_workloads(ctx: RunContext, validator: Any, target: Any) -> dict[str, Any]:
    """N-gram speculation on chat requests, against ``target`` alone (the same kernels): a copy-heavy set (answers
    that copy the prompt: ``zoo.COPY_TASKS``), gated (``copy_speculative_speedup``, lossless), and an open set
    (questions), reported: prompt lookup pays where the answer repeats its prompt, and what it costs elsewhere is
    the other half of the claim."""
    from ryzen_opt.models import zoo
    from ryzen_opt.measure.timing import compare
    from ryzen_opt.optimizers.speculative import NGramDrafter, SpeculativeDecoder, check_lossless

    v, tokenizer = ctx.config.validation, ctx.tokenizer
    if v.spec_task_prompts == 0:
        why = "[validation] spec_task_prompts = 0"
    elif not getattr(tokenizer, "chat_template", None):
        why = "the target's tokenizer has no chat template, and the copy-heavy tasks are chat requests"
    else:
        why = ""
    if why:
        validator.validate_speculative_copy(None, reason=why)
        return {"skipped": why}
    eos = tokenizer.eos_token_id
    n = v.spec_task_prompts
    sets = {
        "copy-heavy": [p for task in zoo.COPY_TASKS for p in zoo.chat_prompts(tokenizer, task, "test", n=n)],
        "open": zoo.chat_prompts(tokenizer, "open", "test", n=n),
    }
    out: dict[str, Any] = {}
    for name, prompts in sets.items():
        decoder = SpeculativeDecoder(target, NGramDrafter(), ctx.config.system.speculative)
        ctx.say(f"validation: n-gram speculation on {len(prompts)} {name} chat prompts")
        stats, identical = check_lossless(decoder, target, prompts, v.spec_new_tokens, eos)
        speed = compare(
            lambda prompts=prompts: [
                target.generate(ids, max_new_tokens=v.spec_new_tokens, do_sample=False, eos_token_id=eos)
                for ids in prompts
            ],
            lambda prompts=prompts, decoder=decoder: [
                decoder.generate(ids, v.spec_new_tokens, eos_token_id=eos) for ids in prompts
            ],
            min_pairs=v.pairs,  # as the stage's other speculative figure: 4 pairs decided 1.5x (CI 1.71-1.90)
            max_pairs=v.pairs,
            warmup=1,
            baseline_name="target alone, same kernels",
            candidate_name=f"n-gram speculation ({name})",
        )
        tasks = zoo.COPY_TASKS if name == "copy-heavy" else ("open",)
        workload = (
            f"{name} chat requests ({', '.join(tasks)}; {v.spec_task_prompts} each, 'test' half), "
            f"up to {v.spec_new_tokens} new tokens, greedy"
        )
        out[name] = {
            "workload": workload,
            "stats": stats.to_dict(),
            "identical": identical,
            "prompts": len(prompts),
            "speedup": speed.to_dict(),
        }
        if name == "copy-heavy":
            validator.validate_speculative_copy(
                speed, lossless=True, baseline="target alone, same kernels", workload=workload
            )
    return out


def _validate_model(ctx: RunContext, validator: Any, model_name: str) -> tuple[str, dict[str, Any]]:
    """One model's measurements (see ``_validation``); returns ``(label, measurements)``.

    Each optimized variant is built once (``build_variants``; for the target, setup's build is reused when training
    left the target as it was) and every measurement of this model shares it.
    """
    import torch

    from ryzen_opt.models import zoo
    from ryzen_opt.measure.timing import accuracy, compare
    from ryzen_opt.optimizers.kv_cache import CachedForward, KVCacheOptimizer
    from ryzen_opt.optimizers.speculative import NGramDrafter, SpeculativeDecoder
    from ryzen_opt.optimizers.system import build_variants, compose

    cfg, v = ctx.config, ctx.config.validation
    baseline = "HF generate, fp32, default attention, dynamic cache"
    # Where the stage's minutes go, kept in the report: (phase, start) marks, one per phase.
    marks: list[tuple[str, float]] = [("build", time.perf_counter())]

    def tag(result: Any, optimizer: str, model: str) -> None:
        result.details.update(optimizer=optimizer, model=model)

    if model_name == "target":
        reference, draft, label = ctx.target, ctx.draft, "target"
        blocks = _heldout(ctx, v.accuracy_blocks)
        prompts = [blocks[i % blocks.shape[0] : i % blocks.shape[0] + 1, :32] for i in range(v.prompts)]
        if ctx.variants is None:
            ctx.say(f"validation [{label}]: building the four optimizers, each alone and all together (once)")
            ctx.variants = build_variants(reference, draft, cfg.system)
        variants = ctx.variants
    else:
        reference, draft, label = zoo.llama_134m(device=ctx.device), None, "134m"
        blocks = None
        generator = torch.Generator().manual_seed(0)
        # One prompt: HF generate on the 134M takes ~2 s per 64 tokens, and the ratio is stable across prompts.
        prompts = [torch.randint(1, 32000, (1, 32), generator=generator).to(ctx.device)]
        variants = build_variants(reference, None, cfg.system)
    ctx.say(f"validation [{label}]: each optimizer alone and all four together vs HF generate")
    from tqdm.auto import tqdm

    # The timed arms (one step: they share each round), then speculative, KV memory, compression and accuracy.
    bar = tqdm(total=5, desc=f"validation [{label}]", unit="step", leave=False, disable=None)

    def step(what: str) -> None:
        marks.append((what, time.perf_counter()))
        bar.set_postfix_str(what)
        bar.update(1)

    speeds = compose(
        reference,
        draft,
        prompts,
        new_tokens=v.new_tokens,
        config=cfg.system,
        pairs=v.pairs,
        progress=step,
        variants=variants,
    )
    model_data: dict[str, Any] = {"speedups_vs_hf": {k: m.to_dict() for k, m in speeds.items()}}
    # Which gates apply where is the issues' definition: the kernel speedup (3x) is a claim about a model big enough
    # to be bound by streaming weights (the 134M, a real target such as SmolLM2); the zoo target's 6.8M are bound by
    # per-token overhead, so there the kernels' speedup is reported (speedups_vs_hf) but not gated. Speculative
    # decoding's gates are about a trained draft (the zoo's); n-gram drafting on arbitrary text is reported, not gated.
    if label == "134m" or cfg.model.target != "zoo":
        tag(validator.validate_kernel_performance(speeds["kernels"], baseline=baseline), "kernel_optimizer", label)
    workload = f"{len(prompts)} held-out prose prompt(s) of 32 tokens, {v.new_tokens} new tokens each, greedy"
    model_data["workload"] = workload
    tag(validator.validate_end_to_end_system(speeds["all four"], baseline=baseline, workload=workload), "e2e", label)
    # Speculative decoding against its own baseline: the target alone with the same kernels, so the drafting target
    # has those kernels only too; a draft model drafts with its kernels (the system's, compiled once).
    kernels_only = variants.kernels
    drafter = variants.system.draft if variants.system.draft is not None else NGramDrafter()
    spec = SpeculativeDecoder(kernels_only, drafter, cfg.system.speculative)
    step("speculative vs the target alone")
    stats = None
    for ids in prompts:
        out = spec.generate(ids, v.new_tokens)
        stats = out.stats if stats is None else stats.merge(out.stats)
    spec_speed = compare(
        lambda: [
            kernels_only.generate(ids, max_new_tokens=v.new_tokens, min_new_tokens=v.new_tokens, do_sample=False)
            for ids in prompts
        ],
        lambda: [spec.generate(ids, v.new_tokens) for ids in prompts],
        min_pairs=v.pairs,
        max_pairs=v.pairs,
        warmup=1,
        baseline_name="target alone, same kernels",
        candidate_name="speculative decoding",
    )
    model_data["speculative"] = {
        "drafter": "draft model" if draft is not None else "n-gram prompt lookup",
        "stats": stats.to_dict() if stats else None,
        "speedup": spec_speed.to_dict(),
    }
    if draft is not None:
        tag(
            validator.validate_speculative_decoding(
                stats.acceptance_rate if stats else None,
                speedup=spec_speed,
                baseline="target alone, same kernels",
                reason=None if stats and stats.proposed else "the drafter proposed nothing",
            ),
            "speculative_decoder",
            label,
        )
        tag(validator.results[-1], "speculative_decoder", label)
    if label == "target":
        model_data["speculative_tasks"] = _speculative_workloads(ctx, validator, kernels_only)
        tag(validator.results[-1], "speculative_decoder", label)
    # KV memory at the configured context, and the compression ratio.
    step("KV cache memory")
    context = min(v.context_len, getattr(reference.config, "max_position_embeddings", v.context_len))
    kv = KVCacheOptimizer(cfg.system.kv_cache)
    kv_report = kv.memory_report(reference, context, decode_steps=4)
    model_data["kv_memory"] = kv_report
    tag(
        validator.validate_kv_cache_optimization(kv_report["reduction"], context_len=context),
        "kv_cache_optimizer",
        label,
    )
    step("embedding compression")
    model_data["compression"] = variants.embeddings_report
    tag(validator.validate_embedding_compression(model_data["compression"]["ratio"]), "embedding_compressor", label)
    # Accuracy: only a trained model's held-out text can say anything.
    step("accuracy")
    if blocks is None:
        for optimizer in ("kernel_optimizer", "embedding_compressor", "kv_cache_optimizer", "e2e"):
            tag(
                validator.validate_correctness(None, reason="random weights: accuracy is measured on the target"),
                optimizer,
                label,
            )
    else:
        ctx.say(f"validation [{label}]: accuracy on {blocks.shape[0]} held-out blocks")
        # Every candidate against the one fp32 forward (computed once, memoized). Cached candidates read their
        # cache in chunks of 64: with the quantized cache's 128-token full-precision window, the second half of
        # each 256-token block attends to quantized keys and values. (A full-precision cache read the same way
        # agrees with the plain forward to float rounding; it is no longer run as a separate reference: ~40 s.)
        plain = _memo_logits(reference, blocks)
        comparisons = {
            "kernel_optimizer": (plain, variants.kernels),
            "embedding_compressor": (plain, variants.embeddings),
            "kv_cache_optimizer": (plain, CachedForward(reference, lambda: kv.make_cache(reference), chunk=64)),
            "e2e": (plain, variants.system.accuracy_model(chunk=64)),
        }
        accuracies = {}
        for optimizer, (reference_model, candidate) in comparisons.items():
            m = accuracy(reference_model, candidate, blocks, reference_name="fp32 reference", candidate_name=optimizer)
            accuracies[optimizer] = m.to_dict()
            tag(validator.validate_correctness(m), optimizer, label)
        model_data["accuracy"] = accuracies
        model_data["accuracy_text"] = (
            "the zoo's held-out files" if cfg.model.target == "zoo" else "CPython's docs, the 'test' half"
        )
    bar.close()
    marks.append(("end", time.perf_counter()))
    model_data["seconds"] = {a: round(t1 - t0, 1) for (a, t0), (_, t1) in itertools.pairwise(marks)}
    return label, model_data


def _validation(ctx: RunContext) -> dict[str, Any]:
    """Each optimizer against its baseline and all four together against HF generate (speed, accuracy, ratio,
    KV reduction, acceptance), checked against the thresholds into ``validation_report.json``."""
    from ryzen_opt.validation.validator import OptimizationValidator, load_thresholds

    v = ctx.config.validation
    validator = OptimizationValidator(load_thresholds(device_class=ctx.device.type), device=ctx.device)
    ctx.validator = validator
    data: dict[str, Any] = {}
    try:
        for model_name in v.models:
            label, model_data = _validate_model(ctx, validator, model_name)
            data[label] = model_data
    finally:
        ctx.variants = None  # the optimized copies are not needed after validation: free their memory
    validator.export_validation_report(ctx.out / "validation_report.json")
    ctx.validation = data
    summary = validator.summary()
    failing = validator.failures("strict")
    return {
        "models": list(v.models),
        "summary": summary,
        "failing": [f"{r.name} ({r.details.get('model')})" for r in failing],
        "measurements": data,
    }


def _heldout(ctx: RunContext, n: int) -> Any:
    """Held-out blocks for accuracy: the zoo's held-out files for the zoo target; for any other target, English prose
    from CPython's docs, the half that neither training nor any default was tuned on (``zoo.prose_blocks``)."""
    from ryzen_opt.models import zoo

    if ctx.config.model.target == "zoo":
        return zoo.heldout_blocks(ctx.tokenizer, ctx.config.zoo_recipe, blocks=n).to(ctx.device)
    return zoo.prose_blocks(ctx.tokenizer, "test", blocks=n).to(ctx.device)


def _save_model(ctx: RunContext) -> Path:
    """Save the validated target (weights, tokenizer, and the run's optimizer configs as ``ryzen_opt_system.json``)
    to ``<output_dir>/model``, atomically: a temporary directory renamed into place."""
    import shutil
    import tempfile

    final = ctx.out / "model"
    ctx.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=ctx.out))
    try:
        ctx.target.save_pretrained(tmp)
        ctx.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "ryzen_opt_system.json", ctx.config.system.to_dict())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _testing(ctx: RunContext) -> dict[str, Any]:
    """Run pytest with the ryzen plugin in a subprocess; collect its ``integration_test_report.json``.

    Without ``[testing] paths``: the packaged suite (``ryzen_opt.selftest``) on the model just validated, saved to
    ``<output_dir>/model`` and named to the suite by ``$RYZEN_OPT_SELFTEST_MODEL``."""
    t = ctx.config.testing
    if not t.enabled:
        return {"skipped": "[testing] enabled = false"}
    report_dir = (ctx.out / "testing").absolute()
    # pytest runs as one process of its own: torchrun's variables would make it think it is a rank.
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    if t.paths:
        missing = [p for p in t.paths if not Path(p).exists()]
        if missing:
            raise ConfigError(
                f"[testing] paths {missing} do not exist (relative to {os.getcwd()}): point [testing] paths at your "
                "test suite, leave it empty for the packaged suite, or set [testing] enabled = false"
            )
        cmd = [sys.executable, "-m", "pytest", *t.paths, *t.pytest_args, f"--ryzen-report-dir={report_dir}"]
        suite = "paths"
    else:
        from ryzen_opt import selftest

        if ctx.target is None:
            raise RyzenOptError("no model to test: setup did not load one")
        ctx.say("testing: saving the validated model for the packaged suite")
        model_dir = _save_model(ctx).absolute()
        env[selftest.MODEL_ENV] = str(model_dir)
        ini = Path(selftest.__file__).with_name("pytest.ini")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "--pyargs",
            "ryzen_opt.selftest",
            # Its own ini and rootdir: the current directory's pytest config (addopts, plugins) is not the suite's.
            "-c",
            str(ini),
            "--rootdir",
            str(ini.parent),
            *t.pytest_args,
            f"--ryzen-report-dir={report_dir}",
        ]
        if "no:cacheprovider" not in "".join(t.pytest_args):  # pytest's cache goes with the reports, not the package
            cmd[-1:-1] = ["-o", f"cache_dir={report_dir / '.pytest_cache'}"]
        suite = f"ryzen_opt.selftest on {model_dir}"
    ctx.say(f"testing: {' '.join(cmd)}")
    report_path = report_dir / "integration_test_report.json"
    report_path.unlink(missing_ok=True)  # a report left by an earlier run must not pass for this one's
    started = time.perf_counter()
    # pytest's own progress (its dots and percentages) goes to the terminal as it runs.
    proc = subprocess.run(cmd, timeout=t.timeout_s, check=False, env=env)
    if not report_path.is_file():
        raise RyzenOptError(f"pytest exited {proc.returncode} without writing {report_path} (see its output above)")
    report = json.loads(report_path.read_text())
    atomic_write_json(ctx.out / "integration_test_report.json", report)
    counts = report["summary"]
    tail = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped", "errors"))
    if proc.returncode != 0:
        raise RyzenOptError(f"pytest exited {proc.returncode}: {tail}")
    return {
        "suite": suite,
        "command": cmd,
        "exit_code": proc.returncode,
        "summary": tail,
        "seconds": time.perf_counter() - started,
    }


StageFn = Callable[[RunContext], dict[str, Any]]
STAGES: list[tuple[str, StageFn]] = [
    ("setup", _setup),
    ("training", _training),
    ("validation", _validation),
    ("testing", _testing),
]


def run_pipeline(
    config: RunConfig,
    progress: Callable[[StageResult], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every stage in order and write ``phase2_final_report.json`` (and its Markdown summary with plots).

    Returns the final report as a dict. Its ``status`` is COMPLETE only when every stage ran and succeeded and every
    validated gate passed. A KeyboardInterrupt is recorded as the running stage's failure, the report is written,
    and the interrupt is re-raised.
    """
    ctx = RunContext(config=config, progress=say)
    try:
        ctx.dist = distributed.env_info()  # the rank is known before the group is joined: rank 0 alone writes
    except ConfigError:
        pass  # setup's distributed.start raises it again, as that stage's failure
    failed = False
    interrupted: KeyboardInterrupt | None = None
    outcome: dict[str, Any] = {"status": "FAILED", "reason": "rank 0 stopped before its final report"}
    try:
        for name, fn in STAGES:
            start = time.perf_counter()
            if failed or interrupted is not None:
                result = StageResult(name, StageStatus.SKIPPED, reason="an earlier stage failed or was interrupted")
            elif name in _MAIN_ONLY and not ctx.dist.is_main:
                result = StageResult(name, StageStatus.SKIPPED, reason=f"rank {ctx.dist.rank}: rank 0 runs {name}")
            else:
                try:
                    data = fn(ctx)
                    result = StageResult(name, StageStatus.DONE, time.perf_counter() - start, data=data)
                except RyzenOptError as exc:
                    failed = True
                    result = StageResult(name, StageStatus.FAILED, time.perf_counter() - start, reason=str(exc))
                    logger.error("stage %s failed: %s", name, exc)
                except KeyboardInterrupt as exc:
                    interrupted = exc
                    result = StageResult(
                        name, StageStatus.FAILED, time.perf_counter() - start, reason="interrupted (Ctrl-C)"
                    )
                if ctx.dist.active and name not in _MAIN_ONLY and interrupted is None:
                    # Every rank joins training's collectives: all must have got through this stage, or none goes on.
                    failed = _ranks_disagree(ctx, name, result) or failed
            ctx.results[name] = result
            if progress is not None and ctx.dist.is_main:
                progress(result)
        if not ctx.dist.is_main:
            return _wait_for_main(ctx)
        report = write_final_report(ctx)
        outcome = {
            "status": report["status"],
            "failed": [s["name"] for s in report["stages"] if s["status"] == "FAILED"],
        }
    finally:
        if ctx.dist.active and ctx.dist.is_main and distributed.joined():
            try:
                distributed.release(ctx.dist, outcome)
            except distributed.RankFailedError as exc:  # a rank that died is not waiting any more
                logger.warning("%s", exc)
        distributed.shutdown()
    if interrupted is not None:
        raise interrupted
    return report


# Stages rank 0 runs alone under torchrun; the other ranks wait for its outcome.
_MAIN_ONLY = frozenset(("validation", "testing"))


def _ranks_disagree(ctx: RunContext, name: str, result: StageResult) -> bool:
    """Whether any rank failed ``name`` (then this one fails it too, with the reason), after one collective."""
    ok = result.status is StageStatus.DONE
    try:
        every = distributed.agree(ctx.dist, ok, f"checking that every rank finished {name}")
    except distributed.RankFailedError as exc:
        every, reason = False, str(exc)
    else:
        reason = f"another rank failed its {name} (its log says why)"
    if ok and not every:
        result.status, result.reason = StageStatus.FAILED, reason
    return not every


def _wait_for_main(ctx: RunContext) -> dict[str, Any]:
    """Ranks 1..: wait while rank 0 validates, tests and writes the final report; return its outcome (no files)."""
    logger.info("rank %d: waiting for rank 0's validation and testing", ctx.dist.rank)
    try:
        outcome = distributed.wait_for_main(ctx.dist)
    except distributed.RankFailedError as exc:
        outcome = {"status": "FAILED", "reason": str(exc)}
    stages = [r.to_dict() for r in ctx.results.values()]
    failed = [s["name"] for s in stages if s["status"] == "FAILED"] + list(outcome.get("failed", []))
    return {
        "status": outcome.get("status", "FAILED"),
        "rank": ctx.dist.rank,
        "stages": stages,
        "failed": failed,
        "path": None,
        "incomplete_reasons": [outcome["reason"]] if outcome.get("reason") else [],
    }


def _entries(validator: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    optimization: dict[str, dict[str, list[dict[str, Any]]]] = {}
    e2e: dict[str, list[dict[str, Any]]] = {}
    if validator is None:
        return optimization, e2e
    from ryzen_opt.validation.validator import METRICS  # noqa: F401  (the metric names the schema knows)

    for r in validator.results:
        metric = {
            "kernel_performance": "speedup",
            "end_to_end_system": "speedup",
            "speculative_speedup": "speedup",
            "speculative_copy_speedup": "speedup",
            "embedding_compression": "compression_ratio",
            "kv_cache_optimization": "memory_reduction",
            "speculative_decoding": "acceptance_rate",
            "correctness": "accuracy_loss",
        }[r.name]
        entry = {
            "value": r.actual,
            "target": r.expected,
            "comparison": r.comparison,
            "status": r.status.value,
            "ci_low": r.ci_low,
            "ci_high": r.ci_high,
            "n": r.n,
            "baseline": r.baseline,
            "model": r.details.get("model"),
        }
        optimizer = r.details.get("optimizer", "e2e")
        if optimizer == "e2e":
            e2e.setdefault(metric, []).append(entry)
        else:
            optimization.setdefault(optimizer, {}).setdefault(metric, []).append(entry)
    return optimization, e2e


def write_final_report(ctx: RunContext) -> dict[str, Any]:
    from ryzen_opt.validation.validator import is_failing

    stages = [r.to_dict() for r in ctx.results.values()]
    reasons = [
        f"{r.name}: {r.status.value}: {r.reason}" for r in ctx.results.values() if r.status is not StageStatus.DONE
    ]
    if ctx.validator is not None:
        reasons += [
            f"gate {r.name} ({r.details.get('model')}): {r.status.value}"
            for r in ctx.validator.results
            if is_failing(r, "strict")
        ]
    optimization, e2e = _entries(ctx.validator)
    report = {
        "schema_version": SCHEMA_VERSION,
        "phase": "Phase 2: Core Optimizations",
        "status": "INCOMPLETE" if reasons else "COMPLETE",
        "incomplete_reasons": reasons,
        "completion_timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": ctx.config.to_dict(),
        "stages": stages,
        "optimization_results": optimization,
        "e2e_results": e2e,
        "environment": environment(ctx.device),
    }
    path = ctx.out / "phase2_final_report.json"
    atomic_write_json(path, report)
    try:
        from ryzen_opt.run.summary import write_summary

        report["summary_path"] = str(write_summary(report, ctx.out))
    except Exception as exc:  # noqa: BLE001 - the JSON report stands; the human summary says why it is missing
        logger.warning("no Markdown summary: %s", exc)
    report["path"] = str(path)
    return report
