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
from typing import Optional

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


def validation_shard(world_size: int) -> tuple[int, int]:
    """This process's share (i, k) of a packed dataset's open-time validation (PackedDataset(shard=...),
    docs/packed-format.md#validation), before any process group: rank r of W checks the per-token arrays of
    its W-th of the rows, so the job reads them once; a bad row stops that rank with its one line and the
    launcher ends the job. A process group that already exists (tests) gives the rank; else the launcher's
    environment; one process, or a rank out of range, checks everything."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else rank_from_env()
    return (rank, world_size) if 0 <= rank < world_size else (0, 1)


def rank_from_env() -> int:
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    for var in _MPI_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


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
    if launched_by_mpi() and not os.environ.get("MASTER_ADDR"):
        # No rendezvous given: DeepSpeed's MPI discovery picks rank 0's first `hostname -I` address (and would
        # always use port 29500: two jobs on a node would collide).
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)), timeout=timeout)
    else:
        if launched_by_mpi():
            # The launcher computed the rendezvous (slurm/common.sh: the first node's Slurm NodeAddr): it wins.
            # DeepSpeed's discovery would overwrite MASTER_ADDR with the first word of `hostname -I` on rank 0 —
            # docker0 or an IPoIB address on many nodes — so the ranks' environment is set here instead.
            _env_from_mpi()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "WORLD_SIZE" not in os.environ:
            # A single process: a world of one on an in-memory store, adopted below. No port: picking a "free"
            # one by binding and closing a socket races with every other process on the node doing the same.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    if torch.cuda.is_available():
        # Under MPI the local rank is known only now (DeepSpeed's discovery sets LOCAL_RANK).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def any_rank(flag: bool, device) -> bool:
    """Collective: True on every rank if ``flag`` is True on any (one all-reduce MAX on ``device``)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


_MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def _env_from_mpi() -> None:
    """RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_PORT, default 29500) from the MPI launcher's variables, keeping
    MASTER_ADDR; the local rank from the launcher, else from mpi4py (ranks sharing this node's memory)."""
    rank, world = rank_from_env(), world_size_from_env()
    local = next((os.environ[v] for v in _MPI_LOCAL_RANK_VARS if os.environ.get(v)), None)
    if local is None:
        from mpi4py import MPI
        local = str(MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_rank())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=local,
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))


_FAILED_KEY = "witscale/failed_rank"
_PROGRESS_KEY = "witscale/progress/"      # + rank: "<step> <host>", set after each optimizer step
_TIMED_OUT_KEY = "witscale/collective_failed/"     # + rank: set by a rank whose collective failed or watchdog fired


# --- collective timeouts: short while stepping, long around the phases known to be long ------------------
# A hung rank (a wedged GPU, a stopped process, a dead NIC) leaves the others waiting in a collective until its
# timeout. --dist-timeout (default 30 min) must cover the long collective phases — a checkpoint's save or load,
# the universal conversion, the export — but nothing in a healthy step comes near it: every rank enters each of
# the step's collectives within seconds of the others. So after the first step the timeout drops to
# --step-timeout (default 300 s: torchtitan uses 100 s after its first step; 300 leaves room for a slow data
# read or a Python GC pause on a loaded host, and still finds a hung rank in 5 min instead of 30) and goes
# back to --dist-timeout only inside ``long_collectives()``.
_timeouts = {"long": None, "short": None, "now": None}


def _all_groups() -> list:
    c10d = dist.distributed_c10d
    return [pg for pg in list(c10d._world.pg_map) if not c10d._rank_not_in_group(pg)]


def set_collective_timeout(seconds: float) -> None:
    """Every process group of this rank (torch's default, DeepSpeed's and witscale's) times out after
    ``seconds``; applies to collectives issued from now on (``ProcessGroup._set_default_timeout``)."""
    import datetime

    timeout = datetime.timedelta(seconds=seconds)
    for pg in _all_groups():
        try:
            dist.distributed_c10d._set_pg_timeout(timeout, pg)
        except (RuntimeError, ValueError, AssertionError):    # a backend without settable timeouts: left as is
            pass
    _timeouts["now"] = seconds


