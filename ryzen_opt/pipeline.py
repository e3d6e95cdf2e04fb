"""The orchestrator behind ``ryzen-opt run``: setup -> training -> validation -> testing -> final report.

Each stage is a function of the run context that returns what it measured. A failed stage marks the final report
INCOMPLETE with the reason, later stages are SKIPPED, and the report still holds everything measured before. Ctrl-C
is a failure too ("interrupted"): the final report is written (atomically, as every report is) before the run exits,
so no report is ever left half-written.

The config is TOML; every table maps onto one dataclass, and a wrong key or value is an error naming the key and
what is allowed (``RunConfig.from_dict``). The embedded default needs no file.
"""

from __future__ import annotations

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

from ryzen_opt.configs import ConfigMixin
from ryzen_opt.embeddings import CompressionConfig
from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.kernels import KernelConfig
from ryzen_opt.kv_cache import KVCacheConfig
from ryzen_opt.reports import SCHEMA_VERSION, atomic_write_json, environment
from ryzen_opt.speculative import SpecConfig
from ryzen_opt.system import SystemConfig

logger = logging.getLogger(__name__)


class StageStatus(str, Enum):
    DONE = "DONE"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    NOT_BUILT = "NOT_BUILT"


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ModelSection(ConfigMixin):
    """``[model]``: ``target`` is ``"zoo"`` or a local HF directory / hub id; ``draft`` is ``"zoo"`` (the zoo's
    early exit, only with the zoo target), ``"ngram"`` (prompt lookup, no model) or a directory / hub id."""

    target: str = "zoo"
    draft: str = "zoo"

    def __post_init__(self) -> None:
        if self.draft == "zoo" and self.target != "zoo":
            raise ConfigError("[model] draft = 'zoo' needs target = 'zoo'; give a draft path or 'ngram'")


@dataclass(frozen=True)
class TrainingSection(ConfigMixin):
    """``[training]``: with ``text_files``, fine-tune the target on them (``steps`` steps of ``block_size``-token
    blocks); without, the zoo recipe's own training (cached after the first run) is what this stage reports."""

    text_files: tuple[str, ...] = ()
    steps: int = 100
    batch_size: int = 8
    block_size: int = 256
    lr: float = 1e-4

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_files", tuple(self.text_files))
        if self.steps < 1 or self.batch_size < 1 or self.block_size < 8 or not self.lr > 0:
            raise ConfigError("[training] steps and batch_size must be >= 1, block_size >= 8 and lr > 0")


@dataclass(frozen=True)
class ValidationSection(ConfigMixin):
    """``[validation]``: which models to measure (``"zoo"``: the configured target; ``"134m"``: the random-weight 134M
    Llama, speed only), how many prompts, tokens and A/B pairs, held-out blocks for accuracy, KV context length."""

    models: tuple[str, ...] = ("zoo", "134m")
    prompts: int = 4
    new_tokens: int = 64
    pairs: int = 6
    accuracy_blocks: int = 64
    context_len: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        bad = sorted(set(self.models) - {"zoo", "134m"})
        if bad:
            raise ConfigError(f"[validation] models: unknown {bad}; allowed values are 'zoo', '134m'")
        if min(self.prompts, self.new_tokens, self.accuracy_blocks) < 1 or self.pairs < 3 or self.context_len < 64:
            raise ConfigError("[validation] prompts, new_tokens, accuracy_blocks >= 1, pairs >= 3, context_len >= 64")


