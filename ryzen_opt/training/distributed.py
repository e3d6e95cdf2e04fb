"""torch.distributed for the training stage: torchrun's environment, one process group, rank 0's side effects.

``torchrun --standalone --nproc-per-node=2 -m ryzen_opt run CFG`` starts one process per rank with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment (torchrun's contract, the same
for one node or many). :func:`start` joins the process group those name: gloo on CPU, nccl on CUDA (ROCm builds of
torch serve the ``nccl`` backend with RCCL). Without torchrun's variables, or with ``WORLD_SIZE=1``, nothing is
initialised and every helper here is a no-op: one code path for one process and for many.

What the ranks share and what they do not (the convention of torch's own examples and of HF Accelerate):
- every rank trains, on its own shard of each global batch, under DistributedDataParallel;
- only rank 0 writes reports and caches (:func:`main_first` lets it fill a cache before the others read it);
- the other stages run on rank 0 alone, while the others wait in :func:`wait_for_main` for its outcome.

A peer that dies makes the next collective fail on the others (gloo and nccl see the closed connection); those
failures become :class:`RankFailedError`, which names the rank and the step, so no rank waits forever.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ryzen_opt.errors import ConfigError, RyzenOptError

logger = logging.getLogger(__name__)

# How long a collective may wait for the slowest rank before it fails. Ranks 1.. wait in wait_for_main() while rank 0
# validates and tests (10-20 minutes on 2 CPU cores), so the default is torch's own 30 minutes, raised to an hour.
TIMEOUT_ENV = "RYZEN_OPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Every variable torchrun gives its workers: a subprocess that must run as a plain single process drops them.
TORCHRUN_ENV = frozenset(
    (
        *_ENV,
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "GROUP_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS",
    )
)


class RankFailedError(RyzenOptError, RuntimeError):
    """A collective failed: another rank died, was killed, or stopped with an error of its own."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. ``backend`` is ``None`` for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "rank": self.rank, "backend": self.backend}


SINGLE = DistInfo()


def env_info() -> DistInfo:
    """Rank and world size from torchrun's environment (before or without a process group).

    Raises:
        ConfigError: the variables are partly set or not integers (a hand-written launcher's mistake).
    """
    present = {name: os.environ.get(name) for name in _ENV}
    if all(v is None for v in present.values()):
        return SINGLE
    if present["RANK"] is None or present["WORLD_SIZE"] is None:
        raise ConfigError(
            f"torch.distributed environment is partial ({present}): launch with torchrun, which sets RANK, "
            "WORLD_SIZE and LOCAL_RANK for every process"
        )
    try:
        rank, world = int(present["RANK"] or 0), int(present["WORLD_SIZE"] or 1)
        local = int(present["LOCAL_RANK"] or rank)
    except ValueError as exc:
        raise ConfigError(f"torch.distributed environment is not integers: {present}") from exc
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"torch.distributed environment is inconsistent: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank, world, local, None)


# Depth of main_first blocks this process is in: their code runs on one rank at a time, so it must not join a
# collective (a zoo trained into the cache by rank 0 while the others wait trains as one process).
_local_depth = 0


def current() -> DistInfo:
    """This process's place in the initialised process group, or :data:`SINGLE` when there is none, or inside a
    :func:`main_first` block (which runs on one rank at a time)."""
    if not joined() or _local_depth:
        return SINGLE
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    return DistInfo(rank, world, local, str(torch.distributed.get_backend()))


def backend_for(device: torch.device) -> str:
    """gloo on CPU; nccl on CUDA and ROCm (torch's ROCm build serves ``nccl`` with RCCL)."""
    if device.type == "cpu":
        return "gloo"
    if device.type == "cuda":
        return "nccl"
    raise ConfigError(
        f"distributed training on {device.type!r} is not supported: torch.distributed has no backend for it; "
        "run one process, or use --device=cpu (gloo) or a CUDA/ROCm GPU (nccl)"
    )


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: a positive number of seconds")
    return value