def use_step_timeout(step_seconds: float, long_seconds: float) -> bool:
    """From now on (call once the first step is done) the step watchdog (witscale/training/watchdog.py) ends a
    rank whose step phase makes no progress for ``step_seconds``, and every collective times out
    ``watchdog.LEAD_S`` after it (so that on NCCL the watchdog — which reports and requeues — fires before NCCL's
    own abort, which does neither); ``long_collectives()`` suspends both. True when the watchdog runs."""
    from witscale.training import watchdog

    if not dist.is_initialized() or dist.get_world_size() == 1 or step_seconds >= long_seconds:
        return False
    short = step_seconds + watchdog.LEAD_S
    if short < long_seconds:
        _timeouts.update(long=long_seconds, short=short)
        set_collective_timeout(short)
    watchdog.start(step_seconds)
    return True


class long_collectives:
    """``with long_collectives():`` — --dist-timeout for a checkpoint save/load, conversion or export, then back;
    the step watchdog is suspended meanwhile (its clock restarts after)."""

    def __enter__(self):
        from witscale.training import watchdog

        self.paused = watchdog.suspended()
        self.paused.__enter__()
        self.restore = _timeouts["short"] if _timeouts["now"] == _timeouts["short"] and _timeouts["short"] else None
        if self.restore is not None:
            set_collective_timeout(_timeouts["long"])
        return self

    def __exit__(self, *exc):
        if self.restore is not None and exc[0] is None:
            set_collective_timeout(self.restore)
        self.paused.__exit__(*exc)
        return False


def node_name() -> str:
    """This node as the scheduler names it (what `--exclude` takes), else its hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def record_progress(step: int) -> None:
    """After each optimizer step: this rank's step and host in the rendezvous store (one small write), so that
    a rank whose collective timed out can say which ranks, on which hosts, stopped (``hung_ranks``)."""
    store = _default_store()
    if store is not None:
        try:
            store.set(f"{_PROGRESS_KEY}{dist.get_rank()}", f"{step} {node_name()}")
        except Exception:    # noqa: BLE001 - diagnosis only
            pass


def hung_ranks(grace_s: float = 10.0, doing: str = "") -> Optional[str]:
    """After a collective of this rank failed, or its step watchdog fired: which ranks stopped. Every such rank
    marks itself in the store — with ``doing``, what its main thread does ('' = waits in a collective,
    ``main_thread_activity``) — and waits ``grace_s`` for the others' marks (they fail within about the same
    second). Named, with host and last finished step (``record_progress``): the unmarked ranks (stopped, wedged,
    gone: "did not reach it") and, where some marked rank waits in a collective, the marked ranks that do not
    ("stuck outside any collective": e.g. a rank in a dead filesystem's read). None without a store."""
    import time

    store = _default_store()
    if store is None or not dist.is_initialized():
        return None
    try:
        store.set(f"{_TIMED_OUT_KEY}{dist.get_rank()}", _BUSY + doing if doing else _WAITING)
        time.sleep(grace_s)
        hung, busy, waiting = [], [], 0
        for r in range(dist.get_world_size()):
            where = _last_progress(store, r)
            if store.check([f"{_TIMED_OUT_KEY}{r}"]):
                mark = store.get(f"{_TIMED_OUT_KEY}{r}").decode()
                if mark.startswith(_BUSY):
                    busy.append(f"rank {r} on {where[1]} (last finished step {where[0]}; {mark[len(_BUSY):]})"
                                if where else f"rank {r} (no step finished; {mark[len(_BUSY):]})")
                else:
                    waiting += 1
            elif where:
                hung.append(f"rank {r} on {where[1]} (last finished step {where[0]})")
            else:
                hung.append(f"rank {r} (no step finished)")
    except Exception:    # noqa: BLE001 - the store may be gone
        return None
    parts = (["did not reach it: " + ", ".join(hung)] if hung else []) + (
        ["stuck outside any collective: " + ", ".join(busy)] if busy and waiting else [])
    return "; ".join(parts) if parts else "every rank failed with it"


_WAITING, _BUSY = "collective", "busy: "       # the marks of hung_ranks


def _last_progress(store, rank: int) -> Optional[tuple[str, str]]:
    key = f"{_PROGRESS_KEY}{rank}"
    if not store.check([key]):
        return None
    step, host = store.get(key).decode().split(" ", 1)
    return step, host


def main_thread_activity() -> str:
    """'' when this rank's main thread is inside torch or DeepSpeed (a collective, a ZeRO gather's wait, a device
    sync: what a rank waiting for a stopped peer does), else where it is busy — ``busy in <function> (<file>:<line>)``
    of its innermost Python frame: a rank stuck in witscale's own code or another library (a dead filesystem's
    read, a sleep). Under NCCL a hung collective usually blocks the host at the step's next device sync
    (``.item()``, a C call from witscale's code): then every rank looks busy, and ``hung_ranks`` names none."""
    import sys
    import threading

    top = frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).split(".")[0] in ("torch", "deepspeed"):
            return ""
        frame = frame.f_back
    if top is None:
        return ""
    return f"busy in {top.f_code.co_name} ({os.path.basename(top.f_code.co_filename)}:{top.f_lineno})"


