#!/usr/bin/env python3
"""The end-to-end CPU demo (the README's main command, `make demo`).

From nothing: generate a small instruction dataset (templated tasks with varied prompt wordings), train a
SentencePiece tokenizer on it, pack train and eval splits, train a tiny Llama with 2 ranks under ZeRO-3
(torchrun, gloo) with the paper's weighted loss, evaluate, export an HF directory, then evaluate the
exported model as the paper does (tools/evaluate.py): POSIX prompt sensitivity on held-out prompts and, with
lm-eval installed, a local multiple-choice task (the made-up capitals of the data), and print where the
TensorBoard logs, the exported model and the evaluation report are. A few minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sh(cmd: list[str], env=None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


DEMO_MARKER = "witscale_demo.json"     # says --out is a demo's own directory (and may be replaced by the next demo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "demo_out"), help="everything is written here")
    p.add_argument("--records", type=int, default=3000)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--prompt-weight", type=float, default=0.2)
    p.add_argument("--response-weight", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--eval-prompts", type=int, default=8,
                   help="held-out prompts for POSIX (each gives a spelling and a template set); 0: no evaluation")
    p.add_argument("--eval-max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)

    from witscale.data.synthetic import generate_instruction_records, train_sentencepiece

    t0 = time.time()
    out = os.path.abspath(args.out)
    # An earlier demo's directory (its marker) or an empty one is replaced; anything else is refused, never
    # deleted (witscale/data/output_dir.py).
    from witscale.data.output_dir import OutputError, OutputKind, check_target
    demo_kind = OutputKind("witscale demo directory", "witscale-demo", DEMO_MARKER,
                           lambda d: os.path.isfile(os.path.join(d, DEMO_MARKER)))
    try:
        out = check_target(args.out, demo_kind)
    except OutputError as e:
        print(f"error: --out {e}", file=sys.stderr)
        return 2
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(out, DEMO_MARKER), "w", encoding="utf-8") as f:
        f.write("{}\n")
    py = sys.executable

    # 1. Data: train and eval splits of templated instruction tasks.
    records = generate_instruction_records(args.records, seed=0)
    n_eval = max(50, len(records) // 20)
    for name, part in (("train", records[n_eval:]), ("eval", records[:n_eval])):
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    texts = [" ".join(str(v) for v in r.values() if isinstance(v, str)) for r in records]
    tokenizer = train_sentencepiece(texts, os.path.join(out, "tokenizer"), vocab_size=1024)
    print(f"[demo] {len(records) - n_eval} train / {n_eval} eval records; tokenizer {tokenizer}")

    # 2. Pack once; every (λp, λr) reuses it.
    for name in ("train", "eval"):
        sh([py, "tools/pack_dataset.py", "--input", os.path.join(out, f"{name}.jsonl"), "--tokenizer", tokenizer,
            "--seq-len", str(args.seq_len), "--template", "plain", "--output", os.path.join(out, f"packed_{name}")])

    # 3. A tiny Llama, trained with 2 ranks under ZeRO-3.
    import sentencepiece as spm
    vocab = spm.SentencePieceProcessor(model_file=tokenizer).get_piece_size()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": args.hidden, "intermediate_size": args.hidden * 3, "num_hidden_layers": args.layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": args.seq_len,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2}
    config_path = os.path.join(out, "tiny_llama.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    run_dir = os.path.join(out, "run")
    export_dir = os.path.join(out, "exported_hf")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore::FutureWarning")
    sh([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "witscale/train.py",
        "--ds_config", "ds_configs/zero3.json", "--data", os.path.join(out, "packed_train"),
        "--eval-data", os.path.join(out, "packed_eval"), "--model-config", config_path, "--output-dir", run_dir,
        "--prompt-weight", str(args.prompt_weight), "--response-weight", str(args.response_weight),
        "--micro-batch-size", "2", "--grad-accum", "2", "--lr", "3e-3", "--warmup-ratio", "0.05",
        "--weight-decay", "0.0", "--max-steps", str(args.steps), "--eval-steps", str(max(1, args.steps // 4)),
        "--save-steps", str(max(1, args.steps // 2)), "--log-every", "10", "--export-hf", export_dir,
        "--tokenizer", tokenizer], env=env)

    # 4. What happened.
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    k = max(1, len(train) // 10)
    first = sum(r["loss"] for r in train[:k]) / k
    last = sum(r["loss"] for r in train[-k:]) / k
    print(f"\n[demo] weighted loss (λp={args.prompt_weight}, λr={args.response_weight}, paper normalization): "
          f"{first:.3f} over the first {k} steps → {last:.3f} over the last {k}")
    print(f"[demo] response NLL {train[0]['response_nll']:.3f} → {train[-1]['response_nll']:.3f}; "
          f"prompt NLL {train[0]['prompt_nll']:.3f} → {train[-1]['prompt_nll']:.3f}")
    if evals:
        print(f"[demo] eval: loss {evals[0]['eval_loss']:.3f} → {evals[-1]['eval_loss']:.3f}; response NLL "
              f"{evals[0]['eval_response_nll']:.3f} → {evals[-1]['eval_response_nll']:.3f}")
    print(f"[demo] TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
    print(f"[demo] checkpoints: {os.path.join(run_dir, 'checkpoints')} (resume with --resume auto)")
    print(f"[demo] exported HF model: {export_dir} "
          f"(transformers.AutoModelForCausalLM.from_pretrained('{export_dir}'))")
    if not last < first:
        print("[demo] error: the loss did not fall", file=sys.stderr)
        return 1

    # 5. Evaluate the exported model like the paper: POSIX and a benchmark (a local lm-eval task).
    if args.eval_prompts > 0:
        rc = evaluate_exported(out, export_dir, records[:n_eval], records[n_eval:], args, env)
        if rc:
            return rc
    print(f"[demo] done in {time.time() - t0:.0f} s")
    return 0


def capital_docs(records) -> list[dict]:
    """A multiple-choice task from the data's own capital questions: every capital seen is a choice, the
    answer is the response the model was trained to give (one document per country)."""
    import re

    capitals = {}
    for r in records:
        m = re.fullmatch(r"The capital of (\w+) is (\w+)\.", r.get("output", ""))
        if m:
            capitals[m.group(1)] = m.group(2)
    names = sorted(capitals)
    return [{"question": f"What is the capital of {c}?",
             "choices": [f"The capital of {c} is {capitals[x]}." for x in names], "answer": names.index(c)}
            for c in names]


def evaluate_exported(out, export_dir, eval_records, train_records, args, env) -> int:
    from witscale.evaluation import harness
    from witscale.evaluation.local_task import write_multiple_choice_task
    from witscale.evaluation.results import read_results

    t0 = time.time()
    seen, prompts = set(), []
    for r in eval_records:                      # held-out prompts, one per distinct instruction
        key = (r["instruction"], r.get("input", ""))
        if key not in seen:
            seen.add(key)
            prompts.append({"instruction": r["instruction"], "input": r.get("input", "")})
        if len(prompts) == args.eval_prompts:
            break
    prompts_path = os.path.join(out, "posix_prompts.jsonl")
    with open(prompts_path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    eval_dir = os.path.join(out, "eval")
    cmd = [sys.executable, "tools/evaluate.py", "--model", export_dir, "--output", eval_dir, "--posix", prompts_path,
           "--max-new-tokens", str(args.eval_max_new_tokens), "--no-progress"]
    if harness.available() is not None:
        tasks = write_multiple_choice_task(os.path.join(out, "eval_tasks"), "witscale_capitals",
                                           capital_docs(train_records))
        cmd += ["--tasks", "witscale_capitals", "--include-path", tasks]
    else:
        print("[demo] lm-eval is not installed (pip install 'witscale[eval]'): POSIX only, no benchmark")
    sh(cmd, env=env)
    res = read_results(eval_dir) or {}
    p = res.get("posix", {})
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in sorted(p.get("posix_by_kind", {}).items()))
    print(f"\n[demo] POSIX (prompt sensitivity, lower = more robust; paper's ψ normalized by response length): "
          f"{p['posix']:.3f} over {p['num_sets']} prompt sets ({kinds}); "
          f"normalized by max_new_tokens as the reference implementation: {p['posix_max_new_tokens']:.3f}")
    example = p["sets"][0]
    print(f"[demo]   e.g. {example['variants'][0]!r} → {example['responses'][0]!r}; "
          f"{example['variants'][-1]!r} → {example['responses'][-1]!r}")
    task = (res.get("tasks") or {}).get("witscale_capitals")
    if task:
        n = len(capital_docs(train_records))
        print(f"[demo] benchmark witscale_capitals (lm-eval, zero-shot, {n}-way multiple choice): "
              f"{task['metric'].split(',')[0]} {task['score']:.3f} (chance {1 / max(1, n):.3f})")
    print(f"[demo] evaluation report: {os.path.join(eval_dir, 'eval_results.json')} "
          f"({time.time() - t0:.0f} s; a sweep's report: tools/collect_sweep.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
