"""How fast do established CPU inference engines decode, batch 1, next to HF transformers fp32 on the same Llama?

Every ryzen_opt speedup is quoted against HF transformers ``generate`` fp32. That number only means something next
to what the engines people actually deploy on CPUs reach with the same weights on the same cores, so this times, on
one local HF Llama directory:

* ``hf``: transformers ``generate`` fp32 (the baseline);
* ``ryzen``: ryzen_opt's ``KernelOptimizer`` (fp32, int8, int8-a8, int4): its lean static-cache loop, driven step
  by step (``int8-a8``: ``int8_kernel="native-a8"``, activations rounded to int8 per block of 32 as Q8_0's are);
* ``llamacpp``: llama.cpp through ``llama-cpp-python``, GGUF f32, bf16, Q8_0 and Q4_K_M;
* ``ortgenai``: ONNX Runtime GenAI, fp32, int8 and int4 from its own model builder (CPU defaults: MatMulNBits,
  block 32, accuracy level 4, i.e. int8 activations).

Setting: batch 1, a prompt of ``--prompt-tokens`` random token ids (seed 0), ``--new-tokens`` greedy tokens with
EOS suppressed (HF ``min_new_tokens``, ORT GenAI ``min_length``, llama.cpp: our own argmax loop never stops), so every
engine generates exactly that many. Each engine is driven through its own Python API and a timestamp is taken as each
new token id becomes known: HF, a streamer's ``put``; ryzen, its own argmax after each step;
llama.cpp, ``Llama.eval`` then argmax of the last logits;
ORT GenAI, ``Generator.generate_next_token``. Prefill = start to first new token; decode ms/token =
(last token - first token) / (new_tokens - 1), so the prompt pass is excluded. After one warm-up run each, engines run
round-robin (one run of each per round) so drift on a shared machine hits all alike; figures are medians over
``--runs``. Every engine gets the same thread count: ``torch.set_num_threads``, llama ``n_threads`` and
``n_threads_batch``, ORT ``intra_op_num_threads`` (inter-op 1). ``speedup_vs_hf`` = HF fp32 ms/token / engine
ms/token, measured in the same process at the same thread count. ``match_vs_hf`` = how many leading greedy tokens equal
HF fp32's: a conversion sanity check (quantized formats may diverge legitimately, sooner on random weights).

**Quality against speed** (``--quality-blocks``, on by default for a pretrained model): every engine scores the same
held-out token blocks (CPython's documentation prose, the ``test`` split of ``corpus.prose_blocks``), each block in one
prompt pass (llama.cpp with ``logits_all``, ORT GenAI's prompt-pass logits), and ``ryzen_opt.measure.accuracy`` compares
its logits with HF fp32's: top-1 agreement, KL(fp32 || engine), relative top-1 loss on the true next tokens with a
paired-bootstrap interval, perplexity ratio. A table and a plot (KL against ms/token, ``<out>.png``) put them side
by side. With ``--model smollm2`` llama.cpp also runs the wheel's own Q4_1 file (``q4_1-wheel``), the exact weights
the fp32 reference was dequantized from; Q8_0 and Q4_K_M are quantized from that fp32.

Conversions are cached under ``$RYZEN_OPT_CACHE/peers/artifacts/<hash of the HF dir>/`` and written atomically
(temp path + rename). GGUF comes from llama.cpp's own ``convert_hf_to_gguf.py``, taken from the llama-cpp-python
sdist of the installed version (fetched once with ``pip download`` unless ``$LLAMA_CPP_SRC`` names a llama.cpp
tree), then quantized with ``llama_cpp.llama_model_quantize``. A byte-level BPE tokenizer whose pre-tokenizer hash
llama.cpp does not know is written as ``gpt-2``; prompts are token ids, so this cannot touch the timings. An engine
that is not installed, or whose conversion fails, is reported SKIPPED with the reason and the install command.

    python benchmarks/bench_peers.py [--model {134m,smollm2,zoo,PATH}] [--threads 1 2] [--prompt-tokens 32]
        [--new-tokens 64] [--runs 7] [--engines hf,ryzen,llamacpp,ortgenai] [--out benchmarks/results/peers.json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ryzen_opt.measure.timing import read_bandwidth_gbs
from ryzen_opt.models import zoo
from ryzen_opt.validation.reports import atomic_write_json, environment

logger = logging.getLogger("bench_peers")

ENGINES = ("hf", "ryzen", "llamacpp", "ortgenai")
INSTALL = {
    "hf": "pip install torch transformers",
    "llamacpp": 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python gguf sentencepiece',
    "ortgenai": "pip install onnxruntime-genai onnx-ir",
    "ryzen": "pip install -e . (this repository)",
}
LLAMA_PRECISIONS = ("f32", "bf16", "q8_0", "q4_k_m")
# SmolLM2's own GGUF (Q4_1, blocks of 32): every other artifact is made from its fp32 dequantization, so this one
# is the exact weights the fp32 reference came from.
WHEEL_PRECISION = "q4_1-wheel"
LLAMA_CONVERT_OUTTYPE = {"f32": "f32", "bf16": "bf16"}  # written by the converter; the rest quantized from f32
LLAMA_QUANT_FTYPE = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
ORT_PRECISIONS = ("fp32", "int8", "int4")
PACKAGES = (
    "torch",
    "transformers",
    "llama-cpp-python",
    "gguf",
    "sentencepiece",
    "onnxruntime",
    "onnxruntime-genai",
    "onnx",
    "onnx-ir",
)
CONFIG_134M: dict[str, Any] = dict(zoo.LLAMA_134M)  # the issue's speed reference
HASHED_SUFFIXES = {".json", ".safetensors", ".bin", ".model", ".txt"}

# Runs llama.cpp's converter with one patch: an unrecognised BPE pre-tokenizer is written as "gpt-2" (byte-level
# GPT-2 regex, what the zoo's tokenizer uses) instead of aborting the conversion.
_CONVERT_WRAPPER = """
import logging, runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
try:
    import conversion.base as mod
    run = lambda: runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
