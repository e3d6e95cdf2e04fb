"""The ``ryzen-opt`` command line. The only place in the project that prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ryzen_opt.errors import RyzenOptError


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, name + "."))
        else:
            rows.append((name, "-" if value is None else str(value)))
    return rows


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> None:
    """Print rows as an aligned plain-text table (no dependency, copy-pastes into issues)."""
    all_rows = [list(header)] if header else []
    all_rows += [list(r) for r in rows]
    if not all_rows:
        return
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(all_rows[0]))]
    for i, row in enumerate(all_rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())
        if header and i == 0:
            print("  ".join("-" * w for w in widths))


def cmd_env(args: argparse.Namespace) -> int:
    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.device import device_info

    info = device_info(args.device)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_table(_flatten(info), header=("field", "value"))
    return 0


def run_exit_code(report: dict[str, Any]) -> int:
    """``ryzen-opt run``'s exit code for its final report: 0 only when COMPLETE, 1 otherwise (a failed or
    inconclusive gate, a failed stage). Bad input (a bad config, an unknown device) exits 2 before anything runs."""
    failed = report.get("failed") or [s for s in report["stages"] if s["status"] == "FAILED"]
    return 0 if report["status"] == "COMPLETE" and not failed else 1


def _first_reason(report: dict[str, Any]) -> str:
    """`` (the first incomplete reason; N more)`` for the last line, or nothing for a COMPLETE report."""
    reasons = report["incomplete_reasons"]
    if not reasons:
        return ""
    more = f"; {len(reasons) - 1} more" if len(reasons) > 1 else ""
    return f" ({reasons[0]}{more})"


def cmd_run(args: argparse.Namespace) -> int:
    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.run.config import RunConfig

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.run.context import StageResult

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.run.pipeline import run_pipeline

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.run.summary import gate_rows

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.training import distributed

    config = RunConfig.from_toml(args.config) if args.config else RunConfig()
    overrides = {k: v for k, v in (("device", args.device), ("output_dir", args.output_dir)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)  # __post_init__ checks the values again
    stages = ("setup", "training", "validation", "testing")
    done = {"n": 0}
    try:
        main_rank = distributed.env_info().is_main  # under torchrun only rank 0 prints
    except RyzenOptError:
        main_rank = True  # the run's setup stage reports the bad environment

    def progress(result: StageResult) -> None:
        done["n"] += 1
        line = f"[{done['n']}/{len(stages)}] [{result.status.value:>9}] {result.name} ({result.duration_s:.0f} s)"
        if result.reason:
            line += f": {result.reason}"
        print(line, flush=True)

    def say(message: str) -> None:
        print(f"      {message}", flush=True)

    if not main_rank:
        return run_exit_code(run_pipeline(config))  # the same code as rank 0's: its outcome is broadcast
    print(f"ryzen-opt run: device={config.device} output_dir={config.output_dir}")
    report = run_pipeline(config, progress=progress, say=say)
    rows = gate_rows(report)
    if rows:
        print()
        print_table(rows, header=("optimizer", "metric", "model", "measured [95% CI] (threshold)", "status"))
    print(f"\nfinal report: {report['path']} (status {report['status']})")
    if report.get("summary_path"):
        print(f"summary with plots: {report['summary_path']}")
    for reason in report["incomplete_reasons"]:
        print(f"  incomplete: {reason}")
    code = run_exit_code(report)
    print(f"ryzen-opt run: final report {report['status']}{_first_reason(report)}: exit {code}")
    return code


# The quality bars of the reference models (issue #3): what `ryzen-opt zoo --eval` compares against.
ZOO_BARS = {"target_top1": 0.25, "draft_agreement": 0.60}


def cmd_zoo(args: argparse.Namespace) -> int:
    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.models import zoo

    path = zoo.build(args.recipe, force=args.force, progress=not args.json)
    build = json.loads((path / "build.json").read_text())
    if not args.eval:
        if args.json:
            print(json.dumps({"path": str(path), "build": build}, indent=2))
        else:
            print(f"zoo {args.recipe!r}: {path}")
            print(
                f"trained {build['steps']} steps, {build['tokens']} tokens, {build['tokens_per_s']:.0f} tokens/s, "
                f"{build['build_seconds']:.0f}s to build"
            )
        return 0
    quality = zoo.evaluate_zoo(args.recipe)
    quality["path"] = str(path)
    quality["bars"] = ZOO_BARS
    if args.json:
        print(json.dumps(quality, indent=2))
        return 0
    t, d = quality["target"], quality["draft"]
    print(f"zoo {args.recipe!r} at {path}: measured on {quality['heldout_tokens']} held-out tokens")
    print_table(
        [
            ("target next-token top-1", f"{t['accuracy']:.4f}", f">= {ZOO_BARS['target_top1']}"),
            ("target perplexity", f"{t['perplexity']:.1f}", ""),
            ("draft next-token top-1", f"{d['accuracy']:.4f}", ""),
            (
                "draft greedy agreement with target",
                f"{d['agreement_with_target']:.4f}",
                f">= {ZOO_BARS['draft_agreement']}",
            ),
            ("target greedy distinct-token fraction", f"{quality['generation']['distinct_token_fraction']:.3f}", ""),
        ],
        header=("measure", "value", "bar"),
    )
    return 0


def cmd_bench_noise(args: argparse.Namespace) -> int:
    import torch

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.device import resolve_device

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.measure.timing import noise_floor

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # A memory-bound matrix-vector product, the shape of batch-1 decode: ~16 MiB of fp32 weights per call.
    weight = torch.randn(args.size, args.size, device=device)
    x = torch.randn(1, args.size, device=device)

    def workload() -> None:
        for _ in range(args.repeat):
            torch.mm(x, weight)

    floor = noise_floor(workload, pairs=args.pairs, warmup=3, device=device)
    data = floor.to_dict() | {
        "workload": f"{args.repeat} x fp32 GEMV [1 x {args.size}] @ [{args.size} x {args.size}]",
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"A/A noise floor on {data['device']} ({data['threads']} threads), workload: {data['workload']}")
    print_table(
        [
            ("A/A ratio (should be 1)", f"{floor.ratio:.4f}"),
            ("95% CI", f"{floor.ci_low:.4f} - {floor.ci_high:.4f}"),
            ("pairs", str(floor.n)),
            ("coefficient of variation", f"{floor.cv:.3f}"),
            ("smallest speedup distinguishable from noise", f"{floor.smallest_detectable_speedup:.3f}x"),
        ],
        header=("measure", "value"),
    )
    return 0


def cmd_report_compare(args: argparse.Namespace) -> int:
    """Two runs' gate measurements side by side: baselines saved with ``--ryzen-save`` or report directories."""
    from pathlib import Path

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.validation import baselines

    root = Path(args.root)
    old_label, old, old_machine = baselines.entries_from_source(root, args.a)
    new_label, new, new_machine = baselines.entries_from_source(root, args.b)
    comparisons = baselines.compare(old, new)
    print(f"then: {old_label}   now: {new_label}")
    print("regressed = the new 95% interval entirely on the worse side of the stored one")
    mismatch = baselines.machine_mismatch(old_machine, new_machine)
    if mismatch:
        print(f"machines differ: {'; '.join(mismatch)}")
    header, rows = baselines.table(comparisons)
    print_table(rows, header=header)
    regressed = [c for c in comparisons if c.verdict == baselines.REGRESSED]
    return 1 if regressed and args.fail_on_regression else 0


