"""Data parallelism over the node's GPUs: under ``torchrun --nproc_per_node G tools/evaluate.py …`` each rank
takes every G-th prompt set / prompt, on its own GPU (``LOCAL_RANK``), and rank 0 gathers the results in
their original order. A failure on a rank travels as data (``(ok, payload)``), so no rank is left waiting
in a collective for one that raised. Without torchrun (or ``WORLD_SIZE=1``) everything is local.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import torch


class DataParallel:
    def __init__(self, timeout_hours: float = 12.0):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._owns_group = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                cuda = torch.cuda.is_available()
                if cuda:
                    torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
                dist.init_process_group("nccl" if cuda else "gloo",
                                        timeout=datetime.timedelta(hours=timeout_hours))
                self._owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """The indices of n items this rank takes."""
        return list(range(self.rank, n, self.world))

    def gather(self, indexed: Sequence[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """All ranks' (index, value) pairs, sorted by index, on every rank."""
        if self.world == 1:
            return sorted(indexed, key=lambda x: x[0])
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, list(indexed))
        return sorted((x for p in parts for x in p), key=lambda x: x[0])

    def all_ok(self, ok: bool, message: str = "") -> list[str]:
        """Every rank's error message ('' where it succeeded)."""
        return [m for _, m in self.gather([(self.rank, "" if ok else (message or "failed"))])]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        """After the work is done on every rank (never after an error: a peer may not reach the barrier)."""
        if self._owns_group:
            from witscale.parallel.topology import teardown
            teardown()
