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

Probes (``sinkscope probe``) and flow runs (``sinkscope flow``) run data-parallel the same way,
with whole batches as the unit (batch ``b`` to process ``b % N``, :func:`batch_shard`), so that
every forward pass is one a single process runs too and the merged results are those of one
process, value for value; each process writes its part into the output folder and the main
process merges them once every process is done:

- ``probe``: each process extracts the group features of its batches (``--batch-size`` images
  each) into ``OUT/feature-parts/rank{r}/``; the main process merges them in the item order (the
  same :class:`~sinkscope.probing.GroupFeatures` as one process: same arrays, same order), caches
  them, fits the probes alone and writes ``probe.csv`` and ``summary.json``; the others wait and
  return that run, read back (cached features are reused by every process: nothing is extracted).
- ``flow``: the ViT analyses (``rollout``, ``relevance``, ``vit_attention_by_group``,
  ``redundancy``) run per batch of 8 images; ``knockout`` per set of pairs sharing a first target
  and ``decode`` per isolated position (a VLM's prompt holds every image: there is no per-image
  shard); ``propagation``, ``attribution`` and ``relevancy`` (one pass over that prompt) run on
  the main process alone. Parts go to ``OUT/parts/rank{r}/``; the main process merges them in the
  single-process order, recomputes the summaries from the merged tables and writes the run; the
  others return their own part. Both need an output folder under several processes.

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
>>> batch_shard(7, batch_size=2, rank=0, num_processes=2)   # batches [0, 1] and [4, 5]
[0, 1, 4, 5]
>>> images_per_process(7, 2, batch_size=2)
[4, 3]
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


def batch_shard(n_items: int, batch_size: int, rank: int, num_processes: int) -> list[int]:
    """The indices of the items process ``rank`` runs when whole batches are shared out: batch
    ``b`` (items ``b * batch_size`` to ``(b + 1) * batch_size - 1``) goes to process
    ``b % num_processes``, so each batch is the one a single process runs."""
    n_batches = -(-n_items // batch_size)
    return [
        i
        for b in range(rank, n_batches, num_processes)
        for i in range(b * batch_size, min((b + 1) * batch_size, n_items))
    ]


def images_per_process(n_items: int, num_processes: int, batch_size: int | None = None) -> list[int]:
    """How many of ``n_items`` each process gets from :func:`shard_of` (or, with ``batch_size``,
    from :func:`batch_shard`)."""
    if batch_size is not None:
        return [len(batch_shard(n_items, batch_size, r, num_processes)) for r in range(num_processes)]
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

    def shard_batches(self, n_items: int, batch_size: int) -> list[int]:
        """The item indices of this process' batches (:func:`batch_shard`)."""
        return batch_shard(n_items, batch_size, self.rank, self.num_processes)

    def summary(self, n_items: int, batch_size: int | None = None) -> dict[str, Any]:
        return {
            "num_processes": self.num_processes,
            "rank": self.rank,  # of the process whose result this is (0: the merged run in summary.json)
            "images_per_process": images_per_process(n_items, self.num_processes, batch_size),
            "sharding": "item i -> process i % num_processes"
            if batch_size is None
            else f"batch b of {batch_size} items -> process b % num_processes",
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


def context_for(
    what: str, out: str | Path | None, device: str | None, progress: bool
) -> tuple[DistContext | None, str | None, bool]:
    """``(dist, device, progress)`` of this process for an analysis other than the scan (``what``:
    ``"probe"``, ``"flow"``): :func:`context`, the process' own device (``cuda:<local rank>``
    unless another was given) and a progress bar on the main process only. Under several
    processes an output folder is needed (the parts are merged there), refused in one line.

    >>> context_for("probe", None, None, True)   # one process: nothing changes
    (None, None, True)
    """
    dist = context()
    if dist is None:
        return None, device, progress
    if out is None:
        raise SinkscopeError(
            f"a {what} under several processes needs an output folder (out / --out) to merge the parts in"
        )
    device = dist.device if device in (None, "cuda") else device
    return dist, device, progress and dist.is_main


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


__all__ = ["DistContext", "batch_shard", "context", "context_for", "images_per_process", "shard_of"]
