"""The multi-rank test harness itself: results in rank order, a failing rank's traceback in the parent, a hang
ended at the timeout with a clear error."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import DistributedTestError, run_distributed


def _ok(rank, world, tag):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "tag": tag, "sum": float(t), "omp": os.environ["OMP_NUM_THREADS"],
            "env_rank": int(os.environ["RANK"]), "threads": torch.get_num_threads()}


def _fails_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    t = torch.ones(1)
    dist.all_reduce(t)           # the peers block here until rank 1 is gone
    return rank


def _rank_0_hangs(rank, world):
    if rank == 0:
        time.sleep(60)
    return rank


@pytest.mark.slow
def test_results_come_back_in_rank_order():
    res = run_distributed(_ok, 3, "x")
    assert [r["rank"] for r in res] == [0, 1, 2] == [r["env_rank"] for r in res]
    assert all(r["sum"] == 3.0 and r["world"] == 3 and r["tag"] == "x" for r in res)
    assert all(r["omp"] == "1" and r["threads"] == 1 for r in res)


@pytest.mark.slow
def test_failing_rank_raises_with_its_traceback():
    with pytest.raises(DistributedTestError, match="rank 1 first") as e:
        run_distributed(_fails_on_rank_1, 2, timeout=60)
    assert "ValueError: deliberate failure on rank 1" in str(e.value)
    assert "_fails_on_rank_1" in str(e.value)


@pytest.mark.slow
def test_hang_ends_at_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"did not finish within 3 s; ranks still running: \[0"):
        run_distributed(_rank_0_hangs, 2, timeout=3)
    assert time.monotonic() - t0 < 20


def _rank_0_starts_a_process_and_fails(rank, world, pid_file):
    if rank == 0:
        import subprocess
        child = subprocess.Popen(["sleep", "300"])       # e.g. the compiler of a torch extension build
        with open(pid_file, "w") as f:
            f.write(str(child.pid))
        raise ValueError("deliberate failure on rank 0")
    return rank


def _gone(pid: int) -> bool:
    """No such process, or a zombie (killed, waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _assert_gone_soon(pid: int, message: str, seconds: float = 10) -> None:
    """``pid`` ends within ``seconds`` (else the test fails with ``message`` and the process is killed)."""
    deadline = time.monotonic() + seconds
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert _gone(pid), message.format(pid)
    finally:
        if not _gone(pid):
            os.kill(pid, 9)


@pytest.mark.slow
def test_what_a_rank_started_does_not_outlive_the_run(tmp_path):
    """Each rank leads its own process group, killed when the run ends: a process it started (a compiler holding
    torch's extension build lock, once) no longer lives on after its rank failed, hung or was killed."""
    pid_file = tmp_path / "child.pid"
    with pytest.raises(DistributedTestError, match="deliberate failure on rank 0"):
        run_distributed(_rank_0_starts_a_process_and_fails, 2, str(pid_file), timeout=60)
    _assert_gone_soon(int(pid_file.read_text()), "the rank's child {} outlived the run")


def test_worker_must_be_picklable():
    with pytest.raises(TypeError, match="top-level"):
        run_distributed(lambda rank, world: rank, 2)


def test_a_launcher_that_times_out_is_killed_with_its_ranks(tmp_path):
    """tests/distributed.run_launcher (mpirun, torchrun): on the timeout the launcher and everything below it are
    killed — also a rank in a session of its own, as torchrun starts them; subprocess.run killed the launcher alone
    and its ranks lived on."""
    import subprocess

    from tests.distributed import run_launcher
    pid_file = tmp_path / "rank.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_launcher(["bash", "-c", f'setsid sleep 300 & echo $! > "{pid_file}"; wait'], timeout=2)
    _assert_gone_soon(int(pid_file.read_text()), "the launcher's child {} outlived it")


def test_the_serial_group_runs_in_one_worker_in_order(tmp_path):
    """--dist loadgroup sends every test of tests/conftest.py's SERIAL_GROUPS files (the local Slurm, mpirun) to one
    worker, in file order, while the other tests spread: an inner pytest on 2 workers over the Slurm files' tests
    that need no cluster and a fast file (under pytest 9, xdist's own marker-based grouping spread them)."""
    import re
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "WITSCALE_REQUIRE"))}
    res = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                          "no:cacheprovider", f"--basetemp={tmp_path}/t", "tests/test_slurm.py", "tests/test_tiers.py",
                          "-k", "signal_lead or preemptible or shellcheck or launchers_are_recognized"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    ran = re.findall(r"^\[(gw\d)\] \[ *\d+%\] \w+ (tests/test_\w+\.py)::(\w+)", res.stdout, re.M)
    slurm = [(worker, test) for worker, path, test in ran if path == "tests/test_slurm.py"]
    assert len(slurm) == 3 and len({w for w, _ in slurm}) == 1, res.stdout[-3000:]
    assert [t for _, t in slurm] == ["test_scripts_pass_shellcheck",
                                     "test_templates_pass_their_signal_lead_to_the_trainer",
                                     "test_every_preemptible_template_exports_its_own_signal_lead"], res.stdout[-3000:]
