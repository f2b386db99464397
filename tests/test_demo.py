"""The README's main command, end to end, with fewer steps (CI): training, export, then the paper's evaluation of
the exported model (POSIX and, with lm-eval installed, a local benchmark task)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from witscale.evaluation import harness

pytestmark = pytest.mark.slow  # the README's demo, end to end


def test_demo_runs_end_to_end_and_the_loss_falls(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "tools/demo.py", "--out", str(tmp_path / "demo"), "--records", "800",
                          "--steps", "24", "--hidden", "64", "--layers", "2", "--eval-prompts", "3",
                          "--eval-max-new-tokens", "8"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "exported HF model" in res.stdout and "TensorBoard" in res.stdout
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 24 and sum(losses[-4:]) < sum(losses[:4])
    assert os.path.exists(tmp_path / "demo" / "exported_hf" / "config.json")
    # the evaluation of the exported model
    report = tmp_path / "demo" / "eval" / "eval_results.json"
    assert f"[demo] evaluation report: {report}" in res.stdout
    results = json.loads(report.read_text())
    assert results["errors"] == {}
    assert results["posix"]["num_sets"] == 6 and results["posix"]["posix"] >= 0
    assert "[demo] POSIX (prompt sensitivity" in res.stdout and f"{results['posix']['posix']:.3f}" in res.stdout
    if harness.available() is not None:
        score = results["tasks"]["witscale_capitals"]["score"]
        assert 0 <= score <= 1 and f"acc {score:.3f}" in res.stdout
