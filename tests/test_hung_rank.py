"""A hung rank is found in minutes, not after --dist-timeout (witscale/training/distributed.py: the short
--step-timeout after the first step, ``long_collectives`` around saves and the export, ``laggards``)."""
from __future__ import annotations

import os
import signal
import socket

import pytest

from tests.test_train_cli_operations import _args, _env, _torchrun, run_inputs  # noqa: F401

pytestmark = pytest.mark.slow  # torchrun ranks


def test_a_stopped_rank_ends_the_job_within_the_step_timeout_naming_its_host(run_inputs, tmp_path):  # noqa: F811
    """Rank 1 SIGSTOPs itself before step 3; rank 0 waits in step 3's first collective. With the default
    --dist-timeout (30 min) the old code waited half an hour; here the job ends after --step-timeout (5 s), and
    the line names rank 1, its host and the step it last finished, also in $WITSCALE_FAILURE_FILE. The save at
    step 2 ran under the long timeout (it is slowed by 8 s, longer than the step timeout)."""
    failure = tmp_path / "failure.txt"
    proc = _torchrun(_args(run_inputs, tmp_path / "run", 6, "--save-steps", "2", "--step-timeout", "5",
                           "--no-tensorboard"),
                     env=_env(WITSCALE_FAULT="stop_in_step:3:1", WITSCALE_SLOW_SAVE="8",
                              WITSCALE_FAILURE_FILE=str(failure)), wait=False)
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-4000:]
    host = socket.gethostname()
    named = [ln for ln in out.splitlines() if "a collective failed" in ln]
    assert len(named) == 1 and f"did not reach it: rank 1 on {host} (last finished step 2)" in named[0], out[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002", out[-4000:]
    report = failure.read_text()
    assert report.startswith(f"collective {host} | "), report


def test_a_rank_stuck_outside_any_collective_is_found_by_the_step_watchdog(run_inputs, tmp_path):  # noqa: F811
    """Rank 1 sleeps (alive, its Python running) before step 3's batch; rank 0 waits in step 3's collectives. The
    collectives' own timeout is the watchdog's + 60 s, so only the step watchdog can end the job here — as on NCCL,
    where the collective timeout aborts the process (SIGABRT) with no report. Both watchdogs fire: each rank says
    where it is (rank 0 in a collective, rank 1 busy in the training loop), dumps every thread's stack, and the
    failure file names rank 1's host as a collective failure, which the batch script requeues."""
    failure = tmp_path / "failure.txt"
    proc = _torchrun(_args(run_inputs, tmp_path / "run", 6, "--step-timeout", "5", "--no-tensorboard"),
                     env=_env(WITSCALE_FAULT="sleep_in_step:3:1", WITSCALE_FAILURE_FILE=str(failure)), wait=False)
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (tmp_path / "out.txt").write_text(out)
    assert proc.returncode != 0, out[-4000:]
    host = socket.gethostname()
    assert "step watchdog: no progress for" in out and "in step 3: forward/backward/optimizer (waiting in a " \
        "collective)" in out, out[-4000:]
    assert "in step 3: loading its batch (busy in train_loop (train.py:" in out, out[-4000:]
    assert "(most recent call first)" in out, out[-4000:]        # faulthandler's dump of the stacks
    named = [ln for ln in out.splitlines() if "a collective failed (step watchdog" in ln]
    assert named and all(f"stuck outside any collective: rank 1 on {host} (last finished step 2; busy in "
                         "train_loop" in ln for ln in named), out[-4000:]
    report = failure.read_text()
    assert report.startswith(f"collective {host} | ") and "step watchdog" in report, report
