"""generate_workload (exactly ``new_tokens`` tokens, generate's arguments passed through) and model_bytes (every
stored tensor, each storage once), on tiny random models built in milliseconds."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from ryzen_opt.errors import ConfigError, MeasurementError
from ryzen_opt.measure.memory import model_bytes
from ryzen_opt.measure.timing import generate_workload
from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer

VOCAB = 128
NEW = 6


def _llama(**extra: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _llama()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))


def _spy(model: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the keyword arguments of every ``model.generate`` call (the instance's, still running the real one)."""
    seen: list[dict[str, Any]] = []
    real = model.generate

    def generate(ids: torch.Tensor, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(ids, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return seen


def test_existing_callers_get_exactly_new_tokens_greedy(model: LlamaForCausalLM, prompt: torch.Tensor) -> None:
    out = generate_workload(model, prompt, NEW)()
    assert out.shape == (1, prompt.shape[1] + NEW)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)


def test_generate_kwargs_reach_generate_and_the_length_is_still_forced(
    model: LlamaForCausalLM, prompt: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy(model, monkeypatch)
    greedy = generate_workload(model, prompt, NEW)()
    static = generate_workload(model, prompt, NEW, cache_implementation="static", do_sample=False)()
    assert seen[1]["cache_implementation"] == "static"
    assert seen[1]["max_new_tokens"] == seen[1]["min_new_tokens"] == NEW
    assert torch.equal(static, greedy)  # the same greedy tokens through a static cache


def test_eos_is_held_off_even_when_passed(model: LlamaForCausalLM, prompt: torch.Tensor) -> None:
    first = int(generate_workload(model, prompt, 1)()[0, -1])  # the token greedy decoding emits next
    out = generate_workload(model, prompt, NEW, eos_token_id=first)()
    assert out.shape[1] == prompt.shape[1] + NEW


def test_sampling_can_be_asked_for(model: LlamaForCausalLM, prompt: torch.Tensor) -> None:
    torch.manual_seed(3)
    out = generate_workload(model, prompt, NEW, do_sample=True, top_k=0, temperature=5.0)()
    assert out.shape[1] == prompt.shape[1] + NEW


def test_a_generate_output_is_returned_and_checked(model: LlamaForCausalLM, prompt: torch.Tensor) -> None:
    out = generate_workload(model, prompt, NEW, return_dict_in_generate=True, output_scores=True)()
    assert out.sequences.shape[1] == prompt.shape[1] + NEW
    assert len(out.scores) == NEW


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_a_given_cache_is_reset_before_every_call_and_left_filled(
    model: LlamaForCausalLM, prompt: torch.Tensor, name: str
) -> None:
    """A second generate into the filled cache would continue from the first call's tokens: different work."""
    cache = DynamicCache(config=model.config)
    run = generate_workload(model, prompt, NEW, **{name: cache})
    first, second = run(), run()
    assert torch.equal(first, second)
    assert torch.equal(first, generate_workload(model, prompt, NEW)())
    assert cache.get_seq_length() == prompt.shape[1] + NEW - 1  # the last token is emitted, never fed back


def test_a_static_cache_object_is_reused(model: LlamaForCausalLM, prompt: torch.Tensor) -> None:
    cache = StaticCache(config=model.config, max_cache_len=32)
    run = generate_workload(model, prompt, NEW, past_key_values=cache)
    assert torch.equal(run(), run())


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_new_tokens": NEW + 1}, "max_new_tokens=7"),
        ({"min_new_tokens": 2}, "min_new_tokens=2"),
        ({"max_length": 50}, "max_length=50"),
        ({"min_length": 3}, "min_length=3"),
    ],
)
def test_a_conflicting_length_is_a_clear_error(
    model: LlamaForCausalLM, prompt: torch.Tensor, kwargs: dict[str, int], named: str
) -> None:
    with pytest.raises(ConfigError, match=f"exactly new_tokens={NEW} new tokens; {named}"):
        generate_workload(model, prompt, NEW, **kwargs)


