"""Data-parallel scans under ``accelerate launch`` (or ``torchrun``): shard, scan, merge.

When a scan starts in a process group of N processes (``WORLD_SIZE`` > 1, as set by
``accelerate launch`` and ``torchrun``), each process takes a deterministic shard of the inputs
(item ``i`` goes to process ``i % N``), scans only that shard and writes its own files into the
same output folder::

    parts/rank{r}-part-00000.parquet ...   the rows of process r, batch by batch
    progress.rank{r}.jsonl                 its progress log (one line per batch, as progress.jsonl)
    seen/rank{r}-00000.png ...             the pictures it kept for the report

The main process waits for every process (``PartialState().wait_for_everyone()``: gloo on CPU,
NCCL on GPUs), then reads every progress log and writes what a single-process scan writes:
``tokens.parquet`` (the same rows), a merged ``progress.jsonl``, ``summary.json`` (with
``"distributed": {"num_processes": N, "images_per_process": [...]}``) and ``report.html``
(pictures of the first 24 items). The other processes write nothing else and return the result
of their own shard (a process with an empty shard returns the merged run), after the main one
has written the run; the command line prints once per process. ``--resume`` works per shard:
every process reads every progress log, so it skips what any earlier run (with any number of
processes, or one) finished, and a killed run continues without duplicates. Not yet under
several processes: ``--save-layers`` (refused in one line), and a scan without ``--out``.
Without a process group nothing changes: accelerate is not even imported.

Multi-GPU, for paper-scale datasets (one process per GPU, each on ``cuda:<local rank>``; the
model is loaded once per process, so each GPU must hold it)::

    accelerate config                       # once: multi-GPU, 8 processes, no mixed precision
    accelerate launch --num_processes 8 .venv/bin/sinkscope scan --model dinov2-small \\
        --images photos/ --out runs/big     # add --resume to continue a killed run
    accelerate launch --multi_gpu --num_processes 8 .venv/bin/sinkscope scan ...   # without a config

Several CPU processes on one machine (tests, laptops): accelerate 1.x's ``--cpu`` launcher starts
a single process on one machine (more need MPI; sinkscope then warns that it scans alone), so
hide the GPUs and use the multi-GPU launcher, which picks gloo on CPU; ``torchrun
--nproc_per_node 2 .venv/bin/sinkscope scan ...`` works too::

    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 .venv/bin/sinkscope scan \\
        --model tiny-dinov2+sinks --images photos/ --out runs/tiny

>>> shard_of(list("abcde"), rank=1, num_processes=2)
['b', 'd']
>>> images_per_process(5, 2)
[3, 2]
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from ._utils import SinkscopeError

log = logging.getLogger("sinkscope")
T = TypeVar("T")

#: how long a process waits for the others at a barrier (the slowest shard, the main one's merge)
BARRIER_TIMEOUT_H = 48
#: the files of process r in a scan folder (``{r}`` is the rank)
PART_PREFIX = "rank{r}-"
PROGRESS = "progress.rank{r}.jsonl"


def shard_of(items: Sequence[T], rank: int, num_processes: int) -> list[T]:
    """The items process ``rank`` of ``num_processes`` scans: every ``num_processes``-th from ``rank``."""
    return list(items[rank::num_processes])


def images_per_process(n_items: int, num_processes: int) -> list[int]:
    """How many of ``n_items`` each process gets from :func:`shard_of`."""
    return [len(range(r, n_items, num_processes)) for r in range(num_processes)]


@dataclass
class DistContext:
    """Where this process stands in a data-parallel scan."""

    rank: int
    num_processes: int
    device: str | None = None
    _state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process reaches this point (accelerate's ``wait_for_everyone``)."""
        if self._state is not None:
            self._state.wait_for_everyone()

    def shard(self, items: Sequence[T]) -> list[T]:
        return shard_of(items, self.rank, self.num_processes)

    def summary(self, n_items: int) -> dict[str, Any]:
        return {
            "num_processes": self.num_processes,
            "rank": self.rank,  # of the process whose result this is (0: the merged run in summary.json)
            "images_per_process": images_per_process(n_items, self.num_processes),
            "sharding": "item i -> process i % num_processes",
        }