except ImportError:  # older llama.cpp: everything lives in the script
    import convert_hf_to_gguf as mod
    run = mod.main
cls = getattr(mod, "TextModel", None) or getattr(mod, "Model")
orig = cls.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        logging.getLogger("bench_peers").warning("BPE pre-tokenizer unknown to llama.cpp: writing 'gpt-2'")
        return "gpt-2"
cls.get_vocab_base_pre = pre
sys.argv[0] = src + "/convert_hf_to_gguf.py"
run()
"""

_QUANTIZE = """
import ctypes, sys, llama_cpp
src, dst, ftype, threads = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, ftype)
params.nthread = int(threads)
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
"""


class Skip(Exception):
    """An engine or precision that cannot be measured here; the message is the reason."""


# ------------------------------------------------------------------------------------------------ model & cache


def cache_root() -> Path:
    from ryzen_opt.models import cache as model_cache

    return model_cache.cache_root() / "peers"


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build ``final`` through ``build(tmp)`` in a sibling temp dir, then rename it into place (unless present)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
            logger.info("%s appeared meanwhile; keeping that copy", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_134m() -> Path:
    """A random-weight 134M Llama (seed 0) with a small byte-level BPE tokenizer, cached."""

    def build(tmp: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        from ryzen_opt.models import corpus, zoo

        logger.info("building the random-weight 134M Llama into %s", tmp)
        # The converters need a tokenizer; prompts are token ids, so a small one (ids < 1024) is enough.
        texts = tuple(path.read_text(encoding="utf-8", errors="replace") for _, path in corpus.corpus_files()[:40])
        tokenizer = zoo.train_tokenizer(texts, 1024)
        eot = tokenizer.convert_tokens_to_ids(corpus.EOT)
        torch.manual_seed(0)
        config = LlamaConfig(**CONFIG_134M, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
        model = LlamaForCausalLM(config).eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(cache_root() / "llama134m", build)


def resolve_model(spec: str) -> tuple[str, Path]:
    if spec == "134m":
        return "134m", build_134m()
    if spec == "zoo":
        from ryzen_opt.models import zoo

        return "zoo", zoo.build("default") / "target"
    if spec == "smollm2":
        from ryzen_opt.models import zoo

        return "smollm2", zoo.smollm2_dir()
    path = Path(spec).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} is not a HF model directory (no config.json)")
    return path.name, path


def model_hash(model_dir: Path) -> str:
    """sha256 over the names and bytes of the config, weight and tokenizer files: keys the converted artifacts."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix in HASHED_SUFFIXES:
            digest.update(path.name.encode())
            with path.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run a conversion step quietly; a failure becomes a Skip carrying the tail of its output."""
    shown = [arg if "\n" not in arg else "<inline script>" for arg in cmd]
    logger.info("%s: %s", what, " ".join(shown))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in (proc.stderr + proc.stdout).splitlines():
        if "bench_peers" in line:  # the converter wrapper's own notes
            logger.warning("%s: %s", what, line.strip())
    if proc.returncode != 0:
        raise Skip(f"{what} failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}")


# ------------------------------------------------------------------------------------------------ llama.cpp


def llama_cpp_src() -> Path:
    """A llama.cpp tree with ``convert_hf_to_gguf.py``: ``$LLAMA_CPP_SRC``, else the installed version's sdist."""
    if env := os.environ.get("LLAMA_CPP_SRC"):
        src = Path(env).expanduser()
        if not (src / "convert_hf_to_gguf.py").is_file():
            raise Skip(f"$LLAMA_CPP_SRC={src} has no convert_hf_to_gguf.py")
        return src
    version = importlib.metadata.version("llama-cpp-python")

    def fetch(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as dl:
            spec = f"llama-cpp-python=={version}"
            _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", dl],
                f"downloading the {spec} sdist for llama.cpp's converter",
            )
            sdists = list(Path(dl).glob("*.tar.gz"))
            if not sdists:
                raise Skip(f"pip download {spec} gave no .tar.gz sdist")
            with tarfile.open(sdists[0]) as tar:
                for member in tar.getmembers():
                    parts = Path(member.name).parts
                    if not member.isfile() or parts[1:3] != ("vendor", "llama.cpp") or ".." in parts:
                        continue
                    rel = Path(*parts[3:])
                    if rel.parts == ("convert_hf_to_gguf.py",) or rel.parts[0] in ("conversion", "gguf-py"):
                        out = tmp / rel
                        out.parent.mkdir(parents=True, exist_ok=True)
                        src_file = tar.extractfile(member)
                        assert src_file is not None
                        out.write_bytes(src_file.read())
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise Skip(f"the {version} sdist has no vendor/llama.cpp/convert_hf_to_gguf.py")

    return atomic_dir(cache_root() / f"llama.cpp-src-{version}", fetch)


