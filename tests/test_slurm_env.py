"""slurm/common.sh's derivations, run as the batch shell runs them (no Slurm needed): ranks per node from the
allocation, the accelerator, the rendezvous port range, the output directory."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

CLEAR = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "NPROC_PER_NODE",
         "SLURM_JOB_ID", "MASTER_PORT", "OUTPUT", "SCRATCH", "WIT_LARGE_OUTPUT", "GRAD_ACCUM", "WITSCALE_SITE_ENV")


def defaults(tmp_path, gpu_node: bool, **env):
    """Run wit_defaults in a bash like the batch script's; returns (exit code, NPROC_PER_NODE, DS_ACCELERATOR,
    MASTER_PORT, OUTPUT, stderr). ``gpu_node``: what torch says (a stand-in python answers the probe)."""
    fake_py = tmp_path / "python"
    fake_py.write_text(f"#!/bin/sh\necho {'True' if gpu_node else 'False'}\n")
    fake_py.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in CLEAR}
    base.update(WITSCALE_HOME=REPO_ROOT, PYTHON=str(fake_py), DATA="d", MODEL_CONFIG="m", MASTER_ADDR="10.0.0.1",
                OUTPUT=str(tmp_path / "out"), PATH="/usr/bin:/bin")       # no nvidia-smi on this PATH
    base.update({k: str(v) for k, v in env.items() if v is not None})
    for k, v in env.items():
        if v is None:
            base.pop(k, None)
    script = ('source slurm/common.sh; wit_defaults; '
              'echo "$NPROC_PER_NODE|${DS_ACCELERATOR:-}|$MASTER_PORT|$OUTPUT"')
    res = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=base, capture_output=True, text=True, timeout=60)
    fields = res.stdout.strip().split("|") if res.returncode == 0 else [None] * 4
    return (res.returncode, *fields, res.stderr)


@pytest.mark.parametrize("env,expected", [
    ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "h100:8"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "2"}, "2"),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"),
])
def test_ranks_per_node_come_from_the_allocation(tmp_path, env, expected):
    rc, nproc, accel, *_ = defaults(tmp_path, gpu_node=True, **env)
    assert rc == 0 and nproc == expected
    assert accel == ""        # GPUs allocated: DeepSpeed picks CUDA, whatever PATH says about nvidia-smi


def test_a_gpu_job_that_shows_no_gpu_count_is_refused_in_one_line(tmp_path):
    """The old default silently ran one rank per node on an 8-GPU node."""
    rc, *_, err = defaults(tmp_path, gpu_node=True)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot tell how many GPUs" in lines[0] and "NPROC_PER_NODE" in lines[0], err


def test_a_cpu_node_runs_one_rank_on_the_cpu(tmp_path):
    rc, nproc, accel, *_ = defaults(tmp_path, gpu_node=False)
    assert rc == 0 and nproc == "1" and accel == "cpu"


def test_the_rendezvous_port_stays_below_the_ephemeral_range(tmp_path):
    for job in (0, 12767, 12768, 99999, 4_000_000_123):
        rc, _, _, port, *_ = defaults(tmp_path, gpu_node=False, SLURM_JOB_ID=job)
        assert rc == 0 and 20000 <= int(port) <= 32767, (job, port)


def test_output_defaults_to_scratch_and_a_70b_output_under_home_is_refused(tmp_path):
    rc, _, _, _, out, _ = defaults(tmp_path, gpu_node=False, OUTPUT=None, SCRATCH=str(tmp_path / "scratch"),
                                   USER="ann", SLURM_JOB_ID=7, SLURM_JOB_NAME="wit-70b")
    assert rc == 0 and out == str(tmp_path / "scratch" / "ann" / "witscale" / "wit-70b-7")
    home = tmp_path / "home"
    rc, *_, err = defaults(tmp_path, gpu_node=False, HOME=str(home), OUTPUT=str(home / "runs" / "70b"),
                           WIT_LARGE_OUTPUT=1)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "under $HOME" in err, err
    rc, *_ = defaults(tmp_path, gpu_node=False, HOME=str(home), OUTPUT=str(home / "runs" / "7b"))
    assert rc == 0        # the 7B templates keep allowing it


SCONTROL = """#!/bin/sh
echo "scontrol $*" >>"$STANDIN_LOG"
case "$1 $2" in
    "show hostnames") echo node1 ;;
    "show node") echo "NodeName=node1 NodeAddr=node1 State=ALLOCATED" ;;
