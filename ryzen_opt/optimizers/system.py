"""All four optimizers composed into one generation system, and how it is measured against HF ``generate``.

The order is fixed by what each one replaces: the EmbeddingCompressor first (it needs the ``nn.Embedding`` and the
LM head ``nn.Linear``), then the KernelOptimizer (it keeps a head that is already compressed), then speculative decoding
on top, with the KVCacheOptimizer's cache as the target's cache (the lean loop attends on its stored form). The draft
gets the same kernels, not the embedding compression (see ``OptimizedSystem._optimize``). A model without a draft
drafts by n-gram lookup.

``compose`` measures each optimizer alone and all of them together against the same baseline (HF ``generate``,
fp32, its default attention and dynamic cache), because composed optimizations are known to regress. What it measures
is built once by :func:`build_variants` (each optimizer alone, and the whole system, draft compiled once), so that a
caller who measures more on the same models (``ryzen-opt run``'s validation: accuracy, speculative decoding against
the target alone) passes the same :class:`Variants` instead of building and compiling them again.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ryzen_opt.compat import cache_kwargs
from ryzen_opt.errors import ConfigError
from ryzen_opt.measure.decode import CachedForward
from ryzen_opt.measure.timing import SpeedupMeasurement, compare_arms, generate_workload
from ryzen_opt.optimizers.drafting import NGramDrafter
from ryzen_opt.optimizers.embeddings import CompressionConfig, EmbeddingCompressor
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer, kernel_report
from ryzen_opt.optimizers.kv_cache import KVCacheConfig, KVCacheOptimizer
from ryzen_opt.optimizers.speculative import SpecConfig, SpeculativeDecoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SystemConfig:
    """The four optimizers' configs. Defaults: the measured best on this CPU that keeps accuracy within 1%."""

    # int8: on SmolLM2 both widths keep top-1 within 1% (int4 with groups of 32), and the int8 kernel streams ~4x more
    # bytes per second than the int4 one on an AVX2 CPU (nibble unpacking is the bottleneck there), so int8 decodes
    # faster (benchmarks/bench_kernels.py).
    kernels: KernelConfig = field(default_factory=lambda: KernelConfig(weights="int8"))
    embeddings: CompressionConfig = field(default_factory=lambda: CompressionConfig(method="int8"))
    kv_cache: KVCacheConfig = field(default_factory=lambda: KVCacheConfig(bits=8))
    speculative: SpecConfig = field(default_factory=SpecConfig)
    compile_draft: bool = True
    # Whether the KernelOptimizer measured alone has its decode step compiled. Not by default: since the fused native
    # layers, the eager step is the faster one on CPU (SmolLM2 int8, 64 tokens after a 32-token prompt, 5 interleaved
    # rounds: eager 0.89 s, compiled 1.05 s, and the compile costs ~16 s more). The compiled step pays on GPUs, where
    # it fuses the dequantization into the matmul: set it there. The whole system's target stays eager either way.
    compile_kernels: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernels": self.kernels.to_dict(),
            "embeddings": self.embeddings.to_dict(),
            "kv_cache": self.kv_cache.to_dict(),
            "speculative": self.speculative.to_dict(),
            "compile_draft": self.compile_draft,
            "compile_kernels": self.compile_kernels,
        }

    def alone_kernels(self) -> KernelConfig:
        """The kernels of the KernelOptimizer measured alone: ``kernels``, compiled when ``compile_kernels``."""
        return dataclasses.replace(self.kernels, compile=True) if self.compile_kernels else self.kernels

    def draft_kernels(self) -> KernelConfig:
        """The draft's kernels: the target's, compiled when ``compile_draft`` (measured on the zoo draft: a step
        0.33 -> 0.17 ms, for ~6 s of compile). The target stays eager: it attends through the KV cache."""
        return dataclasses.replace(self.kernels, compile=True) if self.compile_draft else self.kernels


class OptimizedSystem:
    """A target (and draft) with all four optimizations; ``generate(ids, n)`` returns prompt + n tokens."""

    def __init__(self, target: Any, draft: Any | None, config: SystemConfig | None = None) -> None:
        self.config = config or SystemConfig()
        self.applied: dict[str, Any] = {}
        self.target = self._optimize(target, "target")
        self.draft = self._optimize(draft, "draft") if draft is not None else None
        self.kv = KVCacheOptimizer(self.config.kv_cache)
        drafter = self.draft if self.draft is not None else NGramDrafter()
        self.decoder = SpeculativeDecoder(
            self.target, drafter, self.config.speculative, target_cache_factory=self.make_cache
        )
        self.applied["kv_cache"] = self.config.kv_cache.to_dict()
        self.applied["speculative"] = {
            **self.config.speculative.to_dict(),
            "drafter": "draft model" if self.draft is not None else "n-gram prompt lookup",
        }

    def _optimize(self, model: Any, role: str) -> Any:
        model = copy.deepcopy(model)
        if role == "target":
            # The draft keeps its tables: its LM head runs at every draft step, and the KernelOptimizer's fbgemm int8
            # head is ~2x faster there than the compressed table's int8pack kernel (22 vs 43 us on the zoo's head).
            compressor = EmbeddingCompressor(self.config.embeddings)
            model = compressor.apply_to_model(model)
            self.applied["target_embeddings"] = {
                k: v for k, v in compressor.compression_report().items() if k in ("method", "tied", "ratio")
            }
        kernels = self.config.kernels if role == "target" else self.config.draft_kernels()
        model = KernelOptimizer(kernels).apply_to_model(model)
        self.applied[f"{role}_kernels"] = kernel_report(model).to_dict()
        return model

    def make_cache(self) -> Any:
        return self.kv.make_cache(self.target)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return self.decoder.generate(input_ids, max_new_tokens).sequences

    def accuracy_model(self, chunk: int = 32) -> CachedForward:
        """The optimized target read through its KV cache: what accuracy is measured on (speculative decoding
        itself is lossless: it changes which forward computes a token, not the token)."""
        return CachedForward(self.target, self.make_cache, chunk=chunk)


