"""This process's place in a `torchrun` job, for training and evaluation alike."""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """Rank, world size and local rank from torchrun's environment (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def join(self, device: torch.device, timeout: timedelta | None = None) -> torch.device:
        """Joins the process group when there is more than one process (NCCL for CUDA, gloo otherwise) and
        returns this process's device: with CUDA, the GPU of its local rank. `timeout` bounds each collective
        (torch's default, 10 to 30 minutes, when None)."""
        if self.world == 1:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        return device