def gguf_tensor_types(path: Path) -> dict[str, int] | None:
    """How many tensors of each ggml type the file holds (Q4_K_M falls back per tensor where shapes demand)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        reader = GGUFReader(path)
        counts: dict[str, int] = {}
        for tensor in reader.tensors:
            name = tensor.tensor_type.name
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))
    except Exception as exc:  # a reader older than the file's types: the summary is optional
        logger.warning("cannot read tensor types of %s: %s", path, exc)
        return None


def prepare_gguf(model_dir: Path, art_dir: Path, precision: str, threads: int) -> Path:
    """The cached GGUF for ``precision``, converting (f32, bf16) or quantizing from f32 (q8_0, q4_k_m) if needed;
    ``q4_1-wheel`` is the SmolLM2 wheel's own file, run as shipped."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise Skip(f"llama-cpp-python not importable: {exc}") from exc
    if precision == WHEEL_PRECISION:
        from ryzen_opt.models import zoo

        return zoo.smollm2_gguf()[0]
    final = art_dir / f"model-{precision}.gguf"
    if final.is_file():
        return final
    art_dir.mkdir(parents=True, exist_ok=True)
    tmp = art_dir / f".{final.name}.tmp-{os.getpid()}"
    try:
        if precision in LLAMA_CONVERT_OUTTYPE:
            src = llama_cpp_src()
            cmd = [sys.executable, "-c", _CONVERT_WRAPPER, str(src), str(model_dir)]
            cmd += ["--outtype", LLAMA_CONVERT_OUTTYPE[precision], "--outfile", str(tmp)]
            _run(cmd, f"convert_hf_to_gguf.py --outtype {precision}")
        else:
            base = prepare_gguf(model_dir, art_dir, "f32", threads)
            # In a subprocess: llama.cpp logs every tensor to stderr, and a crash in C must not end the benchmark.
            cmd = [sys.executable, "-c", _QUANTIZE, str(base), str(tmp), LLAMA_QUANT_FTYPE[precision], str(threads)]
            _run(cmd, f"llama_model_quantize f32 -> {precision}")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


# ------------------------------------------------------------------------------------------------ ORT GenAI


