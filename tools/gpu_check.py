#!/usr/bin/env python3
"""Everything witscale must prove on one CUDA GPU, in one command (under 8 minutes on one H100/H200).

On a GPU machine without network, from the repository root, with the wheels of `make gpu-wheels` in .whl/:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && python3 tools/gpu_check.py --output $OUT/gpu_check.json

(on a machine with network and DeepSpeed installed: `python tools/gpu_check.py`). Steps, each with its
result, timing and errors in the JSON report (``--output``, default gpu_check.json); a failing step does not
stop the others, and the exit code is 1 if any check failed:

  a  environment  torch / CUDA / NCCL / DeepSpeed / transformers versions, GPU name and compute capability,
                  torch's varlen_attn (present? its parameters; on CUDA a smoke call against per-document
                  SDPA), the attention backend witscale's ``auto`` picks (plain and soft-capped), Gemma-2
                  soft-capped attention and loss on CUDA against the CPU reference with timings
                  (``softcap_gemma2``), and whether DeepSpeed's FusedAdam JIT-compiles and loads (timed;
                  nvcc, ninja and Python.h are reported when it does not).
  b  pytest_gpu   ``pytest -m gpu -q tests``: the GPU test subset, its summary line parsed.
  c  training     world-size-1 NCCL runs of a small Llama (hidden 256, 4 layers, 4 heads, 2 kv heads)
                  through the real CLI (``python witscale/train.py --ds_config ds_configs/zero{0,2,3}.json``)
                  for a few steps, on data generated here (templated instruction records, a SentencePiece
                  tokenizer trained on them, packed by witscale's packer), and the same runs on the CPU in
                  fp32 (``CUDA_VISIBLE_DEVICES=``, gloo); per-step losses compared within a stated bf16
                  tolerance; tokens/s, MFU and peak memory of the GPU runs where metrics.jsonl has them.
                  The CPU runs go in parallel with the GPU runs (other resources).
  d  bench_gpu    tools/bench/bench_gpu.py: a ~1B Llama at seq-len 4096 against transformers, witscale with
                  and without --compile (compiled decoder blocks), and witscale/train.py's Trainer under
                  DeepSpeed ZeRO-1 (bf16: BF16_Optimizer) and ZeRO-3 on the same rows from the same weights
                  (the trainer's MFU as it logs it); its JSON. The benchmark writes its JSON after each
                  system, the decisive ones first (witscale, transformers padded, the trainers; the compiles
                  last), so a run stopped at the phase's budget still reports what it measured. The trainer
                  systems cost mostly their start-up (process, model load, engine: tens of seconds each on a
                  GPU; their steps are the standalone's, ~0.3 s each), so their steps are not trimmed.

``--dry-run`` runs everything that needs no CUDA — argument parsing, data generation and packing, the CPU
reference runs, ``pytest -m gpu --collect-only``, bench_gpu on a tiny model on the CPU — and marks the
CUDA-only checks "skipped" with reason "dry run" (tests/test_gpu_check.py runs exactly that in CI).
Without ``--dry-run`` on a machine without CUDA, the CUDA checks fail: this command exists to prove the GPU
path. ``--steps a,c`` runs a subset.

Order and budget (``PHASES``): the steps run as a (quick: versions, GPU, varlen_attn, auto backend) → d
(the benchmark, about half of the budget) → a's FusedAdam build → c → a's soft-capping compiles → b, so that the
benchmark is measured even when the compiles are slow. ``--budget-s`` (default 470) is shared among them:
each phase gets its share of the time still left (printed as it starts), each subprocess at most that; a
phase with no time left is recorded "out of time" (the run fails). The JSON report is rewritten after
every check, so a run killed from outside still leaves what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS = {"a": "environment", "b": "pytest_gpu", "c": "training", "d": "bench_gpu"}
STAGES = (0, 2, 3)
# The order the checks run in, and each phase's share of --budget-s. The benchmark — what the check exists to
# measure — runs first with the largest share; FusedAdam's JIT build right before the training runs that
# use it; the soft-capping (flex) compiles and the long GPU test list last. A phase's budget is its share of
# the time still left (so time a phase leaves unused goes to the later ones); a phase with no time left
# is recorded "out of time", which fails the run, and the report on disk is rewritten after every check.
PHASES = (  # (step, phase, share, its checks)
    ("a", "environment", 0.04, ("versions", "gpu", "varlen_attn", "witscale_attention_auto")),
    ("d", "bench_gpu", 0.46, ("tiny_cpu", "gpu")),
    ("a", "fused_adam", 0.14, ("fused_adam",)),     # a JIT build takes about a minute
    ("c", "training", 0.22, ("data",) + tuple(f"{k}_zero{s}" for k in ("cpu", "gpu") for s in STAGES)),
    ("a", "softcap_gemma2", 0.06, ("softcap_gemma2",)),
    ("b", "pytest_gpu", 0.08, ("collect", "run")),
)
DRY = "dry run"

# bf16 against fp32, per-step training loss, relative: bf16 keeps 8 significant bits (unit roundoff
# 2^-9 ≈ 2e-3) on every weight and activation; the loss itself is summed in fp32 over ~1000 predicted
# tokens, so at step 1 (identical initial weights) bf16 and fp32 agree to a few 1e-3. Each AdamW step
# then moves every weight by ~lr·sign(g), and for gradients near zero bf16 noise flips that sign, which
# widens the gap step by step (to ~5e-3 after 6 steps at lr 1e-3 on this model). 2e-2 leaves a margin of
# 4× or more, while what this comparison exists to catch — a micro-batch left on the CPU or dropped, a
# lost gradient-accumulation or data-parallel normalization, gradients accumulated in bf16 and
# under-flowing, attention across packed documents — moves the loss by 1e-1 or more within these steps.
LOSS_RTOL = 2e-2
# fp32 CPU runs of ZeRO-0/2/3 differ only in summation order (bucketing, flattening): 1e-4.
CPU_STAGE_RTOL = 1e-4

TRAIN_MODEL = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 256,
               "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
               "tie_word_embeddings": False, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2}
TRAIN_ARGS = ["--max-steps", "6", "--micro-batch-size", "2", "--grad-accum", "2", "--lr", "1e-3",
              "--warmup-ratio", "0", "--weight-decay", "0", "--prompt-weight", "0.2", "--seed", "0",
              "--no-tensorboard", "--log-every", "1"]
TRAIN_STEPS = 6
SEQ_LEN = 256


class CheckFailed(Exception):
    """A check that ran and found a problem; ``data`` still goes into the report."""

    def __init__(self, message: str, data: dict | None = None):
        super().__init__(message)
        self.data = data or {}


def tail(text: str, n: int = 3000) -> str:
    text = text or ""
    return text if len(text) <= n else "…" + text[-n:]


class Report:
    def __init__(self, args):
        self.args = args
        import torch
        self.cuda = torch.cuda.is_available()
        self.t0 = time.perf_counter()           # the budget is the checks' (torch's import is before it)
        self.deadline = self.t0 + args.budget_s
        self.step_deadline = self.deadline
        self.data = {"tool": "tools/gpu_check.py", "format": 1, "argv": sys.argv[1:], "dry_run": args.dry_run,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False, "budget_s": args.budget_s,
                     "phases": [], "out_of_time": [], "steps": {}}

    def save(self) -> None:
        """Write the report as it stands (aside, then renamed into place): a run killed by an outer timeout
        still leaves every check finished so far."""
        out = os.path.abspath(self.args.output)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".partial"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, out)

    def cuda_check(self, step: dict, name: str, fn) -> dict:
        """A check that needs CUDA: skipped in a dry run, failed at once where CUDA is not available."""
        if self.args.dry_run:
            return self.check(step, name, fn, skip=DRY)
        if not self.cuda:
            rec = self.check(step, name, lambda: {})
            rec.update(status="failed", error="CUDA is not available (use --dry-run for the CPU part)")
            step["status"] = "failed"
            return rec
        return self.check(step, name, fn)

    def left(self, cap: float) -> float:
        """Seconds a subprocess may take: ``cap``, or what is left of the current phase's budget (at least 10)."""
        return max(10.0, min(cap, self.step_deadline - time.perf_counter()))

    def step(self, letter: str) -> dict:
        """The step's record (created on first use: step a's checks run in three phases)."""
        rec = self.data["steps"].get(STEPS[letter])
        if rec is None:
            rec = {"id": letter, "name": STEPS[letter], "status": "skipped", "checks": {}}
            self.data["steps"][STEPS[letter]] = rec
        return rec

    def check(self, step: dict, name: str, fn, *, skip: str | None = None) -> dict:
        """Run ``fn()`` (returns a dict of results, raises CheckFailed or anything else to fail)."""
        rec: dict = {}
        t0 = time.perf_counter()
        if skip:
            rec = {"status": "skipped", "reason": skip}
        else:
            try:
                rec = dict(fn() or {})
                rec.setdefault("status", "passed")
            except CheckFailed as e:
                rec = dict(e.data, status="failed", error=str(e))
            except Exception as e:      # noqa: BLE001 — a broken check is a failed check, never a crash
                rec = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": tail(traceback.format_exc(), 4000)}
            rec["wall_s"] = round(time.perf_counter() - t0, 2)
        step["checks"][name] = rec
        self.save()
        if rec["status"] == "failed":
            step["status"] = "failed"
        elif rec["status"] == "passed" and step["status"] == "skipped":
            step["status"] = "passed"
        return rec

    def finish(self) -> dict:
        steps = self.data["steps"]
        failed = [n for n, s in steps.items() if s["status"] == "failed"]
        # A check the budget left no time for decides nothing: the run is not OK.
        self.data.update(ok=not failed and not self.data["out_of_time"], failed_steps=failed, complete=True,
                         wall_s=round(time.perf_counter() - self.t0, 1))
        return self.data


