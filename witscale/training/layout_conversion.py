"""The universal-checkpoint conversion of a resume at another layout, as a step of its own before training.

    python -m witscale.training.layout_conversion --output-dir OUT --resume auto --world 64 --tp 8 --pp 1 \
        --sp 1 --ds_config ds_configs/zero3.json

A run resumed at another data-parallel size, sp or tp loads DeepSpeed's universal checkpoint of the tag
(``checkpoint.universal_tag``). Making it reads and writes the whole optimizer state — 30–90 minutes of I/O at 70B —
so the Slurm templates run this first, as its own job step on one node (slurm/common.sh ``wit_convert_layout``):
no rank of the training step exists yet, so none waits on it in a collective or against a timeout. It decides as
the trainer will (the checkpoint ``--resume`` names, its recorded layout against the one given here, ZeRO ≥ 1) and
converts only when the resume needs it and ``<tag>/universal`` is not there yet. The output is written aside and
renamed into place (``checkpoint.convert_to_universal``): a conversion interrupted midway leaves the checkpoint as
it was, and the next start removes the partial output and converts again. Exit status 0: converted or nothing to
do; 2: a refusal, in one line (the training step then says the same, or falls back to an older checkpoint).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("witscale")


def conversion_needed(output_dir: str, resume: str, layout: dict, zero_stage: int):
    """(root, tag) whose universal checkpoint this resume needs and does not have yet, else None."""
    from witscale.training import checkpoint

    found = checkpoint.resolve_resume(resume, os.path.join(output_dir, "checkpoints"))
    if found is None:
        return None
    where = os.path.join(*found)
    try:
        state = checkpoint.read_state(*found)
    except (OSError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{os.path.join(where, checkpoint.STATE_FILE)}: {e}") from None
    if zero_stage == 0 or not checkpoint.layout_change(state, layout, where=where, zero_stage=zero_stage):
        return None
    if os.path.isdir(os.path.join(where, checkpoint.UNIVERSAL)):
        return None
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="the run's directory (its checkpoints/ are read)")
    p.add_argument("--resume", default="auto", help="auto (checkpoints/latest) or a checkpoint path, as for training")
    p.add_argument("--world", type=int, required=True, help="ranks of the training step")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sp", type=int, default=1, help="the training step's --sp (its ranks share rows, not data)")
    p.add_argument("--ds_config", "--ds-config", required=True, help="the training step's DeepSpeed config")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[witscale] %(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)

    from witscale.training.checkpoint import CheckpointError, convert_to_universal
    if args.tp < 1 or args.pp < 1 or args.sp < 1 or args.world % (args.tp * args.pp * args.sp):
        print(f"error: --world {args.world} is not a multiple of --tp {args.tp} × --pp {args.pp} × --sp {args.sp}",
              file=sys.stderr)
        return 2
    layout = {"dp": args.world // (args.tp * args.pp * args.sp), "tp": args.tp, "pp": args.pp,
              **({"sp": args.sp} if args.sp > 1 else {})}      # as the trainer records it
    try:
        with open(args.ds_config, encoding="utf-8") as f:
            zero_stage = int((json.load(f).get("zero_optimization") or {}).get("stage", 0))
        found = conversion_needed(args.output_dir, args.resume, layout, zero_stage)
        if found is None:
            log.info(f"layout conversion: nothing to do for --resume {args.resume} at "
                     + " ".join(f"{k}={v}" for k, v in layout.items()))
            return 0
        out = convert_to_universal(*found)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: layout conversion: {e}", file=sys.stderr)
        return 2
    log.info(f"layout conversion: {out} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
