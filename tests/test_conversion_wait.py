"""The universal-checkpoint conversion of a resume at another dp is waited for outside any collective
(checkpoint.universal_tag): a conversion slower than every collective timeout still resumes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_train_cli_operations import _args, _env, _torchrun, _train_losses, run_inputs  # noqa: F401

pytestmark = pytest.mark.slow  # torchrun ranks


def test_a_dp_change_with_a_conversion_longer_than_the_collective_timeout_resumes(run_inputs, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "witscale/train.py"),
                            *_args(run_inputs, out, 2, "--no-tensorboard")],
                           cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # dp 1 → 2, the same 4 rows per step (micro 2 × accum 1 × dp 2); every collective times out after 6 s
    # (--dist-timeout 0.1), the conversion takes 15 s longer: the old barrier timed out on rank 1
    args = _args(run_inputs, out, 4, "--no-tensorboard", "--resume", "auto", "--reschedule", "--dist-timeout", "0.1")
    args[args.index("--grad-accum") + 1] = "1"
    code, log = _torchrun(args, env=_env(WITSCALE_SLOW_CONVERSION="15"))
    assert code == 0, log[-4000:]
    assert "converting to a universal checkpoint" in log and "resumed from" in log, log[-4000:]
    assert sorted(_train_losses(out)) == [1, 2, 3, 4]