@dataclass(frozen=True)
class TestingSection(ConfigMixin):
    """``[testing]``: run pytest on ``paths`` in a subprocess with the ryzen plugin; ``pytest_args`` are passed on
    (default: the perf gates are left out, since the validation stage just measured the same things)."""

    enabled: bool = True
    paths: tuple[str, ...] = ("tests",)
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
        allowed = (*_TOP_LEVEL, "compile_draft", *_SECTIONS)
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
        compile_draft = data.get("compile_draft", True)
        if not isinstance(compile_draft, bool):
            raise ConfigError(f"config key 'compile_draft' must be true or false, got {compile_draft!r}")
        system = SystemConfig(
            compile_draft=compile_draft,
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
        raise ConfigError(f"[{name}] {exc}") from exc


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
    validation: dict[str, Any] = field(default_factory=dict)
    validator: Any = None
    results: dict[str, StageResult] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    def say(self, message: str) -> None:
        logger.info(message)
        if self.progress is not None:
            self.progress(message)


def _setup(ctx: RunContext) -> dict[str, Any]:
    """Resolve the device, load the models, and build all four optimizers once to check each initializes."""
    from ryzen_opt import zoo
    from ryzen_opt.device import resolve_device
    from ryzen_opt.models import load_model
    from ryzen_opt.system import OptimizedSystem

    cfg = ctx.config
    ctx.device = resolve_device(cfg.device)
    if cfg.model.target == "zoo":
        ctx.say(f"zoo {cfg.zoo_recipe!r}: loading (trains on first use, ~10 min for 'default' on 2 cores)")
        ctx.target, ctx.tokenizer = zoo.reference_model("target", cfg.zoo_recipe, device=ctx.device)
    else:
        ctx.target, ctx.tokenizer = load_model(cfg.model.target, device=ctx.device)
    if cfg.model.draft == "zoo":
        ctx.draft, _ = zoo.reference_model("draft", cfg.zoo_recipe, device=ctx.device)
    elif cfg.model.draft != "ngram":
        ctx.draft, _ = load_model(cfg.model.draft, device=ctx.device, tokenizer=False)
    for model in (ctx.target, ctx.draft):
        if model is not None:
            model.generation_config.eos_token_id = None  # measured runs generate exactly the tokens asked for
    system = OptimizedSystem(ctx.target, ctx.draft, cfg.system)
    return {
        "device": str(ctx.device),
        "target": cfg.model.target,
        "draft": cfg.model.draft,
        "parameters": sum(p.numel() for p in ctx.target.parameters()),
        "applied": system.applied,
    }


def _training(ctx: RunContext) -> dict[str, Any]:
    """Fine-tune the target on the configured text files, or report the zoo recipe's training (measured when the
    zoo was trained; the report says when)."""
    cfg = ctx.config
    out = ctx.out
    out.mkdir(parents=True, exist_ok=True)
    if cfg.training.text_files:
        return _fine_tune(ctx)
    if cfg.model.target != "zoo":
        raise ConfigError("[training] text_files is empty and the target is not the zoo: nothing to train on")
    from ryzen_opt import zoo

    path = zoo.build(cfg.zoo_recipe)
    report = json.loads((path / "training_metrics_report.json").read_text())
    atomic_write_json(out / "training_metrics_report.json", report)
    build = json.loads((path / "build.json").read_text())
    return {"mode": "zoo recipe", "zoo": str(path), "recipe": cfg.zoo_recipe, "build": build}


def _fine_tune(ctx: RunContext) -> dict[str, Any]:
    from ryzen_opt.metrics import TrainingMetricsCollector
    from ryzen_opt.training import TokenBlocks, TrainConfig, train

    cfg = ctx.config.training
    texts = []
    for name in cfg.text_files:
        p = Path(name)
        if not p.is_file():
            raise ConfigError(f"[training] text_files: {name!r} does not exist")
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
    ids = ctx.tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if ids.numel() < 2 * cfg.block_size:
        raise ConfigError(
            f"[training] text_files hold {ids.numel()} tokens: need at least 2 blocks of {cfg.block_size}"
        )
    blocks = TokenBlocks(ids, cfg.block_size)
    collector = TrainingMetricsCollector(experiment_id="ryzen-opt run: fine-tune")
    config = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, progress=True)
    train(ctx.target, blocks, config, collector, device=ctx.device)
    ctx.target.eval()
    collector.export_metrics(ctx.out / "training_metrics_report.json")
    return {"mode": "fine-tune", "files": list(cfg.text_files), "tokens": int(ids.numel()), "steps": cfg.steps}