@dataclass
class Variants:
    """One reference model optimized each way that is measured, each built once.

    Attributes:
        reference: the model as given (fp32); not copied, never modified.
        draft: the draft model as given, or ``None`` (n-gram drafting).
        kernels: a copy of the reference with the KernelOptimizer alone (``config.alone_kernels()``).
        embeddings: a copy of the reference with the EmbeddingCompressor alone (``embeddings_report``: its
            ``compression_report()``).
        system: all four together (:class:`OptimizedSystem`); ``system.draft`` is the draft with its kernels
            (compiled when ``compile_draft``), which is also what drafts for ``kernels`` when speculative decoding is
            measured against the target alone.
    """

    reference: Any
    draft: Any | None
    kernels: Any
    embeddings: Any
    system: OptimizedSystem
    embeddings_report: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> SystemConfig:
        return self.system.config


def build_variants(reference: Any, draft: Any | None, config: SystemConfig | None = None) -> Variants:
    """Build each optimizer alone and the whole system on copies of ``reference`` (and ``draft``), once."""
    config = config or SystemConfig()
    compressor = EmbeddingCompressor(config.embeddings)
    return Variants(
        reference=reference,
        draft=draft,
        kernels=KernelOptimizer(config.alone_kernels()).apply_to_model(copy.deepcopy(reference)),
        embeddings=compressor.apply_to_model(copy.deepcopy(reference)),
        system=OptimizedSystem(reference, draft, config),
        embeddings_report=compressor.compression_report(),
    )


@dataclass
class Arm:
    name: str
    run: Callable[[], Any]


def _prompts_workload(
    generate: Callable[[torch.Tensor, int], Any], prompts: list[torch.Tensor], new: int
) -> Callable[[], None]:
    def run() -> None:
        for ids in prompts:
            generate(ids, new)

    return run


def compose(
    reference: Any,
    draft: Any | None,
    prompts: list[torch.Tensor],
    *,
    new_tokens: int = 64,
    config: SystemConfig | None = None,
    pairs: int = 6,
    max_time: float = 60.0,
    progress: Callable[[str], None] | None = None,
    variants: Variants | None = None,
) -> dict[str, SpeedupMeasurement]:
    """Speedup of each optimizer alone and of all four together against HF ``generate`` on ``reference``.

    Every arm generates exactly ``new_tokens`` greedy tokens after each prompt (EOS held off), so all do the same work.
    ``pairs`` rounds, each running the baseline once for all arms (:func:`ryzen_opt.measure.timing.compare_arms`);
    ``max_time`` is kept for callers of the per-arm version and no longer bounds anything.
    ``variants`` (from :func:`build_variants` on the same ``reference``, ``draft`` and ``config``) are measured as
    they are; without them they are built here.
    """
    if not prompts:
        raise ConfigError("compose needs at least one prompt")
    if variants is None:
        variants = build_variants(reference, draft, config)
    elif variants.reference is not reference or variants.draft is not draft:
        raise ConfigError("compose: the variants were built from other models than the reference and draft given")
    elif config is not None and config != variants.config:
        raise ConfigError("compose: the variants were built with another SystemConfig than the one given")
    config = variants.config
    baseline = _prompts_workload(lambda ids, n: generate_workload(reference, ids, n)(), prompts, new_tokens)
    kernels_only, compressed, system = variants.kernels, variants.embeddings, variants.system
    kv = KVCacheOptimizer(config.kv_cache)
    spec_plain = SpeculativeDecoder(reference, draft if draft is not None else NGramDrafter(), config.speculative)

    def hf_with_cache(ids: torch.Tensor, n: int) -> Any:
        cache = kv.make_cache(reference)
        return reference.generate(ids, **cache_kwargs(cache), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    arms = [
        Arm(
            "kernels", _prompts_workload(lambda ids, n: generate_workload(kernels_only, ids, n)(), prompts, new_tokens)
        ),
        Arm(
            "embeddings", _prompts_workload(lambda ids, n: generate_workload(compressed, ids, n)(), prompts, new_tokens)
        ),
        Arm("kv_cache", _prompts_workload(hf_with_cache, prompts, new_tokens)),
        Arm("speculative", _prompts_workload(lambda ids, n: spec_plain.generate(ids, n), prompts, new_tokens)),
        Arm("all four", _prompts_workload(system.generate, prompts, new_tokens)),
    ]
    # One baseline run per round, shared by the five arms (bench.compare_arms): HF generate fp32 is the slowest arm
    # by far, and timing it once per arm per pair made it most of the validation stage's time.
    if progress is not None:
        progress("each optimizer alone and all four, one shared HF baseline per round")
    results = compare_arms(
        baseline,
        {arm.name: arm.run for arm in arms},
        rounds=pairs,
        warmup=1,
        baseline_name="HF generate, fp32, default attention, dynamic cache",
    )
    return results
