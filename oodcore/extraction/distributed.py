"""Distributed extraction under `torchrun`: every rank extracts its share of each split's chunks.

`torchrun --nproc_per_node N -m oodcore run ...` sets RANK / WORLD_SIZE / LOCAL_RANK. A split's
images are cut into the same fixed chunks as a single-process run (no shuffling); chunk number i
belongs to rank i mod N, and each rank writes its chunks under the run's `parts/` folder, named by
their first dataset index. Chunks partition the split exactly, so there is no padding to drop.
After a barrier, rank 0 alone gathers the chunks in dataset order, writes the artifact and, once
every split is complete, publishes run.json; the other ranks wait at the next barrier. A killed
rank (torchrun then stops them all) resumes its own missing chunks when the command is run again.
Backend nccl on CUDA (one GPU per local rank), gloo on the CPU. Several nodes need a shared cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

BARRIER_TIMEOUT = timedelta(hours=12)  # a rank waits for the slowest shard of a large split


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    active: bool = False

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Dist":
        """A process group from torchrun's environment, or the single-process default."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls(device=device)
        import torch
        import torch.distributed as td

        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        if device == "cuda":
            torch.cuda.set_device(local)
            device, backend = f"cuda:{local}", "nccl"
        else:
            backend = "gloo"
        if not td.is_initialized():
            td.init_process_group(backend, timeout=BARRIER_TIMEOUT)
        return cls(rank=rank, world=world, device=device, active=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk_number: int) -> bool:
        return chunk_number % self.world == self.rank

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
            self.active = False


SINGLE = Dist()