def _validate_model(ctx: RunContext, validator: Any, model_name: str) -> tuple[str, dict[str, Any]]:
    """One model's measurements (see ``_validation``); returns ``(label, measurements)``."""
    import copy

    import torch
    from transformers import DynamicCache

    from ryzen_opt import zoo
    from ryzen_opt.bench import accuracy, compare
    from ryzen_opt.embeddings import EmbeddingCompressor
    from ryzen_opt.kernels import KernelOptimizer
    from ryzen_opt.kv_cache import CachedForward, KVCacheOptimizer
    from ryzen_opt.speculative import NGramDrafter, SpeculativeDecoder
    from ryzen_opt.system import OptimizedSystem, compose

    cfg, v = ctx.config, ctx.config.validation
    baseline = "HF generate, fp32, default attention, dynamic cache"

    def tag(result: Any, optimizer: str, model: str) -> None:
        result.details.update(optimizer=optimizer, model=model)

    if model_name == "zoo":
        reference, draft, label = ctx.target, ctx.draft, "target"
        blocks = _heldout(ctx, v.accuracy_blocks)
        prompts = [blocks[i % blocks.shape[0] : i % blocks.shape[0] + 1, :32] for i in range(v.prompts)]
    else:
        reference, draft, label = zoo.llama_134m(device=ctx.device), None, "134m"
        blocks = None
        generator = torch.Generator().manual_seed(0)
        # One prompt: HF generate on the 134M takes ~2 s per 64 tokens, and the ratio is stable across prompts.
        prompts = [torch.randint(1, 32000, (1, 32), generator=generator).to(ctx.device)]
    ctx.say(f"validation [{label}]: each optimizer alone and all four together vs HF generate")
    from tqdm.auto import tqdm

    # Five timed arms, then speculative, KV memory, compression and accuracy: a bar per model.
    bar = tqdm(total=9, desc=f"validation [{label}]", unit="step", leave=False, disable=None)

    def step(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)

    speeds = compose(
        reference, draft, prompts, new_tokens=v.new_tokens, config=cfg.system, pairs=v.pairs, progress=step
    )
    model_data: dict[str, Any] = {"speedups_vs_hf": {k: m.to_dict() for k, m in speeds.items()}}
    # Which gates apply where is the issues' definition: the kernel speedup (3x) is a claim about a model big enough
    # to be bound by streaming weights (the 134M); the zoo target's 6.8M are bound by per-token overhead, so there the
    # kernels' speedup is reported (speedups_vs_hf) but not gated. Speculative decoding's gates are about a trained
    # draft (the zoo's); n-gram drafting on a random model is reported, not gated.
    if label == "134m":
        tag(validator.validate_kernel_performance(speeds["kernels"], baseline=baseline), "kernel_optimizer", label)
    tag(validator.validate_end_to_end_system(speeds["all four"], baseline=baseline), "e2e", label)
    # Speculative decoding against the target alone with the same kernels (its own baseline).
    system = OptimizedSystem(reference, draft, cfg.system)
    kernels_only = KernelOptimizer(cfg.system.kernels).apply_to_model(copy.deepcopy(reference))
    # Its own baseline: the target alone with the same kernels; so the drafting target has those kernels only too.
    draft_kernels = (
        None if draft is None else KernelOptimizer(cfg.system.draft_kernels()).apply_to_model(copy.deepcopy(draft))
    )
    spec = SpeculativeDecoder(
        kernels_only, draft_kernels if draft_kernels is not None else NGramDrafter(), cfg.system.speculative
    )
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
    model_data["speculative"] = {"stats": stats.to_dict() if stats else None, "speedup": spec_speed.to_dict()}
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
    # KV memory at the configured context, and the compression ratio.
    step("KV cache memory")
    context = min(v.context_len, getattr(reference.config, "max_position_embeddings", v.context_len))
    kv_report = KVCacheOptimizer(cfg.system.kv_cache).memory_report(reference, context, decode_steps=4)
    model_data["kv_memory"] = kv_report
    tag(
        validator.validate_kv_cache_optimization(kv_report["reduction"], context_len=context),
        "kv_cache_optimizer",
        label,
    )
    step("embedding compression")
    compressor = EmbeddingCompressor(cfg.system.embeddings)
    compressed = compressor.apply_to_model(copy.deepcopy(reference))
    model_data["compression"] = compressor.compression_report()
    tag(validator.validate_embedding_compression(model_data["compression"]["ratio"]), "embedding_compressor", label)
    # Accuracy: only a trained model's held-out text can say anything.
    if blocks is None:
        for optimizer in ("kernel_optimizer", "embedding_compressor", "kv_cache_optimizer", "e2e"):
            tag(
                validator.validate_correctness(None, reason="random weights: accuracy is measured on the zoo target"),
                optimizer,
                label,
            )
    else:
        ctx.say(f"validation [{label}]: accuracy on {blocks.shape[0]} held-out blocks")
        kv = KVCacheOptimizer(cfg.system.kv_cache)
        candidates = {
            "kernel_optimizer": kernels_only,
            "embedding_compressor": compressed,
            "kv_cache_optimizer": CachedForward(reference, lambda: kv.make_cache(reference), chunk=32),
            "e2e": system.accuracy_model(),
        }
        accuracies = {}
        for optimizer, candidate in candidates.items():
            reference_model = reference
            if optimizer == "kv_cache_optimizer":
                from transformers import DynamicCache

                reference_model = CachedForward(reference, lambda: DynamicCache(config=reference.config), chunk=32)
            m = accuracy(reference_model, candidate, blocks, reference_name="fp32 reference", candidate_name=optimizer)
            accuracies[optimizer] = m.to_dict()
            tag(validator.validate_correctness(m), optimizer, label)
        model_data["accuracy"] = accuracies
    step("accuracy")
    bar.close()
    return label, model_data


