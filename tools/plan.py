#!/usr/bin/env python3
"""Memory planner: per-GPU memory of a model under each parallel layout, and which layouts fit.

    python tools/plan.py --model 70B --gpus 64 --gpu-mem 80 --seq-len 4096 --micro-batch 1
    python tools/plan.py --model path/to/config.json --tp 8 --pp 4 --dp 2 --zero 1
    python tools/plan.py --model 70B --gpus 64 --seq-len 262144 --auto      # the cheapest layout that fits
    python tools/plan.py --model 8B --gpus 8 --longest                      # the longest row that fits

The assumptions behind the numbers are in witscale/planner.py (printed with --assumptions).
"""
import argparse
import json
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from witscale import planner  # noqa: E402
from witscale.parallel.topology import LayoutError, ParallelDims  # noqa: E402


def load_shape(spec: str) -> planner.ModelShape:
    if spec.upper() in planner.NAMED_SIZES:
        return planner.ModelShape.from_config(planner.NAMED_SIZES[spec.upper()])
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.exists(path):
        sys.exit(f"error: --model {spec}: neither a named size ({', '.join(planner.NAMED_SIZES)}) nor a config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return planner.ModelShape.from_config(json.load(f))
    except (ValueError, OSError) as e:       # an unknown model_type names the supported families; bad JSON
        sys.exit(f"error: --model {path}: {e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="named size (7B, 8B, 13B, 70B), config.json or HF dir")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job (all layouts are listed)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--tp", type=int, help="with --pp/--dp/--zero: one layout only")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int)
    p.add_argument("--zero", type=int, default=3)
    p.add_argument("--sp", type=int, default=1, help="with --tp: sequence-parallel size (each rank 1/sp of a row)")
    p.add_argument("--assumptions", action="store_true", help="print the estimate's assumptions")
    p.add_argument("--activation-checkpointing", choices=planner.CHECKPOINTING, default="on",
                   help="recompute each block in backward; offload: its checkpointed inputs in pinned host memory "
                        "(the trainer's auto turns it on where needed)")
    p.add_argument("--tp-sequence-parallel", choices=("on", "off"), default="off",
                   help="Megatron sequence parallelism inside TP (norms, residuals, checkpoints sharded by tp)")
    p.add_argument("--tiled-mlp", type=int, default=1, metavar="N", help="the MLP over N sequence tiles (1: off)")
    p.add_argument("--host-mem", type=float, default=1024.0,
                   help="GiB of pinned host memory per node for offloaded checkpoints (--auto, --longest)")
    p.add_argument("--auto", action="store_true",
                   help="every layout and memory feature (sp, Megatron SP, checkpointing off/on/offload, tiled "
                        "MLP): the fitting ones, cheapest first (witscale/planner.py layout_cost)")
    p.add_argument("--longest", action="store_true", help="the longest row (multiple of 8192) that a layout fits")
    p.add_argument("--top", type=int, default=10, help="with --auto: how many fitting layouts to list")
    args = p.parse_args(argv)
    if args.assumptions:
        print(planner.__doc__)
    shape = load_shape(args.model)
    if args.seq_len < 1 or args.micro_batch < 1 or args.tiled_mlp < 1:
        p.error("--seq-len, --micro-batch and --tiled-mlp must be >= 1")
    fit = dict(gpus_per_node=args.gpus_per_node, gpu_gib=args.gpu_mem, host_gib_per_node=args.host_mem)
    if args.longest:
        rows, choice = planner.longest_row(shape, args.gpus, **fit)
        print(f"model {args.model} on {args.gpus} × {args.gpu_mem:g} GiB ({args.host_mem:g} GiB host per node): "
              f"the longest row that fits is {rows} tokens ({rows / 2 ** 20:.2f} Mi)")
        if choice is not None:
            _table([choice.estimate], args, rows)
        return 0
    if args.auto:
        choices = planner.fitting_layouts(shape, args.gpus, seq_len=args.seq_len, micro_batch=args.micro_batch,
                                          **fit)
        _header(shape, args, "all memory features searched")
        if not choices:
            print(f"auto: no layout fits {args.gpus} × {args.gpu_mem:g} GiB at seq-len {args.seq_len}")
            return 1
        print(f"auto: {choices[0].estimate.layout.name()}  (cheapest of {len(choices)} that fit in 90% of the GPU; "
              "cheapest = least recompute, then no tiling, then fewest bytes sent per GPU)")
        _table([c.estimate for c in choices[:args.top]], args, args.seq_len)
        return 0
    features = dict(tp_sp=args.tp_sequence_parallel == "on", tiled_mlp=args.tiled_mlp)
    if args.tp:
        dp = args.dp or max(1, args.gpus // (args.tp * args.pp * args.sp))
        layouts = [planner.Layout(args.tp, args.pp, dp, args.zero, args.sp, **features)]
        try:       # the layout rules the trainer applies, with this job's node size
            ParallelDims(layouts[0].world, args.tp, args.pp, args.zero, shape, sp=args.sp,
                         gpus_per_node=args.gpus_per_node)
        except LayoutError as e:
            print(f"tools/plan.py: {e}", file=sys.stderr)
            return 2
    else:
        layouts = [replace(x, **features) for x in planner.valid_layouts(shape, args.gpus, args.gpus_per_node)]
    _header(shape, args, f"activation checkpointing {args.activation_checkpointing}")
    _table([planner.estimate(shape, x, seq_len=args.seq_len, micro_batch=args.micro_batch,
                             activation_checkpointing=args.activation_checkpointing) for x in layouts],
           args, args.seq_len)
    return 0


def _header(shape, args, what: str) -> None:
    print(f"model {args.model}: {shape.total_params() / 1e9:.2f} B parameters; seq-len {args.seq_len}, "
          f"micro-batch {args.micro_batch}; {args.gpu_mem:g} GiB per GPU; {what}")


def _table(estimates, args, seq_len: int) -> None:
    """One line per layout, GiB per GPU; with offloaded checkpoints, the pinned host memory per node too."""
    host = any(e.host_gib for e in estimates)
    width = max([24] + [len(e.layout.name()) + 2 for e in estimates])
    print(f"{'layout':<{width}}{'params':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'other':>8}{'total':>9}"
          + (f"{'host/node':>11}" if host else "") + "  fits")
    for e in estimates:
        fits = "yes" if e.total_gib <= args.gpu_mem else "no"
        per_node = e.host_gib * min(args.gpus_per_node, e.layout.world)
        if host and per_node > args.host_mem:
            fits = "no (host)"
        print(f"{e.layout.name():<{width}}{e.param_gib:>9.1f}{e.grad_gib:>9.1f}{e.optim_gib:>9.1f}"
              f"{e.activation_gib:>9.1f}{e.overhead_gib:>8.1f}{e.total_gib:>9.1f}"
              + (f"{per_node:>11.1f}" if host else "") + f"  {fits}")


if __name__ == "__main__":
    sys.exit(main())