esac
"""
# The launch step: its ranks end as a rank killed by the NCCL watchdog would (SIGABRT), after the step watchdog wrote
# the failure file (or not).
SRUN = """#!/bin/sh
echo "srun" >>"$STANDIN_LOG"
[ -z "${FAILURE_LINE:-}" ] || echo "$FAILURE_LINE" >>"$WITSCALE_FAILURE_FILE"
kill -ABRT $$
"""


@pytest.mark.parametrize("failure_line", ["collective node2 | [witscale] rank 0 (node1): a collective failed (step "
                                          "watchdog: no progress for 300 s in step 9: forward/backward/optimizer); "
                                          "did not reach it: rank 8 on node2 (last finished step 8)", None])
def test_a_launch_killed_by_sigabrt_is_requeued_only_when_the_failure_file_says_a_collective_failed(tmp_path,
                                                                                                 failure_line):
    """wit_main with stand-ins for srun/scontrol: the launch dies of SIGABRT (exit 134). With the step watchdog's
    failure file the job is requeued and node2 excluded; without one (a bug, or NCCL's abort before any report) it
    fails with the launch's status."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("scancel", "#!/bin/sh\n")):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    log = tmp_path / "standins.log"
    env = {k: v for k, v in os.environ.items() if k not in CLEAR}
    env.update(WITSCALE_HOME=REPO_ROOT, PYTHON=sys.executable, DATA="d", MODEL_CONFIG="m", OUTPUT=str(tmp_path / "out"),
               DS_ACCELERATOR="cpu", NPROC_PER_NODE="1", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_NNODES="2", STANDIN_LOG=str(log), PATH=f"{bindir}:/usr/bin:/bin")
    if failure_line:
        env["FAILURE_LINE"] = failure_line
    res = subprocess.run(["bash", "-c", "source slurm/common.sh; wit_main"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    calls = log.read_text()
    if failure_line:
        assert res.returncode == 0, res.stdout + res.stderr
        assert "scontrol requeue 77" in calls and "ExcNodeList=node2" in calls, calls
        assert "a collective failed (node or network fault)" in res.stdout, res.stdout
    else:
        assert res.returncode == 134 and "requeue" not in calls, res.stdout + res.stderr + calls
        assert "training exited with status 134" in res.stdout and "died of SIGABRT" in res.stdout, res.stdout


def test_sp_ranks_share_rows_so_the_global_batch_counts_dp_without_them(tmp_path):
    """SP=2 on 4 ranks: 2 data-parallel ranks, so GLOBAL_BATCH 8 at micro-batch 1 is 4 accumulation steps (dp
    counted as world / (tp × pp) would give 2: half the paper's batch), and the trainer is told --sp 2."""
    fake_py = tmp_path / "python"
    fake_py.write_text("#!/bin/sh\necho False\n")
    fake_py.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in CLEAR + ("SP", "TP", "PP", "NNODES", "SLURM_NNODES")}
    env.update(WITSCALE_HOME=REPO_ROOT, PYTHON=str(fake_py), DATA="d", MODEL_CONFIG="m", MASTER_ADDR="10.0.0.1",
               OUTPUT=str(tmp_path / "out"), PATH="/usr/bin:/bin", NPROC_PER_NODE="4", SP="2", GLOBAL_BATCH="8",
               MICRO_BATCH="1")
    script = 'source slurm/common.sh; wit_defaults; wit_train_args; echo "$GRAD_ACCUM"; echo "${WIT_TRAIN_ARGS[*]}"'
    res = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    accum, args = res.stdout.strip().splitlines()[-2:]
    assert accum == "4"
    assert " --sp 2 " in f" {args} " and " --grad-accum 4 " in f" {args} "


def test_the_conversion_step_counts_sp_ranks_out_of_dp(tmp_path):
    res = subprocess.run([sys.executable, "-m", "witscale.training.layout_conversion", "--output-dir", str(tmp_path),
                          "--world", "6", "--sp", "4", "--ds_config", "ds_configs/zero1.json"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "not a multiple of --tp 1 × --pp 1 × --sp 4" in res.stderr, res.stderr
