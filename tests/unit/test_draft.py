"""The feature draft (``ryzen_opt.optimizers.draft``): its cache, losslessness in SpeculativeDecoder, training, the
build cache.

Why exact checks hold: the draft only proposes; the target verifies every token, so greedy output equals the target's
own whatever the draft says (up to counted near-ties). The incremental-versus-whole check is fp32 attention over the
same keys in two orders of sums: 1e-5.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ryzen_opt.errors import ConfigError, ModelLoadError
from ryzen_opt.models.cache import verify
from ryzen_opt.optimizers import draft as draft_mod
from ryzen_opt.optimizers.draft import DraftConfig, build_draft, fit_head, load_draft, save_draft
from ryzen_opt.optimizers.feature_draft import FeatureDraft, HeadShape
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer
from ryzen_opt.optimizers.speculative import SpecConfig, SpeculativeDecoder
from ryzen_opt.runtime import UnsupportedModelError

VOCAB = 64


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _draft_for(model: LlamaForCausalLM, vocab: int = VOCAB) -> FeatureDraft:
    ids = torch.arange(vocab)
    torch.manual_seed(1)
    return FeatureDraft(
        HeadShape.of(model.config), ids, model.get_input_embeddings().weight, model.get_output_embeddings().weight[ids]
    ).eval()


@torch.no_grad()
def _features(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids=ids).last_hidden_state


@pytest.fixture(scope="module")
def trained() -> tuple[LlamaForCausalLM, FeatureDraft, float, float]:
    """A tiny target and a draft trained on its features for a few seconds: (target, draft, agreement before, after)."""
    target = _llama()
    gen = torch.Generator().manual_seed(0)
    # Text with structure to learn: a random walk over a few token "phrases".
    phrases = torch.randint(2, VOCAB, (12, 6), generator=gen)
    blocks = phrases[torch.randint(0, 12, (96, 11), generator=gen)].reshape(96, 66)[:, :64]
    features = _features(target, blocks)
    head = _draft_for(target)
    before = draft_mod.agreement(head, target, blocks[-8:], features[-8:])
    config = DraftConfig(budget_seconds=1, batch_size=8, lr=3e-3)
    fit_head(head, blocks[:-8], features[:-8], config, time.perf_counter() + 4.0)
    after = draft_mod.agreement(head, target, blocks[-8:], features[-8:])
    return target, head, before, after


def test_training_raises_held_out_agreement(trained):
    _, _, before, after = trained
    assert after > before + 0.2, (before, after)


def test_incremental_draft_equals_the_whole_sequence():
    target = _llama()
    head = _draft_for(target)
    ids = torch.randint(1, VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))
    f = _features(target, ids)
    with torch.no_grad():
        whole, _, _ = head(f[:, :-1], ids[:, 1:], torch.arange(10))
        first, k, v = head(f[:, :6], ids[:, 1:7], torch.arange(6))
        rest, _, _ = head(f[:, 6:10], ids[:, 7:11], torch.arange(6, 10), (k, v))
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lean", [False, True], ids=["hf", "lean"])
def test_speculation_with_a_feature_draft_is_lossless_and_accepts(trained, lean):
    target, head, _, _ = trained
    runner_target = KernelOptimizer(KernelConfig()).apply_to_model(copy.deepcopy(target)) if lean else target
    decoder = SpeculativeDecoder(runner_target, head, SpecConfig(num_draft_tokens=3))
    accepted = 0
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, VOCAB, (1, 1 + 5 * seed), generator=gen)  # a 1-token prompt included
        out = decoder.generate(ids, max_new_tokens=24)
        want = target.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
        if not torch.equal(out.sequences, want):
            assert out.stats.near_ties > 0
        accepted += out.stats.accepted
    assert accepted > 0  # the draft drafted from the target's features and some drafts were kept


def test_sampling_with_a_feature_draft_runs_and_top_1_is_greedy(trained):
    target, head, _, _ = trained
    decoder = SpeculativeDecoder(target, head)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    a = decoder.generate(ids, 16, temperature=0.8, seed=7)
    b = decoder.generate(ids, 16, temperature=0.8, seed=7)
    assert torch.equal(a.sequences, b.sequences)
    top1 = decoder.generate(ids, 16, temperature=1.0, top_k=1, seed=1)
    want = target.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    if not torch.equal(top1.sequences, want):
        assert top1.stats.near_ties > 0


def test_save_and_load_round_trip(tmp_path, trained):
    _, head, _, _ = trained
    save_draft(head, tmp_path / "d")
    again = load_draft(tmp_path / "d")
    f = torch.randn(1, 5, 32)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.equal(head(f, ids, torch.arange(5))[0], again(f, ids, torch.arange(5))[0])
    with pytest.raises(ModelLoadError, match="not a draft directory"):
        load_draft(tmp_path / "missing")


def test_bad_input_gets_clear_errors(trained):
    target, head, _, _ = trained
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB + 1, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4)).eval()  # fmt: skip
    with pytest.raises(ConfigError, match="vocabulary"):
        SpeculativeDecoder(other, head)
    with pytest.raises(ConfigError, match="budget_seconds"):
        DraftConfig(budget_seconds=0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(UnsupportedModelError, match="RoPE"):
        draft_mod.train_draft(gpt2, _CharTokenizer(), DraftConfig(budget_seconds=5))
    with pytest.raises(ConfigError, match="budget too small"):
        draft_mod.train_draft(target, _CharTokenizer(), DraftConfig(budget_seconds=0.01, chat_tokens=0))


class _CharTokenizer:
    """A stand-in tokenizer for a tiny model: characters to ids, no chat template (so no chat answers)."""

    eos_token_id = 1
    pad_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + ord(c) % (VOCAB - 2) for c in text]}


def _build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: LlamaForCausalLM) -> tuple[Path, DraftConfig]:
    monkeypatch.setenv("RYZEN_OPT_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    target.save_pretrained(model_dir)
    config = DraftConfig(budget_seconds=4, chat_tokens=0, block_size=64, max_tokens=8192, batch_size=8)
    return model_dir, config


def test_build_caches_a_complete_draft(tmp_path, monkeypatch):
    target = _llama()
    model_dir, config = _build(tmp_path, monkeypatch, target)
    path = build_draft(model_dir, config, loader=lambda d: (target, _CharTokenizer()))
    assert verify(path) is None
    build = json.loads((path / "draft_config.json").read_text())["build"]
    assert build["steps"] >= draft_mod.MIN_STEPS
    assert 0.0 <= build["heldout_agreement"] <= 1.0
    assert isinstance(load_draft(path), FeatureDraft)
    started = time.perf_counter()
    assert build_draft(model_dir, config, loader=lambda d: pytest.fail("rebuilt a cached draft")) == path
    assert time.perf_counter() - started < 2


def test_an_interrupted_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    target = _llama()
    model_dir, config = _build(tmp_path, monkeypatch, target)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(draft_mod, "fit_head", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_draft(model_dir, config, loader=lambda d: (target, _CharTokenizer()))
    left = [p.name for p in (tmp_path / "cache" / "drafts").iterdir() if not p.name.endswith(".lock")]
    assert left == []
    with pytest.raises(ModelLoadError, match="no config.json"):
        build_draft(tmp_path / "nowhere", config)
