"""Which kernel should a batch-1 decode use for each weight shape on this CPU? (KernelOptimizer groundwork.)

One decoded token multiplies a [1, in] activation by every weight matrix once, so decode is a chain of GEMVs and
their cost is bytes streamed / achieved bandwidth. For each shape of SmolLM2-135M (or of a 134M Llama with
``--model 134m``), this times each candidate kernel against fp32 ``F.linear`` with the paired A/B
sampler, and reports time per call, GB/s of weight bytes (scales included) and SQNR against fp32
(``20 log10(|ref| / |ref - out|)``, torchao's accuracy measure).

    python benchmarks/bench_gemv.py [--model smollm2|134m] [--threads 1] [--pairs 12] [--out ...gemv.json]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ryzen_opt.measure.timing import compare
from ryzen_opt.ops.linear import fbgemm_reduce_range
from ryzen_opt.validation.reports import atomic_write_json, environment

SHAPES = {  # (out, in) per model; qkv and gate/up fused as the KernelOptimizer fuses them
    "134m": {
        "qkv 2304x768": (2304, 768),
        "o_proj 768x768": (768, 768),
        "gate_up 4096x768": (4096, 768),
        "down 768x2048": (768, 2048),
        "lm_head 32000x768": (32000, 768),
    },
    "smollm2": {  # SmolLM2-135M: hidden 576, 9 query and 3 KV heads of 64, intermediate 1536, vocab 49152
        "qkv 960x576": (960, 576),
        "o_proj 576x576": (576, 576),
        "gate_up 3072x576": (3072, 576),
        "down 576x1536": (576, 1536),
        "lm_head 49152x576": (49152, 576),
    },
}
GROUPS = (32, 64)  # int4 group sizes along the input dimension
# Decode streams every weight from DRAM once per token (440 MB for a 134M model), but one small matrix timed in a
# loop stays in cache and reads 3x faster than DRAM. Each timed call therefore walks over independent copies of the
# matrix totalling at least this many fp32 bytes, so every GEMV streams from memory as it would in decode.
STREAM_BYTES = 256 * 2**20


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out.float()).norm().item()
    return math.inf if noise == 0 else 20 * math.log10(ref.norm().item() / noise)


def candidates(w: torch.Tensor) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """name -> (fn(x_fp32) -> y, stored bytes). Each fn takes the fp32 activation, as a decode step would."""
    n, k = w.shape
    wt = w.t().contiguous()  # [in, out]: the layout that makes x @ Wt stream rows
    w_bf16 = w.bfloat16()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
    w_int8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    scale_bf16 = scale.bfloat16()
    qweight = torch.quantize_per_channel(w, scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    packed_fbgemm = torch.ops.quantized.linear_prepack(qweight, None)
    int4 = {}
    for group in GROUPS:
        wg = w.view(n, k // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        s4 = ((hi - lo) / 15).clamp(min=1e-8)
        q4 = torch.round((wg - lo) / s4).clamp(0, 15).to(torch.int32).view(n, k)
        packed4 = torch._convert_weight_to_int4pack_for_cpu(q4, 1)
        sz = torch.stack([s4.squeeze(-1).t(), (lo + 8 * s4).squeeze(-1).t()], dim=-1).bfloat16().contiguous()
        int4[f"int4 _weight_int4pack_mm_for_cpu g{group} (bf16 act)"] = (
            lambda x, p=packed4, g=group, sz=sz: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), p, g, sz),
            n * k // 2 + sz.numel() * 2,
        )
    reduce_range = fbgemm_reduce_range()
    return {
        "fp32 F.linear": (lambda x: F.linear(x, w), n * k * 4),
        "fp32 x @ Wt": (lambda x: x @ wt, n * k * 4),
        "bf16 F.linear": (lambda x: F.linear(x.bfloat16(), w_bf16), n * k * 2),
        "int8 fbgemm dynamic": (
            lambda x: torch.ops.quantized.linear_dynamic(x, packed_fbgemm, reduce_range),
            n * k + n * 4,
        ),
        "int8 _weight_int8pack_mm (bf16 act)": (
            lambda x: torch._weight_int8pack_mm(x.bfloat16(), w_int8, scale_bf16),
            n * k + n * 2,
        ),
        **int4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=sorted(SHAPES), default="smollm2", help="whose decode shapes")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/results/gemv.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'shape':<20} {'kernel':<48} {'us/call':>9} {'GB/s':>6} {'vs fp32 F.linear':>28} {'SQNR dB':>8}")
    for shape_name, (n, k) in SHAPES[args.model].items():
        copies = max(2, math.ceil(STREAM_BYTES / (n * k * 4)))
        weights = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, generator=gen)
        ref = F.linear(x, weights[0])
        sets = [candidates(w) for w in weights]
        names = list(sets[0])

        def walk(name: str, x: torch.Tensor = x, sets: list = sets) -> Callable[[], None]:
            fns = [s[name][0] for s in sets]

            def run() -> None:
                for fn in fns:
                    fn(x)

            return run

        for name in names:
            fn, nbytes = sets[0][name]
            m = compare(
                walk("fp32 F.linear"),
                walk(name),
                min_pairs=args.pairs,
                max_pairs=args.pairs,
                warmup=2,
                baseline_name="fp32 F.linear",
                candidate_name=name,
            )
            us = m.candidate_median_s / copies * 1e6
            row = {
                "shape": shape_name,
                "out": n,
                "in": k,
                "kernel": name,
                "us_per_call": us,
                "stored_bytes": nbytes,
                "gb_per_s": nbytes / (us * 1e-6) / 1e9,
                "copies_walked": copies,
                "speedup_vs_fp32_linear": m.to_dict(),
                "sqnr_db": sqnr_db(ref, fn(x)),
            }
            rows.append(row)
            print(
                f"{shape_name:<20} {name:<48} {us:9.1f} {row['gb_per_s']:6.1f} {m.describe():>28} {row['sqnr_db']:8.1f}"
            )
        del sets, weights
    result = {
        "benchmark": "decode GEMV candidates per shape",
        "threads": args.threads,
        "model": args.model,
        "rows": rows,
        "environment": environment(),
    }
    for row in result["rows"]:
        if math.isinf(row["sqnr_db"]):
            row["sqnr_db"] = None  # exact: JSON has no Infinity
    atomic_write_json(Path(args.out), result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
