"""Fixtures of the packaged suite: the model under test, its optimizer configs, and held-out prose in its tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ryzen_opt.errors import ModelLoadError
from ryzen_opt.measure.accuracy import MemoLogits
from ryzen_opt.models import corpus, zoo
from ryzen_opt.models.loading import load_model
from ryzen_opt.optimizers.system import SystemConfig
from ryzen_opt.run.config import RunConfig
from ryzen_opt.selftest import MODEL_ENV, SYSTEM_CONFIG_FILE

# Held-out blocks for the accuracy checks: 4 x 256 tokens keep each forward over them to seconds on SmolLM2.
PROSE_BLOCKS = 4


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """``$RYZEN_OPT_SELFTEST_MODEL``, else the reference model's directory (SmolLM2), else skip with the reason."""
    value = os.environ.get(MODEL_ENV)
    if value:
        path = Path(value).expanduser()
        if not (path / "config.json").is_file():
            pytest.fail(f"${MODEL_ENV} = {value!r} is not a save_pretrained directory (no config.json there)")
        return path

    try:
        return zoo.smollm2_dir()
    except ModelLoadError as exc:
        pytest.skip(
            f"no model to test: set ${MODEL_ENV} to a save_pretrained directory with its tokenizer (ryzen-opt run "
            f"does), or install the reference model ({exc})"
        )


@pytest.fixture(scope="session")
def loaded(model_dir: Path) -> tuple[Any, Any]:

    model, tokenizer = load_model(model_dir, device="cpu")
    if tokenizer is None:
        pytest.fail(f"{model_dir} has no tokenizer files: save the tokenizer beside the model")
    return model, tokenizer


@pytest.fixture(scope="session")
def model(loaded: tuple[Any, Any]) -> Any:
    return loaded[0]


@pytest.fixture(scope="session")
def tokenizer(loaded: tuple[Any, Any]) -> Any:
    return loaded[1]


@pytest.fixture(scope="session")
def system_config(model_dir: Path) -> Any:
    """The optimizer configs the model was validated with (saved beside it by ``ryzen-opt run``), else the defaults."""

    path = model_dir / SYSTEM_CONFIG_FILE
    if not path.is_file():
        return SystemConfig()
    return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))).system


def max_positions(model: Any) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


@pytest.fixture(scope="session")
def prose(model: Any, tokenizer: Any) -> torch.Tensor:
    """``[4, T]`` blocks of held-out English prose (CPython's docs, the half no default was tuned on)."""

    return corpus.prose_blocks(tokenizer, "test", blocks=PROSE_BLOCKS, block_size=min(256, max_positions(model) // 2))


@pytest.fixture(scope="session")
def reference(model: Any) -> MemoLogits:
    return MemoLogits(model)
