"""ryzen_opt.training.loop: config validation, the schedule, divergence, a real short run, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ryzen_opt.errors import ConfigError
from ryzen_opt.models import corpus, recipes, zoo
from ryzen_opt.models.loading import load_model
from ryzen_opt.training.loop import TokenBlocks, TrainConfig, TrainingDivergedError, lr_at, train, use_bf16_autocast
from ryzen_opt.training.metrics import TrainingMetricsCollector


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", -1),
        ("lr", float("nan")),
        ("lr", 0.0),
        ("autocast", "fp8"),
        ("grad_clip", -1.0),
        ("min_lr_ratio", 1.5),
        ("threads", 0),
        ("eval_every", 0),
    ],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_config_json_round_trip() -> None:
    config = TrainConfig(steps=7, lr=1e-3, betas=(0.8, 0.9), checkpoint_dir="x")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="unknown TrainConfig key"):
        TrainConfig.from_dict({"stpes": 3})


@given(steps=st.integers(2, 5000), warmup=st.integers(0, 200), ratio=st.floats(0.0, 1.0))
def test_schedule_warms_up_then_decays(steps: int, warmup: int, ratio: float) -> None:
    config = TrainConfig(steps=steps, warmup_steps=min(warmup, steps - 1), lr=1e-3, min_lr_ratio=ratio)
    lrs = [lr_at(s, config) for s in range(steps)]
    peak = max(lrs)
    assert peak <= config.lr * (1 + 1e-9)
    top = lrs.index(peak)
    assert all(a <= b + 1e-15 for a, b in zip(lrs[:top], lrs[1 : top + 1], strict=False))  # non-decreasing warm-up
    assert all(a + 1e-15 >= b for a, b in zip(lrs[top:], lrs[top + 1 :], strict=False))  # non-increasing decay
    assert min(lrs[config.warmup_steps :]) >= config.lr * ratio - 1e-15  # the cosine floor


def test_autocast_choice() -> None:
    cpu = torch.device("cpu")
    assert use_bf16_autocast(TrainConfig(autocast="off"), cpu) is False
    assert use_bf16_autocast(TrainConfig(autocast="bf16"), cpu) is True


class _NaNAtStep(torch.nn.Module):
    """A model whose loss is finite until ``bad_step``, then NaN (as a diverging run's would be)."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 4))
        self.calls = 0
        self.bad_step = bad_step

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        loss = (self.w**2).mean()
        if self.calls == self.bad_step:
            loss = loss * float("nan")
        self.calls += 1
        return SimpleNamespace(loss=loss, logits=torch.zeros(*input_ids.shape, 3))


def test_nan_loss_stops_with_the_step() -> None:
    data = TokenBlocks(torch.arange(400) % 7, block_size=8)
    config = TrainConfig(steps=10, batch_size=2, eval_every=100, progress=False, autocast="off", warmup_steps=0)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3 .*Lower TrainConfig.lr"):
        train(_NaNAtStep(bad_step=3), data, config, TrainingMetricsCollector())


def test_trains_even_when_called_under_no_grad(tiny_data: tuple) -> None:
    # Regression: evaluate_zoo (a no_grad function) builds the zoo on first use; training must still work there.
    from transformers import LlamaForCausalLM

    _, train_blocks, _ = tiny_data
    recipe = recipes.get_recipe("tiny")
    torch.manual_seed(0)
    model = LlamaForCausalLM(zoo.llama_config(recipe, recipe.layers, 0))
    before = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        train(model, train_blocks, dataclasses.replace(recipe.train, steps=2, eval_every=100), None)
        assert not torch.is_grad_enabled()  # the caller's mode is restored
    assert not torch.equal(before, model.model.embed_tokens.weight)


def test_token_blocks_need_enough_tokens() -> None:
    with pytest.raises(ConfigError, match="cannot fill one block"):
        TokenBlocks(torch.arange(5), block_size=8)


@pytest.fixture(scope="module")
def tiny_data() -> tuple[object, TokenBlocks, TokenBlocks]:
    recipe = recipes.get_recipe("tiny")
    train_docs, heldout_docs = corpus.corpus(recipe)
    tok = zoo.train_tokenizer(train_docs, recipe.vocab_size)
    return (
        tok,
        TokenBlocks(corpus.encode_documents(tok, train_docs), recipe.block_size),
        TokenBlocks(corpus.encode_documents(tok, heldout_docs), recipe.block_size),
    )


def test_short_real_run_learns_and_reports(tiny_data: tuple, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    tok, train_blocks, heldout = tiny_data
    recipe = recipes.get_recipe("tiny")
    torch.manual_seed(0)
    model = LlamaForCausalLM(zoo.llama_config(recipe, recipe.layers, 0))
    config = dataclasses.replace(recipe.train, steps=80, eval_every=40, checkpoint_dir=str(tmp_path / "ckpt"))
    collector = TrainingMetricsCollector(experiment_id="short-run", model="tiny-llama", batch_size=config.batch_size)
    summary = train(model, train_blocks, config, collector, heldout=heldout)

    epochs = collector.epoch_metrics
    assert len(epochs) == 2
    # 80 steps on real text must beat the untrained model and keep improving; a broken loop would not.
    assert epochs[-1].val_loss < epochs[0].val_loss < math.log(recipe.vocab_size)
    assert epochs[-1].accuracy > 5 / recipe.vocab_size  # 5x uniform guessing (the exact figure varies with the ISA)
    assert summary["final_eval"]["loss"] == pytest.approx(epochs[-1].val_loss)
    assert len(collector.batch_metrics) == config.steps
    assert all(b.tokens_per_s > 0 and b.grad_norm is not None for b in collector.batch_metrics)

    report = json.loads(collector.export_metrics(tmp_path / "training_metrics_report.json").read_text())
    assert report["statistics"]["total_batches"] == config.steps
    assert len(report["epoch_metrics"]) == 2

    # Checkpoint round trip: save_pretrained -> load_model gives the same logits, exactly (same fp32 weights).
    loaded, _ = load_model(tmp_path / "ckpt" / "final", tokenizer=False)
    ids = heldout.blocks[:1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
