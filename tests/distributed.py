"""Multi-rank test harness: real processes, a real gloo process group, results back by pickle files.

    results = run_distributed(worker, 2, arg1, arg2)   # worker(rank, world_size, arg1, arg2) -> picklable

``worker`` must be a top-level (importable) function. Each child initialises gloo on a free loopback
port with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set (so DeepSpeed finds the same group), runs the worker,
writes its result (or its traceback) to a per-rank file, and leaves through a barrier. A failing rank
raises in the parent with that rank's traceback; a hang ends at ``timeout`` with a clear error.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        result = ("error", traceback.format_exc())
    with open(result_path, "wb") as f:
        pickle.dump(result, f)
    if result[0] != "ok":
        os._exit(1)      # the peers' collectives then fail fast instead of waiting for the timeout
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 240):
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_child, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        crashed = None
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    crashed = TimeoutError(f"distributed test ({world_size} ranks) did not finish in {timeout} s")
                    break
        except mp.ProcessExitedException as e:
            crashed = e
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        outcomes = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    outcomes.append(pickle.load(f))
            else:
                outcomes.append(("error", "exited without a result"))
        for rank, (status, value) in enumerate(outcomes):
            if status != "ok" and "without a result" not in value:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
        if crashed is not None:
            raise RuntimeError(f"distributed test failed: {crashed}")
        return [value for _, value in outcomes]
