"""Data-parallel QAT on torch.distributed: what `torchrun --nproc_per_node=K -m care_q qat ...` uses.

Under torchrun (``RANK`` and ``WORLD_SIZE`` > 1 in the environment) `Dist.from_env()` joins the
process group: NCCL when CUDA is available (one GPU per process, ``LOCAL_RANK``), gloo on CPU.
Without torchrun it is a one-process stand-in with the same interface, so the training loop has
one code path.

Sharding (`shard`): torch's `DistributedSampler` (shuffled with ``seed + epoch``, ``drop_last``),
then each rank takes its consecutive per-rank batches. Rank ``r``'s ``s``-th batch holds global
positions ``{(s * b + j) * K + r}``, so the K per-rank batches of step ``s`` are together exactly
positions ``[s * K * b, (s + 1) * K * b)`` of the epoch's permutation: the batch a single process
with batch ``K * b`` would take. With gradients averaged over ranks (DDP) the runs are the same
computation; a run may also be resumed with another number of processes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from care_q.errors import CareQError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    owned: bool = False  # this object initialised the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> Dist:
        if device not in ("auto", "cpu", "cuda"):
            raise CareQError(f"device must be auto, cpu or cuda, got {device!r}")
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise CareQError("device cuda was asked for, but torch sees no CUDA device")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in os.environ:
            return cls(device=torch.device("cuda") if use_cuda else torch.device("cpu"))
        import torch.distributed as dist

        if not dist.is_available():
            raise CareQError("launched by torchrun, but this torch build has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local)
        owned = not dist.is_initialized()
        if owned:  # rank 0 alone evaluates and exports while the others wait: a generous timeout
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=4))
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local,
                   backend=dist.get_backend(), device=torch.device(f"cuda:{local}") if use_cuda
                   else torch.device("cpu"), owned=owned)

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (for logging)."""
        if not self.active:
            return float(value)
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok (so one rank's failure stops all of them)."""
        if not self.active:
            return ok
        import torch.distributed as dist

        t = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t) == 0

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owned = False

    # ------------------------------------------------------------------ data
    def shard(self, dataset, epoch: int, seed: int, per_rank_batch: int, first_step: int,
              steps: int) -> list[int]:
        """This rank's sample indices for steps ``[first_step, steps)`` of ``epoch`` (see module doc)."""
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        idx = list(sampler)
        return idx[first_step * per_rank_batch: steps * per_rank_batch]
