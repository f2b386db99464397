"""The step watchdog: a rank that makes no progress for --step-timeout ends the job itself, before NCCL does.

On NCCL a collective that waits past its timeout is ended by torch's C++ watchdog thread, which aborts the
communicator and then the process (SIGABRT, ``TORCH_NCCL_ASYNC_ERROR_HANDLING``) — no Python exception, so
``fail_fast`` never runs: nothing names the rank that stopped, ``$WITSCALE_FAILURE_FILE`` is not written and the
Slurm batch script does not requeue the job. (On gloo the timeout raises, and the exception path does all that.)

So each rank runs one daemon thread, this watchdog. The training loop *arms* it at each phase of an optimizer step
(``arm("step 7: forward/backward/optimizer")``: a time stamp and a string, no collective, nothing on the GPU) and
*beats* it where a long phase makes progress (every evaluation micro-batch). When a phase has run for
``timeout_s`` the thread fires (``distributed.leave_after_stall``): it names this rank, its host and the phase,
dumps every Python thread's stack (faulthandler), names the ranks that stopped, writes the failure file as a
collective failure (requeue) and ends the process with status 1, so that torchrun / srun end the job in seconds.

It is *suspended* inside ``distributed.long_collectives()`` (a checkpoint's save or load, the universal conversion,
the export): those are bounded by --dist-timeout, not by the step timeout, exactly like the collectives' own
timeouts. While it is armed, every collective's timeout is the watchdog's plus ``LEAD_S``
(``distributed.use_step_timeout``), so that the watchdog fires first and has time to report.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Optional

# While the watchdog is armed, collectives time out LEAD_S after it: its report (``hung_ranks``'s grace of 10 s,
# the stack dump, the failure file) takes seconds, and NCCL's abort must not cut it short.
LEAD_S = 60.0


class StepWatchdog:
    """Fires ``on_fire(phase, waited_seconds)`` once, from its own thread, when the armed phase has had no
    progress (``arm`` / ``beat``) for ``timeout_s``. Idle until the first ``arm``."""

    def __init__(self, timeout_s: float, on_fire: Optional[Callable[[str, float], None]] = None,
                 poll_s: Optional[float] = None):
        self.timeout_s = float(timeout_s)
        self._on_fire = on_fire or _leave
        self._poll_s = poll_s if poll_s is not None else min(1.0, max(0.05, self.timeout_s / 10))
        self._deadline: Optional[float] = None       # monotonic time at which the armed phase is overdue
        self._since: float = 0.0                      # when the phase last made progress
        self.phase: Optional[str] = None
        self._suspended = 0
        self._warned = False
        self._long_first = False                      # the armed phase has a first timeout above timeout_s
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="witscale-step-watchdog", daemon=True)
        self._thread.start()

    # --- the training loop's side: time stamps only ----------------------------------------------------
    def arm(self, phase: str, first_timeout_s: Optional[float] = None) -> None:
        """A new phase starts now: it has ``timeout_s`` (``first_timeout_s`` until its first beat) to finish or to
        ``beat``. A phase that ended after more than half its time is warned about, once: a healthy step must not
        come near the timeout (raise --step-timeout)."""
        now = time.monotonic()
        # (a phase armed with a longer first timeout is not warned about; compared as the timeout itself, not as
        # deadline − start: that difference of two large monotonic times can round above timeout_s)
        if self.phase is not None and not self._warned and now - self._since > self.timeout_s / 2 \
                and self._deadline is not None and not self._long_first:
            self._warned = True
            _warn_slow(self.phase, now - self._since, self.timeout_s)
        self.phase = phase
        self._since = now
        self._long_first = bool(first_timeout_s) and first_timeout_s > self.timeout_s
        self._deadline = now + (first_timeout_s or self.timeout_s)

    def beat(self) -> None:
        """The armed phase made progress: its clock starts again (no-op when disarmed)."""
        if self.phase is not None:
            self._since = time.monotonic()
            self._deadline = self._since + self.timeout_s
            self._long_first = False

    def disarm(self) -> None:
        self.phase, self._deadline = None, None

    @contextlib.contextmanager
    def suspended(self):
        """A phase known to be long (bounded by --dist-timeout instead); the clock restarts after it."""
        self._suspended += 1
        try:
            yield
        finally:
            self.beat()
            self._suspended -= 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    # --- the thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            deadline, phase = self._deadline, self.phase
            if deadline is None or phase is None or self._suspended or time.monotonic() < deadline:
                continue
            self.fired = True
            self._on_fire(phase, time.monotonic() - self._since)
            return


def _warn_slow(phase: str, seconds: float, timeout_s: float) -> None:
    import logging
    logging.getLogger("witscale").warning(
        f"{phase} took {seconds:.0f} s, more than half the step watchdog's {timeout_s:.0f} s: a slower one would end "
        "the job as hung; raise --step-timeout")


def _leave(phase: str, waited: float) -> None:
    from witscale.training.distributed import leave_after_stall
    leave_after_stall(phase, waited)


# --- the process's watchdog (one per rank), reached from the training loop and from long_collectives() ------
_active: Optional[StepWatchdog] = None


def start(timeout_s: float, on_fire=None) -> StepWatchdog:
    global _active
    stop()
    _active = StepWatchdog(timeout_s, on_fire)
    return _active


def active() -> Optional[StepWatchdog]:
    return _active


def stop() -> None:
    global _active
    if _active is not None:
        _active.stop()
        _active = None


def arm(phase: str, first_timeout_s: Optional[float] = None) -> None:
    if _active is not None:
        _active.arm(phase, first_timeout_s)


def beat() -> None:
    if _active is not None:
        _active.beat()


def disarm() -> None:
    if _active is not None:
        _active.disarm()


def current_phase() -> Optional[str]:
    return _active.phase if _active is not None else None


@contextlib.contextmanager
def suspended():
    if _active is None:
        yield
        return
    with _active.suspended():
        yield


def beating(progress: Optional[Callable[[int, int], None]]) -> Callable[[int, int], None]:
    """An evaluation ``progress(done, total)`` callback that also beats the watchdog (one time stamp per scored
    micro-batch; the evaluation of a large set takes longer than a step, but each micro-batch does not)."""
    def callback(done: int, total: int) -> None:
        beat()
        if progress is not None:
            progress(done, total)
    return callback
