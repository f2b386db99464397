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


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and DeepSpeed's view of it.

    The GPU is chosen before the group exists (NCCL binds each rank's communicator to its current device).
    ``timeout_minutes`` bounds every collective. An existing torch process group (tests start their own) is
    adopted: DeepSpeed still has to be told, or its config would see a world of one.
    """
    import datetime

    import deepspeed

    # The shared-memory comm op is only for inference all-reduce and costs a ~60 s JIT compile on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        return
    if launched_by_mpi():
        # DeepSpeed's MPI discovery would always use port 29500 (two jobs on a node would collide).
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)), timeout=timeout)
    else:
        if "WORLD_SIZE" not in os.environ:  # a single process: a world of one on loopback
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    if torch.cuda.is_available():
        # Under MPI the local rank is known only now (DeepSpeed's discovery sets LOCAL_RANK).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def any_rank(flag: bool, device) -> bool:
    """Collective: True on every rank if ``flag`` is True on any (one all-reduce MAX on ``device``)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


_FAILED_KEY = "witscale/failed_rank"


class PeerFailureWatch:
    """Ends this rank within seconds when another rank has failed.

    A collective with a rank that died does not fail on NCCL until the collective timeout (minutes), and a
    launcher's SIGTERM to the survivors is taken as a preemption request (witscale/training/preemption.py). So a
    failing rank writes its rank under a key of the rendezvous store (``fail_fast``), and a daemon thread on
    every rank polls that key once a ``interval``: when it is set — or when the store itself is gone, i.e.
    rank 0 ended — the rank prints why and exits. ``stop()`` before the normal teardown: the store's host
    (rank 0) may legitimately leave first after the final barrier."""

    def __init__(self, interval: float = 1.0):
        import threading

        self.interval = interval
        self.store = _default_store()
        self._stop = threading.Event()
        self._thread = None
        if self.store is not None:
            self._thread = threading.Thread(target=self._run, name="witscale-peer-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import sys

        while not self._stop.wait(self.interval):
            try:
                if not self.store.check([_FAILED_KEY]):
                    continue
                why = f"rank {self.store.get(_FAILED_KEY).decode()} failed"
            except Exception as e:    # noqa: BLE001 - the store went away with rank 0
                why = f"the rendezvous store is gone (rank 0 ended?): {e}"
            if self._stop.is_set():
                return
            print(f"[witscale] rank {rank_from_env()}: {why}; leaving", file=sys.stderr, flush=True)
            os._exit(1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _default_store():
    """The default process group's store (None where there is none, e.g. an adopted test group)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:    # noqa: BLE001 - private API: no watch rather than no training
        return None


def fail_fast(code: int = 1, message: str | None = None) -> None:
    """Leave NOW after an error on this rank: the message (default: the traceback being handled) on stderr,
    logs flushed, then ``os._exit``. No barrier and no process-group teardown: the other ranks may be
    waiting in a collective with this one, and a barrier would hang until the collective timeout with the
    traceback unprinted. The launcher (torchrun, deepspeed, mpirun, srun --kill-on-bad-exit) sees the
    non-zero exit and ends the other ranks within seconds."""
    import logging
    import sys
    import traceback

    exc = sys.exc_info()[1]
    if code == 1 and isinstance(exc, KeyboardInterrupt):
        code = 130
    rank = rank_from_env()
    try:
        if dist.is_initialized():
            store = _default_store()
            if store is not None:
                try:
                    store.set(_FAILED_KEY, str(rank))      # the other ranks' PeerFailureWatch reads it
                except Exception:    # noqa: BLE001 - the store may be gone already
                    pass
        if message is not None:
            print(message, file=sys.stderr)
        else:
            print(f"[witscale] rank {rank} failed:", file=sys.stderr)
            traceback.print_exc()
        for handler in logging.getLogger("witscale").handlers + logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def teardown() -> None:
    """Every rank waits for the others, then leaves; without the barrier gloo can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
