"""The ``ryzen-opt`` command line. The only place in the project that prints."""

from __future__ import annotations

import argparse
import json
import logging
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
    from ryzen_opt.device import device_info

    info = device_info(args.device)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_table(_flatten(info), header=("field", "value"))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ryzen_opt.pipeline import RunConfig, StageResult, run_pipeline

    config = RunConfig.from_toml(args.config) if args.config else RunConfig()
    overrides = {k: v for k, v in (("device", args.device), ("output_dir", args.output_dir)) if v is not None}
    if overrides:
        config = RunConfig.from_dict({**config.to_dict(), **overrides})

    def progress(result: StageResult) -> None:
        line = f"[{result.status.value:>9}] {result.name}"
        if result.reason:
            line += f": {result.reason}"
        print(line, flush=True)

    print(f"ryzen-opt run: device={config.device} output_dir={config.output_dir}")
    report = run_pipeline(config, progress=progress)
    print(f"final report: {report['path']} (status {report['status']})")
    failed = [s for s in report["stages"] if s["status"] == "FAILED"]
    return 1 if failed else 0


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

    p_run = sub.add_parser("run", help="run the pipeline: setup, training, validation, testing, final report")
    p_run.add_argument("config", nargs="?", help="TOML config file (default: the embedded default)")
    p_run.add_argument("--device", default=None, help="override the config's device (auto|cpu|cuda|rocm|mps)")
    p_run.add_argument("--output-dir", default=None, help="override the report directory (default ryzen_results/)")
    p_run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