def is_collective_failure(exc: Optional[BaseException]) -> bool:
    """A timeout or communication error of a collective (a hung or lost peer, a network fault) — a node's fault,
    worth a requeue — rather than a bug in this rank's code."""
    if exc is None:
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):      # DistBackendError, DistNetworkError, DistStoreError
        return True
    # older paths raise a plain RuntimeError from gloo/NCCL: recognised by their words
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(k in text for k in (
        "timed out", "timeout caused", "pair closure", "connection reset", "connection closed", "nccl error", "gloo",
        "broken pipe"))     # gloo's "Application timeout caused pair closure": ZeRO-3's prefetch wait on a timed-out peer


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


def said_once(message: str, store=None) -> str:
    """``message`` if no rank of this job has said the same words yet, else "" (``fail_fast`` then leaves
    quietly): an error every rank meets (a refused resume) is printed once, by the first rank to meet it; one
    that names a rank's own file is other words, so each rank that meets it says it. Counted under a digest of
    the words in the rendezvous store; without a store, or when it does not answer, every rank says it."""
    store = store if store is not None else (_default_store() if dist.is_initialized() else None)
    if not message or store is None:
        return message
    import hashlib
    try:
        first = store.add("witscale/said/" + hashlib.sha256(message.encode()).hexdigest()[:32], 1) == 1
    except Exception:    # noqa: BLE001 - the store may be gone: better twice than never
        return message
    return message if first else ""


