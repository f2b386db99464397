#!/usr/bin/env python3
"""Evaluate exported models like the WIT paper: prompt sensitivity (POSIX), lm-eval benchmarks, and
generations for the judge-based benchmarks. Writes eval_results.json per model.

One model (an HF directory, e.g. --export-hf of a run):

    python tools/evaluate.py --model runs/wit/hf --output runs/wit --posix prompts.jsonl \\
        --tasks mmlu,bbh,ifeval --alpaca-eval alpaca_eval.json --mt-bench question.jsonl

Every cell of a sweep (slurm/sweep_weights.sh; each cell's model in <cell>/hf), one after the other:

    python tools/evaluate.py --sweep runs/sweep --posix prompts.jsonl --tasks mmlu

On the GPUs of a node, data parallel (POSIX and generations sharded over the ranks; lm-eval's HF backend
shards its documents itself):

    torchrun --standalone --nproc_per_node 8 tools/evaluate.py --model … --output … --posix …

--posix FILE: prompt sets ({"variants": [...]} per line) or single prompts ({"prompt": …} / {"instruction": …,
"input": …}), whose variants are generated (--posix-kinds spelling,template; --make-variants OUT writes
them and exits). POSIX follows the paper: ψ = 1/(N(N−1)) Σ_i Σ_{j≠i} |log P(y_j|x_i) − log P(y_j|x_j)| / L(y_j),
mean over sets (lower = more robust); eval_results.json also carries posix_max_new_tokens, the same
matrices divided by max_new_tokens as the reference implementation (prompt-sensitivity-index) does.

Exit status: 0 all done, 1 some part failed (recorded under "errors" in eval_results.json; the rest ran),
2 bad options or inputs (nothing run).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _kv(value: str) -> dict:
    out = {}
    for item in _csv(value):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="an exported HF directory")
    what.add_argument("--sweep", help="a sweep directory: evaluate every cell's <cell>/hf into <cell>/")
    p.add_argument("--output", help="directory for eval_results.json (and generations); with --model")
    p.add_argument("--overwrite", action="store_true", help="--sweep: evaluate cells that already have results")
    p.add_argument("--tokenizer", help="tokenizer (default: the model's: tokenizer.model when it has no "
                                       "tokenizer.json, else the directory)")
    p.add_argument("--template", default=None,
                   help="the packer's template the model was trained with (plain, alpaca, chatml, llama3, tulu, "
                        "hf); default: the one its export recorded (witscale.json), else plain. A different one "
                        "is used with a warning")
    p.add_argument("--system", help="a system message before every prompt")

    g = p.add_argument_group("POSIX (prompt sensitivity)")
    g.add_argument("--posix", metavar="FILE", help="prompt sets or single prompts (JSONL)")
    g.add_argument("--posix-kinds", type=_csv, default=["spelling", "template"],
                   help="variants generated from single prompts: spelling,template (default both)")
    g.add_argument("--posix-seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=64, help="greedy response length bound (default 64)")
    g.add_argument("--make-variants", metavar="OUT", help="write the prompt sets of --posix to OUT and exit")

    g = p.add_argument_group("benchmarks (lm-evaluation-harness)")
    g.add_argument("--tasks", type=_csv, default=[], help="lm-eval task names, e.g. mmlu,bbh,ifeval")
    g.add_argument("--include-path", help="a directory of task YAMLs (local tasks)")
    g.add_argument("--preset", default="paper", help="paper (zero-shot, no chain of thought; bbh → bbh_zeroshot) "
                                                      "or none (lm-eval's task defaults)")
    g.add_argument("--num-fewshot", type=int, help="override the preset's number of shots")
    g.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                   help="auto: vLLM on a GPU when installed (one process), else lm-eval's HF backend")
    g.add_argument("--lm-eval-batch-size", help="lm-eval's batch size (default: auto on a GPU, 8 on the CPU)")
    g.add_argument("--task-metric", type=_kv, default={}, help="TASK=METRIC[,FILTER] for a task's score")
    g.add_argument("--lm-eval-args", type=_kv, default={}, help="more model_args for lm-eval, KEY=VALUE,…")

    g = p.add_argument_group("generations for judge-based benchmarks")
    g.add_argument("--alpaca-eval", metavar="FILE", help="AlpacaEval's evaluation set (JSON/JSONL of instructions)")
    g.add_argument("--mt-bench", metavar="FILE", help="MT-Bench's question.jsonl (FastChat)")
    g.add_argument("--judge-max-new-tokens", type=int, default=1024)
    g.add_argument("--model-id", help="name in the judge files (default: the cell's or model directory's name)")

    g = p.add_argument_group("execution")
    g.add_argument("--limit", type=int, help="only the first N prompt sets / prompts / documents per task")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    g.add_argument("--max-tokens", type=int, default=8192, help="tokens per packed scoring forward")
    g.add_argument("--device", default="auto", help="auto (this rank's GPU, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32, fp64")
    g.add_argument("--attention", default="auto", help="witscale attention backend for scoring")
    g.add_argument("--no-progress", action="store_true")
    return p


def sweep_cells(sweep_dir: str) -> list[str]:
    """Cell directories of a sweep, in the order of cells.txt when there is one."""
    names = []
    listed = os.path.join(sweep_dir, "cells.txt")
    if os.path.exists(listed):
        from witscale.evaluation.sweep import cell_dir_name
        with open(listed, encoding="utf-8") as f:
            for line in f:
                if line.split():
                    p, r = line.split()[:2]
                    names.append(cell_dir_name(p, r))
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name)
        if name not in names and os.path.isdir(path) and os.path.exists(os.path.join(path, "cell.json")):
            names.append(name)
    return [os.path.join(sweep_dir, n) for n in names]


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[witscale-eval] %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "lm_eval", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from witscale.evaluation.run import EvalOptions, InputError
    from witscale.evaluation.variants import KINDS, read_prompt_sets, write_prompt_sets

    if args.make_variants:
        if not args.posix:
            print("error: --make-variants needs --posix FILE", file=sys.stderr)
            return 2
        try:
            sets = read_prompt_sets(args.posix, args.posix_kinds, args.posix_seed)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        write_prompt_sets(sets, args.make_variants)
        print(f"{len(sets)} prompt sets ({sum(len(s.variants) for s in sets)} variants) written to {args.make_variants}")
        return 0
    bad = [k for k in args.posix_kinds if k not in KINDS]
    if bad:
        print(f"error: --posix-kinds {bad[0]}: choose from {', '.join(KINDS)}", file=sys.stderr)
        return 2

    common = dict(tokenizer=args.tokenizer, template=args.template, system=args.system, posix=args.posix,
                  posix_kinds=args.posix_kinds, posix_seed=args.posix_seed, max_new_tokens=args.max_new_tokens,
                  tasks=args.tasks, include_path=args.include_path, preset=args.preset, num_fewshot=args.num_fewshot,
                  backend=args.backend, lm_eval_batch_size=args.lm_eval_batch_size, task_metrics=args.task_metric,
                  lm_eval_model_args=args.lm_eval_args, alpaca_eval=args.alpaca_eval, mt_bench=args.mt_bench,
                  judge_max_new_tokens=args.judge_max_new_tokens, model_id=args.model_id, limit=args.limit,
                  batch_size=args.batch_size, max_tokens=args.max_tokens, device=args.device, dtype=args.dtype,
                  attention=args.attention, progress=not args.no_progress)
    if args.model:
        if not args.output:
            print("error: --model needs --output DIR", file=sys.stderr)
            return 2
        jobs = [EvalOptions(model_dir=args.model, output_dir=args.output, **common)]
    else:
        if args.output:
            print("error: --output goes with --model; a sweep writes into each cell", file=sys.stderr)
            return 2
        if not os.path.isdir(args.sweep):
            print(f"error: --sweep {args.sweep}: no such directory", file=sys.stderr)
            return 2
        jobs = []
        for cell in sweep_cells(args.sweep):
            done = os.path.exists(os.path.join(cell, "eval_results.json"))
            if not os.path.isdir(os.path.join(cell, "hf")):
                print(f"[witscale-eval] {os.path.basename(cell)}: no exported model (hf/): skipped")
            elif done and not args.overwrite:
                print(f"[witscale-eval] {os.path.basename(cell)}: has eval_results.json: skipped (--overwrite)")
            else:
                jobs.append(EvalOptions(model_dir=os.path.join(cell, "hf"), output_dir=cell, **common))
        if not jobs:
            print("[witscale-eval] nothing to evaluate")
            return 0

    from witscale.data.template_jinja import resolve_eval_template
    for opts in jobs:               # each model with the template it was trained with, unless told otherwise
        opts.template, warning = resolve_eval_template(opts.model_dir, args.template)
        if warning and os.environ.get("RANK", "0") == "0":
            print(warning, file=sys.stderr)

    from witscale.evaluation.parallel import DataParallel
    from witscale.training.distributed import fail_fast
    dp = DataParallel()
    try:
        status = run_jobs(jobs, dp)
    except InputError as e:     # found alike by every rank (the inputs are checked before any collective)
        if dp.world == 1:
            print(f"error: {e}", file=sys.stderr)
            return 2
        fail_fast(2, f"error: {e}" if dp.is_main else "")
    except BaseException:       # noqa: BLE001 - never wait in the closing barrier for a peer that may not reach it
        if dp.world == 1:
            raise
        fail_fast()
    dp.close()                  # every rank got here: the barrier, then the groups go (witscale.parallel.topology.teardown)
    return status


def run_jobs(jobs, dp) -> int:
    """Evaluate each job on every rank; the exit status (1: a part failed; bad input raises ``InputError``)."""
    from witscale.evaluation.run import evaluate
    status = 0
    for opts in jobs:
        errors = evaluate(opts, dp)
        if dp.is_main:
            path = os.path.join(opts.output_dir, "eval_results.json")
            print(summary_line(path))
            for part, msg in errors.items():
                print(f"[witscale-eval] FAILED {part}: {msg}", file=sys.stderr)
        status = max(status, 1 if errors else 0)
    return status


def summary_line(path: str) -> str:
    from witscale.evaluation.results import read_results
    res = read_results(path) or {}
    parts = []
    for name, m in (res.get("metrics") or {}).items():
        parts.append(f"{name} {m['value']:.4f}")
    for name, g in (res.get("generations") or {}).items():
        parts.append(f"{name}: {g['count']} outputs")
    return f"[witscale-eval] {path}: " + ("; ".join(parts) or "no results")


if __name__ == "__main__":
    sys.exit(main())
