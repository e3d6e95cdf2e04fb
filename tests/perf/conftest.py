"""The reference model for every perf gate: SmolLM2-135M-Instruct, loaded once per session.

Accuracy is judged on the "test" half of the held-out prose (``corpus.prose_blocks``); defaults were chosen on the
"tune" half, never on this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from ryzen_opt.models import corpus, zoo


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
