"""The lean runtime on its own: an unoptimized model read by ``build_arch`` and run by ``StaticDecoder`` gives HF's
logits, by every path (prefill, appended tokens, one-token steps, the compiled step's attention written out), and the
public seams hold.

Tolerance: the same fp32 weights; only the order of reductions differs (fused RMSNorm, SDPA against HF's attention,
qkv as one concatenation), which moves logits of these small models by ~1e-6 of their scale: 1e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ryzen_opt.errors import ConfigError
from ryzen_opt.ops.sampling import Sampler
from ryzen_opt.runtime import (
    SUPPORTED_MODEL_TYPES,
    StaticDecoder,
    UnsupportedModelError,
    attach_decoder,
    build_arch,
    decoder_of,
)

VOCAB = 256
ATOL = 1e-4


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_the_layer_loop_matches_hf_on_an_unoptimized_model(make) -> None:
    model = make()
    ids = _ids(12)
    with torch.no_grad():
        reference = model(ids).logits[0]
        decoder = StaticDecoder(model, build_arch(model), native_layers=False)
        decoder.allocate(12)
        prefill = decoder.forward(ids[:, :5], all_logits=True)[0]  # is_causal from an empty cache
        appended = decoder.forward(ids[:, 5:8], all_logits=True)[0]  # a mask over a filled prefix
        steps = [decoder.step(ids[:, p : p + 1])[0] for p in range(8, 12)]  # one token at a time
    torch.testing.assert_close(prefill, reference[:5], atol=ATOL, rtol=0)
    torch.testing.assert_close(appended, reference[5:8], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(steps), reference[8:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_the_compiled_steps_attention_matches_the_eager_one(make) -> None:
    """The static-shape step (the one ``compile`` traces) run eagerly: same layer loop, masked attention."""
    model = make()
    ids = _ids(10)
    with torch.no_grad():
        reference = model(ids).logits[0]
        decoder = StaticDecoder(model, build_arch(model), native_layers=False)
        decoder.allocate(10)
        decoder.forward(ids[:, :6])
        steps = []
        for p in range(6, 10):
            steps.append(decoder._step_static(ids[:, p : p + 1], torch.tensor([p]))[0])
            decoder.pos += 1
    torch.testing.assert_close(torch.stack(steps), reference[6:], atol=ATOL, rtol=0)


def test_crop_rolls_back_by_position() -> None:
    model = _llama()
    ids = _ids(9)
    with torch.no_grad():
        decoder = StaticDecoder(model, build_arch(model), native_layers=False)
        decoder.allocate(16)
        decoder.forward(ids[:, :6])
        decoder.forward(_ids(3))  # a rejected draft
        decoder.crop(6)
        again = decoder.forward(ids[:, 6:9], all_logits=True)[0]
        reference = model(ids).logits[0, 6:9]
    torch.testing.assert_close(again, reference, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="holds 9 positions"):
        decoder.crop(10)


def test_the_cache_limit_is_a_clear_error() -> None:
    model = _llama()
    decoder = StaticDecoder(model, build_arch(model), max_cache_len=32)
    with pytest.raises(ConfigError, match="exceeds the static cache limit 32"):
        decoder.allocate(40)
    with pytest.raises(RuntimeError, match="before allocate"):
        decoder.forward(_ids(2))


def test_decoder_of_finds_only_an_attached_decoder() -> None:
    model = _llama()
    assert decoder_of(model) is None
    decoder = StaticDecoder(model, build_arch(model))
    attach_decoder(model, decoder)
    assert decoder_of(model) is decoder
    assert not decoder.is_compiled


def test_an_unsupported_architecture_names_what_is_supported() -> None:
    model = _llama()
    model.config.model_type = "opt"
    with pytest.raises(UnsupportedModelError, match=", ".join(SUPPORTED_MODEL_TYPES)):
        build_arch(model)


def test_the_sampler_is_greedy_at_temperature_zero_and_seeded_otherwise() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2, 2.9]])
    assert Sampler(0.0).next_token(logits) == 1
    draws = [Sampler(1.0, generator=torch.Generator().manual_seed(7)).next_token(logits) for _ in range(2)]
    assert draws[0] == draws[1]  # one seed, one draw
    top1 = Sampler(1.0, top_k=1, generator=torch.Generator().manual_seed(3))
    assert {top1.next_token(logits) for _ in range(20)} == {1}  # top-k 1 leaves one token