def start(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group when there is one; returns this rank's place and its device.

    On CUDA each rank takes the GPU of its ``LOCAL_RANK`` (``cuda:N``), as torchrun's examples do. A process group
    that is already initialised is used as it is. Without torchrun's variables (or with one process) nothing
    happens: ``(SINGLE, device)``.
    """
    info = env_info()
    if not info.active:
        return SINGLE, device
    if not torch.distributed.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend_for(device)
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {info.local_rank} but this node has {torch.cuda.device_count()} GPU(s): start at most "
                "that many processes per node (--nproc-per-node)"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    info = current()
    logger.info("rank %d of %d (%s) on %s", info.rank, info.world_size, info.backend, device)
    return info, device


def joined() -> bool:
    """Whether this process is in an initialised process group."""
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def shutdown() -> None:
    """Leave the process group (destroying it avoids torch's warning at exit and frees the sockets)."""
    if joined():
        torch.distributed.destroy_process_group()


def _failed(info: DistInfo, what: str, exc: BaseException) -> RankFailedError:
    return RankFailedError(
        f"rank {info.rank} of {info.world_size}: {what} failed ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
        "Another rank has probably died or stopped with an error: its own log (torchrun prefixes each line with "
        "the rank) says why"
    )


@contextlib.contextmanager
def collective(info: DistInfo, what: str) -> Iterator[None]:
    """Turn a failed collective (a dead peer's closed connection, a timeout) into :class:`RankFailedError`."""
    if info.active and not joined():
        raise RankFailedError(
            f"rank {info.rank} of {info.world_size}: {what} needs the process group, which this rank never joined "
            "(its setup failed first; see above)"
        )
    try:
        yield
    except RyzenOptError:
        raise
    except RuntimeError as exc:  # torch.distributed.DistError and the backends' errors are RuntimeErrors
        if not info.active:
            raise
        raise _failed(info, what, exc) from exc


def all_gather_floats(info: DistInfo, values: Sequence[float], what: str) -> list[list[float]]:
    """Every rank's ``values`` (one small tensor, one collective), in rank order. Single process: ``[values]``."""
    if not info.active:
        return [list(values)]
    mine = torch.tensor(list(values), dtype=torch.float64)
    if info.backend == "nccl":
        mine = mine.cuda()
    out = [torch.empty_like(mine) for _ in range(info.world_size)]
    with collective(info, what):
        torch.distributed.all_gather(out, mine)
    return [t.cpu().tolist() for t in out]


def all_sum(info: DistInfo, values: Sequence[float], what: str) -> list[float]:
    """The element-wise sum of ``values`` over the ranks (fp64, so counts stay exact)."""
    if not info.active:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if info.backend == "nccl":
        tensor = tensor.cuda()
    with collective(info, what):
        torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def agree(info: DistInfo, ok: bool, what: str) -> bool:
    """Whether every rank says ``ok``: the ranks must agree before a stage whose collectives they all join."""
    return all(v[0] > 0.5 for v in all_gather_floats(info, [1.0 if ok else 0.0], what))


@contextlib.contextmanager
def main_first(info: DistInfo, what: str) -> Iterator[None]:
    """Rank 0 runs the block first (filling a cache), the other ranks after it (reading what it wrote). Inside the
    block :func:`current` is :data:`SINGLE`: code there (a cache build that trains, say) runs as one process."""
    global _local_depth
    if not info.active:
        yield
        return
    if not info.is_main:
        with collective(info, f"waiting for rank 0 to {what}"):
            torch.distributed.barrier()
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1
        if info.is_main:  # released even when the block failed: the others then fail it themselves, not hang
            with collective(info, f"releasing the ranks after {what}"):
                torch.distributed.barrier()


def release(info: DistInfo, outcome: dict[str, Any]) -> None:
    """Rank 0: hand the run's outcome to the ranks waiting in :func:`wait_for_main`."""
    if info.active and info.is_main:
        with collective(info, "handing the outcome to the other ranks"):
            torch.distributed.broadcast_object_list([outcome], src=0)


def wait_for_main(info: DistInfo) -> dict[str, Any]:
    """Ranks 1..: wait (up to the process group's timeout) while rank 0 runs the other stages; its outcome."""
    box: list[Any] = [None]
    with collective(info, "waiting for rank 0's validation and testing"):
        torch.distributed.broadcast_object_list(box, src=0)
    return dict(box[0] or {})


def shard_batch(batch: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's rows of a global batch: rows ``rank, rank + world, ...`` (DistributedSampler's interleaving).

    Every rank draws the same global batch from the same seeded order and keeps its own rows, so the ranks together
    see exactly the batch one process would, and no row twice.
    """
    if not info.active:
        return batch
    if batch.shape[0] % info.world_size:
        raise ConfigError(
            f"a batch of {batch.shape[0]} rows cannot be split evenly over {info.world_size} ranks: choose a batch "
            f"size divisible by the world size"
        )
    return batch[info.rank :: info.world_size]
