#!/usr/bin/env python3
"""Consolidate a witscale checkpoint of any layout (ZeRO-0..3 × tp × pp) into an HF directory that transformers
loads, one tensor at a time (bf16 by default; --export-dtype fp32). No pickle is executed: DeepSpeed's files
are read with torch's weights_only loader (see witscale/training/export.py).

    python tools/export_hf.py runs/my-run/checkpoints OUT          # the checkpoint 'latest' names
    python tools/export_hf.py runs/my-run/checkpoints/step_00000500 OUT --tokenizer path/to/tokenizer

The run's model config is read from <run>/model_config.json (written when training starts). Tokenizer
files are copied from --tokenizer, or from the run's data (a tokenizer extended by pack_dataset.py
--add-special-tokens) or --model / --tokenizer flags when they are recorded.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoints directory (uses 'latest') or one step_* directory")
    p.add_argument("out", help="the HF directory to write; an earlier witscale export (or an empty directory) there is "
                               "replaced, anything else is refused")
    p.add_argument("--tokenizer", help="tokenizer directory or SentencePiece .model to copy")
    from witscale.training.config import RunConfig
    from witscale.training.flags import add_flags
    add_flags(p, RunConfig, ("export_dtype",), grouped=False,       # train.py's --export-dtype, declared once
              help={"export_dtype": "dtype of the exported weights (recorded in config.json as torch_dtype; "
                                    "default bf16)"})
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    args = p.parse_args(argv)
    from witscale.data.output_dir import OutputError, os_error_line, path_relation
    from witscale.training.checkpoint import CheckpointError, resolve_resume
    from witscale.training.export import export_checkpoint

    if not os.path.exists(args.checkpoint):
        print(f"error: {args.checkpoint}: no such checkpoint", file=sys.stderr)
        return 2
    tokenizer = args.tokenizer
    try:
        root, _ = resolve_resume(args.checkpoint, args.checkpoint)
        run_dir = os.path.dirname(os.path.abspath(root))
        if path_relation(args.out, root) or path_relation(args.out, run_dir) in ("equal", "contains"):
            raise OutputError(f"{args.out}: would replace the run {run_dir} or its checkpoints: choose another "
                              f"directory")
        if tokenizer is None:
            eff = os.path.join(os.path.dirname(os.path.abspath(root)), "effective_config.json")
            if os.path.exists(eff):
                run_args = json.load(open(eff, encoding="utf-8")).get("args", {})
                from witscale.data.loader import data_tokenizer_dir   # the data's, after --add-special-tokens
                tokenizer = (data_tokenizer_dir(run_args.get("data")) or run_args.get("tokenizer")
                             or run_args.get("model"))
        export_checkpoint(args.checkpoint, args.out, tokenizer, args.export_dtype, args.max_shard_size)
    except (CheckpointError, FileNotFoundError, ValueError) as e:     # OutputError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
