"""The reference model for every perf gate: SmolLM2-135M-Instruct, loaded once per session, and each optimized
variant of it built once per session (``kernel_variant``): CI time goes to measuring, not to rebuilding.

Accuracy is judged on the "test" half of the held-out prose (``corpus.prose_blocks``); defaults were chosen on the
"tune" half, never on this one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ryzen_opt.measure.accuracy import MemoLogits
from ryzen_opt.models import corpus, zoo
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer


@pytest.fixture(scope="session")
def smollm2(device: torch.device) -> tuple[Any, Any]:
    """``(model, tokenizer)``: fp32, eval mode, EOS off so that measured runs generate exactly the tokens asked for.
    Tests copy the model before optimizing it (``copy.deepcopy``): this one stays the reference."""
    model, tokenizer = zoo.reference_model("smollm2", device=device)
    model.generation_config.eos_token_id = None
    return model, tokenizer


@pytest.fixture(scope="session")
def prose(smollm2: tuple[Any, Any], device: torch.device) -> torch.Tensor:
    """24 held-out blocks of 256 tokens (6,120 scored positions) of English prose, the "test" half."""
    return corpus.prose_blocks(smollm2[1], "test", blocks=24).to(device)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Speed gates are claims at 2 threads (the machine CI runs on has 2 cores); the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def kernel_variant(smollm2: tuple[Any, Any]) -> Callable[[KernelConfig], Any]:
    """``kernel_variant(config)``: SmolLM2 optimized by ``KernelOptimizer(config)``, built on a copy the first time a
    test asks for that config and shared after (the speed gate, both accuracy gates and the speculative gates use the
    same int8 model). Tests only run these models; none changes one."""
    built: dict[KernelConfig, Any] = {}

    def get(config: KernelConfig) -> Any:
        if config not in built:
            built[config] = KernelOptimizer(config).apply_to_model(copy.deepcopy(smollm2[0]))
        return built[config]

    return get


@pytest.fixture(scope="session")
def reference_logits(smollm2: tuple[Any, Any]) -> MemoLogits:
    """The fp32 reference with its logits kept per batch of held-out blocks: every accuracy gate judges its candidate
    against one forward of the reference (24 blocks: ~13 s; 72: ~40 s on 2 Zen 4 cores), not one per gate. The
    24-block ``prose`` is the first 24 of the 72-block set, so those batches are shared too. Holds up to
    72 x 256 x 49,152 float32 logits (3.6 GB) for the session."""
    return MemoLogits(smollm2[0])
