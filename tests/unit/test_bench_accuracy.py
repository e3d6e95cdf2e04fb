"""ryzen_opt.measure.timing accuracy measures: accuracy loss, its paired bootstrap interval, KL, agreement, greedy
agreement.

Every model here is a tiny random Llama (vocab 64, hidden 32, 2 layers), seeded. Its weights are initialised
with a large spread (``initializer_range=0.3``) so that its next-token distributions are peaked, and the
held-out text is sampled from the reference itself, so that the reference's top-1 accuracy is well above
chance (about 0.23) and relative accuracy loss is a meaningful number. Numbers are checked against a
straightforward per-sequence computation written out below, never against the code under test.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ryzen_opt.errors import ConfigError
from ryzen_opt.measure import accuracy as accuracy_module
from ryzen_opt.measure.accuracy import AccuracyMeasurement, accuracy, greedy_agreement
from ryzen_opt.measure.timing import MeasurementError
from ryzen_opt.training.loop import TokenBlocks

VOCAB = 64
SEQS = 24
SEQ_LEN = 33  # 32 scored positions per sequence


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def perturbed(model: nn.Module, std: float, seed: int) -> nn.Module:
    """A copy with seeded Gaussian noise added to every weight: a stand-in for a lossy optimization."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in out.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * std)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models are all overhead: one thread is much faster, above all on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> LlamaForCausalLM:
    return tiny_llama(0)


@pytest.fixture(scope="module")
def heldout(reference: LlamaForCausalLM) -> torch.Tensor:
    """[SEQS, SEQ_LEN] tokens sampled from the reference (temperature 1, seeded)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (SEQS, 1), generator=gen)
    with torch.no_grad():
        for _ in range(SEQ_LEN - 1):
            probs = reference(input_ids=ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return ids


@pytest.fixture(scope="module")
def noisy(reference: LlamaForCausalLM) -> nn.Module:
    return perturbed(reference, std=0.01, seed=2)


def straightforward(reference: nn.Module, candidate: nn.Module, sequences: list[torch.Tensor]) -> dict[str, float]:
    """The definitions written out one sequence at a time, with torch's own loss functions."""
    correct_ref = correct_cand = agree = tokens = 0
    nll_ref = nll_cand = kl = 0.0
    with torch.no_grad():
        for seq in sequences:
            lr = reference(input_ids=seq[None]).logits[0, :-1].float()
            lc = candidate(input_ids=seq[None]).logits[0, :-1].float()
            target = seq[1:]
            nll_ref += float(F.cross_entropy(lr, target, reduction="sum"))
            nll_cand += float(F.cross_entropy(lc, target, reduction="sum"))
            log_p, log_q = F.log_softmax(lr, dim=-1), F.log_softmax(lc, dim=-1)
            kl += float(F.kl_div(log_q, log_p, reduction="sum", log_target=True))
            correct_ref += int((lr.argmax(-1) == target).sum())
            correct_cand += int((lc.argmax(-1) == target).sum())
            agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
            tokens += target.numel()
    acc_ref, acc_cand = correct_ref / tokens, correct_cand / tokens
    return {
        "reference_accuracy": acc_ref,
        "candidate_accuracy": acc_cand,
        "accuracy_loss": (acc_ref - acc_cand) / acc_ref,
        "reference_perplexity": math.exp(nll_ref / tokens),
        "candidate_perplexity": math.exp(nll_cand / tokens),
        "perplexity_ratio": math.exp(nll_cand / tokens) / math.exp(nll_ref / tokens),
        "kl_divergence": kl / tokens,
        "top1_agreement": agree / tokens,
        "tokens": tokens,
    }