def prepare_ort(model_dir: Path, art_dir: Path, precision: str) -> Path:
    """The cached ORT GenAI model folder for ``precision``, built offline with ``onnxruntime_genai.models.builder``."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise Skip(f"onnxruntime-genai not importable: {exc}") from exc

    def build(tmp: Path) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with tempfile.TemporaryDirectory() as hf_cache:
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(tmp)]
            cmd += ["-p", precision, "-e", "cpu", "-c", hf_cache]
            _run(cmd, f"onnxruntime_genai.models.builder -p {precision}", env)
        if not (tmp / "genai_config.json").is_file():
            raise Skip(f"the ORT GenAI builder wrote no genai_config.json for {precision}")

    return atomic_dir(art_dir / f"ortgenai-{precision}", build)


# ------------------------------------------------------------------------------------------------ runners


@dataclass
class Run:
    prefill_s: float
    decode_s_per_token: float
    tokens: list[int]


def run_from_stamps(t0: float, stamps: list[float], tokens: list[int]) -> Run:
    if len(stamps) < 2:
        raise ValueError("decode timing needs at least 2 new tokens")
    return Run(stamps[0] - t0, (stamps[-1] - stamps[0]) / (len(stamps) - 1), tokens)


class Runner(Protocol):
    engine: str
    precision: str

    def generate(self, prompt: list[int], new_tokens: int) -> Run: ...

    def logits(self, ids: list[int]) -> torch.Tensor:
        """``[len(ids), vocab]`` float32 next-token logits of one sequence, every position (the quality table)."""
        ...


class HFRunner:
    engine = "hf"
    precision = "fp32"

    def __init__(self, model_dir: Path, threads: int) -> None:
        from transformers import AutoModelForCausalLM

        self.threads = threads
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self) -> None:
                self.stamps: list[float] = []

            def put(self, value: Any) -> None:
                self.stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        torch.set_num_threads(self.threads)
        ids = torch.tensor([prompt])
        streamer = Stamps()
        gen = self.model.generation_config
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # masks EOS: exactly new_tokens every run
                do_sample=False,
                streamer=streamer,
                pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id,
            )
        # The streamer's first put is the prompt; then one per generated token.
        return run_from_stamps(t0, streamer.stamps[1:], out[0, len(prompt) :].tolist())

    def logits(self, ids: list[int]) -> torch.Tensor:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids])).logits[0].float()


class RyzenRunner:
    """ryzen-opt's KernelOptimizer: the lean static-cache loop, timed token by token like the others."""

    engine = "ryzen"

    def __init__(self, model_dir: Path, precision: str, threads: int) -> None:
        from transformers import AutoModelForCausalLM

        from ryzen_opt.optimizers.kernels import KernelConfig, KernelOptimizer, kernel_report
        from ryzen_opt.runtime import decoder_of

        self.precision = precision
        self.threads = threads
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        weights = {"fp32": "none", "int8": "int8", "int8-a8": "int8", "int4": "int4"}[precision]
        # int8-a8: the same int8 weights with activations rounded to int8 per block of 32 (llama.cpp's Q8_0 x Q8_0)
        kernel = "native-a8" if precision == "int8-a8" else "auto"
        self.model = KernelOptimizer(KernelConfig(weights=weights, int8_kernel=kernel)).apply_to_model(model)
        self.decoder = decoder_of(self.model)
        self.weight_bytes = kernel_report(self.model).bytes_per_token

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        # The same steps as the optimized model's generate (prefill, then one step per token), with a timestamp
        # as each token is known: HF's streamer hook is not part of the lean loop.
        torch.set_num_threads(self.threads)
        decoder = self.decoder
        ids = torch.tensor([prompt])
        stamps: list[float] = []
        tokens: list[int] = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            decoder.allocate(len(prompt) + new_tokens)
            logits = decoder.forward(ids)
            for i in range(new_tokens):
                token = logits.argmax(-1, keepdim=True)
                tokens.append(int(token))
                stamps.append(time.perf_counter())
                if i + 1 < new_tokens:
                    logits = decoder.step(token)
        return run_from_stamps(t0, stamps, tokens)

    def logits(self, ids: list[int]) -> torch.Tensor:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids])).logits[0].float()


class LlamaCppRunner:
    engine = "llamacpp"

    def __init__(self, gguf: Path, precision: str, threads: int, n_ctx: int, logits_all: bool = False) -> None:
        from llama_cpp import Llama

        self.precision = precision
        self.logits_all = logits_all
        self.llm = Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            logits_all=logits_all,  # keeps every position's logits (the quality table), not only the last
            verbose=False,
        )

    def logits(self, ids: list[int]) -> torch.Tensor:
        llm = self.llm
        if not self.logits_all:
            raise RuntimeError("this llama.cpp runner was built without logits_all")
        llm.reset()
        llm.eval(ids)  # one batched prompt pass, as llama.cpp runs a prompt
        return torch.from_numpy(llm.scores[: len(ids)].copy()).float()

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        import llama_cpp
        import numpy as np

        llm = self.llm
        n_vocab = llm.n_vocab()

        def argmax_last() -> int:
            # Without logits_all, Llama.eval keeps no logits: read the last position's row in place.
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            return int(row.argmax())

        llm.reset()
        tokens: list[int] = []
        stamps: list[float] = []
        t0 = time.perf_counter()
        llm.eval(prompt)
        for i in range(new_tokens):
            if i:
                llm.eval([tokens[-1]])
            tokens.append(argmax_last())
            stamps.append(time.perf_counter())
        return run_from_stamps(t0, stamps, tokens)


