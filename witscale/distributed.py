"""Process-group start-up for every launcher witscale supports.

- ``torchrun`` and ``deepspeed`` set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
- ``mpirun`` / ``srun --mpi`` set OMPI_* / PMI_* variables: DeepSpeed discovers the ranks through mpi4py;
- a plain ``python witscale/train.py`` is a world of one.
The world size is read from the environment *before* any group exists, so that the layout can be
validated first.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def launched_by_mpi() -> bool:
    return "WORLD_SIZE" not in os.environ and any(v in os.environ for v in _MPI_SIZE_VARS)


def world_size_from_env() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    for var in _MPI_SIZE_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 1


def rank_from_env() -> int:
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    for var in _MPI_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and DeepSpeed's view of it.

    An existing torch process group (tests start their own) is adopted: DeepSpeed still has to be told,
    or its config would see a world of one.
    """
    import deepspeed

    # The shared-memory comm op is only for inference all-reduce and costs a ~60 s JIT compile on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        return
    if launched_by_mpi():
        # DeepSpeed's MPI discovery would always use port 29500 (two jobs on a node would collide).
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    else:
        if "WORLD_SIZE" not in os.environ:  # a single process: a world of one on loopback
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    """Every rank waits for the others, then leaves; without the barrier gloo can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
