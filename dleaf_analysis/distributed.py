"""Scale-out on torch.distributed's launcher contract: the same command, unchanged, under ``torchrun
--nproc_per_node N``, ``accelerate launch`` or ``srun``.

- The process's place is read from the environment: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
  (torchrun, accelerate) or ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` (srun); each
  rank takes ``cuda:LOCAL_RANK`` when CUDA is there (``--device auto``/``cuda``), the CPU otherwise.
- Units (events, images, faults, evaluation batches) are handed out *dynamically* through the
  c10d store: each rank asks for the next unit index (``store.add``), so a rank that draws cheap
  units takes more of them (the makespan follows the work, not a static split), and every unit is
  run exactly once.
- Each rank records its finished units in its own result store (``<out>/.rank-<r>/``); after a
  barrier rank 0 merges them into the one ``--out`` store, in unit order, and writes the tables:
  the merged tables are byte-identical to a single-process run (with the same thread count per
  process).  A rerun after a crash (a rank killed, a node lost) resumes: units finished by any rank
  are not redone.
- Nested sweeps: the work of one unit belongs to the rank that drew it.  Inside a unit
  (:func:`unit_scope`) a nested sweep (say, the images of one tuning configuration) runs locally on
  that rank, without the process group: :func:`active` is false and :func:`barrier` does nothing.
- Slurm job arrays (one GPU per job, no process group): ``--shard slurm-array`` takes shard
  ``SLURM_ARRAY_TASK_ID`` of ``SLURM_ARRAY_TASK_COUNT``; merge the shards' ``--out`` directories
  afterwards (``dleaf study NAME --merge ...``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Place:
    """Where this process runs: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def place_from_env(env: dict | None = None) -> Place:
    """The process's place from the launcher's environment variables (see the module doc)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1:
        return Place(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1 and "SLURM_PROCID" in env:
        return Place(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "srun")
    return Place()


def slurm_array_shard(env: dict | None = None) -> tuple[int, int]:
    """``(i, n)`` of a Slurm job array (``SLURM_ARRAY_TASK_ID`` from ``SLURM_ARRAY_TASK_MIN``)."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        raise ValueError("--shard slurm-array needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (run it in an "
                         "sbatch --array job)")
    lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    return int(env["SLURM_ARRAY_TASK_ID"]) - lo, int(env["SLURM_ARRAY_TASK_COUNT"])


@lru_cache(maxsize=1)
def place() -> Place:
    """This process's place; joins the process group on first use when there are several ranks."""
    p = place_from_env()
    if p.distributed and not torch.distributed.is_initialized():
        if p.launcher == "srun":  # srun gives no rendezvous address: use the first node's, as torchrun would
            os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
            os.environ.setdefault("MASTER_PORT", "29517")
            os.environ.setdefault("RANK", str(p.rank))
            os.environ.setdefault("WORLD_SIZE", str(p.world_size))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, timeout=timedelta(hours=6))
    return p


def device_for(requested: str) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``cuda``/``auto`` under a multi-rank launch."""
    p = place()
    if p.distributed and requested in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{p.local_rank}"
    return requested


def store():
    """The c10d key-value store of the process group (``None`` for a single process or inside a unit)."""
    if not active():
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


_UNIT_DEPTH = 0  # > 0 while this rank runs a unit it drew (nested sweeps run locally)


@contextmanager
def unit_scope():
    """Run the body as one rank's own unit: nested sweeps inside it are local to this rank."""
    global _UNIT_DEPTH
    _UNIT_DEPTH += 1
    try:
        yield
    finally:
        _UNIT_DEPTH -= 1


def active() -> bool:
    """True when work is to be shared out across ranks here: a multi-rank launch, outside a unit."""
    return place().distributed and _UNIT_DEPTH == 0


def writer() -> bool:
    """True when this process writes shared outputs here: rank 0, or any rank inside its own unit."""
    return place().main or _UNIT_DEPTH > 0


def barrier() -> None:
    if active():
        torch.distributed.barrier()


class UnitQueue:
    """Hands out unit indices ``0..n-1`` across the ranks, each exactly once, in request order
    (the c10d store's atomic counter); for one process, simply ``0..n-1``."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n
        self._store = store()
        self._local = 0

    def __iter__(self):
        while True:
            if self._store is None:
                i, self._local = self._local, self._local + 1
            else:
                i = int(self._store.add(f"dleaf/{self.name}", 1)) - 1
            if i >= self.n:
                return
            yield i