# ------------------------------------------------------------------------------------------- subprocesses
def base_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    return env


def gpu_env() -> dict:
    env = base_env()
    if env.get("DS_ACCELERATOR") == "cpu":      # the Makefile exports it for the CPU build
        del env["DS_ACCELERATOR"]
    return env


def cpu_env(threads: int) -> dict:
    env = base_env()
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))
    return env


def run(cmd: list[str], env: dict, timeout: float, cwd: str = ROOT) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")) + \
            f"\n[gpu_check] killed after {timeout:.0f} s"
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - t0, 2), "stdout": out,
            "stderr": err}


class Background:
    """A subprocess started now and collected later (the CPU reference runs, next to the GPU runs)."""

    def __init__(self, cmd: list[str], env: dict, log_dir: str):
        os.makedirs(log_dir, exist_ok=True)
        self.cmd, self.t0 = cmd, time.perf_counter()
        self.out = open(os.path.join(log_dir, "stdout.txt"), "w+", encoding="utf-8")
        self.err = open(os.path.join(log_dir, "stderr.txt"), "w+", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.out, stderr=self.err, text=True)

    def wait(self, timeout: float) -> dict:
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = "timeout"
        wall = time.perf_counter() - self.t0
        texts = []
        for f in (self.out, self.err):
            f.flush()
            f.seek(0)
            texts.append(f.read())
            f.close()
        if rc == "timeout":
            texts[1] += "\n[gpu_check] killed: out of time"
        return {"cmd": " ".join(self.cmd), "rc": rc, "wall_s": round(wall, 2), "stdout": texts[0], "stderr": texts[1]}


