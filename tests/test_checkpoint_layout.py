"""Resume on another layout: a checkpoint written at dp 2 continues at dp 1 (same global batch: grad-accum
doubles), one written at tp 2 at tp 1 and back at tp 2, through DeepSpeed's universal checkpoint, which
`--resume auto` makes by itself; the losses follow the uninterrupted run on the original layout (rtol 1e-5),
so the weights, the Adam moments and the data position carried over."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.distributed import run_launcher
from tests.test_train_cli_operations import _args, _env, _torchrun, _train_losses, run_inputs  # noqa: F401


def _torchrun_n(n, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(REPO_ROOT, "witscale/train.py"), *args]
    proc = run_launcher(cmd, timeout=300, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                        env=_env(WITSCALE_UNIVERSAL_WORKERS="1"))
    return proc.returncode, proc.stdout


def _with_config(args, zero):
    args = list(args)
    args[args.index("--ds_config") + 1] = f"ds_configs/{zero}.json"
    return args


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero3", "zero1"])
def test_dp2_checkpoint_resumes_at_dp1_with_the_same_losses(run_inputs, tmp_path, zero):
    dp2_run = tmp_path / "dp2"      # the original layout, uninterrupted: dp 2, micro 2 × accum 2, all checkpoints kept
    code, log = _torchrun(_with_config(_args(run_inputs, dp2_run, 8, "--save-steps", "2", "--keep-checkpoints", "0"),
                                       zero))
    assert code == 0, log
    ref = _train_losses(dp2_run)
    tmp_path = tmp_path / "dp1"
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(dp2_run / "checkpoints" / "step_00000002", ckpts / "step_00000002")
    (ckpts / "latest").write_text("step_00000002")
    state = json.loads((ckpts / "step_00000002" / "witscale_state.json").read_text())
    assert state["layout"] == {"dp": 2, "tp": 1, "pp": 1}

    args = _with_config(_args(run_inputs, tmp_path, 8, "--save-steps", "2", "--resume", "auto"), zero)
    args[args.index("--grad-accum") + 1] = "4"          # the same global batch on half the ranks
    code, log = _torchrun_n(1, args)
    assert code == 0, log
    assert "written at dp=2 tp=1, this run has dp=1 tp=1" in log and "resumed from" in log, log
    assert "converting to a universal checkpoint" in log, log
    losses = _train_losses(tmp_path)
    assert sorted(losses) == list(range(3, 9))
    for step in range(3, 9):
        assert losses[step] == pytest.approx(ref[step], rel=1e-5, abs=0), (step, losses[step], ref[step])
    # the checkpoints written at dp 1 record it, and resume there without conversion
    assert json.loads((ckpts / "step_00000008" / "witscale_state.json").read_text())["layout"]["dp"] == 1


def _resume_from(src_ckpts, tag, out):
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(src_ckpts / tag, ckpts / tag)
    (ckpts / "latest").write_text(tag)


@pytest.mark.slow
def test_tp2_checkpoint_resumes_at_tp1_and_back_at_tp2(run_inputs, tmp_path):
    common = ("--save-steps", "2", "--keep-checkpoints", "0")
    tp2 = tmp_path / "tp2"
    code, log = _torchrun(_args(run_inputs, tp2, 8, *common, "--tp", "2"))      # 2 ranks: tp 2, dp 1
    assert code == 0, log
    ref = _train_losses(tp2)

    tp1 = tmp_path / "tp1"                      # one rank: tp 1, dp 1, the same global batch
    _resume_from(tp2 / "checkpoints", "step_00000002", tp1)
    code, log = _torchrun_n(1, _args(run_inputs, tp1, 8, *common, "--resume", "auto"))
    assert code == 0, log
    assert "written at dp=1 tp=2, this run has dp=1 tp=1" in log, log
    losses = _train_losses(tp1)
    assert sorted(losses) == list(range(3, 9))
    for step in range(3, 9):
        assert losses[step] == pytest.approx(ref[step], rel=1e-5, abs=0), ("tp2->1", step, losses[step], ref[step])

    back = tmp_path / "back"                    # the tp-1 run's step 4, continued at tp 2 on 2 ranks
    _resume_from(tp1 / "checkpoints", "step_00000004", back)
    code, log = _torchrun(_args(run_inputs, back, 8, *common, "--tp", "2", "--resume", "auto"))
    assert code == 0, log
    assert "written at dp=1 tp=1, this run has dp=1 tp=2" in log, log
    losses = _train_losses(back)
    assert sorted(losses) == list(range(5, 9))
    for step in range(5, 9):
        assert losses[step] == pytest.approx(ref[step], rel=1e-5, abs=0), ("tp1->2", step, losses[step], ref[step])


def test_layout_changes_that_are_refused_say_so_in_one_line():
    from witscale.training.checkpoint import CheckpointError, layout_change

    saved = {"layout": {"dp": 2, "tp": 1, "pp": 1}}
    assert layout_change(saved, {"dp": 2, "tp": 1, "pp": 1}, where="c", zero_stage=3) is False
    assert layout_change({}, {"dp": 1, "tp": 2, "pp": 1}, where="c", zero_stage=3) is False     # not recorded
    assert layout_change(saved, {"dp": 1, "tp": 2, "pp": 1}, where="c", zero_stage=3) is True
    assert layout_change(saved, {"dp": 1, "tp": 1, "pp": 1}, where="c", zero_stage=0) is True
    for layout, stage, what in (({"dp": 1, "tp": 1, "pp": 2}, 1, "pipeline"), ({"dp": 1, "tp": 2, "pp": 1}, 0, "ZeRO")):
        with pytest.raises(CheckpointError, match=what) as e:
            layout_change(saved, layout, where="c", zero_stage=stage)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_another_global_batch_is_refused_before_loading_with_the_grad_accum_that_keeps_it(run_inputs, tmp_path):
    """dp 2 → 1 without doubling --grad-accum: one line naming --grad-accum 4, exit code 2, nothing trained."""
    src = tmp_path / "dp2"
    code, log = _torchrun(_args(run_inputs, src, 2, "--save-steps", "2"))
    assert code == 0, log
    out = tmp_path / "dp1"
    _resume_from(src / "checkpoints", "step_00000002", out)
    code, log = _torchrun_n(1, _args(run_inputs, out, 4, "--resume", "auto"))
    assert code != 0 and "exitcode  : 2" in log, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors and "8 rows per step" in errors[0] and "pass --grad-accum 4 to keep it" in errors[0], log
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()
