"""``ryzen-opt run``'s configuration: one TOML table per dataclass, checked key by key.

A wrong key or value is an error naming the key and what is allowed (:meth:`RunConfig.from_dict`); the embedded
default needs no file. The four optimizer tables start from :class:`~ryzen_opt.optimizers.system.SystemConfig`'s
defaults.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ryzen_opt.configs import ConfigMixin
from ryzen_opt.device import DEVICE_CHOICES
from ryzen_opt.errors import ConfigError
from ryzen_opt.models.loading import looks_like_path
from ryzen_opt.optimizers.embeddings import CompressionConfig
from ryzen_opt.optimizers.kernels import KernelConfig
from ryzen_opt.optimizers.kv_cache import KVCacheConfig
from ryzen_opt.optimizers.speculative import SpecConfig
from ryzen_opt.optimizers.system import SystemConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# ``[model] target`` keywords; anything else is a local directory, a .gguf file or a hub id.
TARGET_KEYWORDS = ("smollm2", "zoo")
DRAFT_KEYWORDS = ("auto", "zoo", "ngram")


def _check_model_source(key: str, value: str, keywords: tuple[str, ...]) -> None:
    """A ``[model]`` value that names a local path must exist: that is the error to report, before any other."""

    if value in keywords:
        return
    if not value.strip():
        raise ConfigError(f"[model] {key} is empty: give {', '.join(map(repr, keywords))}, a directory or a hub id")
    path = Path(value).expanduser()
    if path.exists():
        return
    if looks_like_path(value) or value.endswith(".gguf"):
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
    from CPython's documentation, ``corpus.prose_texts("tune")``: the half that accuracy is never measured on). The zoo
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

    ``spec_task_prompts`` chat requests per task (``corpus.chat_prompts``, "test" halves) measure speculation on a
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