# ------------------------------------------------------------------------------------------- a: environment
def _version(dist: str):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def env_versions() -> dict:
    import platform

    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "executable": sys.executable,
           "PYTHONPATH": os.environ.get("PYTHONPATH"), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    for dist in ("deepspeed", "transformers", "numpy", "sentencepiece", "safetensors", "pydantic", "triton",
                 "flash-attn", "ninja", "pytest"):
        out[dist] = _version(dist)
    missing = [d for d in ("deepspeed", "transformers", "sentencepiece", "safetensors", "pydantic", "pytest")
               if out[d] is None]
    if missing:
        raise CheckFailed(f"not installed: {', '.join(missing)} (make gpu-wheels brings deepspeed and its "
                          "dependencies)", out)
    return out


def env_gpu() -> dict:
    import torch
    if not torch.cuda.is_available():
        raise CheckFailed("CUDA is not available to torch (is this the CUDA build of torch? "
                          f"torch.version.cuda={torch.version.cuda})")
    props = torch.cuda.get_device_properties(0)
    out = {"device_count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0),
           "compute_capability": list(torch.cuda.get_device_capability(0)),
           "total_memory_gib": round(props.total_memory / 2 ** 30, 1),
           "multiprocessors": props.multi_processor_count, "bf16_supported": torch.cuda.is_bf16_supported(),
           "cudnn": torch.backends.cudnn.version()}
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:      # noqa: BLE001
        out["nccl"] = f"unavailable: {e}"
    if not out["bf16_supported"]:
        raise CheckFailed("the GPU does not support bf16 (witscale trains bf16 on GPU)", out)
    return out


def _varlen():
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return None
    return getattr(varlen, "varlen_attn", None)