def test_the_same_length_again_is_no_conflict(model: LlamaForCausalLM, prompt: torch.Tensor) -> None:
    out = generate_workload(model, prompt, NEW, max_new_tokens=NEW, min_new_tokens=NEW)()
    assert out.shape[1] == prompt.shape[1] + NEW


@pytest.mark.parametrize("new_tokens", [0, -1, 2.5, True])
def test_new_tokens_must_be_a_positive_integer(model: LlamaForCausalLM, prompt: torch.Tensor, new_tokens: Any) -> None:
    with pytest.raises(ConfigError, match="new_tokens must be an integer >= 1"):
        generate_workload(model, prompt, new_tokens)


def test_a_cache_that_holds_tokens_or_cannot_reset_is_refused(model: LlamaForCausalLM, prompt: torch.Tensor) -> None:
    cache = DynamicCache(config=model.config)
    generate_workload(model, prompt, 2, past_key_values=cache)()
    with pytest.raises(ConfigError, match="already holds 6 tokens"):
        generate_workload(model, prompt, NEW, past_key_values=cache)
    with pytest.raises(ConfigError, match="has no reset"):
        generate_workload(model, prompt, NEW, past_key_values=object())
    with pytest.raises(ConfigError, match="both `cache` and `past_key_values`"):
        generate_workload(model, prompt, NEW, past_key_values=None, cache=None)


def test_a_decode_that_stops_early_fails_loudly(model: LlamaForCausalLM, prompt: torch.Tensor) -> None:
    class Short:
        generation_config = None

        def generate(self, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.cat([ids, ids[:, :1]], dim=1)  # one token, whatever was asked

    with pytest.raises(MeasurementError, match="produced 1 new tokens, not 6"):
        generate_workload(Short(), prompt, NEW)()


# -- model_bytes ------------------------------------------------------------------------------------------------------
def _param_and_buffer_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_model_bytes_counts_parameters_and_buffers() -> None:
    linear = torch.nn.Linear(4, 2)
    linear.register_buffer("table", torch.zeros(3, dtype=torch.int8), persistent=False)
    assert model_bytes(linear) == (8 + 2) * 4 + 3


def test_a_tied_embedding_is_counted_once() -> None:
    tied, untied = _llama(tie_word_embeddings=True), _llama(tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    embedding = VOCAB * 32 * 4
    assert model_bytes(tied) == _param_and_buffer_bytes(tied)  # parameters() yields a tied weight once
    assert model_bytes(untied) - model_bytes(tied) == embedding


def test_views_of_one_storage_are_counted_once_at_its_full_size() -> None:
    """A fused weight sliced into parts: the memory is the fused storage, once."""
    fused = torch.zeros(6, 4)
    module = torch.nn.Module()
    module.register_buffer("q", fused[:2])
    module.register_buffer("kv", fused[2:])
    assert model_bytes(module) == fused.numel() * 4


def test_an_int8_model_has_fewer_bytes_and_its_int8_buffers_count() -> None:
    reference = _llama()
    quantized = KernelOptimizer(KernelConfig(weights="int8", decode="hf")).apply_to_model(copy.deepcopy(reference))
    int8 = [b for b in quantized.buffers() if b.dtype in (torch.int8, torch.uint8)]
    assert int8, "the int8 model keeps its weights in int8/uint8 buffers"
    assert model_bytes(quantized) < model_bytes(reference)
    assert model_bytes(quantized) >= sum(b.numel() for b in int8)
    # Parameters alone would miss the quantized weights entirely.
    assert model_bytes(quantized) > sum(p.numel() * p.element_size() for p in quantized.parameters())


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao is deprecated
def test_weights_kept_outside_parameters_and_buffers_are_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """quantize_dynamic packs each Linear's weight into a torchbind object: not a parameter, not a buffer."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    with caplog.at_level("WARNING", logger="ryzen_opt.measure.memory"):
        assert model_bytes(dynamic) < model_bytes(model)
    assert "2 modules (0._packed_params, 2._packed_params) keep weights in torch.ao packed parameters" in caplog.text
    caplog.clear()
    model_bytes(model)
    assert caplog.text == ""
