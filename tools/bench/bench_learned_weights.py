#!/usr/bin/env python3
"""--learn-weights on the CPU: its overhead, and where the learned λ ends against a grid of fixed λ.

    python tools/bench/bench_learned_weights.py                               # generated corpus, own tokenizer
    python tools/bench/bench_learned_weights.py --input ../shared/data/alpaca_en_demo.json \
        --tokenizer ../shared/data/llama2_tokenizer.model --steps 60

Packs the records (plain template) into a train and a held-out eval set, then runs ``witscale/train.py`` (one
process, ZeRO-0, a small random-init Llama) several times on them:
1. overhead: the same run without and with --learn-weights (--weights-every K): tokens/s over whole
   K-step cycles after the first, their ratio, and the formula's prediction (docs/objective.md#learned-weights);
2. quality: a 3 × 3 grid of fixed (λp, λr) and one --learn-weights run from λp = --start-lp; the held-out
   response NLL at the end (``eval_response_nll``) of each, and the learned run's rank among the cells.
Reports what it measures, whatever it shows (a markdown table on stdout; --out writes it to a file too).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def prepare(args, tmp: str) -> dict:
    from witscale.data.pack import PackOptions, pack_records
    from witscale.data.tokenizer import load_tokenizer

    if args.input:
        from witscale.data.readers import read_records
        _, records = read_records(args.input, "auto")
        records = [r.record for r in records]
        tokenizer = args.tokenizer
    else:
        from witscale.data.synthetic import generate_instruction_records, train_sentencepiece
        records = generate_instruction_records(600, seed=0)
        texts = [" ".join(str(v) for v in r.values() if isinstance(v, str)) for r in records]
        tokenizer = train_sentencepiece(texts, tmp, vocab_size=1000)
    held_out = max(8, len(records) // 10)
    opts = PackOptions(seq_len=args.seq_len, template="plain")
    pack_records(records[:-held_out], tokenizer, os.path.join(tmp, "train"), opts)
    pack_records(records[-held_out:], tokenizer, os.path.join(tmp, "eval"), opts)
    tok = load_tokenizer(tokenizer)
    config = {"model_type": "llama", "vocab_size": tok.vocab_size, "hidden_size": args.hidden,
              "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": args.seq_len, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    with open(os.path.join(tmp, "model.json"), "w") as f:
        json.dump(config, f)
    return {"train": os.path.join(tmp, "train"), "eval": os.path.join(tmp, "eval"),
            "config": os.path.join(tmp, "model.json")}


def run(args, inputs, out: str, *extra) -> list[dict]:
    cmd = [sys.executable, os.path.join(ROOT, "witscale/train.py"), "--ds_config", "ds_configs/zero0.json",
           "--data", inputs["train"], "--eval-data", inputs["eval"], "--model-config", inputs["config"],
           "--output-dir", out, "--micro-batch-size", str(args.micro_batch), "--grad-accum", str(args.grad_accum),
           "--lr", str(args.lr), "--max-steps", str(args.steps), "--seed", "0", "--no-tensorboard", *extra]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(extra)}: exit {res.returncode}\n{res.stderr[-2000:]}")
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def tokens_per_s(records, every: int) -> float:
    """Σ tokens / Σ step time over whole K-step cycles after the first (each cycle holds one measuring step;
    a step's time includes the hypergradient's passes: witscale/training/trainer.py)."""
    steps = [r for r in records if "loss" in r]
    cycles = (len(steps) - every) // every
    if cycles < 1:
        raise SystemExit(f"--steps must be at least 2 × --every ({2 * every})")
    window = [r for r in steps if every < r["step"] <= every + cycles * every]
    return sum(r["tokens"] for r in window) / sum(r["tokens"] / r["tokens_per_s"] for r in window)


def step_cost(records, every: int) -> tuple[float, float]:
    """Within the learned run (robust to load that differs between runs): the median time of a measuring step
    (steps 1 + nK, n ≥ 1) and of the other steps after the first."""
    import statistics
    times = {r["step"]: r["tokens"] / r["tokens_per_s"] for r in records if "loss" in r}
    measuring = [t for s, t in times.items() if s > 1 and (s - 1) % every == 0]
    other = [t for s, t in times.items() if s > 1 and (s - 1) % every]
    return statistics.median(measuring), statistics.median(other)


def final_eval(records, key="eval_response_nll") -> float:
    return [r[key] for r in records if key in r][-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="instruction records (alpaca JSON …); default: a generated corpus")
    p.add_argument("--tokenizer", help="tokenizer for --input")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="--weights-every K")
    p.add_argument("--weights-lr", type=float, default=0.3)
    p.add_argument("--start-lp", type=float, default=0.1, help="the learned run's starting λp")
    p.add_argument("--grid", default="0,0.3,1", help="λp values of the grid (λr: 0.3,0.65,1 × … see --grid-r)")
    p.add_argument("--grid-r", default="0.3,0.65,1")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-grid", action="store_true", help="measure the overhead only")
    p.add_argument("--out", help="also write the report here")
    args = p.parse_args(argv)
    if args.input and not args.tokenizer:
        p.error("--input needs --tokenizer")

    tmp = tempfile.mkdtemp(prefix="bench-learned-")
    inputs = prepare(args, tmp)
    learn = ["--learn-weights", "--weights-every", str(args.every), "--weights-lr", str(args.weights_lr)]
    base = run(args, inputs, os.path.join(tmp, "off"), "--prompt-weight", str(args.start_lp))
    learned = run(args, inputs, os.path.join(tmp, "learned"), "--prompt-weight", str(args.start_lp), *learn)
    t_off, t_on = tokens_per_s(base, args.every), tokens_per_s(learned, args.every)
    predicted = (1 + 1) / (args.every * args.grad_accum)       # one learned group, b_val = b
    measure, other = step_cost(learned, args.every)
    lines = ["## --learn-weights: overhead", "",
             f"{args.steps} steps, micro-batch {args.micro_batch} × grad-accum {args.grad_accum}, K = {args.every}, "
             f"hidden {args.hidden}, {args.layers} layers, seq {args.seq_len}, CPU {args.threads} thread(s)", "",
             f"| run | tokens/s (steps {args.every + 1}.., whole cycles of K) |", "|---|---|",
             f"| fixed λp = {args.start_lp:g} | {t_off:.0f} |", f"| --learn-weights | {t_on:.0f} |", "",
             f"overhead: {100 * (t_off / t_on - 1):.1f}% (formula: {100 * predicted:.0f}% of the step's "
             "forward+backward, less of the whole step)", "",
             f"within the learned run: a measuring step takes {measure:.3f} s (median), another step {other:.3f} s: "
             f"+{measure / other - 1:.2f} steps per K = {args.every} → overhead "
             f"{100 * (measure / other - 1) / args.every:.1f}%",
             "",
             f"learned λp per step: {[round(r['lambda_prompt_side'], 4) for r in learned if 'loss' in r]}", ""]
    if not args.skip_grid:
        cells = {}
        for lp in map(float, args.grid.split(",")):
            for lr_ in map(float, args.grid_r.split(",")):
                rec = run(args, inputs, os.path.join(tmp, f"cell_{lp:g}_{lr_:g}"), "--prompt-weight", str(lp),
                          "--response-weight", str(lr_))
                cells[(lp, lr_)] = final_eval(rec)
        mine = final_eval(learned)
        rank = 1 + sum(v < mine for v in cells.values())
        lines += ["## held-out response NLL at the end (lower is better)", "",
                  "| λp \\ λr | " + " | ".join(args.grid_r.split(",")) + " |",
                  "|---|" + "---|" * len(args.grid_r.split(","))]
        for lp in map(float, args.grid.split(",")):
            lines.append(f"| {lp:g} | " + " | ".join(f"{cells[(lp, float(r))]:.4f}" for r in args.grid_r.split(","))
                         + " |")
        final_lp = [r["lambda_prompt_side"] for r in learned if "loss" in r][-1]
        lines += ["", f"learned run (λp {args.start_lp:g} → {final_lp:.4f}, λr 1): {mine:.4f}, rank {rank} of "
                      f"{len(cells) + 1} (1 = best)", ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