def env_varlen(on_cuda: bool, fn=None, device: str = "cuda") -> dict:
    """torch's varlen_attn: present? its parameters; on CUDA, a bf16 call against per-document SDPA."""
    import inspect

    import torch
    fn = fn or _varlen()
    out = {"exists": fn is not None}
    if fn is None:
        return out
    params = inspect.signature(fn).parameters
    out["parameters"] = [str(p) for p in params.values()]
    if not on_cuda:
        return out
    torch.manual_seed(0)
    lengths, hq, hkv, d = [37, 128, 5, 200], 8, 2, 64
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total = sum(lengths)
    q = torch.randn(total, hq, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(total, hkv, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(total, hkv, d, device=device, dtype=torch.bfloat16)
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        raise CheckFailed("varlen_attn has neither is_causal nor window_size: cannot ask for causal attention", out)
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
        kk, vv = k, v
    else:
        kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    out["call_kwargs"] = {k_: str(v_) for k_, v_ in kwargs.items()}
    got = fn(q, kk, vv, cu, cu, max(lengths), max(lengths), **kwargs)
    if isinstance(got, tuple):
        got = got[0]
    ref = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref[s:e] = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1).float(), k[s:e].repeat_interleave(hq // hkv, 1).transpose(0, 1).float(),
            v[s:e].repeat_interleave(hq // hkv, 1).transpose(0, 1).float(), is_causal=True).transpose(0, 1).to(q.dtype)
    err = float((got.float() - ref.float()).abs().max())
    out["smoke_max_abs_error_vs_fp32_sdpa"] = err
    # bf16 output of unit-scale values: rounding alone is up to ~4e-3; 2e-2 flags only real disagreement.
    if not err <= 2e-2:
        raise CheckFailed(f"varlen_attn disagrees with per-document causal SDPA: max abs error {err:.3g}", out)
    if "enable_gqa" not in params:
        # torch 2.10/2.11: may the trainer skip repeating K/V? The trainer asks the same probe (once per process).
        from witscale.model.attention import varlen_takes_grouped_kv
        out["grouped_kv_probe"] = varlen_takes_grouped_kv(device, torch.bfloat16)
    return out


def env_witscale_attention(on_cuda: bool) -> dict:
    import torch

    from witscale.model import attention
    out = {"backends": list(attention.BACKENDS)}
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    out["auto_selects"] = attention.select_backend("auto", device, dtype)
    out["auto_selects_softcapped"] = attention.select_backend("auto", device, dtype, softcap=50.0)
    out["for"] = f"{device.type} {str(dtype).replace('torch.', '')}"
    return out


def _cuda_ms(fn, repeat: int = 5) -> float:
    """Median wall milliseconds of ``fn()`` on CUDA, after one warm-up call (compilation)."""
    import torch
    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(sorted(times)[len(times) // 2], 2)


def env_softcap() -> dict:
    """Gemma-2 soft-capping on CUDA against the CPU reference (tests/test_gpu.py's figures: relative
    Frobenius errors of attention outputs and gradients per backend and dtype, of the capped fused loss),
    and timings: capped attention per backend (bf16, one 4096-token row of 512-token documents, Gemma-2-2B's
    8×256 heads) and the fused loss capped vs uncapped (8192 tokens, hidden 2304, vocabulary 256000)."""
    import torch

    from tests import test_gpu
    from witscale.model.attention import packed_attention
    from witscale.parallel.cross_entropy import fused_weighted_cross_entropy

    out = {"attention": test_gpu.softcap_attention_errors(), "loss": test_gpu.softcap_loss_errors()}
    bad = [f"{case}: {errs}" for case, errs in out["attention"].items() if isinstance(errs, dict) and any(
        e >= test_gpu.ATTN_TOL[torch.bfloat16 if case.endswith("bfloat16") else torch.float32]
        for e in errs.values())]
    if out["loss"]["dh"] >= 2e-2 or out["loss"]["dw"] >= 2e-2 or out["loss"]["loss"] >= 5e-3:
        bad.append(f"loss: {out['loss']}")
    g = test_gpu.GEMMA2
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    seq = 4096
    cu = torch.arange(0, seq + 1, 512, dtype=torch.int32, device=dev)
    q = torch.randn(1, seq, g["heads"], g["head_dim"], device=dev, dtype=bf16, requires_grad=True)
    k, v = (torch.randn(1, seq, g["kv_heads"], g["head_dim"], device=dev, dtype=bf16, requires_grad=True)
            for _ in range(2))
    timings = {}
    for backend in out["attention"].keys():
        name = backend.split("/")[0]
        if "/" not in backend or name in timings:
            continue

        def step(name=name):
            o = packed_attention(q, k, v, cu, seq, backend=name, sliding_window=g["window"] * 128,
                                 scale=g["scale"], softcap=g["attn_softcap"])
            torch.autograd.grad(o.sum(), (q, k, v))
        try:
            timings[name] = _cuda_ms(step)
        except Exception as e:      # noqa: BLE001 — a timing that cannot run is reported, not fatal
            timings[name] = f"{type(e).__name__}: {e}"[:300]
    out["attention_fwd_bwd_ms_seq4096_window4096"] = timings
    h = torch.randn(8192, 2304, device=dev, dtype=bf16, requires_grad=True)
    w = (torch.randn(256000, 2304, device=dev) / 48).to(bf16).requires_grad_(True)
    t = torch.randint(0, 256000, (8192,), device=dev)
    wt = torch.ones(8192, device=dev)
    loss_ms = {}
    for cap in (None, g["final_softcap"]):
        def loss_step(cap=cap):
            fused_weighted_cross_entropy(h, w, t, wt, logit_softcap=cap).weighted_sum.backward()
            h.grad = w.grad = None
        loss_ms["capped" if cap else "uncapped"] = _cuda_ms(loss_step, repeat=3)
    out["loss_fwd_bwd_ms_T8192_H2304_V256000"] = loss_ms
    if bad:
        raise CheckFailed("soft-capped attention or loss on CUDA disagrees with the CPU reference: "
                          + "; ".join(bad)[:1500], out)
    return out


FUSED_ADAM_PROBE = r"""
import json, os, shutil, sys, sysconfig, time
out = {"nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja"), "CUDA_HOME": os.environ.get("CUDA_HOME"),
       "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")}
try:
    import torch
    from deepspeed.accelerator import get_accelerator
    out["accelerator"] = get_accelerator()._name
    if out["accelerator"] != "cuda":
        raise RuntimeError(f"DeepSpeed's accelerator is {out['accelerator']!r}, not 'cuda' (DS_ACCELERATOR?)")
    from deepspeed.ops.op_builder import FusedAdamBuilder
    b = FusedAdamBuilder()
    out["is_compatible"] = bool(b.is_compatible(verbose=False))
    t0 = time.perf_counter()
    b.load(verbose=False)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    from deepspeed.ops.adam import FusedAdam
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    p2 = torch.nn.Parameter(p1.detach().clone())
    a = FusedAdam([p1], lr=1e-2, weight_decay=0.1, adam_w_mode=True)
    r = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(1000, device="cuda")
        p1.grad, p2.grad = g.clone(), g.clone()
        a.step(); r.step()
    out["max_abs_diff_vs_torch_adamw"] = float((p1 - p2).abs().max())
    out["ok"] = out["max_abs_diff_vs_torch_adamw"] < 1e-5
except Exception as e:
    import traceback
    out["ok"] = False
    out["error"] = f"{type(e).__name__}: {e}"
    out["traceback"] = traceback.format_exc()[-3000:]
print("FUSED_ADAM_JSON " + json.dumps(out))
"""


def env_fused_adam(report: Report) -> dict:
    r = run([sys.executable, "-c", FUSED_ADAM_PROBE], gpu_env(), report.left(360))
    found = [line for line in r["stdout"].splitlines() if line.startswith("FUSED_ADAM_JSON ")]
    if not found:
        raise CheckFailed(f"FusedAdam probe produced no result (rc {r['rc']})",
                          {"rc": r["rc"], "stderr": tail(r["stderr"]), "stdout": tail(r["stdout"])})
    out = json.loads(found[-1][len("FUSED_ADAM_JSON "):])
    out["probe_wall_s"] = r["wall_s"]
    if not out.get("ok"):
        out["stderr"] = tail(r["stderr"])
        raise CheckFailed(out.get("error") or f"FusedAdam differs from torch AdamW by "
                          f"{out.get('max_abs_diff_vs_torch_adamw')}", out)
    return out


def step_environment(report: Report) -> None:
    """Step a's quick part (seconds); FusedAdam's JIT build and the soft-capping compiles run later."""
    step = report.step("a")
    report.check(step, "versions", env_versions)
    gpu = report.cuda_check(step, "gpu", env_gpu)
    on_cuda = gpu["status"] == "passed"
    report.check(step, "varlen_attn", lambda: env_varlen(on_cuda))
    report.check(step, "witscale_attention_auto", lambda: env_witscale_attention(on_cuda))


def step_fused_adam(report: Report) -> None:
    report.cuda_check(report.step("a"), "fused_adam", lambda: env_fused_adam(report))


def step_softcap(report: Report) -> None:
    report.cuda_check(report.step("a"), "softcap_gemma2", env_softcap)


# ------------------------------------------------------------------------------------------- b: pytest -m gpu
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)")


def parse_pytest(output: str) -> dict:
    lines = [line.strip().strip("=").strip() for line in output.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines)
                    if _COUNT.search(line) or "collected" in line or "no tests ran" in line), "")
    counts = {}
    for n, word in _COUNT.findall(summary):
        word = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[word] = int(n)
    m = re.search(r"(\d+)(?:/(\d+))? tests? collected", summary)
    if m:
        counts["collected"] = int(m.group(1))
    m = re.search(r"in ([\d.]+)s", summary)
    return {"summary_line": summary, "counts": counts, "duration_s": float(m.group(1)) if m else None,
            "test_ids": [line for line in lines if "::" in line and " " not in line][:200]}


def step_pytest(report: Report) -> None:
    step = report.step("b")

    def collect():
        r = run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                 "tests"], base_env(), report.left(300))
        out = parse_pytest(r["stdout"])
        out.update(rc=r["rc"], cmd=r["cmd"])
        if r["rc"] != 0 or not out["counts"].get("collected"):
            out["output"] = tail(r["stdout"] + r["stderr"])
            raise CheckFailed(f"collecting the gpu tests failed (rc {r['rc']}): {out['summary_line']}", out)
        return out

    def run_gpu_tests():
        r = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], gpu_env(),
                report.left(420))
        out = parse_pytest(r["stdout"])
        out.update(rc=r["rc"], cmd=r["cmd"], output=tail(r["stdout"] + r["stderr"], 6000))
        out.pop("test_ids", None)
        if r["rc"] != 0 or not out["counts"].get("passed"):
            raise CheckFailed(f"pytest -m gpu: rc {r['rc']}: {out['summary_line'] or 'no summary line'}", out)
        return out

    report.check(step, "collect", collect)
    report.cuda_check(step, "run", run_gpu_tests)


