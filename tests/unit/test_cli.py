"""The ryzen-opt CLI, called in-process (fast); tests/e2e drives it as a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ryzen_opt.cli import main
from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.run import pipeline
from ryzen_opt.run.config import RunConfig


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "env" in out
    assert "run" in out


def test_env_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "cpu"
    assert "avx512_vnni" in info["cpu"]["flags"]


def test_env_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "versions.torch" in out
    assert "cpu.flags.avx512_bf16" in out


def test_env_bad_device_is_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


@pytest.mark.slow
def test_run_on_the_tiny_zoo_measures_every_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RYZEN_OPT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    suite = tmp_path / "suite" / "test_user_suite.py"
    suite.parent.mkdir()
    suite.write_text(
        "def test_sorting_is_stable():\n"
        "    assert sorted([(1, 'b'), (0, 'a'), (1, 'a')]) == [(0, 'a'), (1, 'a'), (1, 'b')]\n"
    )
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'device = "cpu"\noutput_dir = "{tmp_path / "out"}"\nzoo_recipe = "tiny"\n[model]\ntarget = "zoo"\n'
        f'[training]\ntext_files = ["{text}"]\nsteps = 3\nbatch_size = 2\nblock_size = 32\nlr = 1e-3\n'
        '[validation]\nmodels = ["zoo"]\nprompts = 1\npairs = 3\nnew_tokens = 16\naccuracy_blocks = 8\n'
        f'context_len = 256\n[testing]\npaths = ["{suite}"]\npytest_args = ["-q", "-p", "no:cacheprovider"]\n'
    )
    code = main(["run", str(cfg)])
    out = tmp_path / "out"
    report = json.loads((out / "phase2_final_report.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["stages"]}
    assert statuses == {"setup": "DONE", "training": "DONE", "validation": "DONE", "testing": "DONE"}
    assert code == (0 if report["status"] == "COMPLETE" else 1)  # a tiny model may well miss a gate: then exit 1
    training = json.loads((out / "training_metrics_report.json").read_text())
    assert training["statistics"]["total_batches"] == 3  # the fine-tune's own steps, measured now
    stage = {s["name"]: s for s in report["stages"]}
    assert stage["training"]["data"]["mode"] == "fine-tune"
    held = stage["training"]["data"]
    assert held["heldout_after"]["loss"] < held["heldout_before"]["loss"]
    integration = json.loads((out / "integration_test_report.json").read_text())
    assert integration["summary"]["passed"] == 1
    validation = json.loads((out / "validation_report.json").read_text())
    names = {r["name"] for r in validation["results"]}
    assert names >= {"end_to_end_system", "correctness", "speculative_decoding", "embedding_compression"}
    # Status follows the gates: COMPLETE only if none fails (a tiny model may well miss the speed bars).
    assert (report["status"] == "COMPLETE") == (not report["incomplete_reasons"])
    assert (out / "phase2_summary.md").is_file()
    printed = capsys.readouterr().out
    assert "[4/4]" in printed
    assert "final report" in printed
    assert printed.splitlines()[-1].startswith(f"ryzen-opt run: final report {report['status']}")
    assert printed.splitlines()[-1].endswith(f": exit {code}")


def _final_report(tmp_path: Path, status: str, reasons: list[str]) -> dict[str, object]:
    """What run_pipeline returns, for a run whose stages all finished and whose one gate has ``status``."""
    gate = "PASS" if status == "COMPLETE" else "INCONCLUSIVE"
    entry = {"value": 0.004, "target": 0.01, "comparison": "max", "status": gate, "ci_low": -0.002, "ci_high": 0.012}
    return {
        "status": status,
        "incomplete_reasons": reasons,
        "stages": [{"name": name, "status": "DONE"} for name in ("setup", "training", "validation", "testing")],
        "optimization_results": {"kernels": {"accuracy_loss": [entry | {"model": "target"}]}},
        "e2e_results": {},
        "path": str(tmp_path / "phase2_final_report.json"),
    }


@pytest.mark.parametrize(
    ("status", "reasons", "code", "last_line"),
    [
        ("COMPLETE", [], 0, "ryzen-opt run: final report COMPLETE: exit 0"),
        (
            "INCOMPLETE",
            ["gate correctness (target): INCONCLUSIVE"],
            1,
            "ryzen-opt run: final report INCOMPLETE (gate correctness (target): INCONCLUSIVE): exit 1",
        ),
        (
            "INCOMPLETE",
            ["gate correctness (target): FAIL", "gate kernel_performance (target): INCONCLUSIVE"],
            1,
            "ryzen-opt run: final report INCOMPLETE (gate correctness (target): FAIL; 1 more): exit 1",
        ),
    ],
    ids=["complete", "inconclusive gate", "failed gate and more"],
)
def test_run_exits_0_only_for_a_complete_report_and_says_so_last(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    status: str,
    reasons: list[str],
    code: int,
    last_line: str,
) -> None:
    def fake_run_pipeline(config, progress=None, say=None):
        assert config.output_dir == str(tmp_path)
        return _final_report(tmp_path, status, reasons)

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    assert main(["run", "--device", "cpu", "--output-dir", str(tmp_path)]) == code
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == last_line
    assert "kernels" in printed  # the gate table is still printed above it
    for reason in reasons:
        assert f"  incomplete: {reason}" in printed


def test_run_with_a_failed_stage_exits_1_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real run_pipeline (its stages faked): a stage's failure is the first reason on the last line."""

    def broken(ctx):
        raise RyzenOptError("the disk is full")

    monkeypatch.setattr(pipeline, "STAGES", [("setup", lambda ctx: {}), ("validation", broken), ("testing", dict)])
    assert main(["run", "--device", "cpu", "--output-dir", str(tmp_path)]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "ryzen-opt run: final report INCOMPLETE (validation: FAILED: the disk is full; 1 more): exit 1"
    assert json.loads((tmp_path / "phase2_final_report.json").read_text())["status"] == "INCOMPLETE"


@pytest.mark.parametrize(("status", "code"), [("COMPLETE", 0), ("INCOMPLETE", 1), ("FAILED", 1)])
def test_a_torchrun_rank_other_than_0_exits_with_rank_0s_outcome_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, status: str, code: int
) -> None:
    from ryzen_opt.training import distributed

    monkeypatch.setattr(distributed, "env_info", lambda: distributed.DistInfo(rank=1, world_size=2))
    outcome = {"status": status, "stages": [], "failed": [], "path": None, "incomplete_reasons": []}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config: outcome)
    assert main(["run", "--device", "cpu", "--output-dir", str(tmp_path)]) == code
    assert capsys.readouterr().out == ""  # only rank 0 prints


def test_run_bad_input_exits_2_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("the pipeline ran on bad input")

    monkeypatch.setattr(pipeline, "run_pipeline", must_not_run)
    assert main(["run", "--device", "tpu", "--output-dir", str(tmp_path)]) == 2
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    printed = capsys.readouterr()
    assert "'device' = 'tpu': allowed values" in printed.err
    assert "does not exist" in printed.err
    assert "exit" not in printed.out


def test_run_bad_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('device = "tpu"\n')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "'device'" in err
    assert "allowed values" in err


def test_run_with_a_target_that_does_not_exist_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\ntarget = "{tmp_path / "my-model"}"\n')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"[model] target = '{tmp_path / 'my-model'}'" in err
    assert "does not exist" in err
    assert "draft" not in err
    assert not (tmp_path / "ryzen_results").exists()  # nothing ran


def test_config_unknown_key_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key.*'devcie'"):
        RunConfig.from_dict({"devcie": "cpu"})
    broken = tmp_path / "broken.toml"
    broken.write_text("device = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "missing.toml")
