"""Multi-rank test harness: real processes, a real gloo process group, results back by pickle files.

    from distributed import run_distributed
    results = run_distributed(worker, 2, arg1, arg2)   # worker(rank, world_size, arg1, arg2) -> picklable

``worker`` must be a top-level (importable) function; ``results[r]`` is what rank r returned. Each rank
is a fresh process with RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR=127.0.0.1/MASTER_PORT
(the port of a TCP store the parent holds open for the run) and OMP_NUM_THREADS=1 set (so DeepSpeed finds the same group), initialises gloo, runs the
worker, pickles its result (or traceback) to a per-rank file in a temporary directory (never stdout), and
leaves through ``barrier`` + ``destroy_process_group``. A failing rank raises ``DistributedTestError``
in the parent with that rank's traceback (the rank that failed first is named first: the others usually
fail only because a peer vanished); a hang ends at ``timeout`` seconds with an error naming the ranks
still running. Each rank leads a process group of its own, which is killed when the run ends (a timeout, an
error, an interrupt): nothing a rank started — a compiler, a subprocess — outlives the run. The process group's own timeout is set a little below ``timeout``, so a rank stuck in a
collective usually reports *where* it is stuck rather than being killed silently.

The rendezvous store is a ``TCPStore`` the parent opens on port 0 (the kernel picks a free port and the parent
keeps it bound until every rank is gone); the ranks join it as clients. Picking a "free" port by binding and
closing a socket, and letting rank 0 bind it again later, races with every other process doing the same on the
machine (pytest-xdist workers launching ranks at once): two runs could share a store or fail with EADDRINUSE.

Speed. Start-up is the cost of a multi-rank test: a spawned rank imports torch (~1 s of CPU each, 4 ranks
on 2 cores ≈ 5 s) and Python's teardown of torch takes seconds more. So:
- the default start method is ``forkserver`` with torch preloaded: the server is a fresh, single-threaded
  interpreter started once per test session (it has imported torch, nothing else ran in it), and every
  rank is forked from it — a clean process like a spawned one, without paying the import again
  (4 ranks: ~0.1 s instead of ~5 s). ``start_method="spawn"`` (or WITSCALE_TEST_START_METHOD=spawn) gives
  plain spawn;
- ranks leave with ``os._exit`` after the barrier and destroy: their result is already on disk;
- this module imports only the standard library at the top, and the worker is sent pickled together with
  the parent's ``sys.path`` so it is importable in the child whatever the rootdir.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback

# Imported once in the fork server (a missing one is skipped): what nearly every rank imports anyway.
_PRELOAD = ["torch", "torch.distributed", "torch.nn.functional", "numpy", "pytest", "deepspeed",
            "witscale.parallel.layers"]


# Set by tests/conftest.py in a test without the `slow` marker: refuses the launch (multi-process tests are slow).
launch_guard = None


class DistributedTestError(RuntimeError):
    """A rank failed, died, or the run did not finish in time."""


def _write(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)       # the parent never reads half a file


def _child(rank: int, world_size: int, port: int, out_dir: str, payload: bytes, sys_path: list,
           pg_timeout_s: float) -> None:
    os.setpgid(0, 0)    # a process group of its own: what the rank starts (a compiler) is killed with it (_kill_groups)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    ok = False
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        fn, args = pickle.loads(payload)
        timeout = datetime.timedelta(seconds=pg_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        result = fn(rank, world_size, *args)
        _write(path, ("ok", result, time.time()))
        ok = True
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        try:
            _write(path, ("error", traceback.format_exc(), time.time()))
        except BaseException:  # noqa: BLE001 - e.g. an unpicklable result: still say something
            _write(path, ("error", "could not write the result:\n" + traceback.format_exc(), time.time()))
    sys.stdout.flush()
    sys.stderr.flush()
    if not ok:
        os._exit(1)     # no barrier: the peers' collectives then fail fast instead of waiting
    try:
        import torch.distributed as dist
        if dist.is_initialized():   # the worker may have torn the group down itself
            dist.barrier()
            dist.destroy_process_group()
    finally:
        os._exit(0)     # the result is on disk; skip the interpreter's slow teardown of torch


def _context(start_method: str | None):
    method = start_method or os.environ.get("WITSCALE_TEST_START_METHOD", "forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)   # no effect once the server runs; harmless
        os.environ.setdefault("OMP_NUM_THREADS", "1")   # inherited by the server when it starts
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed picks its accelerator at import
    return ctx


@contextlib.contextmanager
def _rendezvous_store(world_size: int, timeout_s: float):
    """A TCP store on a port the kernel picks (bound here, for the whole run); yields its port."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield store.port
    finally:
        del store   # closes the listening socket once the ranks are gone


