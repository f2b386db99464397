#!/usr/bin/env python3
"""Memory planner: per-GPU memory of a model under each parallel layout, and which layouts fit.

    python tools/plan.py --model 70B --gpus 64 --gpu-mem 80 --seq-len 4096 --micro-batch 1
    python tools/plan.py --model path/to/config.json --tp 8 --pp 4 --dp 2 --zero 1

The assumptions behind the numbers are in witscale/planner.py (printed with --assumptions).
"""
import argparse
import json
import os
import sys

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
    p.add_argument("--activation-checkpointing", choices=("on", "off"), default="on",
                   help="recompute each block in backward (the trainer's auto turns it on where needed)")
    args = p.parse_args(argv)
    if args.assumptions:
        print(planner.__doc__)
    shape = load_shape(args.model)
    if args.tp:
        dp = args.dp or max(1, args.gpus // (args.tp * args.pp * args.sp))
        layouts = [planner.Layout(args.tp, args.pp, dp, args.zero, args.sp)]
        try:       # the layout rules the trainer applies, with this job's node size
            ParallelDims(layouts[0].world, args.tp, args.pp, args.zero, shape, sp=args.sp,
                         gpus_per_node=args.gpus_per_node)
        except LayoutError as e:
            print(f"tools/plan.py: {e}", file=sys.stderr)
            return 2
    else:
        layouts = planner.valid_layouts(shape, args.gpus, args.gpus_per_node)
    print(f"model {args.model}: {shape.total_params() / 1e9:.2f} B parameters; seq-len {args.seq_len}, "
          f"micro-batch {args.micro_batch}; {args.gpu_mem:g} GiB per GPU; activation checkpointing "
          f"{args.activation_checkpointing}")
    print(f"{'layout':<24}{'params':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'other':>8}{'total':>9}  fits")
    for layout in layouts:
        e = planner.estimate(shape, layout, seq_len=args.seq_len, micro_batch=args.micro_batch,
                             activation_checkpointing=args.activation_checkpointing == "on")
        fits = "yes" if e.total_gib <= args.gpu_mem else "no"
        print(f"{layout.name():<24}{e.param_gib:>9.1f}{e.grad_gib:>9.1f}{e.optim_gib:>9.1f}"
              f"{e.activation_gib:>9.1f}{e.overhead_gib:>8.1f}{e.total_gib:>9.1f}  {fits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