class OrtGenAIRunner:
    engine = "ortgenai"

    def __init__(self, folder: Path, precision: str, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.precision = precision
        config = og.Config(str(folder))
        config.clear_providers()  # CPU
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)  # min_length masks EOS
        generator = og.Generator(self.model, params)
        stamps: list[float] = []
        t0 = time.perf_counter()
        generator.append_tokens(prompt)  # runs the prompt pass
        for _ in range(new_tokens):
            generator.generate_next_token()
            stamps.append(time.perf_counter())
        tokens = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
        return run_from_stamps(t0, stamps, tokens)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Every position's logits. The builder's model returns the prompt pass's logits for all positions; should an
        ORT GenAI version return only the last one, the sequence is fed one token at a time instead (same model,
        same KV cache, slower)."""
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 1)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)
        out = torch.from_numpy(generator.get_output("logits").copy()).float().reshape(-1, self._vocab(generator))
        if out.shape[0] == len(ids):
            return out
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids[:1])
        rows = [torch.from_numpy(generator.get_output("logits").copy()).float().reshape(-1)]
        for token in ids[1:]:
            generator.append_tokens([token])
            rows.append(torch.from_numpy(generator.get_output("logits").copy()).float().reshape(-1))
        return torch.stack(rows)

    @staticmethod
    def _vocab(generator: Any) -> int:
        return int(generator.get_output("logits").shape[-1])


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class Entry:
    """One engine x precision: its artifact (or why it is skipped) and, per thread count, its runs."""

    engine: str
    precision: str
    artifact: Path | None = None
    skip: str | None = None
    tensor_types: dict[str, int] | None = None
    runs: dict[int, list[Run]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    quality: dict[str, Any] | None = None
    quality_error: str | None = None
    weight_bytes: int | None = None  # read per decode step: ryzen's kernel_report; llama.cpp's GGUF file size


def prepare(engines: list[str], model_dir: Path, art_dir: Path, threads: int, model_name: str) -> list[Entry]:
    entries: list[Entry] = []
    wanted = {
        "hf": ["fp32"],
        "ryzen": ["fp32", "int8", "int8-a8", "int4"],
        "llamacpp": ([WHEEL_PRECISION] if model_name == "smollm2" else []) + list(LLAMA_PRECISIONS),
        "ortgenai": list(ORT_PRECISIONS),
    }
    for engine in engines:
        for precision in wanted[engine]:
            entry = Entry(engine, precision)
            entries.append(entry)
            try:
                if engine == "llamacpp":
                    entry.artifact = prepare_gguf(model_dir, art_dir, precision, threads)
                    entry.tensor_types = gguf_tensor_types(entry.artifact)
                elif engine == "ortgenai":
                    entry.artifact = prepare_ort(model_dir, art_dir, precision)
                else:  # hf and ryzen load the HF directory itself
                    entry.artifact = model_dir
            except Skip as exc:
                entry.skip = str(exc)
            except Exception as exc:
                entry.skip = f"{type(exc).__name__}: {exc}"
            if entry.skip:
                logger.warning("%s %s SKIPPED: %s", engine, precision, entry.skip)
    return entries


def make_runner(entry: Entry, threads: int, n_ctx: int, logits_all: bool = False) -> Runner:
    assert entry.artifact is not None
    if entry.engine == "hf":
        return HFRunner(entry.artifact, threads)
    if entry.engine == "ryzen":
        return RyzenRunner(entry.artifact, entry.precision, threads)
    if entry.engine == "llamacpp":
        return LlamaCppRunner(entry.artifact, entry.precision, threads, n_ctx, logits_all)
    return OrtGenAIRunner(entry.artifact, entry.precision, threads)


def measure(entries: list[Entry], threads: int, prompt: list[int], new_tokens: int, runs: int) -> float:
    """One warm-up each, then ``runs`` rounds, each running every engine once (round-robin); returns the machine's
    read bandwidth in GB/s at ``threads``, measured just before the rounds (the denominator of each row's share)."""
    n_ctx = len(prompt) + new_tokens + 8
    live: list[tuple[Entry, Runner]] = []
    for entry in entries:
        if entry.skip:
            continue
        try:
            runner = make_runner(entry, threads, n_ctx)
            runner.generate(prompt, new_tokens)  # warm-up
            live.append((entry, runner))
            entry.runs[threads] = []
            if isinstance(runner, RyzenRunner):
                entry.weight_bytes = runner.weight_bytes
            elif entry.engine == "llamacpp" and entry.artifact is not None:
                entry.weight_bytes = entry.artifact.stat().st_size  # the tied table is the output head: all read
        except Exception as exc:
            entry.errors[threads] = f"{type(exc).__name__}: {exc}"
            logger.warning("%s %s failed at %d threads: %s", entry.engine, entry.precision, threads, exc)
    torch.set_num_threads(threads)
    bandwidth = read_bandwidth_gbs()
    logger.info("threads %d: read bandwidth %.1f GB/s", threads, bandwidth)
    for round_ in range(runs):
        logger.info("threads %d: round %d/%d", threads, round_ + 1, runs)
        for entry, runner in live:
            entry.runs[threads].append(runner.generate(prompt, new_tokens))
    del live
    return bandwidth


class _Logits(torch.nn.Module):
    """A runner as ``accuracy`` sees a model: ``forward(input_ids [B, T]) -> [B, T, vocab]``, one row at a time."""

    def __init__(self, runner: Runner) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, input_ids: torch.Tensor) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.stack([self.runner.logits(row.tolist()) for row in input_ids]))