def per_sequence_correct(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return (pred == ids[:, 1:]).sum(1).numpy()


# --- identical, perturbed, bf16 ------------------------------------------------------------------------------


def test_identical_models_measure_exactly_no_change(reference: LlamaForCausalLM, heldout: torch.Tensor) -> None:
    m = accuracy(reference, copy.deepcopy(reference), heldout)
    assert m.accuracy_loss == 0.0
    assert m.value == 0.0
    assert (m.ci_low, m.ci_high) == (0.0, 0.0)
    assert m.kl_divergence == pytest.approx(0.0, abs=1e-7)  # log-softmax of bit-identical logits: identical
    assert m.top1_agreement == 1.0
    assert m.perplexity_ratio == 1.0
    assert m.reference_accuracy == m.candidate_accuracy > 1.5 / VOCAB  # sampled from itself: above chance
    assert (m.n, m.n_sequences, m.tokens) == (SEQS, SEQS, SEQS * (SEQ_LEN - 1))
    assert m.near_ties == 0  # continuous random weights: no exact ties


def test_perturbed_candidate_matches_the_definitions(
    reference: LlamaForCausalLM, noisy: nn.Module, heldout: torch.Tensor
) -> None:
    m = accuracy(reference, noisy, heldout, batch_size=5)
    expected = straightforward(reference, noisy, list(heldout))
    assert m.kl_divergence > 1e-3
    assert m.top1_agreement < 0.95
    for name, value in expected.items():
        assert getattr(m, name) == pytest.approx(value, rel=1e-6), name
    assert m.accuracy_loss != 0.0


def test_bf16_candidate_is_close_but_not_identical(
    reference: LlamaForCausalLM, noisy: nn.Module, heldout: torch.Tensor
) -> None:
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    m = accuracy(reference, bf16, heldout)
    # bf16 keeps 8 significant bits: weights and activations are rounded by at most 2^-9 (0.2%) relative, so
    # logits of spread ~2 move by ~1e-2 and the KL, about half the variance of that shift under p, is of order
    # 1e-4 (0.00055 measured). 5e-3 leaves a 10x margin yet sits far below the weight-noise candidate's ~0.08.
    assert 0.0 < m.kl_divergence < 5e-3
    assert m.kl_divergence < accuracy(reference, noisy, heldout).kl_divergence / 10
    assert m.top1_agreement > 0.9  # flips only where the reference's top-2 gap is within bf16 rounding
    expected = straightforward(reference, bf16, list(heldout))
    assert m.kl_divergence == pytest.approx(expected["kl_divergence"], rel=1e-5)
    assert m.top1_agreement == pytest.approx(expected["top1_agreement"])


# --- the paired bootstrap ------------------------------------------------------------------------------------


def test_interval_covers_the_estimate_and_is_seeded(
    reference: LlamaForCausalLM, noisy: nn.Module, heldout: torch.Tensor
) -> None:
    a = accuracy(reference, noisy, heldout, seed=7)
    b = accuracy(reference, noisy, heldout, seed=7)
    c = accuracy(reference, noisy, heldout, seed=8)
    assert a.ci_low < a.accuracy_loss < a.ci_high
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.accuracy_loss == c.accuracy_loss  # the seed moves only the interval
    wider = accuracy(reference, noisy, heldout, seed=7, confidence=0.99)
    assert wider.ci_low <= a.ci_low
    assert wider.ci_high >= a.ci_high
    assert wider.ci_high - wider.ci_low > a.ci_high - a.ci_low


def test_interval_is_paired(reference: LlamaForCausalLM, noisy: nn.Module, heldout: torch.Tensor) -> None:
    """Resampling both models' counts on the same sequences cancels how hard each sequence is.

    An unpaired bootstrap (each model's sequences resampled independently) of the same statistic is
    computed here from scratch; the paired interval must be clearly narrower, and both must centre near
    the estimate.
    """
    m = accuracy(reference, noisy, heldout, n_boot=2000)
    c_ref = per_sequence_correct(reference, heldout)
    c_cand = per_sequence_correct(noisy, heldout)
    rng = np.random.default_rng(123)
    i = rng.integers(0, SEQS, size=(2000, SEQS))
    j = rng.integers(0, SEQS, size=(2000, SEQS))
    unpaired = (c_ref[i].sum(1) - c_cand[j].sum(1)) / c_ref[i].sum(1)
    paired = (c_ref[i].sum(1) - c_cand[i].sum(1)) / c_ref[i].sum(1)
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert m.ci_high - m.ci_low < 0.8 * (high - low)
    p_low, p_high = np.quantile(paired, [0.025, 0.975])  # an independent paired bootstrap: similar width
    assert m.ci_high - m.ci_low == pytest.approx(p_high - p_low, rel=0.25)


# --- input forms ---------------------------------------------------------------------------------------------


def _numbers(m: AccuracyMeasurement) -> dict[str, float]:
    return {k: v for k, v in m.to_dict().items() if k not in ("reference_name", "candidate_name")}


def test_input_forms_give_the_same_numbers(
    reference: LlamaForCausalLM, noisy: nn.Module, heldout: torch.Tensor
) -> None:
    blocks = TokenBlocks(heldout.flatten(), block_size=SEQ_LEN)
    assert torch.equal(blocks.blocks, heldout)
    from_blocks = _numbers(accuracy(reference, noisy, blocks, batch_size=8))
    from_tensor = _numbers(accuracy(reference, noisy, heldout, batch_size=3))
    from_list = _numbers(accuracy(reference, noisy, list(heldout), device="cpu"))
    for other in (from_tensor, from_list):
        assert other.keys() == from_blocks.keys()
        for key, value in from_blocks.items():
            assert other[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_variable_length_sequences_pool_by_token(
    reference: LlamaForCausalLM, noisy: nn.Module, heldout: torch.Tensor
) -> None:
    seqs = [heldout[0, :20], heldout[1], heldout[2, :7]]
    m = accuracy(reference, noisy, seqs)
    expected = straightforward(reference, noisy, seqs)
    assert m.tokens == 19 + 32 + 6 == expected["tokens"]
    assert m.n == 3
    for name in ("reference_accuracy", "candidate_accuracy", "kl_divergence", "top1_agreement", "perplexity_ratio"):
        assert getattr(m, name) == pytest.approx(expected[name], rel=1e-6), name


def test_max_batches_limits_the_data(reference: LlamaForCausalLM, noisy: nn.Module, heldout: torch.Tensor) -> None:
    m = accuracy(reference, noisy, heldout, batch_size=4, max_batches=2)
    assert (m.n, m.tokens) == (8, 8 * (SEQ_LEN - 1))
    assert _numbers(m) == pytest.approx(_numbers(accuracy(reference, noisy, heldout[:8])))
    assert accuracy(reference, noisy, list(heldout), max_batches=5).n == 5


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.zeros(5, dtype=torch.long), r"\[N, T\]"),
        (torch.zeros(2, 1, dtype=torch.long), "at least 2"),
        ([], "empty"),
        (torch.zeros(2, 4), "integer"),
        ("some text", "TokenBlocks"),
    ],
)
def test_malformed_heldout_is_a_config_error(reference: LlamaForCausalLM, data: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        accuracy(reference, reference, data)


def test_modes_are_restored(reference: LlamaForCausalLM, heldout: torch.Tensor) -> None:
    ref = copy.deepcopy(reference).train()
    cand = copy.deepcopy(reference).eval()
    seen = []
    handle = ref.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    accuracy(ref, cand, heldout[:2])
    handle.remove()
    assert seen == [False]  # measured in eval mode
    assert ref.training
    assert not cand.training
    assert all(m.training for m in ref.modules())


# --- errors and reports --------------------------------------------------------------------------------------


class FixedLM(nn.Module):
    """Always predicts ``token`` (logit 1, every other 0), or returns ``fill`` everywhere when given."""

    def __init__(self, token: int = 0, fill: float | None = None) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.token, self.fill = token, fill

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits[..., self.token] = 1.0
        if self.fill is not None:
            logits.fill_(self.fill)
        return SimpleNamespace(logits=logits)


def test_reference_with_zero_accuracy_is_a_clear_error() -> None:
    ids = torch.randint(1, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))  # never token 0
    with pytest.raises(MeasurementError, match=r"predicted none of 36 held-out tokens.*undefined"):
        accuracy(FixedLM(token=0), FixedLM(token=5), ids)
    ids[:, 1] = 0  # one correct prediction per sequence is enough
    m = accuracy(FixedLM(token=0), FixedLM(token=5), ids)
    assert m.reference_accuracy == pytest.approx(4 / 36)
    assert m.accuracy_loss == pytest.approx(1.0 - (ids[:, 1:] == 5).sum().item() / 4)


