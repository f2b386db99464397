"""Shared by tests/test_slurm.py and tests/test_mpi.py: the tiny CPU run the Slurm templates launch, and
the skip-or-fail rule (WITSCALE_REQUIRE_SLURM=1, set by CI, turns every "cannot run here" into a failure)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT

SEQ = 64
REQUIRED = os.environ.get("WITSCALE_REQUIRE_SLURM") == "1"


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (WITSCALE_REQUIRE_SLURM=1)")
    pytest.skip(reason)


def make_tiny_inputs(root, sp_model_path) -> dict:
    """Packed train/eval sets of 64-token rows and a 2-layer, 32-wide Llama config matching the tokenizer."""
    from witscale.data.pack import PackOptions, pack_records
    from witscale.data.synthetic import generate_instruction_records
    from witscale.data.tokenizer import load_tokenizer

    records = generate_instruction_records(200, seed=1)
    pack_records(records[:180], sp_model_path, str(root / "train"), PackOptions(seq_len=SEQ, template="plain"))
    pack_records(records[180:], sp_model_path, str(root / "eval"), PackOptions(seq_len=SEQ, template="plain"))
    tok = load_tokenizer(sp_model_path)
    config = {"model_type": "llama", "vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    (root / "model.json").write_text(json.dumps(config))
    return {"train": str(root / "train"), "eval": str(root / "eval"), "config": str(root / "model.json")}


def cpu_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_flags(inputs: dict, out, steps: int, *extra) -> list[str]:
    return ["--ds_config", "ds_configs/zero3.json", "--data", inputs["train"], "--model-config", inputs["config"],
            "--output-dir", str(out), "--prompt-weight", "0.3", "--micro-batch-size", "2", "--grad-accum", "2",
            "--lr", "3e-3", "--max-steps", str(steps), "--seed", "7", "--no-tensorboard", *extra]


def read_metrics(out_dir) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def train_losses(out_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r and "eval_loss" not in r}


def world_of(out_dir) -> int:
    with open(os.path.join(out_dir, "effective_config.json"), encoding="utf-8") as f:
        return json.load(f)["layout"]["world"]


PY = sys.executable
TRAIN = os.path.join(REPO_ROOT, "witscale", "train.py")


# ------------------------------------------------------------------------------------------ waits under load
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
# The Slurm tests' waits were sized on this machine alone. `make test` runs them beside 2 other pytest workers on
# 2 cores (and whatever else the machine runs): every rank's start (torch + DeepSpeed imports) and step then takes
# up to ~3× as long. A wait is a hang bound — it ends at once when its job reaches a final state — so allowing for
# the load costs nothing unless a job really hangs. WITSCALE_SLURM_LOAD_ALLOWANCE overrides the factor.
LOAD_ALLOWANCE = float(os.environ.get("WITSCALE_SLURM_LOAD_ALLOWANCE", "3"))


def hang_bound(seconds: float) -> float:
    """How long a wait measured at ``seconds`` on an idle machine may take before it counts as a hang."""
    return seconds * LOAD_ALLOWANCE


def note_wait(what: str, started: float, seconds: float) -> None:
    """With WITSCALE_SLURM_WAIT_LOG=FILE, append how long a wait took against its idle-machine figure (to size
    LOAD_ALLOWANCE from measurements: docs in README, Tests)."""
    path = os.environ.get("WITSCALE_SLURM_WAIT_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "wait": what,
                                "took_s": round(time.time() - started, 1), "idle_figure_s": seconds}) + "\n")


# ------------------------------------------------------------------------------------------ one test's jobs
# The local cluster has 2 nodes, and the Slurm tests run one after another on them (tests/conftest.py). A test
# that failed used to leave its jobs running: the next tests then waited for nodes and timed out too, a cascade
# that named the wrong tests. tests/conftest.py's `slurm_jobs` fixture uses these two functions around every test
# that uses the cluster: the nodes must be idle when it starts, and what it submitted is cancelled when it ends.
IDLE_BOUND_S = 180      # cancelled jobs' processes get SIGTERM, KillWait=10 s, SIGKILL; then the epilog


def slurm_env(conf: str) -> dict:
    return dict(os.environ, SLURM_CONF=conf)


def known_jobs(env) -> dict[str, tuple[str, str, str]]:
    """{job id (an array's base id): (state, name, nodes or reason)} of every job slurmctld still knows."""
    res = subprocess.run(["squeue", "-h", "--states=all", "-o", "%F|%T|%j|%R"], env=env, capture_output=True,
                         text=True, timeout=60)
    if res.returncode != 0:
        raise AssertionError(f"squeue failed: {res.stderr.strip()}")
    jobs = {}
    for line in res.stdout.splitlines():
        job, state, name, where = line.split("|", 3)
        if jobs.get(job, ("COMPLETED",))[0] in FINAL_STATES:     # an array: a live task makes it live
            jobs[job] = (state, name, where)
    return jobs


def live(jobs: dict) -> dict:
    return {j: v for j, v in jobs.items() if v[0] not in FINAL_STATES}


def busy_nodes(env) -> list[str]:
    """The nodes not idle (allocated, mixed, completing, down, drained …), with their state."""
    res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True, timeout=60)
    states = sorted(set(res.stdout.split("\n")) - {""})
    return [s for s in states if not s.endswith(" idle")] if res.returncode == 0 else [res.stderr.strip()]


def wait_nodes_idle(env, jobs=(), bound=IDLE_BOUND_S) -> str:
    """Wait until ``jobs`` have left slurmctld's live states and every node is idle; return what is still there
    after ``bound`` seconds ('' when all is idle)."""
    deadline = time.time() + bound
    while True:
        left = {j: v for j, v in live(known_jobs(env)).items() if not jobs or j in jobs}
        nodes = busy_nodes(env)
        if not left and not nodes:
            return ""
        if time.time() > deadline:
            return f"jobs {left or 'none'}, nodes {nodes or 'idle'}"
        time.sleep(0.5)


@contextlib.contextmanager
def jobs_cancelled_at_exit(env, test: str, bound: float = IDLE_BOUND_S):
    """Around one test: wait up to ``bound`` s for idle nodes, else fail naming what holds them (never cancelled
    here: it may be a user's job); at the exit cancel the jobs submitted inside (those slurmctld did not know at the
    entry) and wait for idle nodes; a job that would not go away fails, naming it."""
    held = wait_nodes_idle(env, bound=bound)
    if held:
        pytest.fail(f"the local Slurm's nodes are not free before {test} (these tests need both nodes idle: an "
                    f"earlier test's job that would not go away, or a job of yours — scancel it): {held}")
    before = set(known_jobs(env))
    try:
        yield
    finally:
        mine = set(known_jobs(env)) - before
        cancel_jobs(env, mine)
        held = wait_nodes_idle(env, mine, bound=bound)
        if held:
            pytest.fail(f"{test}: its jobs would not go away within {bound:.0f} s of scancel: {held}")


def cancel_jobs(env, jobs) -> None:
    """scancel the live ones of ``jobs`` (array base ids cancel every task)."""
    alive = sorted(live({j: v for j, v in known_jobs(env).items() if j in jobs}))
    if alive:
        subprocess.run(["scancel", *alive], env=env, capture_output=True, text=True, timeout=60)