def measure_quality(entries: list[Entry], threads: int, blocks: torch.Tensor) -> None:
    """Each engine's next-token logits on the same held-out token blocks against HF fp32's, through the one
    ``ryzen_opt.measure.accuracy`` (top-1 loss with its paired-bootstrap interval, KL, top-1 agreement, perplexity
    ratio)."""
    from ryzen_opt.measure.accuracy import MemoLogits, accuracy

    hf = next((e for e in entries if e.engine == "hf" and not e.skip), None)
    if hf is None:
        for entry in entries:
            entry.quality_error = "needs the hf engine (the fp32 reference)"
        return
    n_ctx = blocks.shape[1] + 8
    reference = MemoLogits(_Logits(make_runner(hf, threads, n_ctx)))  # its forward runs once per block
    for entry in entries:
        if entry.skip:
            continue
        logger.info("quality: %s %s on %d x %d held-out tokens", entry.engine, entry.precision, *blocks.shape)
        try:
            candidate = _Logits(make_runner(entry, threads, n_ctx, logits_all=True))
            m = accuracy(
                reference,
                candidate,
                blocks,
                batch_size=1,
                reference_name="hf fp32",
                candidate_name=f"{entry.engine} {entry.precision}",
            )
            entry.quality = m.to_dict()
            del candidate
        except Exception as exc:
            entry.quality_error = f"{type(exc).__name__}: {exc}"
            logger.warning("quality of %s %s failed: %s", entry.engine, entry.precision, exc)