def test_non_finite_logits_are_a_measurement_error(heldout: torch.Tensor) -> None:
    with pytest.raises(MeasurementError, match="broken produced non-finite logits"):
        accuracy(FixedLM(), FixedLM(fill=math.nan), heldout, candidate_name="broken")


def test_to_dict_is_json_safe_and_round_trips(
    reference: LlamaForCausalLM, noisy: nn.Module, heldout: torch.Tensor
) -> None:
    m = accuracy(reference, noisy, heldout, reference_name="fp32", candidate_name="noisy")
    text = json.dumps(m.to_dict(), allow_nan=False)
    back = AccuracyMeasurement.from_dict(json.loads(text))
    assert back == m
    assert back.value == m.accuracy_loss
    bad = AccuracyMeasurement(**{**m.to_dict(), "kl_divergence": math.nan})
    with pytest.raises(ValueError, match="kl_divergence"):
        bad.to_dict()
    with pytest.raises(ValueError, match="unknown"):
        AccuracyMeasurement.from_dict({**m.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="ci_low"):
        AccuracyMeasurement(**{**m.to_dict(), "ci_low": 1.0, "ci_high": 0.0})


def test_describe() -> None:
    m = AccuracyMeasurement(
        reference_accuracy=0.3012,
        candidate_accuracy=0.2999,
        accuracy_loss=0.0042,
        ci_low=-0.001,
        ci_high=0.0095,
        n=64,
        tokens=8000,
        reference_perplexity=10.0,
        candidate_perplexity=10.1,
        perplexity_ratio=1.01,
        kl_divergence=0.0031,
        top1_agreement=0.981,
        near_ties=0,
    )
    assert m.describe() == (
        "accuracy loss 0.42% (95% CI -0.10% to 0.95%, 64 seqs; top-1 0.3012 -> 0.2999, KL 0.0031, agreement 0.981)"
    )
    assert "3 near-ties" in AccuracyMeasurement(**{**m.to_dict(), "near_ties": 3}).describe()


# --- near-ties -----------------------------------------------------------------------------------------------


def test_near_ties_are_counted(reference: LlamaForCausalLM, heldout: torch.Tensor) -> None:
    flat = copy.deepcopy(reference)
    with torch.no_grad():
        flat.lm_head.weight.zero_()  # every logit is 0: every position is a tie
    m = accuracy(flat, flat, heldout)
    assert m.near_ties == m.tokens

    twin = copy.deepcopy(reference)
    with torch.no_grad():
        twin.lm_head.weight[0] *= 3.0  # make token 0 the argmax often...
        twin.lm_head.weight[1] = twin.lm_head.weight[0]  # ...and tie it with token 1 there
        logits = twin(input_ids=heldout).logits[:, :-1]
    top_is_twin = int((logits.argmax(-1) == 0).sum())
    assert top_is_twin > 10
    assert accuracy(twin, twin, heldout).near_ties == top_is_twin


class GapLM(nn.Module):
    """Token 0's logit is 1 and token 1's is ``1 - gap`` at every position; every other logit is 0."""

    def __init__(self, gap: float) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.gap = gap

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits[..., 0] = 1.0
        logits[..., 1] = 1.0 - self.gap
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize(("gap", "tie"), [(0.0, True), (5e-6, True), (5e-5, False), (0.5, False)])
def test_near_tie_threshold_is_1e_5(gap: float, tie: bool) -> None:
    ids = torch.zeros(3, 6, dtype=torch.long)  # all token 0: the reference is always right
    m = accuracy(GapLM(gap), GapLM(gap), ids)
    assert m.near_ties == (15 if tie else 0)


# --- greedy agreement ----------------------------------------------------------------------------------------


def test_greedy_agreement_of_identical_models(reference: LlamaForCausalLM, heldout: torch.Tensor) -> None:
    prompts = [heldout[0, :4], heldout[1, :9], heldout[2, :1]]
    out = greedy_agreement(reference, copy.deepcopy(reference), prompts, max_new_tokens=12)
    json.dumps(out, allow_nan=False)
    assert out["prefix_lengths"] == [12, 12, 12]
    assert out["exact_matches"] == 3
    assert out["mean_prefix_fraction"] == 1.0
    assert out["exact_match_rate"] == 1.0
    assert [p["prompt_tokens"] for p in out["per_prompt"]] == [4, 9, 1]


def test_greedy_agreement_of_a_perturbed_model(reference: LlamaForCausalLM, heldout: torch.Tensor) -> None:
    # A model whose generation config names a pad token, and a prompt full of it: generate() would mask those
    # tokens out unless told otherwise, but the measurement must attend to every prompt token.
    reference = copy.deepcopy(reference)
    reference.generation_config.pad_token_id = 5
    prompts = [heldout[i, :4] for i in range(4)] + [torch.tensor([5, 17, 5, 40, 5])]
    n = 10
    out = greedy_agreement(reference, perturbed(reference, std=0.03, seed=3), prompts, max_new_tokens=n)
    json.dumps(out, allow_nan=False)
    assert set(out) >= {"max_new_tokens", "prompts", "prefix_lengths", "mean_prefix_fraction", "exact_matches"}
    assert out["max_new_tokens"] == n
    assert out["prompts"] == len(prompts)
    prefixes = out["prefix_lengths"]
    assert len(prefixes) == len(prompts)
    assert all(0 <= k <= n for k in prefixes)
    assert min(prefixes) < n  # this much weight noise changes some greedy continuation
    assert out["exact_matches"] == sum(k == n for k in prefixes)
    assert out["mean_prefix_fraction"] == pytest.approx(sum(prefixes) / (len(prompts) * n))

    # The prefix lengths are the real first differences: decode greedily by hand (full forward per step, the
    # end-of-text token 2 masked as min_new_tokens does) and find where the two continuations first differ.
    noisy = perturbed(reference, std=0.03, seed=3)
    expected = []
    for prompt in prompts:
        a, b = manual_greedy(reference, prompt, n), manual_greedy(noisy, prompt, n)
        expected.append(next((i for i in range(n) if a[i] != b[i]), n))
    assert prefixes == expected


def manual_greedy(model: nn.Module, prompt: torch.Tensor, n: int, eos: int = 2) -> torch.Tensor:
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids).logits[0, -1]
            logits[eos] = -math.inf
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, prompt.numel() :]


