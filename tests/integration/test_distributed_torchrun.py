"""Distributed training with gloo on CPU, launched by torchrun as a user would: equivalence, reports, failures.

Each test starts real processes (``python -m torch.distributed.run``), so they are few and short: a 2-layer Llama,
four steps of blocks of 32 tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")
# A run takes ~10 s (two processes importing torch and transformers); a hung collective would take the gloo timeout.
LIMIT_S = 180


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["RYZEN_OPT_DIST_TIMEOUT"] = "120"
    return env


def _torchrun(out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [str(WORKER), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S, env=_env(), check=False)


def _single(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(WORKER), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S, env=_env(), check=False)


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def test_two_ranks_with_half_batches_match_one_rank(tmp_path: Path) -> None:
    """2 ranks x 2 rows reach the losses of 1 rank x 4 rows: the same global batches, gradients averaged by DDP.

    Tolerance 1e-4 relative: the two runs differ only in fp32 summation order (two 2-row means averaged by the
    all-reduce against one 4-row mean; ~1e-7 relative per reduction), which four AdamW steps at lr 1e-2 amplify
    through the update's normalisation, but by far less than 1e-4; a wrong shard or a missed all-reduce moves the
    losses by 1e-2 or more."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
    single = _single(one)
    assert single.returncode == 0, single.stdout + single.stderr
    dist = _torchrun(two)
    assert dist.returncode == 0, dist.stdout + dist.stderr
    a, b = _result(one)["losses"], _result(two)["losses"]
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-4)
    assert a[-1] < a[0]  # it trained
    report = json.loads((two / "training_metrics_report.json").read_text())
    assert report["metadata"]["world_size"] == 2
    assert report["metadata"]["backend"] == "gloo"
    assert all(len(m["rank_step_s"]) == 2 for m in report["batch_metrics"])
    assert report["statistics"]["straggler_ratio"] >= 1.0
    solo = json.loads((one / "training_metrics_report.json").read_text())
    assert solo["metadata"]["world_size"] == 1
    assert solo["metadata"]["backend"] is None
    # Held-out evaluation is split over the ranks and summed: the same numbers as one process.
    assert _result(two)["summary"]["final_eval"]["loss"] == pytest.approx(
        _result(one)["summary"]["final_eval"]["loss"], rel=1e-4
    )


def test_accumulation_with_no_sync_matches_one_big_batch(tmp_path: Path) -> None:
    """2 ranks x 2 micro-batches of 1 row (no_sync on the first) give the losses of 1 rank x 4 rows."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
    assert _single(one).returncode == 0
    dist = _torchrun(two, "--accum", "2")
    assert dist.returncode == 0, dist.stdout + dist.stderr
    assert _result(two)["losses"] == pytest.approx(_result(one)["losses"], rel=1e-4)


def test_a_nan_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    proc = _torchrun(tmp_path, "--fault", "nan", "--fault-rank", "1", "--fault-step", "2")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"rank {rank} ERROR TrainingDivergedError: loss became nan at step 2 on rank(s) [1]" in text, text
    report = json.loads((tmp_path / "training_metrics_report.json").read_text())
    assert [a["kind"] for a in report["anomalies"]] == ["nan_loss"]  # the reduced loss, in rank 0's report
    assert not (tmp_path / "result.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_a_rank_that_dies_stops_the_run(tmp_path: Path) -> None:
    """Rank 1 exits abruptly mid-training: the run ends (no rank waits on it) with an error that names it."""
    proc = _torchrun(tmp_path, "--fault", "die", "--fault-rank", "1", "--fault-step", "2")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    # torchrun names the rank that failed and its exit code; rank 0, if it saw the closed connection before torchrun
    # stopped it, says so itself.
    assert "exitcode  : 7" in text or "exit code 7" in text.lower() or "exitcode: 7" in text, text
    assert not (tmp_path / "result.json").exists()
