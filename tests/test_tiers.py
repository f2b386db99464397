"""The test tiers' guard (tests/tiers.py): a test without the `slow` marker that starts ranks is refused before
anything starts, in one line naming the test and the launcher; an ordinary subprocess is not."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests import tiers
from tests.distributed import run_distributed


def _rank(rank, world):
    return rank


@pytest.mark.parametrize("cmd,launcher", [
    ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py"], "torch.distributed.run"),
    (["/usr/local/bin/torchrun", "--standalone", "x.py"], "/usr/local/bin/torchrun"),
    (["deepspeed", "--num_gpus", "2", "x.py"], "deepspeed"),
    ([sys.executable, "-m", "witscale.launch", "--nproc_per_node=2", "x.py"], "witscale.launch"),
    (["mpirun", "-np", "2", "python", "x.py"], "mpirun"),
    ("cd /tmp && srun -N2 python x.py", "srun"),
    ("bash -c 'sbatch --wait job.sh'", "sbatch"),
    ([sys.executable, "witscale/train.py", "--deepspeed-config", "c.json"], None),
    ([sys.executable, "-c", "import deepspeed"], None),
    ("echo torchrun-like", None),
])
def test_launchers_are_recognized_and_ordinary_commands_are_not(cmd, launcher):
    assert tiers.launcher_in(cmd) == launcher


def test_a_fast_test_that_starts_ranks_is_refused_before_they_start(request, tmp_path):
    marker = tmp_path / "started"
    with pytest.raises(tiers.LaunchOutsideSlowTier) as e:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-c", f"open({str(marker)!r}, 'w')"], check=False)
    assert str(e.value) == (f"{request.node.nodeid} launches `torch.distributed.run` but is not marked slow: add "
                            "@pytest.mark.slow (or a module-level pytestmark = pytest.mark.slow); see README, Tests")
    with pytest.raises(tiers.LaunchOutsideSlowTier, match="launches 2 gloo ranks but is not marked slow"):
        run_distributed(_rank, 2)
    assert tiers.forget_refusals(request.node) == ["`torch.distributed.run`", "2 gloo ranks"]
    assert not marker.exists()
    # an ordinary subprocess runs
    assert subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True).stdout == "ok\n"


def test_a_swallowed_refusal_still_fails_the_test_in_one_line(request):
    class Report:
        outcome, failed, longrepr = "passed", False, None
    try:
        run_distributed(_rank, 2)
    except tiers.LaunchOutsideSlowTier:
        pass
    report, call = Report(), type("Call", (), {"when": "call"})()
    tiers.fail_report_of_a_refused_launch(request.node, call, report)
    tiers.forget_refusals(request.node)
    assert report.outcome == "failed" and report.longrepr == tiers.refusal_line(request.node.nodeid, "2 gloo ranks")