def _world_size() -> int:
    for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        try:
            return int(os.environ[k])
        except (KeyError, ValueError):
            continue
    return 1


def context() -> DistContext | None:
    """The data-parallel context of this process, or ``None`` when it runs alone.

    A process group exists when the launcher set ``WORLD_SIZE`` > 1; it is then joined through
    ``accelerate.PartialState()`` (gloo on CPU when no GPU is visible or ``ACCELERATE_USE_CPU`` is set).
    """
    if _world_size() <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and os.environ.get(
            "MASTER_ADDR"
        ):
            log.warning(
                "accelerate launch --cpu started a single process (on one machine accelerate needs MPI for "
                "several CPU processes): this scan runs alone; for N CPU processes use "
                "CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes N, or torchrun"
            )
        return None
    import torch

    try:
        from accelerate import PartialState
    except ImportError:
        raise SinkscopeError(
            "a scan under several processes needs accelerate: pip install accelerate"
        ) from None
    use_cpu = (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    )
    # a long timeout: the main process waits at a barrier while the slowest shard finishes
    state = PartialState(cpu=use_cpu, timeout=timedelta(hours=BARRIER_TIMEOUT_H))
    if state.num_processes <= 1:
        return None
    return DistContext(state.process_index, state.num_processes, str(state.device), state)


def check_supported(out: str | Path | None, save_layers: Any) -> None:
    """What a data-parallel scan cannot do yet, refused in one line before any work."""
    if out is None:
        raise SinkscopeError(
            "a scan under several processes needs an output folder (--out) to merge the shards in"
        )
    if save_layers is not None:
        raise SinkscopeError(
            "--save-layers is not supported under several processes yet; scan with one process"
        )


def gather(
    dist: DistContext, names: list[str], status: dict[str, dict], read_all: Callable[[], dict[str, dict]]
) -> tuple[list[str], dict[str, dict]]:
    """After every process scanned its shard: the names and records the result covers.

    The main process waits for all, then takes every process' records (``read_all``: the merged
    progress logs) for every name; another process keeps the names and records of its own shard.
    """
    dist.barrier()
    if dist.is_main:
        recs = read_all()
        return names, {n: recs[n] for n in names if n in recs}
    mine = set(dist.shard(names))
    return [n for n in names if n in mine], {n: r for n, r in status.items() if n in mine}


# -- the files of one process in a scan folder ----------------------------------------------------


def part_prefix(dist: DistContext | None) -> str:
    """``rank{r}-`` for process r of a data-parallel scan, ``""`` alone (``part-00000.parquet``)."""
    return PART_PREFIX.format(r=dist.rank) if dist is not None else ""


def progress_file(out: Path, dist: DistContext | None) -> Path:
    return out / (PROGRESS.format(r=dist.rank) if dist is not None else "progress.jsonl")


def progress_files(out: Path) -> list[Path]:
    """Every progress log of a scan folder: ``progress.jsonl``, then one per process (which may
    not exist; a reader takes them oldest first, so the latest record of an image wins)."""
    return [out / "progress.jsonl", *sorted(out.glob(PROGRESS.format(r="*")))]


def stale_files(out: Path) -> list[Path]:
    """The per-process progress logs a fresh scan removes (parts and pictures go with their folders)."""
    return list(out.glob(PROGRESS.format(r="*")))


def write_merged_progress(out: Path, records: dict[str, dict]) -> None:
    """Write every process' records as one ``progress.jsonl`` (atomically), so that every reader
    of a scan folder (``seen_pictures``, a single-process ``--resume``) sees the merged run."""
    tmp = out / "progress.jsonl.tmp"
    tmp.write_text(json.dumps(list(records.values())) + "\n")
    os.replace(tmp, out / "progress.jsonl")


__all__ = ["DistContext", "context", "images_per_process", "shard_of"]
