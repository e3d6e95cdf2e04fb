"""``ryzen-opt run``'s config and its failure handling, without running the expensive stages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.run import config as run_config
from ryzen_opt.run import context as run_context
from ryzen_opt.run import pipeline
from ryzen_opt.run import training as stage_training
from ryzen_opt.run import validation as stage_validation
from ryzen_opt.run.config import RunConfig
from ryzen_opt.run.context import StageStatus
from ryzen_opt.run.pipeline import run_pipeline
from ryzen_opt.run.summary import gate_rows, write_summary


def test_tables_map_onto_the_optimizers_configs_with_the_systems_defaults():
    config = RunConfig.from_dict(
        {"kernels": {"group_size": 128}, "speculative": {"num_draft_tokens": 3}, "validation": {"models": ["zoo"]}}
    )
    assert config.system.kernels.weights == "int8"  # SystemConfig's default, not KernelConfig's ("none")
    assert config.system.kernels.group_size == 128
    assert config.system.speculative.num_draft_tokens == 3
    assert config.validation.models == ("target",)  # "zoo" is read as "target", its old name
    assert RunConfig.from_dict(config.to_dict()) == config


def test_the_default_target_is_smollm2_drafted_by_ngram_and_the_packaged_suite_tests_it():
    config = RunConfig()
    assert (config.model.target, config.model.draft, config.model.drafter) == ("smollm2", "auto", "ngram")
    assert config.validation.models == ("target",)
    assert config.testing.paths == ()  # the packaged suite, not ./tests
    assert RunConfig.from_dict({"model": {"target": "zoo"}}).model.drafter == "zoo"
    assert RunConfig.from_dict({"model": {"target": "org/name", "draft": "ngram"}}).model.drafter == "ngram"


def test_a_target_path_that_does_not_exist_is_the_error_reported(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    for model in ({"target": str(missing)}, {"target": str(missing), "draft": "zoo"}):
        with pytest.raises(ConfigError) as info:
            RunConfig.from_dict({"model": model})
        message = str(info.value)
        assert message.startswith(f"[model] target = '{missing}': ")
        assert "does not exist" in message
        assert "save_pretrained" in message
        assert "'smollm2'" in message  # what to pass instead
        assert "draft" not in message
        assert message.count("[model]") == 1
    with pytest.raises(ConfigError, match=r"\[model\] target = 'weights/model.gguf'.*does not exist"):
        RunConfig.from_dict({"model": {"target": "weights/model.gguf"}})
    with pytest.raises(ConfigError, match=r"\[model\] draft = '\./draft'.*does not exist"):
        RunConfig.from_dict({"model": {"target": "zoo", "draft": "./draft"}})
    existing = tmp_path / "model"
    existing.mkdir()
    assert RunConfig.from_dict({"model": {"target": str(existing)}}).model.target == str(existing)


def test_a_zoo_draft_for_another_target_names_the_table_once():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"model": {"target": "smollm2", "draft": "zoo"}})
    message = str(info.value)
    assert message.startswith("[model] draft = 'zoo' needs target = 'zoo'")
    assert message.count("[model]") == 1
    assert "'auto'" in message
    assert "'ngram'" in message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kernel": {}}, r"unknown config key\(s\) 'kernel'.*allowed keys are .*kernels"),
        ({"kernels": {"bits": 4}}, r"\[kernels\] unknown key\(s\) \['bits'\]"),
        ({"kernels": {"weights": "int3"}}, r"\[kernels\].*'none', 'bf16', 'int8', 'int4'"),
        ({"kv_cache": {"bits": "8"}}, r"\[kv_cache\] bits = '8': expected int"),
        ({"validation": {"models": ["gpt5"]}}, r"\[validation\].*allowed values are 'target' .*'134m'"),
        ({"testing": {"enabled": "yes"}}, r"\[testing\] enabled = 'yes': expected bool"),
        ({"model": {"target": "/models/x"}}, r"^\[model\] target = '/models/x': '/models/x' does not exist"),
        ({"training": {"heldout_blocks": 0}}, r"^\[training\] steps, batch_size and heldout_blocks must be >= 1"),
        ({"training": 3}, r"'training' must be a table"),
        ({"device": 3}, r"'device' must be a string"),
    ],
)
def test_a_bad_config_names_the_key_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(data)


def _fake_stages(monkeypatch, stages):
    monkeypatch.setattr(pipeline, "STAGES", stages)


def test_a_failed_stage_marks_the_report_incomplete_and_keeps_what_was_measured(tmp_path: Path, monkeypatch):
    def broken(ctx):
        raise RyzenOptError("the disk is full")

    _fake_stages(monkeypatch, [("setup", lambda ctx: {"measured": 1.5}), ("validation", broken), ("testing", dict)])
    report = run_pipeline(RunConfig(device="cpu", output_dir=str(tmp_path)))
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["setup"]["data"] == {"measured": 1.5}
    assert stages["validation"]["status"] == StageStatus.FAILED.value
    assert stages["testing"]["status"] == StageStatus.SKIPPED.value
    assert report["status"] == "INCOMPLETE"
    assert "validation: FAILED: the disk is full" in report["incomplete_reasons"]
    written = json.loads((tmp_path / "phase2_final_report.json").read_text())
    assert written["status"] == "INCOMPLETE"


def test_ctrl_c_writes_the_report_then_interrupts(tmp_path: Path, monkeypatch):
    def interrupted(ctx):
        raise KeyboardInterrupt

    _fake_stages(monkeypatch, [("setup", lambda ctx: {}), ("training", interrupted), ("validation", dict)])
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(RunConfig(device="cpu", output_dir=str(tmp_path)))
    written = json.loads((tmp_path / "phase2_final_report.json").read_text())
    assert written["status"] == "INCOMPLETE"
    assert any("interrupted" in r for r in written["incomplete_reasons"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_summary_has_a_table_and_plots(tmp_path: Path):
    speed = {"ratio": 3.2, "ci_low": 3.0, "ci_high": 3.4}
    report = {
        "status": "COMPLETE",
        "completion_timestamp": "now",
        "environment": {"device": "cpu", "git_sha": "abc"},
        "incomplete_reasons": [],
        "stages": [
            {
                "name": "validation",
                "status": "DONE",
                "duration_s": 1.0,
                "reason": None,
                "data": {
                    "measurements": {
                        "target": {
                            "speedups_vs_hf": {"kernels": speed, "all four": speed},
                            "compression": {"ratio": 3.9},
                            "kv_memory": {"reduction": 0.63},
                            "accuracy": {
                                "embedding_compressor": {"accuracy_loss": 0.001, "ci_low": -0.002, "ci_high": 0.004}
                            },
                        }
                    }
                },
            },
        ],
        "optimization_results": {
            "kernel_optimizer": {
                "speedup": [
                    {
                        "value": 3.2,
                        "target": 3.0,
                        "comparison": "min",
                        "status": "PASS",
                        "ci_low": 3.0,
                        "ci_high": 3.4,
                        "model": "target",
                    }
                ]
            }
        },
        "e2e_results": {},
    }
    (tmp_path / "training_metrics_report.json").write_text(
        json.dumps(
            {
                "batch_metrics": [{"step": i, "loss": 5.0 - i / 10} for i in range(20)],
                "epoch_metrics": [{"step": 10, "val_loss": 4.2}],
            }
        )
    )
    path = write_summary(report, tmp_path)
    text = path.read_text()
    assert "| kernel_optimizer | speedup | target | 3.2 [3, 3.4] (>= 3) | PASS |" in text
    for png in ("loss_curve.png", "speedups.png", "accuracy_vs_compression.png"):
        assert (tmp_path / png).stat().st_size > 1000
        assert f"({png})" in text
    assert gate_rows(report)[0][-1] == "PASS"


# ------------------------------------------------------------------------------------------------ stages, tiny models


def _tiny_llama(seed: int = 0, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class _CharTokenizer:
    """Characters as token ids: enough of a tokenizer for the fine-tune stage."""

    def __call__(self, text: str, return_tensors: str = "pt"):
        import types

        import torch

        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) % 96 for c in text]]))


def _ctx(tmp_path: Path, **config) -> run_context.RunContext:
    import torch

    ctx = run_context.RunContext(config=RunConfig(device="cpu", output_dir=str(tmp_path), **config))
    ctx.device = torch.device("cpu")
    return ctx


def _count_calls(monkeypatch, cls, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.mark.parametrize("with_draft", [False, True])
def test_validation_builds_each_optimized_variant_once(tmp_path: Path, monkeypatch, with_draft: bool):
    import torch

    from ryzen_opt.optimizers.embeddings import EmbeddingCompressor
    from ryzen_opt.optimizers.kernels import KernelOptimizer
    from ryzen_opt.optimizers.system import OptimizedSystem
    from ryzen_opt.validation.validator import OptimizationValidator, load_thresholds

    target = _tiny_llama(0)
    draft = _tiny_llama(1, layers=1) if with_draft else None
    # Held-out text the target predicts: its own greedy continuations (a random model's top-1 on random text is ~0).
    prompts = torch.randint(1, 96, (2, 4), generator=torch.Generator().manual_seed(0))
    blocks = torch.cat(
        [target.generate(p[None], max_new_tokens=60, min_new_tokens=60, do_sample=False) for p in prompts]
    )
    monkeypatch.setattr(stage_validation, "validation_blocks", lambda ctx, n: blocks)
    ctx = _ctx(
        tmp_path,
        model=run_config.ModelSection(target="zoo", draft="zoo" if with_draft else "ngram"),
        validation=run_config.ValidationSection(prompts=1, new_tokens=8, pairs=3, accuracy_blocks=2, context_len=64),
        system=dataclasses.replace(RunConfig().system, compile_draft=False, compile_kernels=False),
    )
    ctx.target, ctx.draft = target, draft
    kernel_calls = _count_calls(monkeypatch, KernelOptimizer, "apply_to_model")
    embedding_calls = _count_calls(monkeypatch, EmbeddingCompressor, "apply_to_model")
    system_calls = _count_calls(monkeypatch, OptimizedSystem, "__init__")
    validator = OptimizationValidator(load_thresholds(device_class="cpu"), device=ctx.device)
    label, data = stage_validation.validate_model(ctx, validator, "target")
    # Once each: the kernels alone, the system's target (and its draft); the embeddings alone and the system's.
    assert len(kernel_calls) == (3 if with_draft else 2)
    assert len(embedding_calls) == 2
    assert len(system_calls) == 1
    assert label == "target"
    assert set(data["speedups_vs_hf"]) == {"kernels", "embeddings", "kv_cache", "speculative", "all four"}
    assert set(data["accuracy"]) == {"kernel_optimizer", "embedding_compressor", "kv_cache_optimizer", "e2e"}
    assert data["speculative"]["drafter"] == ("draft model" if with_draft else "n-gram prompt lookup")
    # Where the stage's time went: every phase, in order, none negative.
    assert list(data["seconds"])[0] == "build"
    assert list(data["seconds"])[-1] == "accuracy"
    assert all(s >= 0 for s in data["seconds"].values())
    # What setup built is reused when training left the target as it was: validation builds nothing more.
    kernel_calls.clear()
    stage_validation.validate_model(ctx, validator, "target")
    assert kernel_calls == []


def test_the_fine_tune_lowers_held_out_loss_and_records_it(tmp_path: Path):
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    ctx = _ctx(
        tmp_path,
        model=run_config.ModelSection(target="zoo"),
        training=run_config.TrainingSection(text_files=(str(text),), steps=12, batch_size=4, block_size=32, lr=3e-3),
    )
    ctx.target, ctx.tokenizer = _tiny_llama(), _CharTokenizer()
    ctx.variants = object()  # built from the weights before training
    data = stage_training.run_training(ctx)
    assert ctx.variants is None  # the target changed: validation builds the variants again
    assert data["mode"] == "fine-tune"
    assert data["heldout_after"]["loss"] < data["heldout_before"]["loss"]
    assert data["heldout_blocks"] == 4  # the last 4 of 44 blocks (at most a tenth)
    report = json.loads((tmp_path / "training_metrics_report.json").read_text())
    assert report["statistics"]["total_batches"] == 12
    steps = [(e["step"], e["val_loss"]) for e in report["epoch_metrics"]]
    before, after = data["heldout_before"]["loss"], data["heldout_after"]["loss"]
    assert steps == [(0, pytest.approx(before)), (12, pytest.approx(after))]


def test_a_fine_tune_that_does_not_lower_held_out_loss_fails_the_stage(tmp_path: Path, monkeypatch):
    from ryzen_opt.training import loop as training

    text = tmp_path / "corpus.txt"
    text.write_text("x = 1\n" * 200)

    def no_training(model, data, config, collector=None, *, heldout=None, device=None):
        # Evaluated as train() evaluates, with the same autocast decision: on a CPU with fast bf16 (Zen 4) the
        # held-out loss before training is taken under bf16 autocast, and an fp32 one here would differ by rounding.
        batches = heldout.fixed_batches(config.batch_size, config.eval_batches)
        bf16 = training.use_bf16_autocast(config, device)
        return {"final_eval": training.evaluate(model, batches, device, bf16), "seconds": 0.0}

    monkeypatch.setattr(stage_training, "train", no_training)
    ctx = _ctx(
        tmp_path,
        model=run_config.ModelSection(target="zoo"),
        training=run_config.TrainingSection(text_files=(str(text),), steps=2, batch_size=2, block_size=16),
    )
    ctx.target, ctx.tokenizer = _tiny_llama(), _CharTokenizer()
    with pytest.raises(RyzenOptError, match=r"did not lower the held-out loss: (\d+\.\d+) before, \1 after 2 steps"):
        stage_training.run_training(ctx)


def test_the_built_in_corpus_is_the_tune_half_of_the_prose(tmp_path: Path, monkeypatch):
    import torch

    from ryzen_opt.models import corpus

    asked = []

    def prose_blocks(tokenizer, split, *, blocks, block_size):
        asked.append((split, blocks, block_size))
        return torch.arange(40 * block_size).remainder(96).view(40, block_size)

    monkeypatch.setattr(corpus, "prose_blocks", prose_blocks)
    ctx = _ctx(tmp_path, training=run_config.TrainingSection(steps=3, batch_size=2, block_size=16, lr=3e-3))
    ctx.target, ctx.tokenizer = _tiny_llama(), object()
    data = stage_training.run_training(ctx)
    assert asked == [("tune", None, 16)]
    assert data["corpus"] == stage_training.BUILTIN_CORPUS
    assert (data["train_blocks"], data["heldout_blocks"]) == (36, 4)
