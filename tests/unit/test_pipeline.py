"""``ryzen-opt run``'s config and its failure handling, without running the expensive stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ryzen_opt import pipeline
from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.pipeline import RunConfig, StageStatus, run_pipeline
from ryzen_opt.summary import gate_rows, write_summary


def test_tables_map_onto_the_optimizers_configs_with_the_systems_defaults():
    config = RunConfig.from_dict(
        {"kernels": {"group_size": 128}, "speculative": {"num_draft_tokens": 3}, "validation": {"models": ["zoo"]}}
    )
    assert config.system.kernels.weights == "int4"  # SystemConfig's default, not KernelConfig's
    assert config.system.kernels.group_size == 128
    assert config.system.speculative.num_draft_tokens == 3
    assert config.validation.models == ("zoo",)
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kernel": {}}, r"unknown config key\(s\) 'kernel'.*allowed keys are .*kernels"),
        ({"kernels": {"bits": 4}}, r"\[kernels\] unknown key\(s\) \['bits'\]"),
        ({"kernels": {"weights": "int3"}}, r"\[kernels\].*'none', 'bf16', 'int8', 'int4'"),
        ({"kv_cache": {"bits": "8"}}, r"\[kv_cache\] bits = '8': expected int"),
        ({"validation": {"models": ["gpt5"]}}, r"\[validation\].*allowed values are 'zoo', '134m'"),
        ({"testing": {"enabled": "yes"}}, r"\[testing\] enabled = 'yes': expected bool"),
        ({"model": {"target": "/models/x"}}, r"draft = 'zoo' needs target = 'zoo'"),
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
