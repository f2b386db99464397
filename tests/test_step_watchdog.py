"""The step watchdog (witscale/training/watchdog.py): armed per phase with a time stamp, fired from its own thread
when a phase makes no progress for its timeout, silent inside ``long_collectives()`` (a save, a conversion, the
export) however long that lasts."""
from __future__ import annotations

import threading
import time

import pytest

from witscale.training import watchdog
from witscale.training.distributed import long_collectives


class Fired:
    def __init__(self):
        self.calls, self.event = [], threading.Event()

    def __call__(self, phase, waited):
        self.calls.append((phase, waited))
        self.event.set()


@pytest.fixture
def fired():
    f = Fired()
    yield f
    watchdog.stop()


def test_an_armed_phase_without_progress_fires_once_naming_the_phase(fired):
    wd = watchdog.start(0.2, on_fire=fired)
    wd.arm("step 3: forward/backward/optimizer")
    assert fired.event.wait(10)
    time.sleep(0.3)
    assert len(fired.calls) == 1
    phase, waited = fired.calls[0]
    assert phase == "step 3: forward/backward/optimizer" and waited >= 0.2


def test_idle_or_disarmed_it_never_fires(fired):
    wd = watchdog.start(0.1, on_fire=fired)
    time.sleep(0.4)                     # not armed yet (the first step runs without it)
    wd.arm("step 2: loading its batch")
    wd.disarm()
    time.sleep(0.4)
    assert not fired.calls


def test_beats_keep_a_long_evaluation_alive(fired):
    wd = watchdog.start(0.3, on_fire=fired)
    wd.arm("step 4: evaluation")
    progress = watchdog.beating(None)
    for i in range(10):                 # 1 s in all, more than three timeouts, a beat every 0.1 s
        time.sleep(0.1)
        progress(i + 1, 10)
    wd.disarm()
    assert not fired.calls


def test_a_long_phase_inside_long_collectives_does_not_fire_and_the_clock_restarts_after(fired):
    """A save under long_collectives() lasting three timeouts: silent. After it the step's clock starts again,
    so the rest of the step gets the whole timeout (and a phase stuck after the save still fires)."""
    wd = watchdog.start(0.2, on_fire=fired)
    wd.arm("step 2: preemption check")
    with long_collectives():
        time.sleep(0.7)
    time.sleep(0.1)
    assert not fired.calls
    assert fired.event.wait(10)
    assert fired.calls[0][0] == "step 2: preemption check"


def test_the_module_functions_are_no_ops_without_a_watchdog():
    watchdog.stop()
    watchdog.arm("step 1")
    watchdog.beat()
    watchdog.disarm()
    with watchdog.suspended():
        pass
    assert watchdog.current_phase() is None


def test_a_phase_that_took_more_than_half_the_timeout_is_warned_about_once(fired, caplog):
    wd = watchdog.start(0.4, on_fire=fired)
    with caplog.at_level("WARNING", logger="witscale"):
        wd.arm("step 2: forward/backward/optimizer")
        time.sleep(0.25)
        wd.arm("step 2: preemption check")
        time.sleep(0.25)
        wd.arm("step 3: loading its batch")
        wd.disarm()
    warned = [r.getMessage() for r in caplog.records if "raise --step-timeout" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("step 2: forward/backward/optimizer took"), warned
