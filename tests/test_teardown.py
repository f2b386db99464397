"""Leaving after success: every multi-process entry point ends in ``witscale.parallel.topology.teardown`` (a barrier,
then the groups destroyed). Without the barrier a rank could destroy its gloo group while a peer was still in the
last collective, and die at exit of std::terminate (issue 26: tools/evaluate.py under torchrun)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.distributed import run_launcher

SCRIPT = r'''
import os, sys, time
sys.path.insert(0, sys.argv[2])
from witscale.evaluation.parallel import DataParallel
out = sys.argv[1]
dp = DataParallel()
dp.gather([(dp.rank, dp.rank)])             # the last collective of an evaluation
if dp.rank == 0:
    time.sleep(1.0)                          # rank 0 still writing its results
    open(os.path.join(out, "rank0_done"), "w").close()
dp.close()
# after close() every rank has passed the barrier: rank 0's work is finished
open(os.path.join(out, f"rank{dp.rank}_saw"), "w").write(str(os.path.exists(os.path.join(out, "rank0_done"))))
'''


@pytest.mark.slow
def test_evaluation_close_waits_for_every_rank_before_the_group_goes(tmp_path):
    script = tmp_path / "close.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path), REPO_ROOT], timeout=180, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (tmp_path / "rank1_saw").read_text() == "True"     # rank 1 left only after rank 0 finished


def test_every_multi_process_entry_point_leaves_through_the_shared_teardown():
    for path in ("witscale/train.py", "tools/precompute_reference.py", "witscale/evaluation/parallel.py"):
        text = open(os.path.join(REPO_ROOT, path), encoding="utf-8").read()
        if path == "tools/precompute_reference.py":     # runs through train.py's entry point, which tears down
            assert "from witscale.train import entry_point" in text, path
        else:
            assert "from witscale.parallel.topology import teardown" in text, path
        assert "destroy_process_group" not in text, path


def test_a_single_process_run_takes_no_port():
    """One process (`python witscale/train.py`, no launcher) gets a world of one on an in-memory store: no port is
    picked by binding and closing a socket (two such runs on a node could take the same one), none is bound."""
    probe = ("import os, sys; sys.path.insert(0, sys.argv[1]); import torch.distributed as dist; "
             "from witscale.training.distributed import init_distributed; init_distributed(); "
             "print(dist.get_world_size(), os.environ.get('MASTER_PORT'), "
             "type(dist.distributed_c10d._get_default_store().underlying_store).__name__)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", probe, REPO_ROOT], env=dict(env, DS_ACCELERATOR="cpu"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["1", "None", "HashStore"], done.stdout
