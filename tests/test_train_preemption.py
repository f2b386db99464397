"""Preemption that holds under torchrun: a TERM ends in a committed checkpoint and exit 0 even when the
checkpoint takes longer than torchrun's 30-s grace before SIGKILL (witscale/launch.py).

The save is slowed to 41 s (WITSCALE_SLOW_SAVE). Plain torchrun would SIGKILL its workers 30 s after the
TERM and exit 1 with no checkpoint; ``python -m witscale.launch`` forwards the signal to the ranks and
lets them finish. Two deliveries, as Slurm and users produce them: TERM to the launcher process alone
(``kill -TERM`` of a local run), and TERM to every process of the job (Slurm's time limit, scancel).
"""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.test_train_cli_operations import _args, _env, _torchrun, _train_losses, reference_run, run_inputs  # noqa: F401

pytestmark = pytest.mark.slow  # torchrun ranks

SLOW_SAVE_S = 41


def _launch(args, env):
    cmd = [sys.executable, "-m", "witscale.launch", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "witscale/train.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.mark.parametrize("delivery", ["launcher", "every-process"])
def test_term_with_a_slow_save_checkpoints_and_exits_zero(run_inputs, reference_run, tmp_path, delivery):
    ref = _train_losses(reference_run)
    proc = _launch(_args(run_inputs, tmp_path, 8, "--save-steps", "100"),
                   _env(WITSCALE_SLOW_SAVE=str(SLOW_SAVE_S)))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    targets = [psutil.Process(proc.pid)]
    if delivery == "every-process":
        targets += psutil.Process(proc.pid).children(recursive=True)
    signalled = time.time()
    for p in targets:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:        # a short-lived helper (e.g. a compiler probe) gone since listed
            pass
    try:
        out, _ = proc.communicate(timeout=SLOW_SAVE_S + 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert time.time() - signalled > SLOW_SAVE_S, "the save was to take longer than torchrun's 30-s grace"
    assert "preemption signal" in out
    tag = open(tmp_path / "checkpoints" / "latest").read().strip()
    stopped_at = int(tag.split("_")[1])
    assert 1 <= stopped_at < 8
    assert (tmp_path / "checkpoints" / tag / "witscale_state.json").exists()
    code, log = _torchrun(_args(run_inputs, tmp_path, 8, "--save-steps", "100", "--resume", "auto"))
    assert code == 0, log
    losses = _train_losses(tmp_path)
    assert [losses[s] for s in range(stopped_at + 1, 9)] == [ref[s] for s in range(stopped_at + 1, 9)]
