"""ryzen_opt.training.distributed without processes: torchrun's environment, backends, sharding, and what a single
process
sees (every helper a no-op). The multi-process behaviour is in tests/integration/test_distributed_torchrun.py."""

from __future__ import annotations

import math
from importlib import resources

import jsonschema
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from ryzen_opt.errors import ConfigError
from ryzen_opt.training import distributed
from ryzen_opt.training.distributed import SINGLE, DistInfo
from ryzen_opt.training.loop import TokenBlocks, TrainConfig, train
from ryzen_opt.training.metrics import BatchMetric, TrainingMetricsCollector

SCHEMA = __import__("json").loads(
    resources.files("ryzen_opt.validation").joinpath("schemas/training_metrics_report.schema.json").read_text()
)


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", distributed.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_torchrun_the_process_is_rank_0_of_1(no_torchrun: pytest.MonkeyPatch) -> None:
    assert distributed.env_info() == SINGLE
    assert distributed.current() == SINGLE
    info, device = distributed.start(torch.device("cpu"))
    assert info == SINGLE
    assert device == torch.device("cpu")
    assert not distributed.joined()
    assert distributed.all_sum(info, [1.0, 2.0], "x") == [1.0, 2.0]
    assert distributed.agree(info, True, "x")
    assert not distributed.agree(info, False, "x")
    with distributed.main_first(info, "x"):
        pass


def test_torchrun_environment_is_read_and_checked(no_torchrun: pytest.MonkeyPatch) -> None:
    no_torchrun.setenv("RANK", "1")
    no_torchrun.setenv("WORLD_SIZE", "2")
    no_torchrun.setenv("LOCAL_RANK", "1")
    assert distributed.env_info() == DistInfo(1, 2, 1, None)
    no_torchrun.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="inconsistent: RANK=2, WORLD_SIZE=2"):
        distributed.env_info()
    no_torchrun.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="partial .*launch with torchrun"):
        distributed.env_info()
    no_torchrun.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="not integers"):
        distributed.env_info()


def test_backends_and_timeout(no_torchrun: pytest.MonkeyPatch) -> None:
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda")) == "nccl"
    with pytest.raises(ConfigError, match="'mps' is not supported"):
        distributed.backend_for(torch.device("mps"))
    assert distributed.timeout_s() == distributed.DEFAULT_TIMEOUT_S
    no_torchrun.setenv(distributed.TIMEOUT_ENV, "-3")
    with pytest.raises(ConfigError, match="positive number of seconds"):
        distributed.timeout_s()


def test_a_rank_outside_the_group_gets_a_clear_error() -> None:
    with pytest.raises(distributed.RankFailedError, match="never joined"):
        distributed.all_sum(DistInfo(1, 2, 1, None), [1.0], "evaluation")


@given(world=st.integers(1, 4), per_rank=st.integers(1, 3))
def test_shards_partition_the_global_batch(world: int, per_rank: int) -> None:
    batch = torch.arange(world * per_rank * 3).view(world * per_rank, 3)
    shards = [distributed.shard_batch(batch, DistInfo(r, world, r, "gloo")) for r in range(world)]
    rows = sorted(int(row[0]) for shard in shards for row in shard)
    assert rows == sorted(int(row[0]) for row in batch)  # every row once, none twice
    assert all(s.shape[0] == per_rank for s in shards)


def test_an_uneven_split_is_refused() -> None:
    with pytest.raises(ConfigError, match="5 rows cannot be split evenly over 2 ranks"):
        distributed.shard_batch(torch.zeros(5, 2), DistInfo(0, 2, 0, "gloo"))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("grad_sync", "sometimes", "allowed values"),
        ("bucket_cap_mb", 0.0, "positive number of MB"),
        ("accumulation_steps", 3, "does not split into accumulation_steps = 3"),
        ("accumulation_steps", 0, "positive integer"),
    ],
)
def test_train_config_checks_the_new_fields(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(batch_size=4, **{field: value})


def _tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def test_accumulation_gives_the_losses_of_one_batch() -> None:
    """4 rows in 2 micro-batches of 2: the same gradients as 4 rows at once, so the same losses (fp32 order only).
    fp32 on every CPU: under bf16 autocast (chosen where the CPU has fast bf16, a Zen 4) the rounding of the smaller
    batches alone moves the losses by ~1e-4, which would hide a wrong accumulation no better than a CPU model."""
    ids = torch.randint(0, 64, (16 * 16,), generator=torch.Generator().manual_seed(0))
    data = TokenBlocks(ids, 16)
    losses = []
    for accum in (1, 2):
        collector = TrainingMetricsCollector("accum")
        cfg = TrainConfig(
            steps=3, batch_size=4, accumulation_steps=accum, lr=1e-2, warmup_steps=0, progress=False, autocast="off"
        )
        train(_tiny(), data, cfg, collector)
        losses.append([m.loss for m in collector.batch_metrics])
        assert collector.world_size == 1
        assert collector.backend is None
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_the_report_carries_ranks_and_stragglers() -> None:
    collector = TrainingMetricsCollector("dist", batch_size=4)
    collector.set_distributed(2, "gloo")
    for step, times in enumerate([(0.10, 0.20), (0.10, 0.20), (0.12, 0.22)]):
        collector.record_batch_metric(
            BatchMetric(0, step, 2.0 - step * 0.1, 40.0, 640.0, 1e-3, 1.0, max(times), step=step, rank_step_s=times)
        )
    report = collector.to_dict()
    report["environment"] = {}
    jsonschema.validate(report, SCHEMA, cls=jsonschema.Draft202012Validator)
    assert report["metadata"]["world_size"] == 2
    assert report["metadata"]["backend"] == "gloo"
    assert report["statistics"]["rank_step_s"] == pytest.approx([0.10667, 0.20667], rel=1e-3)
    assert report["statistics"]["straggler_ratio"] == pytest.approx(0.20667 / 0.10667, rel=1e-3)
    again = TrainingMetricsCollector.from_dict(report)
    assert again.world_size == 2
    assert again.batch_metrics[0].rank_step_s == (0.10, 0.20)
    single = TrainingMetricsCollector("one")
    single.record_batch_metric(BatchMetric(0, 0, 1.0, 1.0, 1.0, 1e-3, 1.0, 0.1))
    stats = single.compute_statistics()
    assert stats["rank_step_s"] is None
    assert stats["straggler_ratio"] is None
    assert "rank_step_s" not in single.to_dict()["batch_metrics"][0]
    assert math.isfinite(report["statistics"]["avg_loss"])


def test_main_first_runs_its_block_as_one_process(tmp_path, no_torchrun: pytest.MonkeyPatch) -> None:
    """Inside main_first (rank 0 filling a cache while the others wait) nothing may join a collective: a zoo trained
    there must train as one process, so ``current()`` says SINGLE inside and the group again after."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert distributed.current().backend == "gloo"
        with distributed.main_first(DistInfo(0, 2, 0, "gloo"), "fill a cache"):
            assert distributed.current() == SINGLE
        assert distributed.current().backend == "gloo"
        with pytest.raises(RuntimeError, match="boom"), distributed.main_first(DistInfo(0, 2, 0, "gloo"), "x"):
            raise RuntimeError("boom")  # rank 0 still releases the others
        assert distributed.current().backend == "gloo"
    finally:
        distributed.shutdown()
