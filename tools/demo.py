#!/usr/bin/env python3
"""The end-to-end CPU demo (the README's main command, `make demo`).

From nothing: generate a small instruction dataset (templated tasks with varied prompt wordings), train a
SentencePiece tokenizer on it, pack train and eval splits, train a tiny Llama with 2 ranks under ZeRO-3
(torchrun, gloo) with the paper's weighted loss, evaluate, export an HF directory, and print where the
TensorBoard logs and the exported model are. A few minutes on a 2-core machine.
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
    args = p.parse_args(argv)

    from witscale.data.synthetic import generate_instruction_records, train_sentencepiece

    t0 = time.time()
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
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
    print(f"[demo] done in {time.time() - t0:.0f} s")
    if not last < first:
        print("[demo] error: the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