def fail_fast(code: int = 1, message: str | None = None) -> None:
    """Leave NOW after an error on this rank: the message (default: the traceback being handled) on stderr,
    logs flushed, then ``os._exit``. No barrier and no process-group teardown: the other ranks may be
    waiting in a collective with this one, and a barrier would hang until the collective timeout with the
    traceback unprinted. The launcher (torchrun, deepspeed, mpirun, srun --kill-on-bad-exit) sees the
    non-zero exit and ends the other ranks within seconds. ``message=""``: leave quietly (another rank says why)."""
    import logging
    import sys
    import traceback

    exc = sys.exc_info()[1]
    if code == 1 and isinstance(exc, KeyboardInterrupt):
        code = 130
    rank = rank_from_env()
    collective = code == 1 and dist.is_initialized() and is_collective_failure(exc)
    try:
        if collective:      # before the failure key: the peers must not leave before they marked themselves
            traceback.print_exc()
            _report_collective_failure(rank, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        if dist.is_initialized():
            store = _default_store()
            if store is not None:
                try:
                    store.set(_FAILED_KEY, str(rank))      # the other ranks' PeerFailureWatch reads it
                except Exception:    # noqa: BLE001 - the store may be gone already
                    pass
        if message:
            print(message, file=sys.stderr)
        elif message is None and not collective:    # (a collective failure printed its traceback and line already)
            print(f"[witscale] rank {rank} ({node_name()}) failed:", file=sys.stderr)
            traceback.print_exc()
        for handler in logging.getLogger("witscale").handlers + logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def leave_after_stall(phase: str, waited: float) -> None:
    """The step watchdog fired (witscale/training/watchdog.py; called from its thread): this rank's phase made no
    progress for ``waited`` seconds. Say so, dump every thread's Python stack (faulthandler) and — on NCCL —
    torch's flight recorder, report it as a collective failure (the ranks that stopped, $WITSCALE_FAILURE_FILE:
    the batch script requeues), tell the peers (``_FAILED_KEY``) and leave with status 1, before NCCL's own
    timeout aborts the process with none of that."""
    import faulthandler
    import logging
    import sys

    rank = rank_from_env()
    try:
        doing = main_thread_activity()
        print(f"[witscale] rank {rank} ({node_name()}): step watchdog: no progress for {waited:.0f} s in {phase} "
              f"({doing or 'waiting in a collective'}); the Python stack of every thread follows",
              file=sys.stderr, flush=True)
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except (ValueError, OSError, AttributeError):     # stderr without a file descriptor
            pass
        _dump_flight_recorder(rank)
        _report_collective_failure(rank, f"step watchdog: no progress for {waited:.0f} s in {phase}", doing)
        store = _default_store()
        if store is not None:
            try:
                store.set(_FAILED_KEY, str(rank))
            except Exception:    # noqa: BLE001 - the store may be gone already
                pass
        for handler in logging.getLogger("witscale").handlers + logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(1)


def _dump_flight_recorder(rank: int) -> None:
    """NCCL only: torch's flight recorder (each rank's last collectives with their sequence numbers) into the file
    NCCL's own timeout dump would have written (``$TORCH_FR_DUMP_TEMP_FILE<rank>``, slurm/site_env.sh), which the
    step watchdog pre-empts. Read them with ``python -m torch.distributed.flight_recorder.fr_trace``."""
    import sys

    stem = os.environ.get("TORCH_FR_DUMP_TEMP_FILE")
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if not stem or dump is None or not dist.is_initialized() or dist.get_backend() != "nccl":
        return
    try:
        data = dump()
        with open(f"{stem}{rank}", "wb") as f:
            f.write(data)
        print(f"[witscale] rank {rank}: NCCL flight recorder written to {stem}{rank}", file=sys.stderr, flush=True)
    except Exception as e:    # noqa: BLE001 - diagnosis only
        print(f"[witscale] rank {rank}: could not dump the NCCL flight recorder: {e}", file=sys.stderr, flush=True)


def _report_collective_failure(rank: int, what: str, doing: str = "") -> None:
    """One line naming the ranks and hosts that stopped, and — for the Slurm batch script, which requeues a
    job that died of a node or network fault but not one that died of a bug — the same line in
    $WITSCALE_FAILURE_FILE (set by slurm/common.sh): ``collective <hosts behind, comma-separated> | <line>``.
    ``what``: the failure in a few words; ``doing``: what this rank's main thread does (``hung_ranks``)."""
    import sys

    import re

    hung = hung_ranks(float(os.environ.get("WITSCALE_HUNG_GRACE_S", "10")), doing)
    line = f"[witscale] rank {rank} ({node_name()}): a collective failed ({what})" + (f"; {hung}" if hung else "")
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("WITSCALE_FAILURE_FILE")
    if path:
        hosts = sorted(set(re.findall(r"rank \d+ on (\S+) \(", hung or "")))
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"collective {','.join(hosts) or '-'} | {line}\n")
        except OSError:
            pass
