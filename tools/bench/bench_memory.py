"""Peak host memory of (a) construction + loading and (b) HF export, on the CPU, per layout.

    python tools/bench/bench_memory.py [--hidden 1024 --layers 12 --intermediate 2816 --vocab 32000]
                                       [--parts a,b] [--layouts tp1,tp2,zero3-dp2] [--json OUT]

The model is a Llama shape (default: hidden 1024, 12 layers, 16 heads, 8 kv heads, intermediate 2816,
vocabulary 32000: ~206M parameters). Every layout runs as fresh processes (one per rank, gloo, the real
witscale code: ``build_module``, ``export_module``, ``export_checkpoint``), so one case's allocator state
cannot flatter another.

How memory is measured (as tools/bench/bench_loss.py): children run with ``MALLOC_MMAP_THRESHOLD_=65536``
(glibc serves every large tensor by mmap and returns it on free, so the resident set follows the live
tensors); right before the measured phase the process's peak-RSS counter is reset (``/proc/self/clear_refs``
← 5) and ``VmRSS`` read as the baseline; after it, ``VmHWM − baseline`` is the phase's peak above the
baseline — exact, no sampling. A 2 ms sampler of ``RssAnon`` runs too (anonymous memory only): for the
offline export, which reads DeepSpeed's files memory-mapped, ``VmHWM`` also counts the clean file pages it
touched (page cache mapped into the process, dropped by the kernel under pressure; the reader maps a file
afresh after every 256 MiB read from it, which bounds them), ``RssAnon`` does not.

(a) construction + load of this rank's module from an HF directory (bf16 safetensors, written first by a
    tp1 export), in the training dtype (fp32 on the CPU). Ratio of the anonymous peak (the checkpoint is read
    memory-mapped: VmHWM also counts its clean file pages) to the rank's own share (the model's fp32 bytes /
    (tp × ZeRO-3 dp)); target ≤ 1.2 × share + 5% of the model.
(b) export in bf16 (the default): live (``--export-hf``'s path, rank 0 writing) for each layout, and
    offline (``tools/export_hf.py``'s path) from a tp=2 checkpoint. Ratio to the model's bf16 size;
    target ≤ 0.25 × model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

LAYOUTS = {"tp1": (1, 1, 0), "tp2": (2, 2, 1), "zero3-dp2": (2, 1, 3)}   # name: (world, tp, ZeRO stage)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class Peak:
    """Peak resident memory of a phase above the RSS at its start (VmHWM reset), plus sampled RssAnon."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status("VmRSS")
        self.base_anon = _status("RssAnon")
        self.anon = self.base_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.time()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.anon = max(self.anon, _status("RssAnon"))
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t0
        self._stop.set()
        self._thread.join()
        self.anon = max(self.anon, _status("RssAnon"))
        self.peak = _status("VmHWM") - self.base
        self.peak_anon = self.anon - self.base_anon

    def as_dict(self):
        return {"peak_bytes": self.peak, "peak_anon_bytes": self.peak_anon, "seconds": round(self.seconds, 2)}


def _model_config(args):
    from witscale.model import ModelConfig
    return ModelConfig.from_dict(dict(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False))


def _ds_config(stage):
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
            "bf16": {"enabled": False}, "steps_per_print": 10 ** 9}


