"""The testing stage: pytest with the ryzen plugin, in a subprocess, on the validated model or the user's suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ryzen_opt import selftest
from ryzen_opt.errors import ConfigError, RyzenOptError
from ryzen_opt.run.context import RunContext
from ryzen_opt.training import distributed
from ryzen_opt.validation.reports import atomic_write_json


def save_model(ctx: RunContext) -> Path:
    """Save the validated target (weights, tokenizer, and the run's optimizer configs as ``ryzen_opt_system.json``)
    to ``<output_dir>/model``, atomically: a temporary directory renamed into place."""

    final = ctx.out / "model"
    ctx.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=ctx.out))
    try:
        ctx.target.save_pretrained(tmp)
        ctx.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "ryzen_opt_system.json", ctx.config.system.to_dict())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def run_testing(ctx: RunContext) -> dict[str, Any]:
    """Run pytest with the ryzen plugin in a subprocess; collect its ``integration_test_report.json``.

    Without ``[testing] paths``: the packaged suite (``ryzen_opt.selftest``) on the model just validated, saved to
    ``<output_dir>/model`` and named to the suite by ``$RYZEN_OPT_SELFTEST_MODEL``."""
    t = ctx.config.testing
    if not t.enabled:
        return {"skipped": "[testing] enabled = false"}
    report_dir = (ctx.out / "testing").absolute()
    # pytest runs as one process of its own: torchrun's variables would make it think it is a rank.
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    if t.paths:
        missing = [p for p in t.paths if not Path(p).exists()]
        if missing:
            raise ConfigError(
                f"[testing] paths {missing} do not exist (relative to {os.getcwd()}): point [testing] paths at your "
                "test suite, leave it empty for the packaged suite, or set [testing] enabled = false"
            )
        cmd = [sys.executable, "-m", "pytest", *t.paths, *t.pytest_args, f"--ryzen-report-dir={report_dir}"]
        suite = "paths"
    else:
        if ctx.target is None:
            raise RyzenOptError("no model to test: setup did not load one")
        ctx.say("testing: saving the validated model for the packaged suite")
        model_dir = save_model(ctx).absolute()
        env[selftest.MODEL_ENV] = str(model_dir)
        ini = Path(selftest.__file__).with_name("pytest.ini")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "--pyargs",
            "ryzen_opt.selftest",
            # Its own ini and rootdir: the current directory's pytest config (addopts, plugins) is not the suite's.
            "-c",
            str(ini),
            "--rootdir",
            str(ini.parent),
            *t.pytest_args,
            f"--ryzen-report-dir={report_dir}",
        ]
        if "no:cacheprovider" not in "".join(t.pytest_args):  # pytest's cache goes with the reports, not the package
            cmd[-1:-1] = ["-o", f"cache_dir={report_dir / '.pytest_cache'}"]
        suite = f"ryzen_opt.selftest on {model_dir}"
    ctx.say(f"testing: {' '.join(cmd)}")
    report_path = report_dir / "integration_test_report.json"
    report_path.unlink(missing_ok=True)  # a report left by an earlier run must not pass for this one's
    started = time.perf_counter()
    # pytest's own progress (its dots and percentages) goes to the terminal as it runs.
    proc = subprocess.run(cmd, timeout=t.timeout_s, check=False, env=env)
    if not report_path.is_file():
        raise RyzenOptError(f"pytest exited {proc.returncode} without writing {report_path} (see its output above)")
    report = json.loads(report_path.read_text())
    atomic_write_json(ctx.out / "integration_test_report.json", report)
    counts = report["summary"]
    tail = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped", "errors"))
    if proc.returncode != 0:
        raise RyzenOptError(f"pytest exited {proc.returncode}: {tail}")
    return {
        "suite": suite,
        "command": cmd,
        "exit_code": proc.returncode,
        "summary": tail,
        "seconds": time.perf_counter() - started,
    }
