"""pytest_ryzen's public helpers: exported lazily (``import pytest_ryzen`` stays torch-free), and each the measurement
ryzen-opt's own gates use, on a tiny random model and a real (byte-level) tokenizer built offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import pytest_ryzen
from pytest_ryzen import helpers
from ryzen_opt.errors import ConfigError
from ryzen_opt.measure import memory
from ryzen_opt.models import corpus

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ("decode_workload", "heldout_blocks", "model_bytes")


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer with one token per byte (GPT-2's byte alphabet, no merges) and an end-of-sequence token:
    built in milliseconds, no download."""
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("module", ["pytest_ryzen", "pytest_ryzen.plugin"])
def test_importing_the_plugin_package_does_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"importing {module} imported torch" + done.stderr


def test_the_helpers_are_exported_lazily_from_the_package() -> None:
    for name in HELPERS:
        assert name in pytest_ryzen.__all__
        assert name in dir(pytest_ryzen)
        assert getattr(pytest_ryzen, name) is getattr(helpers, name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        pytest_ryzen.nothing_here  # noqa: B018


def test_the_helpers_import_from_the_package_by_name() -> None:
    code = (
        "import sys, pytest_ryzen\n"
        "assert 'torch' not in sys.modules\n"
        "from pytest_ryzen import decode_workload, heldout_blocks, model_bytes\n"
        "assert 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_helper_shows_an_example() -> None:
    for name in HELPERS:
        assert "Example::" in (getattr(helpers, name).__doc__ or ""), name


def test_decode_workload_generates_exactly_new_tokens_with_generate_kwargs(tiny: LlamaForCausalLM) -> None:
    prompt = torch.tensor([[1, 2, 3]])
    plain = pytest_ryzen.decode_workload(tiny, prompt, 5)()
    static = pytest_ryzen.decode_workload(tiny, prompt, 5, cache_implementation="static")()
    assert plain.shape == (1, 8)
    assert torch.equal(plain, static)
    with pytest.raises(ConfigError, match="max_new_tokens=9"):
        pytest_ryzen.decode_workload(tiny, prompt, 5, max_new_tokens=9)


def test_model_bytes_counts_a_tied_head_once(tiny: LlamaForCausalLM) -> None:
    stored = sum(t.numel() * t.element_size() for t in [*tiny.parameters(), *tiny.buffers()])
    assert pytest_ryzen.model_bytes(tiny) == stored == memory.model_bytes(tiny)


def test_heldout_blocks_are_the_test_split_of_the_prose(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    blocks = pytest_ryzen.heldout_blocks(byte_tokenizer)
    assert blocks.shape == (24, 256)
    assert blocks.dtype == torch.long
    assert torch.equal(blocks, corpus.prose_blocks(byte_tokenizer, "test", blocks=24, block_size=256))
    first = corpus.prose_texts("test")[0]
    assert byte_tokenizer.decode(blocks[0]) == first[:256]  # one byte a token: the first 256 characters (ASCII)


def test_heldout_blocks_take_their_size_and_the_tune_split(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    tune = pytest_ryzen.heldout_blocks(byte_tokenizer, blocks=4, block_size=64, split="tune")
    test = pytest_ryzen.heldout_blocks(byte_tokenizer, 4, 64)
    assert tune.shape == test.shape == (4, 64)
    assert not torch.equal(tune, test)
    assert byte_tokenizer.decode(tune[0]) == corpus.prose_texts("tune")[0][:64]
    with pytest.raises(ConfigError, match="choose one of"):
        pytest_ryzen.heldout_blocks(byte_tokenizer, split="train")
    with pytest.raises(ConfigError, match="not 100000"):
        pytest_ryzen.heldout_blocks(byte_tokenizer, blocks=100_000)


def test_the_prose_corpus_names_its_licence() -> None:
    assert "PSF License Version 2" in corpus.PROSE_LICENCE
    assert "pydoc_data.topics" in corpus.PROSE_LICENCE
    doc = " ".join((corpus.prose_blocks.__doc__ or "").split())  # words, whatever the line breaks
    for words in ("pydoc_data.topics", "Python Software Foundation License Version 2", '"tune"', '"test"'):
        assert words in doc
    assert 'split="tune"' in " ".join((helpers.heldout_blocks.__doc__ or "").split())


def test_decode_path_reads_one_token_per_forward_and_matches_the_prefill(tiny: LlamaForCausalLM) -> None:
    from pytest_ryzen import decode_path

    ids = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    calls: list[int] = []

    def count(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args[0] if args else kwargs["input_ids"]).shape[1])

    with torch.no_grad():
        prefill = tiny(input_ids=ids).logits
        hook = tiny.register_forward_pre_hook(count, with_kwargs=True)  # the fixture is shared: removed below
        try:
            decoded = decode_path(tiny)(ids).logits
        finally:
            hook.remove()
    assert calls == [1] * 12  # one token a forward, through the cache
    # fp32, the same weights, another summation order: equal to float rounding (the cache itself is exact)
    torch.testing.assert_close(decoded, prefill, rtol=1e-4, atol=1e-4)