def _validation(ctx: RunContext) -> dict[str, Any]:
    """Each optimizer against its baseline and all four together against HF generate (speed, accuracy, ratio,
    KV reduction, acceptance), checked against the thresholds into ``validation_report.json``."""
    from ryzen_opt.validation import OptimizationValidator, load_thresholds

    v = ctx.config.validation
    validator = OptimizationValidator(load_thresholds(device_class=ctx.device.type), device=ctx.device)
    ctx.validator = validator
    data: dict[str, Any] = {}
    for model_name in v.models:
        label, model_data = _validate_model(ctx, validator, model_name)
        data[label] = model_data
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
    from ryzen_opt import zoo

    if ctx.config.model.target == "zoo":
        return zoo.heldout_blocks(ctx.tokenizer, ctx.config.zoo_recipe, blocks=n).to(ctx.device)
    # A local model: held-out text is the zoo's held-out files (the standard library), in its own tokenizer.
    from ryzen_opt.training import TokenBlocks

    ids = ctx.tokenizer("\n\n".join(zoo.heldout_texts(ctx.config.zoo_recipe)), return_tensors="pt").input_ids[0]
    return TokenBlocks(ids, 256).blocks[:n].to(ctx.device)


def _testing(ctx: RunContext) -> dict[str, Any]:
    """Run pytest with the ryzen plugin in a subprocess; collect its ``integration_test_report.json``."""
    t = ctx.config.testing
    if not t.enabled:
        return {"skipped": "[testing] enabled = false"}
    missing = [p for p in t.paths if not Path(p).exists()]
    if missing:
        raise ConfigError(
            f"[testing] paths {missing} do not exist (relative to {os.getcwd()}): run from the project's checkout, "
            "or point [testing] paths at your test suite, or set [testing] enabled = false"
        )
    report_dir = ctx.out / "testing"
    cmd = [sys.executable, "-m", "pytest", *t.paths, *t.pytest_args, f"--ryzen-report-dir={report_dir}"]
    ctx.say(f"testing: {' '.join(cmd)}")
    started = time.perf_counter()
    # pytest's own progress (its dots and percentages) goes to the terminal as it runs.
    proc = subprocess.run(cmd, timeout=t.timeout_s, check=False)
    report_path = report_dir / "integration_test_report.json"
    if not report_path.is_file():
        raise RyzenOptError(f"pytest exited {proc.returncode} without writing {report_path} (see its output above)")
    report = json.loads(report_path.read_text())
    atomic_write_json(ctx.out / "integration_test_report.json", report)
    counts = report["summary"]
    tail = [", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped", "errors"))]
    if proc.returncode != 0:
        raise RyzenOptError(f"pytest exited {proc.returncode}: {tail[0]}")
    return {
        "command": cmd,
        "exit_code": proc.returncode,
        "summary": tail[0] if tail else "",
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
    failed = False
    interrupted: KeyboardInterrupt | None = None
    for name, fn in STAGES:
        start = time.perf_counter()
        if failed or interrupted is not None:
            result = StageResult(name, StageStatus.SKIPPED, reason="an earlier stage failed or was interrupted")
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
        ctx.results[name] = result
        if progress is not None:
            progress(result)
    report = write_final_report(ctx)
    if interrupted is not None:
        raise interrupted
    return report


def _entries(validator: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    optimization: dict[str, dict[str, list[dict[str, Any]]]] = {}
    e2e: dict[str, list[dict[str, Any]]] = {}
    if validator is None:
        return optimization, e2e
    from ryzen_opt.validation import METRICS  # noqa: F401  (the metric names the schema knows)

    for r in validator.results:
        metric = {
            "kernel_performance": "speedup",
            "end_to_end_system": "speedup",
            "speculative_speedup": "speedup",
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
    from ryzen_opt.validation import is_failing

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
        from ryzen_opt.summary import write_summary

        report["summary_path"] = str(write_summary(report, ctx.out))
    except Exception as exc:  # noqa: BLE001 - the JSON report stands; the human summary says why it is missing
        logger.warning("no Markdown summary: %s", exc)
    report["path"] = str(path)
    return report
