"""Long context (issue 24): activation memory per rank against row length at --sp 1/2/4 on the CPU, and the
planner's answers for the cases the issue names.

    python tools/bench/bench_long.py [--lengths 1024,2048,4096 --sps 1,2,4 --json out.json]

Part (a), measured: for each row length and sp, ``sp`` real processes (gloo, DeepSpeed's all-to-all) each run
one forward + backward of witscale's CausalLM (fp32, activation checkpointing on — what long rows need) on its
1/sp of one row under the memory probe (witscale/memory_probe.py: the peak of live tensors allocated, what
``torch.cuda.max_memory_allocated`` reports above the parameters on a GPU), beside the planner's estimate for the
same rank. Activation memory per rank must fall ~1/sp.

Part (b), the planner (witscale/planner.py, bf16 on 80 GiB GPUs, 1 TiB of pinned host memory per node):
``auto`` for 70B at 256k on 64 GPUs and 8B at 1M on 8 GPUs (both must fit), and the longest 8B row that fits
on 8 GPUs (ALST, Snowflake 2025, reports 3.7M on 8 H100s).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# A small Llama with the 8B's shape ratios (GQA 4:1, SwiGLU 3.5 h), small enough for 2 CPU cores.
MODEL = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4)


def child(seq: int) -> dict:
    import torch
    import torch.distributed as dist

    from witscale.memory_probe import measure_activation_peak
    from witscale.model import CausalLM, ModelConfig
    from witscale.model.weights import init_weights
    from witscale.training.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed()
    world = dist.get_world_size()
    cfg = ModelConfig.from_dict(dict(MODEL, max_position_embeddings=seq))
    model = CausalLM(cfg, None, activation_checkpointing=True,
                     **(dict(sp_group=dist.group.WORLD) if world > 1 else {}))
    init_weights(model, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (1, seq), generator=g)
    out = measure_activation_peak(model, ids, labels, torch.ones(1, seq))
    dist.barrier()
    dist.destroy_process_group()
    return out


def run(seq: int, sp: int) -> list[dict]:
    from tools.bench.local_ranks import run_ranks
    return run_ranks([sys.executable, os.path.abspath(__file__), "--child", str(seq)], sp, cwd=ROOT,
                     what=f"seq {seq} sp {sp}")


def measured_part(lengths: list[int], sps: list[int]) -> list[dict]:
    from witscale import planner

    shape = planner.ModelShape.from_config(MODEL)
    rows, mib = [], 2 ** 20
    print("(a) activation memory per rank, measured (memory probe) and estimated (planner); fp32, checkpointing on")
    print(f"{'row':>7} {'sp':>3} {'measured MiB':>13} {'estimate MiB':>13} {'est/meas':>9} {'vs sp1':>7}")
    for seq in lengths:
        base = None
        for sp in sps:
            peak = max(r["peak"] for r in run(seq, sp))
            est = planner.activation_memory(shape, tokens=seq // sp, element_size=4, sp=sp).peak
            base = base or peak
            rows.append(dict(seq=seq, sp=sp, measured=peak, estimate=est))
            print(f"{seq:>7} {sp:>3} {peak / mib:>13.2f} {est / mib:>13.2f} {est / peak:>9.3f} {peak / base:>7.3f}",
                  flush=True)
    return rows


def planner_part() -> dict:
    from witscale import planner

    fit = dict(gpus_per_node=8, gpu_gib=80.0, host_gib_per_node=1024.0)
    out = {}
    print("\n(b) the planner (bf16, 80 GiB per GPU, 1024 GiB pinned host memory per node), GiB per GPU")
    for name, gpus, seq in (("70B", 64, 256 * 1024), ("8B", 8, 1024 * 1024)):
        shape = planner.ModelShape.from_config(planner.NAMED_SIZES[name])
        choice = planner.choose_layout(shape, gpus, seq_len=seq, **fit)
        if choice is None:
            print(f"{name} at {seq} tokens on {gpus} GPUs: nothing fits")
            out[f"{name}@{seq}"] = None
            continue
        e = choice.estimate
        print(f"{name} at {seq // 1024}k tokens on {gpus} × 80 GiB: auto = {e.layout.name()}: total {e.total_gib:.1f} "
              f"(activations {e.activation_gib:.1f}), host {choice.host_gib_per_node:.0f} GiB per node")
        out[f"{name}@{seq}"] = dict(layout=e.layout.name(), total_gib=e.total_gib, activation_gib=e.activation_gib,
                                    host_gib_per_node=choice.host_gib_per_node)
    shape = planner.ModelShape.from_config(planner.NAMED_SIZES["8B"])
    longest, choice = planner.longest_row(shape, 8, **fit)
    print(f"longest 8B row on 8 × 80 GiB: {longest} tokens ({longest / 2 ** 20:.2f} Mi; ALST: 3.7M) with "
          f"{choice.estimate.layout.name()}: total {choice.estimate.total_gib:.1f}, host "
          f"{choice.host_gib_per_node:.0f} GiB per node")
    out["8B longest on 8"] = dict(tokens=longest, layout=choice.estimate.layout.name())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096", help="row lengths (divisible by every sp)")
    p.add_argument("--sps", default="1,2,4")
    p.add_argument("--json", default=None, help="write the figures here too")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    sps = [int(x) for x in args.sps.split(",")]
    figures = dict(measured=measured_part(lengths, sps), planner=planner_part())
    if args.json:
        with open(args.json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
