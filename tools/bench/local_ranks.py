"""A benchmark's ranks as local processes: ``run_ranks(argv, world)`` starts ``argv`` once per rank and returns each
rank's last stdout line as JSON.

The rendezvous is a TCP store this process opens on a port the kernel picks and keeps bound until every rank is
gone; the ranks join it as clients (``TORCHELASTIC_USE_AGENT_STORE``, what torchrun's agent does). Picking a "free"
port by binding and closing a socket, and letting rank 0 bind it again, races with every other process on the
machine doing the same (tests/distributed.py holds its store the same way, for the same reason).
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess


def run_ranks(argv: list[str], world: int, *, cwd: str, what: str, env: dict | None = None,
              timeout_s: float = 1800) -> list[dict]:
    """Run ``argv`` as ranks 0..world-1 on this machine (gloo, CPU); a failed rank raises RuntimeError with its
    stderr's tail, and the other ranks are killed."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    procs = []
    try:
        for rank in range(world):
            rank_env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                            TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                            PYTHONWARNINGS="ignore", **(env or {}))
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                          env=rank_env))
        results = []
        for rank, proc in enumerate(procs):
            stdout, stderr = proc.communicate(timeout=timeout_s)
            if proc.returncode != 0:
                raise RuntimeError(f"{what}: rank {rank} failed:\n{stderr[-3000:]}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        del store       # the port is released once the ranks are gone