def cmd_report_merge(args: argparse.Namespace) -> int:
    """One table and one final report from the report directories of a CI matrix."""
    from pathlib import Path

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.validation import baselines

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.validation.reports import atomic_write_json

    merged, header, rows = baselines.merge(args.dirs)
    print_table(rows, header=header)
    out = atomic_write_json(Path(args.out) / "final_report.json", merged)
    print(f"\nmerged final report: {out} (status {merged['status']})")
    for reason in merged["incomplete_reasons"]:
        print(f"  - {reason}")
    return 0 if merged["status"] == "COMPLETE" else 1


def cmd_draft_build(args: argparse.Namespace) -> int:
    """Build (or find in the cache) a feature draft for a local model; print where it is and how it did."""
    from pathlib import Path

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.models import zoo

    # lazy: the CLI answers --help and bad arguments without importing torch
    from ryzen_opt.optimizers.draft import DraftConfig, build_draft, expected_agreement

    aliases = {"smollm2": zoo.smollm2_dir, "zoo": lambda: zoo.build() / "target"}
    model_dir = aliases[args.model]() if args.model in aliases else Path(args.model)
    given = {"budget_seconds": args.budget, "chat_tokens": args.chat_tokens, "seed": args.seed, "probes": args.probes}
    config = DraftConfig(**{k: v for k, v in given.items() if v is not None})  # the rest: DraftConfig's defaults
    if not args.json and args.model == "smollm2":
        print(
            f"expected held-out agreement for a {config.budget_seconds:.0f} s build on 2 cores: "
            f"~{expected_agreement(config.budget_seconds):.2f} (a forecast from docs/draft.md's budget curve; "
            "an already built draft is loaded instead)"
        )
    path = build_draft(model_dir, config, force=args.force, progress=not args.json)
    build = json.loads((path / "draft_config.json").read_text())["build"]
    if args.json:
        print(json.dumps({"path": str(path), **build}, indent=2))
        return 0
    print(f"draft for {model_dir}: {path}")
    print_table(
        [
            ("held-out teacher-forced agreement", f"{build['heldout_agreement']:.3f}"),
            ("training steps", str(build["steps"])),
            ("blocks (train / held-out)", f"{build['blocks']['train']} / {build['blocks']['heldout']}"),
            ("chat answers by the target", str(build["chat_answers"])),
            ("draft vocabulary", f"{build['draft_vocab']} (covers {build['vocab_coverage']:.1%} of the corpus)"),
            ("build seconds", f"{build['seconds']:.0f}"),
        ],
        header=("measure", "value"),
    )
    if build.get("curve"):
        print("\nlearning curve (held-out agreement during training, on up to 32 held-out blocks):")
        print_table(
            [(f"{p['train_seconds']:.0f}", str(p["steps"]), f"{p['agreement']:.3f}") for p in build["curve"]],
            header=("training s", "steps", "agreement"),
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ryzen-opt",
        description="Measured LLM inference optimizations for PyTorch / transformers causal LMs.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p_env = sub.add_parser("env", help="show the device, CPU flags, threads and versions reports are measured on")
    p_env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_env.add_argument("--device", default=None, help="also describe this device (auto|cpu|cuda|rocm|mps)")
    p_env.set_defaults(func=cmd_env)

    p_run = sub.add_parser(
        "run",
        help="run the pipeline: setup, training, validation, testing, final report",
        epilog="exit status: 0 when the final report is COMPLETE, 1 when it is not (a failed or inconclusive gate, "
        "a failed stage), 2 on bad input (config, device), 130 on Ctrl-C",
    )
    p_run.add_argument("config", nargs="?", help="TOML config file (default: the embedded default)")
    p_run.add_argument("--device", default=None, help="override the config's device (auto|cpu|cuda|rocm|mps)")
    p_run.add_argument("--output-dir", default=None, help="override the report directory (default ryzen_results/)")
    p_run.set_defaults(func=cmd_run)

    p_bench = sub.add_parser("bench", help="measurements: `bench noise` is this machine's A/A noise floor")
    bench_sub = p_bench.add_subparsers(dest="bench_command", metavar="WHAT")
    bench_sub.required = True
    p_noise = bench_sub.add_parser("noise", help="A/A calibration: the smallest speedup this machine can tell apart")
    p_noise.add_argument("--device", default="cpu", help="auto|cpu|cuda|rocm|mps (default cpu)")
    p_noise.add_argument("--pairs", type=int, default=30, help="paired A/A samples (default 30)")
    p_noise.add_argument("--size", type=int, default=2048, help="GEMV size (default 2048: 16 MiB of weights)")
    p_noise.add_argument("--repeat", type=int, default=4, help="GEMVs per timed call (default 4)")
    p_noise.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p_noise.add_argument("--json", action="store_true", help="print JSON")
    p_noise.set_defaults(func=cmd_bench_noise)

    p_report = sub.add_parser("report", help="reports across runs: `report compare A B`, `report merge DIR...`")
    report_sub = p_report.add_subparsers(dest="report_command", metavar="WHAT")
    report_sub.required = True
    p_compare = report_sub.add_parser(
        "compare", help="compare two runs' gates: saved baselines (name, 'latest', .json) or report directories"
    )
    p_compare.add_argument("a", help="the earlier run")
    p_compare.add_argument("b", help="the later run")
    p_compare.add_argument("--root", default=".", help="where .ryzen/ (the saved baselines) is (default: .)")
    p_compare.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a measurement regressed")
    p_compare.set_defaults(func=cmd_report_compare)
    p_merge = report_sub.add_parser(
        "merge", help="merge the report directories of a CI matrix into one table and one final report"
    )
    p_merge.add_argument("dirs", nargs="+", metavar="DIR", help="report directories (--ryzen-report-dir), one per run")
    p_merge.add_argument("--out", default="ryzen_results/merged", help="where final_report.json goes")
    p_merge.set_defaults(func=cmd_report_merge)

    p_zoo = sub.add_parser("zoo", help="train (or load from cache) the reference models and show their quality")
    p_zoo.add_argument("--recipe", default="default", choices=("default", "tiny"), help="which zoo (default: default)")
    p_zoo.add_argument("--eval", action="store_true", help="measure held-out quality now")
    p_zoo.add_argument("--force", action="store_true", help="retrain even if an intact cached copy exists")
    p_zoo.add_argument("--json", action="store_true", help="print JSON")
    p_zoo.set_defaults(func=cmd_zoo)

    p_draft = sub.add_parser("draft", help="drafts for speculative decoding: `draft build MODEL`")
    draft_sub = p_draft.add_subparsers(dest="draft_command", metavar="WHAT")
    draft_sub.required = True
    p_build = draft_sub.add_parser(
        "build", help="train (or load from cache) a feature draft for a local model, within a time budget"
    )
    p_build.add_argument("model", help="a local model directory (save_pretrained), or 'smollm2' or 'zoo'")
    p_build.add_argument("--budget", type=float, help="seconds for the whole build (default: DraftConfig's, 1200)")
    p_build.add_argument("--chat-tokens", type=int, help="tokens of chat answers the target writes for the corpus")
    p_build.add_argument("--seed", type=int, help="data order and initialisation")
    p_build.add_argument(
        "--probes", type=int, help="measure held-out agreement this many times during training (the learning curve)"
    )
    p_build.add_argument("--force", action="store_true", help="rebuild even if an intact cached draft exists")
    p_build.add_argument("--json", action="store_true", help="print JSON")
    p_build.set_defaults(func=cmd_draft_build)
    return parser


# The exit status of a command whose output pipe closed: what a shell reports for one killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that the interpreter's final flush of the output still buffered has
    somewhere to go instead of raising BrokenPipeError again ("Exception ignored ..." on stderr, exit 120).

    The recipe of the Python documentation ("Note on SIGPIPE", in the ``signal`` module's page). A ``sys.stdout``
    without a file descriptor (a test's capture) has no final flush to guard.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ryzen-opt`` console script: parse, run one command, return its exit status.

    A reader that closes the output early (``ryzen-opt report compare a b | head``) ends the command quietly with
    :data:`EXIT_BROKEN_PIPE`, as ``cat`` or ``git log`` do, and not with a BrokenPipeError traceback: the output is
    flushed here, inside the handler, rather than at interpreter exit, where the error could not be caught.
    """
    try:
        try:
            return _dispatch(argv)
        finally:
            sys.stdout.flush()  # argparse's --help exits through here too (SystemExit)
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _dispatch(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except RyzenOptError as exc:
        print(f"ryzen-opt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ryzen-opt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
