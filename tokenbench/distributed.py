"""Data-parallel runs on accelerate: which process this is, its shard of the work, and the store
that every process of a run (and of any earlier run in the same directory) shares.

``accelerate launch --num_processes N -m tokenbench run ...`` starts N copies of the run. Each one
takes the batches ``rank, rank + N, rank + 2N, ...`` of those of every task's accuracy pass that
have work left (whole batches, so every sample is computed in the batch composition a
single-process run gives it; "work left" is judged on the store as every process loaded it, before
any of them appends), and appends its records to its own ``samples.rank<k>.jsonl``. After a barrier the other processes
exit; the main process reads every shard file, runs the efficiency pass alone (one device, so no
two arms are ever timed at once) and computes the statistics and run records exactly as a
single-process run does.

Resume across a change of process count works because no file belongs to a process count: every
store reads all ``samples*.jsonl`` files of the directory and appends only to its own, so a run
killed at N = 4 finishes with N = 2 or 1 without recomputing or duplicating a finished sample, and
a process that dies takes only its own record in flight with it. No locks are needed beyond each
file's single writer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tokenbench.config import ConfigError
from tokenbench.results import SampleStore

T = TypeVar("T")
SINGLE_STORE = "samples.jsonl"


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world_size`` (1 without a launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    state: Any = None  # accelerate's PartialState when launched with more than one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            self.state.wait_for_everyone()

    def shard(self, items: list[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th, from ``rank`` on."""
        return items[self.rank::self.world_size]

    def store_path(self, directory: Path) -> Path:
        return directory / (f"samples.rank{self.rank}.jsonl" if self.distributed else SINGLE_STORE)

    def device(self, requested: str) -> str:
        """``--device cuda`` means this process's own GPU (``cuda:<local rank>``) in a launched run."""
        return f"cuda:{self.local_rank}" if self.distributed and requested == "cuda" else requested

    def gpu_share(self) -> dict[int | str, int] | None:
        """``max_memory`` for a ``--device-map`` in a launched run: this process's equal share of the
        node's GPUs (process ``k`` of ``L`` on the node gets GPUs ``k*G/L .. (k+1)*G/L - 1``, all
        their free memory), so processes never share a GPU. None outside a launched CUDA run."""
        import torch

        if not self.distributed or not torch.cuda.is_available():
            return None
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        per_process = torch.cuda.device_count() // local_world
        if per_process < 1:
            raise ConfigError(f"--device-map with {local_world} processes on a node with "
                              f"{torch.cuda.device_count()} GPU(s): launch at most one process per GPU")
        first = self.local_rank * per_process
        return {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in range(first, first + per_process)}


def current_processes(cpu: bool = False) -> Processes:
    """The process group accelerate (or torchrun) set up, read from its environment; a plain
    ``tokenbench run`` is process 0 of 1 and needs no accelerate. ``cpu``: the run computes on the
    CPU, so the processes talk over gloo even where CUDA is available (the first call decides)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    try:
        from accelerate import PartialState
    except ImportError:
        raise ConfigError("launched as one of several processes, but accelerate is not installed; "
                          "pip install 'tokenbench[multi]'") from None
    state = PartialState(cpu=cpu)
    return Processes(state.process_index, state.num_processes, state.local_process_index, state)


class ShardedSampleStore(SampleStore):
    """A :class:`SampleStore` that appends to this process's file and also knows the records of
    every other ``samples*.jsonl`` in the directory (read only, never truncated: another process
    may be writing it; an incomplete last line there is skipped and its sample recomputed)."""

    def __init__(self, directory: Path, processes: Processes) -> None:
        super().__init__(processes.store_path(directory))
        self.reload()

    def reload(self) -> None:
        """Read the other processes' files again (after a barrier: their records are complete). Of
        two records of one key, the later ``stored_at`` wins (the efficiency pass replaces the
        baseline's timings when it times an added arm, perhaps from another file than this one's)."""
        for path in sorted(self.path.parent.glob("samples*.jsonl")):
            if path != self.path:
                for record in _complete_records(path):
                    mine = self.records.get(record["key"])
                    if mine is None or record.get("stored_at", 0) > mine.get("stored_at", 0):
                        self.records[record["key"]] = record


def _complete_records(path: Path) -> list[dict[str, Any]]:
    """The finished records of a shard file: whole lines that parse, without ``retry`` marks."""
    data = path.read_bytes()
    lines = data[:data.rfind(b"\n") + 1].decode("utf-8", errors="replace").splitlines()
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "key" in record and not record.get("retry"):
            out.append(record)
    return out