# ------------------------------------------------------------------------------------------- c: training
def make_training_data(work: str) -> dict:
    from witscale.data.pack_cli import main as pack_main
    from witscale.data.synthetic import generate_instruction_records, train_sentencepiece

    records = generate_instruction_records(1500, seed=0)
    jsonl = os.path.join(work, "train.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    texts = [" ".join(str(v) for v in r.values() if isinstance(v, str)) for r in records]
    tokenizer = train_sentencepiece(texts, os.path.join(work, "tokenizer"), vocab_size=TRAIN_MODEL["vocab_size"])
    packed = os.path.join(work, "packed")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = pack_main(["--input", jsonl, "--tokenizer", tokenizer, "--seq-len", str(SEQ_LEN), "--template", "plain",
                        "--output", packed, "--overwrite"])
    if rc not in (0, None):
        raise CheckFailed(f"packing failed (rc {rc})", {"output": tail(buf.getvalue())})
    with open(os.path.join(packed, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    config = os.path.join(work, "model_config.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump(TRAIN_MODEL, f, indent=1)
    return {"records": len(records), "tokenizer_vocab": manifest["tokenizer"].get("vocab_size"),
            "rows": manifest["num_rows"], "seq_len": manifest["seq_len"], "tokens": manifest["num_tokens"],
            "packing_efficiency": round(manifest["packing_efficiency"], 4), "packed": packed,
            "model_config": config, "model": {k: v for k, v in TRAIN_MODEL.items() if k != "architectures"},
            "train_args": TRAIN_ARGS}


def extra_train_flags() -> list[str]:
    """Flags that exist only in some versions of the trainer (checked against its parser)."""
    try:
        from witscale.train import build_parser
        known = build_parser()._option_string_actions
    except Exception:   # noqa: BLE001
        return []
    return ["--dist-timeout", "5"] if "--dist-timeout" in known else []


def train_cmd(data: dict, ds_config: str, out_dir: str) -> list[str]:
    return [sys.executable, "witscale/train.py", "--ds_config", ds_config, "--data", data["packed"],
            "--model-config", data["model_config"], "--output-dir", out_dir] + TRAIN_ARGS + extra_train_flags()


def read_run(r: dict, out_dir: str) -> dict:
    """Per-step losses and performance numbers of one finished CLI run; fails on a bad exit or bad losses."""
    rec = {"cmd": r["cmd"], "rc": r["rc"], "run_wall_s": r["wall_s"]}
    rows = []
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    steps = [row for row in rows if "loss" in row]
    rec["losses"] = [row["loss"] for row in steps]
    rec["response_nll"] = [row.get("response_nll") for row in steps]
    rec["grad_norm"] = [row.get("grad_norm") for row in steps]
    later = [row for row in steps[1:]] or steps         # step 1 carries start-up costs
    tps = sorted(row["tokens_per_s"] for row in later if row.get("tokens_per_s"))
    rec["tokens_per_s_median"] = tps[len(tps) // 2] if tps else None
    mfu = sorted(row["mfu"] for row in later if isinstance(row.get("mfu"), (int, float)))
    rec["mfu_median"] = mfu[len(mfu) // 2] if mfu else None
    mem_keys = sorted({k for row in steps for k in row if "mem" in k.lower()})
    rec["peak_memory"] = {k: max(row[k] for row in steps if isinstance(row.get(k), (int, float)))
                          for k in mem_keys if any(isinstance(row.get(k), (int, float)) for row in steps)} or None
    eff = os.path.join(out_dir, "effective_config.json")
    if os.path.exists(eff):
        with open(eff, encoding="utf-8") as f:
            ds = json.load(f).get("ds_config", {})
        rec["bf16"] = (ds.get("bf16") or {}).get("enabled")
        rec["optimizer"] = (ds.get("optimizer") or {}).get("type", "torch AdamW (no optimizer section)")
        rec["data_types"] = ds.get("data_types")
    log_path = os.path.join(out_dir, "train.log")
    if os.path.exists(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            m = re.findall(r"packed attention backend: (\S+)", f.read())
        rec["attention_backend"] = m[-1] if m else None
    if r["rc"] != 0:
        rec["stderr"] = tail(r["stderr"], 4000)
        rec["stdout"] = tail(r["stdout"], 1500)
        raise CheckFailed(f"the run exited with {r['rc']}", rec)
    if len(steps) != TRAIN_STEPS:
        rec["stderr"] = tail(r["stderr"])
        raise CheckFailed(f"metrics.jsonl has {len(steps)} step records, expected {TRAIN_STEPS}", rec)
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in rec["losses"]):
        raise CheckFailed("non-finite loss", rec)
    return rec


def compare(gpu: dict, cpu: dict, rtol: float) -> dict:
    a, b = gpu.get("losses") or [], cpu.get("losses") or []
    if not a or len(a) != len(b):
        raise CheckFailed(f"nothing to compare: {len(a)} GPU losses, {len(b)} CPU losses")
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    out = {"rtol": rtol, "rel_diff": [float(f"{x:.3g}") for x in rel], "max_rel_diff": max(rel),
           "gpu_losses": a, "cpu_losses": b}
    if not max(rel) <= rtol:
        raise CheckFailed(f"per-step losses differ by up to {max(rel):.3g} relative (tolerance {rtol})", out)
    return out


def step_training(report: Report, fused_adam_failed: bool) -> None:
    step = report.step("c")
    args = report.args
    work = os.path.join(args.workdir, "training")
    os.makedirs(work, exist_ok=True)
    data_rec = report.check(step, "data", lambda: make_training_data(work))
    if data_rec["status"] != "passed":
        for kind in ("cpu", "gpu"):
            for stage in STAGES:
                report.check(step, f"{kind}_zero{stage}", None, skip="no data")
        return
    data = data_rec
    # A few threads each, leaving cores for the GPU runs' host side (tiny models: launch-bound).
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, min(3, ((os.cpu_count() or 1) - 2) // len(STAGES))))
    # CPU reference runs: started now, in parallel with each other and with the GPU runs.
    cpu_procs = {}
    for stage in STAGES:
        out_dir = os.path.join(work, f"cpu_zero{stage}")
        cpu_procs[stage] = (Background(train_cmd(data, f"ds_configs/zero{stage}.json", out_dir), cpu_env(threads),
                                       os.path.join(work, f"cpu_zero{stage}_logs")), out_dir)

    gpu_results = {}
    for stage in STAGES:
        def gpu_run(stage=stage):
            ds_config = f"ds_configs/zero{stage}.json"
            note = None
            if fused_adam_failed:
                # FusedAdam did not load (step a): train with DeepSpeed's torch AdamW so that the rest of
                # the GPU path is still checked; the check stays failed through step a.
                with open(os.path.join(ROOT, ds_config), encoding="utf-8") as f:
                    cfg = json.load(f)
                cfg.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = True
                ds_config = os.path.join(work, f"zero{stage}_torch_adam.json")
                with open(ds_config, "w", encoding="utf-8") as f:
                    json.dump(cfg, f, indent=1)
                note = "FusedAdam failed in step a: optimizer.params.torch_adam=true"
            out_dir = os.path.join(work, f"gpu_zero{stage}")
            r = run(train_cmd(data, ds_config, out_dir), gpu_env(), report.left(240))
            rec = read_run(r, out_dir)
            if note:
                rec["note"] = note
            if rec.get("bf16") is not True:
                raise CheckFailed("the run did not train in bf16 (did it see the GPU?)", rec)
            return rec
        gpu_results[stage] = report.cuda_check(step, f"gpu_zero{stage}", gpu_run)

    cpu_results = {}
    for stage in STAGES:
        proc, out_dir = cpu_procs[stage]
        r = proc.wait(report.left(300))
        cpu_results[stage] = report.check(step, f"cpu_zero{stage}", lambda r=r, out_dir=out_dir: read_run(r, out_dir))

    def cpu_stages_agree():
        base = cpu_results[STAGES[0]]
        diffs = {}
        for stage in STAGES[1:]:
            other = cpu_results[stage]
            diffs[f"zero{stage}_vs_zero{STAGES[0]}"] = max(
                abs(x - y) / max(abs(y), 1e-12) for x, y in zip(other["losses"], base["losses"]))
        out = {"rtol": CPU_STAGE_RTOL, "max_rel_diff": diffs}
        if not all(d <= CPU_STAGE_RTOL for d in diffs.values()):
            raise CheckFailed("fp32 CPU runs of different ZeRO stages disagree", out)
        return out
    cpu_ok = all(r["status"] == "passed" for r in cpu_results.values())
    report.check(step, "cpu_zero_stages_agree", cpu_stages_agree, skip=None if cpu_ok else "a CPU run failed")

    for stage in STAGES:
        def cmp(stage=stage):
            for kind, r in (("GPU", gpu_results[stage]), ("CPU", cpu_results[stage])):
                if r["status"] != "passed":     # a comparison that could not be made is not a pass
                    raise CheckFailed(f"no comparison: the {kind} run failed")
            return compare(gpu_results[stage], cpu_results[stage], LOSS_RTOL)
        report.cuda_check(step, f"compare_zero{stage}", cmp)


# ------------------------------------------------------------------------------------------- d: bench
def step_bench(report: Report) -> None:
    step = report.step("d")
    out_file = os.path.join(report.args.workdir, "bench_gpu.json")

    def bench(tiny: bool):
        cmd = [sys.executable, "tools/bench/bench_gpu.py", "--output", out_file]
        if tiny:
            cmd += ["--tiny", "--device", "cpu"]
        else:       # with and without --compile (each block compiled), the Trainer at ZeRO-1 and 3; ratios in its JSON
            cmd += ["--systems", "witscale,witscale_compiled,hf_padded,hf_packed,trainer_zero1,trainer_zero3"]
        env = cpu_env(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(8, os.cpu_count() or 1)))) if tiny \
            else gpu_env()
        r = run(cmd, env, report.left(300 if not tiny else 240))
        result = None
        if os.path.exists(out_file):
            with open(out_file, encoding="utf-8") as f:
                result = json.load(f)
            os.remove(out_file)
        rec = {"cmd": r["cmd"], "rc": r["rc"], "run_wall_s": r["wall_s"], "result": result}
        if r["rc"] != 0 or result is None:
            rec["stderr"] = tail(r["stderr"], 4000)
            raise CheckFailed(f"bench_gpu exited with {r['rc']}", rec)
        parity = result.get("parity") or {}
        if parity.get("ok") is False:
            raise CheckFailed(f"bench_gpu parity: witscale, transformers and the Trainer disagree at the same "
                              f"weights: {parity}", rec)
        return rec

    report.check(step, "tiny_cpu", lambda: bench(True), skip=None if report.args.dry_run else "not a dry run")
    report.cuda_check(step, "gpu", lambda: bench(False))


# ------------------------------------------------------------------------------------------- summary
def summarize(data: dict) -> str:
    steps = data["steps"]
    lines = [f"gpu_check{' (dry run)' if data['dry_run'] else ''}: {'OK' if data['ok'] else 'FAILED'} in "
             f"{data['wall_s']:.0f} s" + (f"; failed: {', '.join(data['failed_steps'])}" if data["failed_steps"] else "")]
    for name, s in steps.items():
        checks = s["checks"]
        bits = []
        if name == "environment":
            v = checks.get("versions", {})
            g = checks.get("gpu", {})
            fa = checks.get("fused_adam", {})
            va = checks.get("varlen_attn", {})
            bits.append(f"torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), deepspeed {v.get('deepspeed')}, "
                        f"transformers {v.get('transformers')}")
            if g.get("name"):
                bits.append(f"{g['name']} sm_{''.join(map(str, g.get('compute_capability', [])))}")
            bits.append(f"varlen_attn {'yes' if va.get('exists') else 'no'}"
                        + (f" (un-repeated K/V: {'exact, used' if va['grouped_kv_probe']['grouped'] else 'not used'})"
                           if va.get("grouped_kv_probe") else ""))
            bits.append(f"auto attention {checks.get('witscale_attention_auto', {}).get('auto_selects')}")
            sc = checks.get("softcap_gemma2", {})
            if sc.get("attention"):
                worst = max(e for errs in sc["attention"].values() if isinstance(errs, dict) for e in errs.values())
                bits.append(f"softcap: attention max rel err {worst:.2g}, loss dW {sc['loss']['dw']:.2g}")
            bits.append("FusedAdam " + (f"{fa['load_s']} s" if fa.get("load_s") is not None else fa.get("status", "?")))
        elif name == "pytest_gpu":
            for c in ("run", "collect"):
                if checks.get(c, {}).get("summary_line"):
                    bits.append(f"{c}: {checks[c]['summary_line']}")
        elif name == "training":
            for stage in STAGES:
                c = checks.get(f"compare_zero{stage}", {})
                g = checks.get(f"gpu_zero{stage}", {})
                cpu = checks.get(f"cpu_zero{stage}", {})
                part = f"zero{stage}: "
                if c.get("max_rel_diff") is not None:
                    part += f"max rel diff {c['max_rel_diff']:.2g} (≤ {c['rtol']:g})"
                else:
                    part += f"compare {c.get('status')}"
                if g.get("tokens_per_s_median"):
                    part += f", GPU {g['tokens_per_s_median']:,.0f} tok/s"
                if cpu.get("losses"):
                    part += f", CPU loss {cpu['losses'][0]:.3f}→{cpu['losses'][-1]:.3f}"
                bits.append(part)
        elif name == "bench_gpu":
            for key in ("gpu", "tiny_cpu"):
                res = (checks.get(key) or {}).get("result") or {}
                if not res:
                    continue
                sysd = res.get("systems", {})
                ws = sysd.get("witscale", {})
                part = f"{key}: witscale {ws.get('tokens_per_s', 0):,.0f} tok/s"
                if ws.get("mfu") is not None:
                    part += f", MFU {ws['mfu']:.1%}"
                if ws.get("peak_memory_gib") is not None:
                    part += f", {ws['peak_memory_gib']:.1f} GiB"
                for other, ratio in (res.get("ratio") or {}).items():
                    if other.startswith("witscale_"):
                        part += (f"; --compile {ratio:.2f}× eager" if other == "witscale_compiled_vs_witscale"
                                 else f"; {ratio:.2f}× {other.replace('witscale_vs_', '')}")
                for trainer in ("trainer_zero1", "trainer_zero3"):       # train.py's Trainer under DeepSpeed
                    tr = sysd.get(trainer) or {}
                    if tr.get("tokens_per_s"):
                        part += (f"; {trainer} {tr['tokens_per_s']:,.0f} tok/s"
                                 + (f", MFU {tr['mfu']:.1%}" if tr.get("mfu") is not None else "")
                                 + f" ({tr.get('optimizer_wrapper')}, start-up {tr.get('startup_s', 0):.0f} s)")
                t = res.get("targets") or {}
                if key == "gpu":
                    yes = {True: "met", False: "NOT met", None: "n/a"}
                    part += (f"; targets: MFU ≥ {t.get('mfu_min', 0):.0%} {yes[t.get('mfu_met')]}, "
                             f"≥ {t.get('speedup_vs_hf_padded_min')}× {yes[t.get('speedup_met')]}, "
                             f"trainer MFU ≥ {t.get('trainer_mfu_min', 0):.0%} {yes[t.get('trainer_mfu_met')]}")
                bits.append(part)
        failed = [f"{k}: {v.get('error', v.get('reason', ''))}"[:160] for k, v in checks.items()
                  if v.get("status") == "failed"]
        lines.append(f"  {s['id']} {name:<12} {s['status']:<7} " + "; ".join(b for b in bits if b))
        for f in failed:
            lines.append(f"      FAILED {f}")
    if data.get("out_of_time"):
        lines.append(f"  out of time (--budget-s {data['budget_s']:g}): {', '.join(data['out_of_time'])}")
    lines.append("  budgets: " + ", ".join(f"{ph['phase']} {ph['budget_s']:.0f} s"
                                         + (f" (took {ph['wall_s']:.0f})" if "wall_s" in ph else "")
                                         for ph in data.get("phases", [])))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    p.add_argument("--dry-run", action="store_true", help="only what needs no CUDA; CUDA checks are 'skipped'")
    p.add_argument("--steps", default="a,b,c,d", help="a subset of a,b,c,d (or their names)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--budget-s", type=float, default=470.0,
                   help="overall time budget, shared among the phases (PHASES; the benchmark first, with ~half); "
                        "each subprocess gets at most its phase's budget (default 470)")
    args = p.parse_args(argv)
    names = {v: k for k, v in STEPS.items()}
    wanted = []
    for item in (s.strip() for s in args.steps.split(",") if s.strip()):
        letter = item if item in STEPS else names.get(item)
        if letter is None:
            p.error(f"--steps: unknown step {item!r} (known: {', '.join(f'{k}={v}' for k, v in STEPS.items())})")
        wanted.append(letter)
    own_workdir = args.workdir is None
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="witscale-gpu-check-"))
    os.makedirs(args.workdir, exist_ok=True)

    report = Report(args)
    report.data["workdir"] = args.workdir
    runners = {"environment": step_environment, "bench_gpu": step_bench, "fused_adam": step_fused_adam,
               "training": lambda r: step_training(r, fused_adam_failed=r.data["steps"].get("environment", {})
                                                   .get("checks", {}).get("fused_adam", {}).get("status") == "failed"),
               "softcap_gemma2": step_softcap, "pytest_gpu": step_pytest}
    phases = [ph for ph in PHASES if ph[0] in wanted]
    try:
        for i, (letter, phase, share, checks) in enumerate(phases):
            now = time.perf_counter()
            remaining = report.deadline - now
            budget = max(0.0, remaining) * share / sum(ph[2] for ph in phases[i:])
            rec = {"step": letter, "phase": phase, "budget_s": round(budget, 1)}
            report.data["phases"].append(rec)
            if remaining < 1.0:
                print(f"[gpu_check] {letter} {phase}: out of time, skipped", flush=True)
                rec["status"] = "out of time"
                report.data["out_of_time"].append(phase)
                step = report.step(letter)
                for name in checks:
                    if name not in step["checks"]:
                        report.check(step, name, None, skip="out of time")
                continue
            print(f"[gpu_check] {letter} {phase}: budget {budget:.0f} s", flush=True)
            report.step_deadline = now + budget
            runners[phase](report)
            rec["wall_s"] = round(time.perf_counter() - now, 1)
            rec["status"] = "over budget" if rec["wall_s"] > budget else "done"
            report.save()
    except BaseException as e:      # noqa: BLE001 — the report is written whatever happens
        report.data["crash"] = f"{type(e).__name__}: {e}\n{tail(traceback.format_exc(), 4000)}"
        report.data["steps"].setdefault("crash", {"id": "-", "name": "crash", "status": "failed", "checks": {}})
    finally:
        data = report.finish()
        report.save()
        out = os.path.abspath(args.output)
        if own_workdir and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(summarize(data) + f"\nreport: {out}", flush=True)
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
