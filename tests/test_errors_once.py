"""An error every rank meets is printed once (the first rank to meet it), the other ranks leave with the same
exit code quietly; an error only some ranks meet (other words: their own file) is printed by each of them."""
import pytest
import torch.distributed as dist

from tests.test_train_cli_operations import _args, _env, run_inputs  # noqa: F401 (fixture)
from witscale.training.distributed import said_once


def test_the_same_words_are_said_once_and_other_words_by_each_rank():
    store = dist.HashStore()        # what the ranks share: the job's rendezvous store
    everyone = "error: checkpoint …/step_00000004 was trained with other optimizer settings"
    assert said_once(everyone, store) == everyone          # the first rank to meet it
    assert said_once(everyone, store) == ""                # every other rank: quiet
    assert said_once(everyone, store) == ""
    own = "error: checkpoint …/step_00000004 cannot be loaded: …/zero_pp_rank_3_mp_rank_00_optim_states.pt: truncated"
    assert said_once(own, store) == own                    # a rank-specific error is never lost
    assert said_once("error: rank 5's words", store) == "error: rank 5's words"
    assert said_once(everyone) == everyone                 # no process group, no store: said


@pytest.mark.slow
def test_a_checkpoint_error_every_rank_meets_is_printed_once(run_inputs, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    from tests.distributed import run_launcher

    def torchrun(args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO_ROOT, "witscale/train.py"), *args]
        proc = run_launcher(cmd, timeout=300, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_env())
        return proc.returncode, proc.stdout

    args = [a if a != "ds_configs/zero3.json" else "ds_configs/zero0.json" for a in _args(run_inputs, tmp_path, 2)]
    code, log = torchrun(args)
    assert code == 0, log
    args[args.index("--lr") + 1] = "1e-3"                  # both ranks refuse the resume, in the same words
    code, log = torchrun(args + ["--resume", "auto"])
    assert code != 0 and "exitcode  : 2" in log, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--lr 0.001 (the checkpoint's: 0.003)" in errors[0], log