def test_greedy_agreement_reports_divergence_at_a_tie(heldout: torch.Tensor) -> None:
    """Tokens 0 and 1 get identical logits; a candidate that prefers 1 there diverges at a near-tie."""
    ref = tiny_llama(5)
    with torch.no_grad():
        ref.lm_head.weight[0] *= 5.0
        ref.lm_head.weight[1] = ref.lm_head.weight[0]
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.lm_head.weight[1] *= 1.001  # wins the tie wherever the shared logit is positive
    out = greedy_agreement(ref, cand, [heldout[i, :3] for i in range(4)], max_new_tokens=8)
    diverged = [p for p in out["per_prompt"] if p["identical_prefix"] < 8]
    assert diverged, "the setup must produce at least one divergence"
    assert out["near_tie_divergences"] == sum(p["diverged_at_near_tie"] for p in diverged) == len(diverged)


def test_greedy_agreement_rejects_bad_arguments(reference: LlamaForCausalLM) -> None:
    with pytest.raises(ConfigError, match="at least one prompt"):
        greedy_agreement(reference, reference, [])
    with pytest.raises(ConfigError, match="1-D"):
        greedy_agreement(reference, reference, [torch.zeros(1, 3, dtype=torch.long)])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        greedy_agreement(reference, reference, [torch.zeros(3, dtype=torch.long)], max_new_tokens=0)


def test_bench_reexports_the_accuracy_module() -> None:
    assert accuracy is accuracy_module.accuracy
    assert AccuracyMeasurement is accuracy_module.AccuracyMeasurement
    assert greedy_agreement is accuracy_module.greedy_agreement