def child(args) -> dict:
    """One rank of one case (environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    import torch
    import torch.distributed as dist

    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.export import export_checkpoint, export_module

    torch.set_num_threads(1)
    cfg = _model_config(args)
    work = args.workdir
    out = {"rank": int(os.environ.get("RANK", 0))}
    # What the measured phases import, imported before any baseline is read (a module is not memory of a phase).
    import deepspeed.runtime.fp16.loss_scaler  # noqa: F401
    import deepspeed.runtime.zero.config  # noqa: F401
    import deepspeed.utils.zero_to_fp32  # noqa: F401
    import witscale.model.state  # noqa: F401
    import witscale.model.weights  # noqa: F401
    if args.child == "offline":
        with Peak() as p:
            export_checkpoint(os.path.join(work, "run", "checkpoints"), os.path.join(work, "offline_hf"))
        out["b_offline"] = p.as_dict()
        return out
    init_distributed()
    world, tp, stage = LAYOUTS[args.child] if args.child != "prepare" else (1, 1, 0)
    topo = Topology(ParallelDims(world, tp, 1, stage, cfg))
    model_dir = None if args.child == "prepare" else os.path.join(work, "hf")
    with Peak() as p:
        module = build_module(cfg, topo, _ds_config(stage), model_dir=model_dir, seed=0)
    out["a"] = p.as_dict()
    dist.barrier()
    target = os.path.join(work, "hf" if args.child == "prepare" else f"hf_{args.child}")
    with Peak() as p:
        export_module(module, topo, cfg, target, dtype="bf16")
    out["b_live"] = p.as_dict()
    if args.child == "tp2":         # a tp=2 checkpoint in DeepSpeed's module layout, for the offline export
        step = os.path.join(work, "run", "checkpoints", "step_00000001")
        os.makedirs(step, exist_ok=True)
        torch.save({"module": module.state_dict()}, os.path.join(step, f"mp_rank_{topo.tp_rank:02d}_model_states.pt"))
        dist.barrier()
        if topo.rank == 0:
            with open(os.path.join(step, "witscale_state.json"), "w") as f:
                json.dump({"step": 1}, f)
            with open(os.path.join(work, "run", "checkpoints", "latest"), "w") as f:
                f.write("step_00000001")
            with open(os.path.join(work, "run", "model_config.json"), "w") as f:
                json.dump(cfg.to_hf_dict(), f)
    dist.barrier()
    return out


def run_case(args, case: str, world: int) -> list[dict]:
    from tools.bench.local_ranks import run_ranks
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--workdir", args.workdir,
           *[f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
             ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab")]]
    return run_ranks(cmd, world, cwd=ROOT, what=case, env={"MALLOC_MMAP_THRESHOLD_": "65536"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--parts", default="a,b", help="a (construction + load), b (export)")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--json", default=None, help="write the figures here too")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    cfg = _model_config(args)
    from witscale.model import dense_shapes
    numel = sum(int(__import__("math").prod(s)) for s in dense_shapes(cfg).values())
    bf16, fp32 = 2 * numel, 4 * numel
    parts = set(args.parts.split(","))
    layouts = [x for x in args.layouts.split(",") if x]
    args.workdir = tempfile.mkdtemp(prefix="bench_memory_")
    mib = lambda b: b / 2 ** 20  # noqa: E731
    print(f"model: Llama shape hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
          f"intermediate {args.intermediate}, vocab {args.vocab}: {numel / 1e6:.1f}M parameters, "
          f"{mib(bf16):.0f} MiB in bf16, {mib(fp32):.0f} MiB in fp32 (training dtype on the CPU)")
    rows = []
    try:
        run_case(args, "prepare", 1)         # the HF directory (a) loads from
        for name in layouts:
            world, tp, stage = LAYOUTS[name]
            layout = f"tp{tp}·pp1·dp{world // tp} ZeRO-{stage}"
            for r in run_case(args, name, world):
                share = fp32 / (tp * (world // tp if stage == 3 else 1))
                if "a" in parts:
                    a = r["a"]
                    # Judged on anonymous memory: the load reads the checkpoint memory-mapped, and VmHWM also
                    # counts the clean file pages it touched (page cache, the size of the file read).
                    rows.append({"part": "a", "case": "construction+load", "layout": layout, "rank": r["rank"],
                                 **a, "share_bytes": share, "ratio_to_share": a["peak_anon_bytes"] / share,
                                 "target_bytes": 1.2 * share + 0.05 * fp32,
                                 "meets_target": a["peak_anon_bytes"] <= 1.2 * share + 0.05 * fp32})
                if "b" in parts:
                    b = r["b_live"]
                    rows.append({"part": "b", "case": "live export (bf16)", "layout": layout, "rank": r["rank"], **b,
                                 "ratio_to_model": b["peak_bytes"] / bf16, "meets_target": b["peak_bytes"] <= 0.25 * bf16})
        if "b" in parts and "tp2" in layouts:
            b = run_case(args, "offline", 1)[0]["b_offline"]
            rows.append({"part": "b", "case": "offline export (bf16) of a tp2 checkpoint", "layout": "1 process",
                         "rank": 0, **b, "ratio_to_model": b["peak_bytes"] / bf16,
                         "ratio_anon_to_model": b["peak_anon_bytes"] / bf16,
                         "meets_target": b["peak_anon_bytes"] <= 0.25 * bf16})
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"{'part':4} {'case':44} {'layout':22} {'rank':>4} {'peak MiB':>9} {'anon MiB':>9} {'ratio':>7}  target")
    for r in rows:
        ratio = r.get("ratio_to_share", r.get("ratio_to_model"))
        target = (f"≤ {mib(r['target_bytes']):.0f} MiB (1.2×share+5%)" if r["part"] == "a" else "≤ 0.25× model")
        print(f"{r['part']:4} {r['case']:44} {r['layout']:22} {r['rank']:>4} {mib(r['peak_bytes']):9.1f} "
              f"{mib(r['peak_anon_bytes']):9.1f} {ratio:7.3f}  {target} {'ok' if r['meets_target'] else 'MISSED'}")
    print("ratio: part a, anonymous peak / the rank's fp32 share; part b, peak / the model's bf16 size "
          "(part a and the offline export: judged on anonymous memory — they read files memory-mapped, see --help)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"parameters": numel, "bf16_bytes": bf16, "fp32_bytes": fp32, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
