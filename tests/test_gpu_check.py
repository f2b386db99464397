"""tools/gpu_check.py --dry-run on the CPU (what CI can run of the GPU check): every step that needs no CUDA
passes, every CUDA-only check is marked skipped ("dry run"), and the CPU reference losses are finite."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a benchmark: the GPU check's CPU part trains at each ZeRO stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUDA_ONLY = {"environment": {"gpu", "fused_adam", "softcap_gemma2"}, "pytest_gpu": {"run"},
             "training": {"gpu_zero0", "gpu_zero2", "gpu_zero3", "compare_zero0", "compare_zero2", "compare_zero3"},
             "bench_gpu": {"gpu"}}
CPU_CHECKS = {"environment": {"versions", "varlen_attn", "witscale_attention_auto"}, "pytest_gpu": {"collect"},
              "training": {"data", "cpu_zero0", "cpu_zero2", "cpu_zero3", "cpu_zero_stages_agree"},
              "bench_gpu": {"tiny_cpu"}}


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--output", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = {f"{s}.{c}": r.get("error") for s, step in report["steps"].items()
              for c, r in step["checks"].items() if r["status"] == "failed"}
    assert p.returncode == 0 and report["ok"] and not failed, (failed, p.stdout[-3000:], p.stderr[-3000:])
    assert report["dry_run"] is True
    # the benchmark runs right after the quick environment checks; the compiles and the GPU tests last
    assert [(ph["step"], ph["phase"]) for ph in report["phases"]] == [
        ("a", "environment"), ("d", "bench_gpu"), ("a", "fused_adam"), ("c", "training"),
        ("a", "softcap_gemma2"), ("b", "pytest_gpu")]
    assert list(report["steps"]) == ["environment", "bench_gpu", "training", "pytest_gpu"]
    assert report["complete"] is True and report["out_of_time"] == []
    assert all(ph["budget_s"] > 0 and ph["status"] in ("done", "over budget") for ph in report["phases"])
    # the benchmark's reserved share: 46% of the budget, of what the environment checks left of it
    env_phase, bench_phase = report["phases"][:2]
    assert bench_phase["budget_s"] >= 0.45 * (report["budget_s"] - env_phase["wall_s"] - 1)
    for ph in report["phases"]:
        assert f"{ph['step']} {ph['phase']}: budget " in p.stdout
    for name, step in report["steps"].items():
        assert step["status"] == "passed", name
        for check in CUDA_ONLY[name]:
            assert step["checks"][check] == {"status": "skipped", "reason": "dry run"}, (name, check)
        for check in CPU_CHECKS[name]:
            assert step["checks"][check]["status"] == "passed", (name, check)
            assert step["checks"][check]["wall_s"] >= 0
        assert set(step["checks"]) == CUDA_ONLY[name] | CPU_CHECKS[name], name

    checks = {n: s["checks"] for n, s in report["steps"].items()}
    assert checks["environment"]["versions"]["deepspeed"]
    # the gpu tests exist and are collected, and only they
    collect = checks["pytest_gpu"]["collect"]
    assert collect["counts"]["collected"] >= 2 and collect["counts"]["deselected"] > 0
    assert any(t.startswith("tests/test_gpu.py::") for t in collect["test_ids"])
    # the CPU reference runs: all steps, finite losses, fp32, and ZeRO-0/2/3 agreeing
    for stage in (0, 2, 3):
        run = checks["training"][f"cpu_zero{stage}"]
        assert run["rc"] == 0 and run["bf16"] is False
        assert len(run["losses"]) == 6 and all(math.isfinite(x) for x in run["losses"])
        assert run["losses"][-1] < run["losses"][0]
    # bench_gpu's tiny CPU run is embedded, with every system and matching losses at the same weights
    bench = checks["bench_gpu"]["tiny_cpu"]["result"]
    assert bench["tiny"] is True and bench["device"] == "cpu"
    assert set(bench["systems"]) >= {"witscale", "hf_padded"}
    assert bench["systems"]["witscale"]["tokens_per_s"] > 0
    assert bench["parity"]["ok"] is True
    # witscale/train.py's Trainer under DeepSpeed (ZeRO-1, ZeRO-3; a world of one) on the same rows from the same
    # initial weights: timed, and its first step (loss, gradient norm, tokens, denominator) equal to the
    # standalone model's
    parity = bench["parity"]
    for name, wrapper in (("trainer_zero1", "DeepSpeedZeroOptimizer"), ("trainer_zero3", "DeepSpeedZeroOptimizer_Stage3")):
        trainer = bench["systems"][name]
        assert trainer["tokens_per_s"] > 0 and trainer["timed_steps"] == bench["timed_steps"], name
        assert trainer["startup_s"] > 0 and trainer["bf16"] is False and trainer["optimizer_wrapper"] == wrapper
        assert trainer["rows_match"] is True and parity["trainer_rows_match"][name] is True
        assert parity["trainer_loss_rel_diff"][name] <= parity["trainer_rtol"] == parity["rtol"]
        assert parity["trainer_grad_norm_rel_diff"][name] <= parity["trainer_rtol"]
        assert bench["ratio"][f"{name}_vs_witscale"] > 0 and bench["ratio"][f"{name}_vs_hf_padded"] > 0
    assert parity["trainer_ok"] is True and bench["complete"] is True
    assert bench["targets"]["trainer_mfu_min"] == 0.45 and bench["targets"]["trainer_mfu_met"] is None  # no MFU on a CPU
    assert "report:" in p.stdout and "dry run" in p.stdout


def test_gpu_check_out_of_budget_still_writes_the_report(tmp_path):
    """A budget too small for the steps: the phase that overruns is recorded with what it measured, the
    phases left without time are 'out of time' (skipped, never silently passed), and the run fails."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--steps", "a,d", "--budget-s", "3",
                        "--output", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert p.returncode == 1 and report["ok"] is False and report["complete"] is True
    env_phase, bench_phase, fused, softcap = report["phases"]
    assert (env_phase["phase"], bench_phase["phase"]) == ("environment", "bench_gpu")
    # the environment checks take seconds (DeepSpeed's import) against a budget of 3 × 4% / 60%
    assert env_phase["status"] == "over budget" and env_phase["wall_s"] > env_phase["budget_s"]
    assert report["steps"]["environment"]["checks"]["versions"]["status"] == "passed"
    for ph in (fused, softcap):
        assert ph["status"] == "out of time"
        assert report["steps"]["environment"]["checks"][ph["phase"]] == {"status": "skipped", "reason": "out of time"}
    assert {"fused_adam", "softcap_gemma2"} <= set(report["out_of_time"])
    assert "out of time" in p.stdout
