"""The human side of ``phase2_final_report.json``: a terminal table, and a Markdown page with plots beside it.

Plots (PNG, matplotlib's Agg backend, no display needed): the training loss curve, each optimizer's speedup over HF
``generate`` with its 95% CI as error bars (alone and all four together), and accuracy loss against how many times
smaller each optimization made what it compresses. Without matplotlib the page is written without plots and says why.
Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from ryzen_opt.validation.reports import atomic_write_text

logger = logging.getLogger(__name__)


def gate_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(optimizer, metric, model, value with CI, status) for every gate in the final report."""
    rows = []
    groups = [(opt, metrics) for opt, metrics in report.get("optimization_results", {}).items()]
    groups.append(("all four (e2e)", report.get("e2e_results", {})))
    for optimizer, metrics in groups:
        for metric, entries in metrics.items():
            for e in entries:
                value = "—" if e["value"] is None else f"{e['value']:.4g}"
                if e.get("ci_low") is not None and e.get("ci_high") is not None:
                    value += f" [{e['ci_low']:.3g}, {e['ci_high']:.3g}]"
                target = (
                    ""
                    if e["target"] is None
                    else (">= " if e.get("comparison") == "min" else "<= ") + f"{e['target']:g}"
                )
                rows.append((optimizer, metric, str(e.get("model") or ""), f"{value} ({target})", e["status"]))
    return rows


def _png(fig: Any, path: Path) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path.name


def _plots(report: dict[str, Any], out: Path) -> list[tuple[str, str]]:

    matplotlib.use("Agg")

    made: list[tuple[str, str]] = []
    metrics_path = out / "training_metrics_report.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        batches = metrics.get("batch_metrics") or []
        if batches:
            fig, ax = plt.subplots(figsize=(6, 3.2))
            ax.plot([b["step"] for b in batches], [b["loss"] for b in batches], lw=0.8)
            evals = metrics.get("epoch_metrics") or []
            held = [(e.get("step", e.get("epoch")), e["val_loss"]) for e in evals if e.get("val_loss") is not None]
            if held:
                ax.plot(*zip(*held, strict=True), "o-", label="held-out loss")
                ax.legend()
            ax.set(xlabel="step", ylabel="loss", title="training loss")
            made.append(("Training loss", _png(fig, out / "loss_curve.png")))
            plt.close(fig)
    validation = next((s["data"] for s in report.get("stages", []) if s["name"] == "validation" and s["data"]), None)
    if validation:
        measurements = validation.get("measurements", {})
        fig, ax = plt.subplots(figsize=(7, 3.4))
        width = 0.8 / max(1, len(measurements))
        for i, (model, data) in enumerate(measurements.items()):
            speeds = data["speedups_vs_hf"]
            names = list(speeds)
            ratios = [speeds[n]["ratio"] for n in names]
            low = [speeds[n]["ratio"] - speeds[n]["ci_low"] for n in names]
            high = [speeds[n]["ci_high"] - speeds[n]["ratio"] for n in names]
            xs = [j + i * width for j in range(len(names))]
            ax.bar(xs, ratios, width, yerr=[low, high], capsize=3, label=model)
            ax.set_xticks([j + width * (len(measurements) - 1) / 2 for j in range(len(names))], names)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(ylabel="speedup vs HF generate (95% CI)", title="each optimizer alone, and all four together")
        ax.legend()
        made.append(("Speedup per optimizer", _png(fig, out / "speedups.png")))
        plt.close(fig)
        points = []
        for model, data in measurements.items():
            acc = data.get("accuracy") or {}
            shrink = {
                "embedding_compressor": data["compression"]["ratio"],
                "kv_cache_optimizer": 1.0 / max(1e-9, 1.0 - data["kv_memory"]["reduction"]),
            }
            for optimizer, factor in shrink.items():
                if optimizer in acc:
                    a = acc[optimizer]
                    points.append((f"{optimizer} ({model})", factor, a["accuracy_loss"], a["ci_low"], a["ci_high"]))
        if points:
            fig, ax = plt.subplots(figsize=(6, 3.4))
            for name, x, y, lo, hi in points:
                ax.errorbar([x], [y * 100], yerr=[[100 * (y - lo)], [100 * (hi - y)]], fmt="o", capsize=3, label=name)
            ax.axhline(1.0, color="red", lw=0.8, ls="--", label="1% gate")
            ax.set(xlabel="times smaller (bytes)", ylabel="accuracy loss, % (95% CI)", title="accuracy vs compression")
            ax.legend(fontsize=7)
            made.append(("Accuracy vs compression", _png(fig, out / "accuracy_vs_compression.png")))
            plt.close(fig)
    return made


def write_summary(report: dict[str, Any], out: Path) -> Path:
    """Write ``phase2_summary.md`` (and its PNGs) into ``out``; returns the Markdown path."""
    lines = [
        "# ryzen-opt run",
        "",
        f"Status: **{report['status']}** ({report['completion_timestamp']}), "
        f"device {report['environment'].get('device')}, git {report['environment'].get('git_sha')}.",
        "",
    ]
    if report["incomplete_reasons"]:
        lines += ["Why it is incomplete:", ""] + [f"- {r}" for r in report["incomplete_reasons"]] + [""]
    lines += ["## Stages", "", "| stage | status | seconds | reason |", "|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['duration_s']:.1f} | {s['reason'] or ''} |")
    rows = gate_rows(report)
    if rows:
        lines += [
            "",
            "## Gates",
            "",
            "| optimizer | metric | model | measured (threshold) | status |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {' | '.join(r)} |" for r in rows]
    try:
        plots = _plots(report, out)
    except ImportError as exc:
        plots = []
        lines += ["", f"Plots: SKIPPED ({exc}; `pip install matplotlib`)."]
    for title, name in plots:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    path = out / "phase2_summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