def _kill_groups(procs) -> None:
    """SIGKILL each rank's process group (the rank and whatever it started: a compiler building a torch extension
    once outlived its killed rank and kept the build lock, stalling every later test that built it), then reap.
    A rank that has already exited leaves its group behind only if it started something still running."""
    import signal

    for p in procs:
        if p.pid is None:       # never started
            continue
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # nothing left in it; or a pid the kernel has given again
            pass
        p.join(5)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher, every process below it and its process group. The tree is listed before anything is
    killed (an orphan is no longer found under its launcher): torchrun starts each worker in a session of its own,
    so killing the launcher's group alone would miss the ranks."""
    import signal

    import psutil

    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    for target in (pid, *(p.pid for p in below)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_launcher(cmd, timeout, stderr=subprocess.PIPE, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=…)`` for a command that starts ranks (mpirun,
    torchrun): in a session of its own, and on the timeout (or any error here) the launcher and everything below it
    are killed (kill_tree) before TimeoutExpired is raised. subprocess.run killed the launcher alone: its ranks lived
    on, holding cores, ports and locks for the tests after it. ``stderr=subprocess.STDOUT`` merges the two."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        kill_tree(proc.pid)
        try:                    # a process that escaped the kill could still hold the pipes: do not wait on it
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        if isinstance(e, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_distributed(fn, world_size: int, *args, timeout: float = 180, start_method: str | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    try:
        payload = pickle.dumps((fn, args))
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"run_distributed: the worker and its arguments must be picklable (a top-level "
                        f"function): {e}") from e
    if launch_guard is not None:
        launch_guard(world_size)
    ctx = _context(start_method)
    pg_timeout_s = max(5.0, 0.85 * timeout)
    with tempfile.TemporaryDirectory(prefix="witscale-dist-") as out_dir, _rendezvous_store(world_size,
                                                                                          pg_timeout_s) as port:
        procs = [ctx.Process(target=_child, name=f"rank{r}",
                             args=(r, world_size, port, out_dir, payload, list(sys.path), pg_timeout_s))
                 for r in range(world_size)]
        try:
            for p in procs:
                p.start()
        except BaseException:
            _kill_groups(procs)
            raise
        deadline = time.monotonic() + timeout
        grace_end = None        # after a first failure, give the peers a moment to report theirs
        timed_out = False
        try:
            while True:
                alive = [p for p in procs if p.exitcode is None]
                if not alive:
                    break
                now = time.monotonic()
                if grace_end is None and any(p.exitcode not in (None, 0) for p in procs):
                    grace_end = now + 3.0
                if now > deadline or (grace_end is not None and now > grace_end):
                    timed_out = grace_end is None
                    break
                mp.connection.wait([p.sentinel for p in alive], timeout=0.2)
        except BaseException:
            _kill_groups(procs)
            raise
        still_running = [r for r, p in enumerate(procs) if p.exitcode is None]
        _kill_groups(procs)

        outcomes = {}
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    outcomes[r] = pickle.load(f)
        failed = sorted((t, r, tb) for r, (status, tb, t) in outcomes.items() if status != "ok")
        if failed:
            first = failed[0][1]
            parts = [f"rank {r} failed" + (" first" if r == first else "") + f":\n{tb}" for _, r, tb in failed]
            raise DistributedTestError(f"{len(failed)} of {world_size} ranks failed; rank {first} first.\n\n"
                                       + "\n".join(parts))
        if timed_out:
            raise DistributedTestError(
                f"distributed run of {getattr(fn, '__name__', fn)} on {world_size} ranks did not finish within "
                f"{timeout} s; ranks still running: {still_running}, ranks whose worker returned: "
                f"{sorted(outcomes)} (a collective not every rank reached?)")
        died = [(r, procs[r].exitcode) for r in range(world_size) if r not in outcomes]
        if died:
            raise DistributedTestError("ranks exited without a result (crashed or killed): "
                                       + ", ".join(f"rank {r} exit code {c}" for r, c in died))
        return [outcomes[r][1] for r in range(world_size)]


__all__ = ["run_distributed", "DistributedTestError"]
