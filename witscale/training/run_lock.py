"""One run per output directory: an exclusive lock that rank 0 holds for the run's life.

Two runs writing one ``--output-dir`` interleave their metrics and prune each other's checkpoints. So rank 0
locks ``<output-dir>/.witscale.lock`` right after the process group exists — before DeepSpeed builds an engine
or a weight is loaded — and the other ranks learn its verdict through the rendezvous store; a second run is
refused in one line naming the holder (host, pid, start time), within seconds. Design (docs/checkpoints.md#one-run-per-output-directory):

- ``fcntl.flock`` on the lock file, held until the process ends. The kernel releases it whenever the holder
  dies — a SIGKILL, a node reboot (on NFS the server's lock recovery) — so a requeued job after a preemption
  or a crash gets it at once, with no staleness rule to tune. The file is never deleted (deleting it would let
  a new run lock a new inode while an old one still holds the unlinked one); its text only names the holder.
- Linux NFS (v3 with NLM, v4) maps flock to POSIX byte-range locks held on the server: exclusive across
  clients. Lustre does so when mounted with ``-o flock``; with ``localflock`` the lock covers one node only
  (documented, not detectable); without either, flock fails (ENOSYS/EINVAL/ENOLCK/EOPNOTSUPP) and so:
- the fall-back on a filesystem without working flock: ``.witscale.lock.held`` created with O_CREAT|O_EXCL
  (atomic on every POSIX filesystem, NFSv3+ included), holding host, pid and start time, its mtime refreshed
  every ``HEARTBEAT_S`` by a daemon thread. It is stale — and taken over by renaming it aside, which only one
  contender can win — when its host is this host and its pid is gone, or when its heartbeat is older than
  ``STALE_S`` (the holder's node died). A clean exit removes it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Optional

LOCK_NAME = ".witscale.lock"
HELD_NAME = ".witscale.lock.held"      # the fall-back's O_EXCL file
HEARTBEAT_S = 30.0
STALE_S = 600.0                        # 20 missed heartbeats
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_STORE_KEY = "witscale/output_dir_lock"
_rounds = 0          # runs started in this process group (tests start several): one store key each


class OutputDirRefused(RuntimeError):
    """Another run holds the output directory, or no lock can be made there (the message says which; empty on
    ranks other than 0)."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _describe(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            h = json.load(f)
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a holder that has not written its name yet"


class OutputDirLock:
    """``acquire()`` or ``OutputDirRefused``; ``release()`` (idempotent; process exit releases the flock too)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: Optional[int] = None
        self._held_file: Optional[str] = None
        self._stop = threading.Event()

    def _busy(self, path: str) -> OutputDirRefused:
        return OutputDirRefused(f"--output-dir {self.output_dir} is in use by another run ({_describe(path)}; lock "
                             f"{path}): wait for it to end, or choose another --output-dir")

    def acquire(self) -> None:
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputDirRefused(f"--output-dir {self.output_dir}: cannot create the run's lock file "
                                   f"{self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(self.path) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            self._acquire_exclusive_file()
            return
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_holder()) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    # --- the fall-back: an O_EXCL file with a heartbeat ------------------------------------------------
    def _acquire_exclusive_file(self) -> None:
        held = os.path.join(self.output_dir, HELD_NAME)
        for _ in range(2):      # once, and once more after taking over a stale file
            try:
                fd = os.open(held, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if not self._stale(held):
                    raise self._busy(held) from None
                aside = f"{held}.stale.{socket.gethostname()}.{os.getpid()}"
                try:
                    os.replace(held, aside)     # one contender wins; the others find it gone and retry
                    os.unlink(aside)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(_holder()) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._held_file = held
            threading.Thread(target=self._heartbeat, name="witscale-lock-heartbeat", daemon=True).start()
            return
        raise self._busy(held)

    @staticmethod
    def _stale(held: str) -> bool:
        try:
            age = time.time() - os.stat(held).st_mtime
            with open(held, encoding="utf-8") as f:
                h = json.load(f)
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            return False            # being written this very moment: not stale
        if age > STALE_S:
            return True
        if h.get("host") == socket.gethostname():
            try:
                os.kill(int(h["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, TypeError, ValueError):
                return False
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self._held_file)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # the flock goes with the descriptor; the file stays (see above)
            self._fd = None
        if self._held_file is not None:
            self._stop.set()
            try:
                os.unlink(self._held_file)
            except FileNotFoundError:
                pass
            self._held_file = None


def hold_output_dir(output_dir: str) -> Optional[OutputDirLock]:
    """Collective, right after the process group exists: rank 0 takes the lock and every rank learns the
    verdict through the rendezvous store (no NCCL collective: a refused run never builds a communicator).
    Returns rank 0's lock (None elsewhere); raises ``OutputDirRefused`` on every rank of a refused run."""
    import torch.distributed as dist

    from witscale.training.distributed import _default_store

    global _rounds
    _rounds += 1
    key = f"{_STORE_KEY}/{_rounds}"
    rank, world = dist.get_rank(), dist.get_world_size()
    lock, refusal = None, ""
    if rank == 0:
        lock = OutputDirLock(output_dir)
        try:
            lock.acquire()
        except OutputDirRefused as e:
            lock, refusal = None, str(e)
    if world > 1:
        store = _default_store()
        if store is None:           # an adopted process group without a store (tests)
            verdict = [refusal]
            dist.broadcast_object_list(verdict, src=0)
            refused = bool(verdict[0])
        elif rank == 0:
            store.set(key, "refused" if refusal else "ok")
            refused = bool(refusal)
        else:
            try:
                refused = store.get(key) != b"ok"
            except Exception:       # noqa: BLE001 - rank 0 refused and left with its store
                refused = True
        if refused and rank != 0:
            raise OutputDirRefused("")
    if refusal:
        raise OutputDirRefused(refusal)
    return lock