def _prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def rows_for(
    entries: list[Entry], thread_counts: list[int], new_tokens: int, bandwidth: dict[int, float] | None = None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    hf = next((e for e in entries if e.engine == "hf"), None)
    for threads in thread_counts:
        hf_runs = hf.runs.get(threads) if hf else None
        hf_ms = statistics.median(r.decode_s_per_token for r in hf_runs) * 1e3 if hf_runs else None
        for entry in entries:
            row: dict[str, Any] = {
                "engine": entry.engine,
                "precision": entry.precision,
                "threads": threads,
                "artifact": str(entry.artifact) if entry.artifact else None,
            }
            if entry.artifact and entry.artifact.is_file():
                row["artifact_bytes"] = entry.artifact.stat().st_size
            elif entry.artifact and entry.engine == "ortgenai":
                row["artifact_bytes"] = sum(p.stat().st_size for p in entry.artifact.rglob("*") if p.is_file())
            if entry.tensor_types is not None:
                row["tensor_types"] = entry.tensor_types
            reason = entry.skip or entry.errors.get(threads)
            runs = entry.runs.get(threads)
            if reason or not runs:
                row.update(status="SKIPPED", reason=reason or "no runs", install=INSTALL[entry.engine])
                rows.append(row)
                continue
            decode_ms = [r.decode_s_per_token * 1e3 for r in runs]
            median_ms = statistics.median(decode_ms)
            tokens = runs[-1].tokens
            if any(len(r.tokens) != new_tokens for r in runs):
                logger.warning("%s %s did not generate exactly %d tokens", entry.engine, entry.precision, new_tokens)
            row.update(
                status="ok",
                decode_ms_per_token=median_ms,
                tokens_per_s=1e3 / median_ms,
                decode_ms_per_token_runs=decode_ms,
                prefill_ms=statistics.median(r.prefill_s * 1e3 for r in runs),
                new_tokens_generated=len(tokens),
                speedup_vs_hf=hf_ms / median_ms if hf_ms else None,
                match_vs_hf=_prefix_match(tokens, hf_runs[-1].tokens) if hf_runs else None,
                tokens=tokens,
            )
            if entry.weight_bytes and bandwidth and threads in bandwidth:
                gbs = entry.weight_bytes / (median_ms / 1e3) / 1e9
                row.update(
                    weight_bytes=entry.weight_bytes,
                    weight_gbs=gbs,
                    read_bandwidth_gbs=bandwidth[threads],
                    bandwidth_share=gbs / bandwidth[threads],
                )
            if threads == max(thread_counts):
                row["quality"] = entry.quality
                row["quality_error"] = entry.quality_error
            rows.append(row)
    return rows


def heldout_blocks(model_name: str, model_dir: Path, blocks: int, block_size: int) -> torch.Tensor | str:
    """The quality table's held-out text, or why there is none."""
    if blocks <= 0:
        return "not asked for (--quality-blocks 0)"
    if model_name == "134m":
        return "random weights: agreement with fp32 says nothing about a real model's quality (use --model smollm2)"
    from transformers import AutoTokenizer

    from ryzen_opt.models import corpus

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return corpus.prose_blocks(tokenizer, "test", blocks=blocks, block_size=block_size)


def print_quality(rows: list[dict[str, Any]], threads: int, blocks: torch.Tensor | str) -> None:
    if isinstance(blocks, str):
        print(f"\nquality: SKIPPED: {blocks}")
        return
    n, t = blocks.shape
    print(f"\nquality against speed, {threads} thread(s); quality on {n} x {t} held-out tokens against HF fp32")
    print(
        f"{'engine':<9} {'prec':<10} {'MB':>6} {'ms/tok':>7} {'vs HF':>6} {'top-1 agree':>11} {'KL':>8}"
        f" {'top-1 loss [95% CI]':>24} {'ppl ratio':>9}"
    )
    for row in rows:
        if row["threads"] != threads:
            continue
        size = f"{row['artifact_bytes'] / 1e6:6.0f}" if row.get("artifact_bytes") else f"{'':>6}"
        speed = (
            f"{row['decode_ms_per_token']:7.2f} {row['speedup_vs_hf']:5.2f}x"
            if row["status"] == "ok" and row.get("speedup_vs_hf")
            else f"{'':>7} {'':>6}"
        )
        q = row.get("quality")
        if q is None:
            tail = f"SKIPPED: {row.get('quality_error') or row.get('reason')}"
        else:
            loss = f"{q['accuracy_loss']:+.2%} [{q['ci_low']:+.2%}, {q['ci_high']:+.2%}]"
            tail = f"{q['top1_agreement']:11.4f} {q['kl_divergence']:8.5f} {loss:>24} {q['perplexity_ratio']:9.4f}"
        print(f"{row['engine']:<9} {row['precision']:<10} {size} {speed} {tail}")


def plot_quality(rows: list[dict[str, Any]], threads: int, out: Path) -> Path | None:
    """KL from fp32 against decode ms/token, one point per engine and precision: where each engine sits between
    fast and faithful. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib not installed: no plot")
        return None
    points = [
        r for r in rows if r["threads"] == threads and r["status"] == "ok" and r.get("quality") and r["engine"] != "hf"
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {"ryzen": "tab:red", "llamacpp": "tab:blue", "ortgenai": "tab:green"}
    for r in points:
        kl = max(r["quality"]["kl_divergence"], 1e-6)
        ax.scatter(r["decode_ms_per_token"], kl, color=colors.get(r["engine"], "gray"))
        ax.annotate(
            f"{r['engine']} {r['precision']}",
            (r["decode_ms_per_token"], kl),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel(f"decode ms/token, batch 1, {threads} thread(s) (lower is faster)")
    ax.set_ylabel("KL from HF fp32, nats/token")
    ax.set_title("lower left is fast and faithful (KL shown at 1e-6 when identical)", fontsize=8)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out.with_suffix(".png")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (the real reference), 134m (random weights: speed only), zoo (the zoo target) or a HF dir",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    parser.add_argument(
        "--quality-blocks",
        type=int,
        default=8,
        help="held-out blocks of CPython's docs prose for the quality table (0: speed only; random weights: none)",
    )
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/peers.json")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := sorted(set(engines) - set(ENGINES)):
        parser.error(f"unknown engines {unknown}: choose from {', '.join(ENGINES)}")
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.runs < 1:
        parser.error("need --new-tokens >= 2, --prompt-tokens >= 1 and --runs >= 1")

    model_name, model_dir = resolve_model(args.model)
    config = json.loads((model_dir / "config.json").read_text())
    if args.prompt_tokens + args.new_tokens > config.get("max_position_embeddings", 1 << 30):
        parser.error("prompt + new tokens exceed the model's max_position_embeddings")
    digest = model_hash(model_dir)
    art_dir = cache_root() / "artifacts" / f"{model_name}-{digest}"
    prompt = torch.randint(1, config["vocab_size"], (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    prompt_ids = prompt.tolist()

    entries = prepare(engines, model_dir, art_dir, max(args.threads), model_name)
    bandwidth = {threads: measure(entries, threads, prompt_ids, args.new_tokens, args.runs) for threads in args.threads}
    quality_threads = max(args.threads)
    blocks = heldout_blocks(model_name, model_dir, args.quality_blocks, args.block_size)
    if isinstance(blocks, str):
        for entry in entries:
            entry.quality_error = blocks
    else:
        measure_quality(entries, quality_threads, blocks)
    rows = rows_for(entries, args.threads, args.new_tokens, bandwidth)

    print(f"\nmodel {model_name} ({model_dir}), prompt {args.prompt_tokens}, new {args.new_tokens}, runs {args.runs}")
    header = f"{'engine':<9} {'prec':<7} {'thr':>3} {'decode ms/tok':>13} {'tok/s':>8} {'vs HF fp32':>10}"
    print(header + f" {'prefill ms':>10} {'match':>5} {'bw':>4}  status")
    for row in rows:
        lead = f"{row['engine']:<9} {row['precision']:<7} {row['threads']:>3}"
        if row["status"] != "ok":
            print(f"{lead} {'':>13} {'':>8} {'':>10} {'':>10} {'':>5} {'':>4}  SKIPPED: {row['reason']}")
            continue
        speedup = f"{row['speedup_vs_hf']:.2f}x" if row["speedup_vs_hf"] else "n/a"
        match = "n/a" if row["match_vs_hf"] is None else f"{row['match_vs_hf']}"
        share = f"{row['bandwidth_share']:.0%}" if row.get("bandwidth_share") else ""
        print(
            f"{lead} {row['decode_ms_per_token']:13.3f} {row['tokens_per_s']:8.1f} {speedup:>10}"
            f" {row['prefill_ms']:10.2f} {match:>5} {share:>4}  ok"
        )
    print_quality(rows, quality_threads, blocks)
    skipped_installs = sorted({row["install"] for row in rows if row["status"] != "ok"})
    for cmd in skipped_installs:
        print(f"to install a skipped engine: {cmd}")

    result = {
        "benchmark": "peer engines: batch-1 greedy decode vs HF transformers fp32",
        "model": {"name": model_name, "dir": str(model_dir), "hash": digest, "config": config},
        "settings": {
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "runs": args.runs,
            "prompt_seed": 0,
            "timing": "per-token timestamps from each engine's Python API; decode = (t_last - t_first)/(new-1),"
            " prefill = t_first - t_start; median over runs after 1 warm-up; engines round-robin per run",
            "ortgenai_quant": "builder CPU defaults: MatMulNBits block 32, accuracy_level 4 (int8 activations)",
        },
        "packages": package_versions(),
        "rows": rows,
        "quality": {
            "threads": quality_threads,
            "heldout": blocks
            if isinstance(blocks, str)
            else f"{blocks.shape[0]} x {blocks.shape[1]} tokens of "
            "CPython's documentation prose (corpus.prose_blocks, test split), each scored in one prompt pass",
            "reference": "hf fp32",
        },
        "environment": environment(),
    }
    out = atomic_write_json(args.out, result)
    print(f"wrote {out}")
    if not isinstance(blocks, str) and (plot := plot_quality(rows, quality_threads, Path(args.out))):
        print(f"wrote {plot}")


if __name__ == "__main__":
    main()
