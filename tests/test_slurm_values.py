"""No value a user sets is parsed again by a shell in slurm/ (docs/reliability.md#slurm): every user variable
holds quotes, spaces, a backslash, `;`, backticks and `$(touch MARKER)`, and the templates run with stand-ins
for sbatch/srun/scontrol that record their argv. Each value must arrive as one whole argument (or one
environment value), the JSON the templates write must parse, numbers that reach $(( )) are refused, and the
marker file never appears. Then the report job of a sweep runs on the real local Slurm with such paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import REPO_ROOT
from tests.test_slurm import job_records, slurm_cluster, wait_job  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow  # the sbatch templates (stand-ins and a real Slurm)

STANDINS = ("sbatch", "srun", "scontrol", "scancel", "mpirun")

STANDIN = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["STANDIN_LOG"], "a", encoding="utf-8") as f:
    f.write(json.dumps({{"cmd": name, "argv": sys.argv[1:],
                        "env": {{k: os.environ.get(k) for k in ("SWEEP_DIR", "OUTPUT", "DATA", "MODEL")}}}}) + "\\n")
if name == "sbatch":
    print(1000 + sum(1 for _ in open(os.environ["STANDIN_LOG"])))
elif name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print("node1")
"""


@pytest.fixture
def odd(tmp_path):
    """A marker that must never appear, a directory whose name is hostile, and helpers to run the templates
    against stand-ins from there."""
    marker = f"/tmp/pwned-{uuid.uuid4().hex[:12]}"
    hostile = f"""w sp 'q' "dq" back\\slash ;touch {marker}; `touch {marker}` $(touch {marker})"""
    root = tmp_path / hostile
    root.mkdir(parents=True)
    fake = tmp_path / "standins"
    fake.mkdir()
    for name in STANDINS:
        (fake / name).write_text(STANDIN.format(python=sys.executable))
        (fake / name).chmod(0o755)
    home = root / "home"
    home.symlink_to(REPO_ROOT)
    bindir = root / "bin"
    bindir.mkdir()
    py = bindir / "py thon"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    log = tmp_path / "standins.jsonl"

    class Odd:
        pass
    o = Odd()
    o.marker, o.root, o.home, o.py, o.log, o.cwd = marker, root, home, py, log, tmp_path

    def run(script, *args, ok=True, **env_extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(PATH=f"{fake}:{env['PATH']}", STANDIN_LOG=str(log), WITSCALE_HOME=str(home), PYTHON=str(py),
                   PYTHONPATH="", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
        env.update({k: str(v) for k, v in env_extra.items()})
        res = subprocess.run(["bash", str(home / "slurm" / script), *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert (res.returncode == 0) == ok, res.stdout[-3000:] + res.stderr[-3000:]
        assert not os.path.exists(marker), f"{script} ran a command from a value"
        return res

    def calls(cmd=None):
        if not log.exists():
            return []
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        return [r for r in rows if cmd is None or r["cmd"] == cmd]

    o.run, o.calls = run, calls
    yield o
    if os.path.exists(marker):
        os.unlink(marker)


def _pairs(argv):
    return set(zip(argv, argv[1:]))


def test_sweep_submission_passes_every_path_whole(odd):
    sweep = odd.root / "sweep"
    prompts = odd.root / "prompts.jsonl"
    odd.run("sweep_weights.sh", "--parsable", SWEEP_DIR=sweep, WEIGHTS="0:1 1:1 *", EVAL_POSIX=prompts, ok=False)
    assert not odd.calls("sbatch")                          # 'WEIGHTS=… *' is a bad cell, not a glob of files
    odd.run("sweep_weights.sh", "--parsable", SWEEP_DIR=sweep, WEIGHTS="0:1 1:1", EVAL_POSIX=prompts)
    train, evaluate, report = odd.calls("sbatch")
    assert train["argv"][-1] == str(odd.home / "slurm" / "sweep_weights.sh")
    assert evaluate["argv"][-1] == str(odd.home / "slurm" / "evaluate_cell.sh")
    assert evaluate["env"]["SWEEP_DIR"] == str(sweep)
    assert report["argv"][-4:] == [str(odd.home / "slurm" / "sweep_report.sh"), str(odd.home), str(odd.py), str(sweep)]
    assert not any(a.startswith("--wrap") for c in odd.calls() for a in c["argv"])
    assert (sweep / "cells.txt").read_text() == "0.0 1.0\n1.0 1.0\n"

    # the report job's script, run with exactly those arguments, reports that very directory
    cell = sweep / "lp0.0_lr1.0"
    cell.mkdir()
    (cell / "cell.json").write_text(json.dumps({"prompt_weight": 0.0, "response_weight": 1.0}))
    (cell / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval_response_nll": 1.5}) + "\n")
    odd.run("sweep_report.sh", *report["argv"][-3:])
    assert "eval_response_nll" in (sweep / "sweep_report.md").read_text()


def _job_env(odd, **extra):
    env = dict(SLURM_JOB_ID=42, SLURM_JOB_NODELIST="node1", SLURM_NNODES=1, NPROC_PER_NODE=1, MASTER_ADDR="localhost",
               GRAD_ACCUM=1, DATA=odd.root / "data", OUTPUT=odd.root / "out", MODEL=odd.root / "model",
               EXPORT_HF=odd.root / "hf", EVAL_DATA=odd.root / "eval", DS_CONFIG=odd.root / "zero3.json",
               EXTRA_ARGS="--no-tensorboard")
    env.update(extra)
    return env


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_training_template_passes_every_path_whole(odd, launcher):
    env = _job_env(odd, LAUNCHER=launcher)
    odd.run("train_7b.sh", **env)
    (srun,) = odd.calls("srun")
    pairs = _pairs(srun["argv"])
    for flag, var in (("--data", "DATA"), ("--output-dir", "OUTPUT"), ("--model", "MODEL"),
                      ("--export-hf", "EXPORT_HF"), ("--eval-data", "EVAL_DATA"), ("--ds_config", "DS_CONFIG")):
        assert (flag, str(env[var])) in pairs, (flag, srun["argv"])
    assert str(odd.home / "slurm" / "launch_task.sh") in srun["argv"]
    if launcher == "deepspeed":
        assert (odd.root / "out" / "hostfile.42").read_text() == "node1 slots=1\n"


@pytest.mark.parametrize("var", ["NPROC_PER_NODE", "NNODES", "TP", "PP", "SP", "MICRO_BATCH", "GLOBAL_BATCH"])
def test_numbers_that_reach_arithmetic_are_refused(odd, var):
    """bash evaluates a variable inside $(( )) as an expression: `a[$(cmd)]` there runs cmd."""
    env = _job_env(odd)
    env.pop("GRAD_ACCUM")
    env[var] = f"a[$(touch {odd.marker})]"
    res = odd.run("train_7b.sh", ok=False, **env)
    assert f"{var}=" in res.stderr and "expected a whole number" in res.stderr
    assert not odd.calls("srun")


def test_dpo_template_passes_model_and_class_weights_whole(odd):
    env = _job_env(odd, CLASS_WEIGHTS=f"eot=0.5 $(touch {odd.marker})")
    env.pop("EVAL_DATA")
    odd.run("dpo_7b.sh", **env)
    reference, training = odd.calls("srun")
    ref = _pairs(reference["argv"])
    assert {("--data", str(env["DATA"])), ("--model", str(env["MODEL"])),
            ("--class-weights", env["CLASS_WEIGHTS"])} <= ref, reference["argv"]
    train = _pairs(training["argv"])
    assert {("--model", str(env["MODEL"])), ("--reference-model", str(env["MODEL"])),
            ("--class-weights", env["CLASS_WEIGHTS"]), ("--objective", "dpo")} <= train, training["argv"]


def test_dpo_sweep_task_writes_valid_json_and_passes_paths_whole(odd):
    sweep, pref = odd.root / "sweep", odd.root / "pref"
    (sweep / "lp0.0_lr1.0" / "hf").mkdir(parents=True)
    (sweep / "lp0.0_lr1.0" / "hf" / "config.json").write_text("{}")
    (sweep / "cells.txt").write_text("0.0 1.0\n")
    pref.mkdir()
    (pref / "manifest.json").write_text(json.dumps({"format_version": 1, "task": "preference"}))
    env = _job_env(odd, SWEEP_DIR=sweep, PREF_DATA=pref, SLURM_ARRAY_JOB_ID=7, SLURM_ARRAY_TASK_ID=0)
    for name in ("DATA", "OUTPUT", "MODEL", "EXPORT_HF", "EVAL_DATA"):
        env.pop(name)
    odd.run("sweep_dpo.sh", **env)
    out = sweep / "dpo" / "lp0.0_lr1.0"
    assert json.loads((out / "cell.json").read_text())["sft_model"] == str(sweep / "lp0.0_lr1.0" / "hf")
    assert json.loads((out / "train_status.json").read_text())["state"] in ("completed", "requeued")
    report = odd.calls("sbatch")[-1]
    assert report["argv"][-1] == str(sweep)
    reference, training = odd.calls("srun")
    assert ("--data", str(out / "pref_data")) in _pairs(reference["argv"])
    assert ("--export-hf", str(out / "hf")) in _pairs(training["argv"])


def test_evaluation_task_passes_paths_whole(odd):
    sweep = odd.root / "sweep"
    (sweep / "lp0.5_lr1.0" / "hf").mkdir(parents=True)
    (sweep / "lp0.5_lr1.0" / "hf" / "config.json").write_text("{}")
    (sweep / "cells.txt").write_text("0.5 1.0\n")
    recorder = odd.root / "bin" / "rec 'py'"
    recorder.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c \'import json, sys; '
                        f'open(sys.argv[1], "w").write(json.dumps(sys.argv[2:]))\' "{odd.cwd}/eval_argv.json" "$@"\n')
    recorder.chmod(0o755)
    posix = odd.root / "prompts.jsonl"
    odd.run("evaluate_cell.sh", SWEEP_DIR=sweep, PYTHON=recorder, SLURM_ARRAY_TASK_ID=0, EVAL_POSIX=posix,
            EVAL_TASKS=f"mmlu $(touch {odd.marker})", EVAL_NPROC=1)
    argv = json.loads((odd.cwd / "eval_argv.json").read_text())
    cell = sweep / "lp0.5_lr1.0"
    assert {("--model", str(cell / "hf")), ("--output", str(cell)), ("--posix", str(posix)),
            ("--tasks", f"mmlu $(touch {odd.marker})")} <= _pairs(argv), argv
    assert json.loads((cell / "eval_status.json").read_text())["state"] == "completed"


# ---------------------------------------------------------------------------------------------- real Slurm
def test_report_job_with_hostile_paths_on_a_real_slurm(slurm_cluster, odd):  # noqa: F811
    """submit_followups on the local Slurm: WITSCALE_HOME, PYTHON and SWEEP_DIR with quotes, spaces and $(…);
    the report job completes, writes its report into that directory, and runs nothing else."""
    sweep = odd.root / "sweep"
    cell = sweep / "lp0.0_lr1.0"
    cell.mkdir(parents=True)
    (sweep / "cells.txt").write_text("0.0 1.0\n")
    (cell / "cell.json").write_text(json.dumps({"prompt_weight": 0.0, "response_weight": 1.0}))
    (cell / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval_response_nll": 1.5}) + "\n")
    logs = odd.cwd / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=slurm_cluster, WITSCALE_HOME=str(odd.home), PYTHON=str(odd.py), SWEEP_DIR=str(sweep),
               PYTHONPATH="", PYTHONWARNINGS="ignore")
    first = subprocess.run(["sbatch", "--parsable", f"--output={logs}/first-%j.out", "--wrap", "true"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    res = subprocess.run(["bash", "-c", 'set -euo pipefail; source "$WITSCALE_HOME/slurm/followups.sh"; CELLS=(x); '
                                        'submit_followups "$1" "$SWEEP_DIR" wit "--output=$2/%x-%j.out"',
                          "submit", first, str(logs)], cwd=odd.cwd, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    eval_id, report_id = res.stdout.split()
    assert eval_id == "-"
    (rec,) = wait_job(report_id, env, timeout=180)
    log = "".join(p.read_text(errors="replace") for p in logs.iterdir())
    assert rec["JobState"] == "COMPLETED", log
    assert "eval_response_nll" in (sweep / "sweep_report.md").read_text()
    assert not os.path.exists(odd.marker)
