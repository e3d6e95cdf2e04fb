"""Memory, measured: a cache's stored bytes, and the peak bytes a block of code allocates (CPU or GPU)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import Cache

logger = logging.getLogger(__name__)


def cache_bytes(cache: Cache) -> int:
    """Stored bytes of any cache: ours report their own; HF layers are summed from their key/value tensors."""
    own = getattr(cache, "stored_bytes", None)
    if own is not None:
        return int(own())
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer ``model`` holds, each storage counted once.

    Why this and not ``sum(p.numel() * p.element_size())`` over parameters: the compression gates (a compression
    ratio, a memory reduction) compare the bytes a model stores before and after an optimizer, and an optimizer moves
    weights out of parameters into buffers (int8/uint8 ``qweight``, scales, packed int4), so both must be counted;
    and a weight stored once must count once, whether it is tied (an LM head sharing the embedding) or viewed by
    several modules (a fused projection sliced into q, k, v). So: every parameter and buffer, including
    non-persistent ones (they occupy memory too), each underlying storage counted once at its full size (a view keeps
    its whole storage alive). A tensor subclass that wraps inner tensors (``__tensor_flatten__``, as torchao's
    quantized tensors do) is counted by those inner tensors. Copies a kernel keeps outside parameters and buffers
    (e.g. a backend's prepacked weight in a plain attribute) are not seen; weights kept *only* there, as
    ``torch.ao.quantization.quantize_dynamic``'s packed parameters are, are missing from the total, and a warning
    names the modules that hold them (their owner must count them).

    Example:
        >>> model_bytes(torch.nn.Linear(4, 2))  # 8 weights + 2 biases, fp32
        40
    """
    seen: set[tuple[str, int]] = set()
    tensors = [*model.parameters(), *model.buffers()]  # each already unique by identity: a tied weight appears once
    total = 0
    while tensors:
        t = tensors.pop()
        if hasattr(t, "__tensor_flatten__"):  # a wrapper subclass: its own storage is empty
            names, _ = t.__tensor_flatten__()
            tensors.extend(getattr(t, name) for name in names)
            continue
        storage = t.untyped_storage()
        # Storages are the same memory when their data pointers are (on one device); a pointer of 0 (meta, empty)
        # identifies nothing, so such a tensor counts alone.
        key = (str(t.device), storage.data_ptr()) if storage.data_ptr() else ("tensor", id(t))
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    packed = [
        name for name, m in model.named_modules() if isinstance(vars(m).get("_packed_params"), torch.ScriptObject)
    ]
    if packed:
        logger.warning(
            "model_bytes: %d modules (%s) keep weights in torch.ao packed parameters, outside parameters and buffers: "
            "their bytes are not counted",
            len(packed),
            ", ".join(packed[:3]) + (", ..." if len(packed) > 3 else ""),
        )
    return total


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence the profiler's native start/stop lines (kineto writes them straight to fd 1/2, past Python)."""
    saved = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:  # no real file descriptors (an embedded interpreter): leave the output alone
        pass
    try:
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


class PeakMemory:
    """Peak bytes allocated above the start of the block, overall and after :meth:`mark` (e.g. once decode begins).

    GPU: the CUDA allocator's peak. CPU: every allocation and free inside the block, traced by ``torch.profiler``
    (``profile_memory=True``) and summed in time order: the peak of live tensor bytes. Everything measured must be
    allocated inside the block (the profiler cannot see frees of older tensors), so a caller builds the cache inside
    it. The resident set cannot show this peak, because the allocator reuses the pages a step freed (measured: RSS grew
    by 20 KB across decode steps that each allocated and freed megabytes); ``rss_delta`` is kept beside it.
    """

    _MARK = "ryzen_opt.peak_memory.mark"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.peak_after_mark = 0
        self.rss_delta = 0

    def __enter__(self) -> PeakMemory:
        self._rss = rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with quiet_native_output():
                self._profile.__enter__()
        return self

    def mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self._start)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with torch.profiler.record_function(self._MARK):
                pass

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_after_mark = torch.cuda.max_memory_allocated(self.device) - self._start
            self.peak = max(self.peak, self.peak_after_mark)
        else:
            with quiet_native_output():
                self._profile.__exit__(*exc)
            events = sorted(self._profile.events(), key=lambda e: e.time_range.start)
            marks = [e.time_range.start for e in events if e.name == self._MARK]
            mark = marks[0] if marks else math.inf
            live = 0
            for event in events:
                live += event.self_cpu_memory_usage
                self.peak = max(self.peak, live)
                if event.time_range.start >= mark:
                    self.peak_after_mark = max(self.peak_after_mark, live)
        self.rss_delta = rss_bytes() - self._rss
