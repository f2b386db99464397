"""tools/gpu_check.py --dry-run on the CPU (what CI can run of the GPU check): every step that needs no CUDA
passes, every CUDA-only check is marked skipped ("dry run"), and the CPU reference losses are finite."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

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
    assert list(report["steps"]) == ["environment", "pytest_gpu", "training", "bench_gpu"]
    assert [s["id"] for s in report["steps"].values()] == ["a", "b", "c", "d"]
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
    assert "report:" in p.stdout and "dry run" in p.stdout
