"""EmbeddingCompressor on a real pretrained encoder: all-MiniLM-L6-v2 sentence embeddings, original vs compressed.

    python benchmarks/bench_minilm.py                     # ~1 minute on one Zen 4 core
    python benchmarks/bench_minilm.py --n 512 --threads 2 --out /tmp/minilm.json

MiniLM's 30522x384 word-embedding table is over half its parameters, so it is where embedding compression pays.
Each method compresses a fresh deep copy of the loaded model; the table reports the compressor's own byte ratio and
the table's SQNR (``compression_report``), then what a user of the encoder sees (``ryzen_opt.measure.sentence_eval``):
cosine between each sentence's original and compressed embedding, and top-1 retrieval agreement among the
sentences. A method that raises is reported with its error; the others still run.

Results go to ``benchmarks/results/minilm.json`` (gitignored) and a table on the terminal.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.measure.sentence_eval import compare_sentence_embeddings, load_minilm, sentences
from ryzen_opt.optimizers.embeddings import CompressionConfig, EmbeddingCompressor
from ryzen_opt.validation.reports import atomic_write_json, environment

logger = logging.getLogger("bench_minilm")

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "minilm.json"

# (label, CompressionConfig keyword arguments)
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("int8", {"method": "int8"}),
    ("int4 g32", {"method": "int4", "group_size": 32}),
    ("int4 g64", {"method": "int4", "group_size": 64}),
    ("int4 g128", {"method": "int4", "group_size": 128}),
    ("lowrank r2", {"method": "lowrank", "target_ratio": 2.0}),
    ("lowrank r4", {"method": "lowrank", "target_ratio": 4.0}),
]


def run_method(label: str, kwargs: dict[str, Any], model: Any, tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """Compress a deep copy of ``model`` with ``kwargs`` and measure it; an exception becomes an ``error`` entry."""
    row: dict[str, Any] = {"label": label, "config": kwargs}
    try:
        start = time.perf_counter()
        compressor = EmbeddingCompressor(CompressionConfig(**kwargs))
        candidate = compressor.apply_to_model(copy.deepcopy(model))
        row["compress_seconds"] = time.perf_counter() - start
        report = compressor.compression_report()
        row["report"] = report
        row["ratio"] = report["ratio"]
        sqnrs = [t["sqnr_db"] for t in report["tensors"] if t.get("sqnr_db") is not None]
        row["sqnr_db"] = min(sqnrs) if sqnrs else None
        row["sentence"] = compare_sentence_embeddings(model, candidate, tokenizer, texts)
    except Exception as exc:  # noqa: BLE001 - one method failing must not hide the others' results
        logger.exception("%s failed", label)
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The terminal table: one line per method, errors in place of numbers."""
    header = f"{'method':<11} {'ratio':>6} {'SQNR dB':>8} {'cos mean':>9} {'cos min':>8} {'cos p05':>8} {'top1 agr':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['label']:<11} ERROR {row['error']}")
            continue
        s = row["sentence"]
        lines.append(
            f"{row['label']:<11} {_fmt(row['ratio'], '6.2f')} {_fmt(row['sqnr_db'], '8.1f')} "
            f"{s['cosine_mean']:9.5f} {s['cosine_min']:8.5f} {s['cosine_p05']:8.5f} {s['retrieval_agreement']:8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="number of sentences (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    texts = sentences(args.n)
    model, tokenizer = load_minilm("cpu")
    rows = [run_method(label, kwargs, model, tokenizer, texts) for label, kwargs in METHODS]

    table = format_table(rows)
    logger.info("\nall-MiniLM-L6-v2, %d sentences, %d thread(s)\n%s", len(texts), args.threads, table)
    data = {
        "benchmark": "minilm_embedding_compression",
        "model": "all-MiniLM-L6-v2",
        "n_sentences": len(texts),
        "threads": args.threads,
        "environment": environment("cpu"),
        "results": rows,
    }
    path = atomic_write_json(args.out, data)
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
