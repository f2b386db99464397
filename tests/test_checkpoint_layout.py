"""Resume on another layout: a checkpoint written at dp 2 continues at dp 1 (same global batch: grad-accum
doubles) through DeepSpeed's universal checkpoint, which `--resume auto` makes by itself; the losses follow
the uninterrupted dp-2 run (rtol 1e-5), so the weights, the Adam moments and the data position carried over."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_train_cli_operations import _args, _env, _torchrun, _train_losses, run_inputs  # noqa: F401


def _torchrun_n(n, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(REPO_ROOT, "witscale/train.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(WITSCALE_UNIVERSAL_WORKERS="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def dp2_run(run_inputs, tmp_path_factory):
    """The original layout, uninterrupted: dp 2, micro 2 × accum 2, a checkpoint every 2 steps, all kept."""
    out = tmp_path_factory.mktemp("dp2")
    code, log = _torchrun(_args(run_inputs, out, 8, "--save-steps", "2", "--keep-checkpoints", "0"))
    assert code == 0, log
    return out


def test_dp2_checkpoint_resumes_at_dp1_with_the_same_losses(run_inputs, dp2_run, tmp_path):
    ref = _train_losses(dp2_run)
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copytree(dp2_run / "checkpoints" / "step_00000002", ckpts / "step_00000002")
    (ckpts / "latest").write_text("step_00000002")
    state = json.loads((ckpts / "step_00000002" / "witscale_state.json").read_text())
    assert state["layout"] == {"dp": 2, "tp": 1, "pp": 1}

    args = _args(run_inputs, tmp_path, 8, "--save-steps", "2", "--resume", "auto")
    args[args.index("--grad-accum") + 1] = "4"          # the same global batch on half the ranks
    code, log = _torchrun_n(1, args)
    assert code == 0, log
    assert "written at dp=2, this run has dp=1" in log and "resumed from" in log, log
    assert "converting to a universal checkpoint" in log, log
    losses = _train_losses(tmp_path)
    assert sorted(losses) == list(range(3, 9))
    for step in range(3, 9):
        assert losses[step] == pytest.approx(ref[step], rel=1e-5, abs=0), (step, losses[step], ref[step])
    # the checkpoints written at dp 1 record it, and resume there without conversion
    assert json.loads((ckpts / "step_00000008" / "witscale_state.json").read_text())["layout"]["dp"] == 1
