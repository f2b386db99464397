#!/usr/bin/env python3
"""DPO step throughput and memory: witscale (`witscale/train.py --objective dpo`: packed pairs, per-document
attention, the fused vocab-parallel loss, reference log-probs precomputed into the dataset) against TRL's
`DPOTrainer`, on the same tiny Llama, the same pairs (the very token ids witscale packed), the same number of
pairs per optimizer step, on the CPU, in one run.

    make bench-dpo-env                       # TRL into build/bench-dpo-trl (never into .venv; no CUDA torch)
    .venv/bin/python tools/bench/bench_dpo.py [--pairs 128] [--steps 4] [--repeats 2] [--json OUT]

Both sides run in their own subprocess (one thread each, fp32, AdamW, no clipping, lr 5e-7, β 0.1, sigmoid
loss) and are measured the same way:

- **pairs/s**: the pairs of the timed steps (all after the first ``--warmup`` ones) / their time: forward +
  backward of every micro-batch and the optimizer step, data already collated. witscale's window is
  ``Trainer.train_step`` (wrapped in the child process; the trainer's own timing window), TRL's a
  TrainerCallback's on_step_begin → on_step_end. Both in wall-clock seconds and in CPU seconds of the process
  (``time.process_time``): with one thread per side, CPU time is the step's work whatever else loads the
  machine — the figure to read on a shared machine; on an idle one the two agree.
- **peak RSS**: the subprocess's maximum resident set (`getrusage` of that child, through wait4).

The sides run alternately ``--repeats`` times (default 2) and each side's best run is reported (all runs are
in --json): on a shared machine a run slowed by other load is not the side's speed.

TRL is configured for its fastest comparable path: `precompute_ref_log_probs=True` (no reference model held,
like witscale), `max_length=None` (nothing truncated: witscale truncates nothing either), `bf16=False`,
`use_cpu=True`, `max_grad_norm=0`. TRL 1.16's `padding_free` is disabled in its DPO trainer (it warns and
pads), so TRL pads each batch of pairs to its longest sequence — chosen and rejected stacked. Its dataset
preparation is bypassed (a subclass returns the pre-tokenized pairs) so that both read the same ids. Reference
log-prob precomputation is excluded from the step times on both sides (each reports it separately).

The pairs are synthetic instructions (witscale/data/synthetic.py's tasks) whose chosen and rejected answers
carry a verbose tail of lognormal length (UltraFeedback-like spread: most completions short, some long).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

TRL_DIR = os.path.join(ROOT, "build", "bench-dpo-trl")     # `make bench-dpo-env` installs TRL here
BETA = 0.1
LR = 5e-7


# --------------------------------------------------------------------------------------------------- data
def make_pairs(n: int, seed: int, median_tail: int) -> list[dict]:
    """{prompt, chosen, rejected}: the task's right answer against another answer of the same task (or a
    corrupted one), each followed by a tail of filler words of lognormal length."""
    from witscale.data.synthetic import _WORDS, generate_instruction_records

    rng = random.Random(seed)
    records = generate_instruction_records(2 * n, seed=seed)
    by_task: dict[str, list[str]] = {}
    for r in records:
        by_task.setdefault(r["instruction"].split()[0], []).append(r["output"])

    def tail() -> str:
        k = min(400, int(rng.lognormvariate(math.log(max(1, median_tail)), 0.9)))
        return (" Because " + " ".join(rng.choice(_WORDS) for _ in range(k)) + ".") if k else ""

    pairs = []
    for r in records[:n]:
        prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        others = [o for o in by_task[r["instruction"].split()[0]] if o != r["output"]]
        wrong = rng.choice(others) if others else r["output"][::-1] + " no"
        chosen, rejected = r["output"] + tail(), wrong + tail()
        if chosen == rejected:
            rejected += " no"
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def prepare(work: str, args) -> dict:
    """Pairs file, tokenizer, the HF model (policy = reference at the start, as in DPO), the packed preference
    dataset with its reference log-probs, and the per-pair ids that TRL gets."""
    import torch
    import transformers

    from witscale.data.synthetic import train_sentencepiece

    pairs = make_pairs(args.pairs, args.seed, args.median_tail)
    pairs_path = os.path.join(work, "pairs.jsonl")
    with open(pairs_path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    texts = [t for p in pairs for t in (p["prompt"], p["chosen"], p["rejected"])]
    sp_model = train_sentencepiece(texts, os.path.join(work, "sp"), vocab_size=args.vocab)   # sp/tokenizer.model

    from witscale.data.tokenizer import load_tokenizer
    tok = load_tokenizer(sp_model)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=max(2048, args.seq_len),
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id if tok.pad_id is not None else tok.eos_id)
    torch.manual_seed(args.seed)
    model_dir = os.path.join(work, "model")
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    for name in os.listdir(os.path.join(work, "sp")):
        shutil.copy(os.path.join(work, "sp", name), model_dir)

    env = child_env(args.threads)
    packed = os.path.join(work, "packed")
    run([sys.executable, os.path.join(ROOT, "tools", "pack_dataset.py"), "--task", "preference", "--input", pairs_path,
         "--tokenizer", sp_model, "--seq-len", str(args.seq_len), "--template", "plain", "--output", packed,
         "--overwrite"], env)
    t0 = time.perf_counter()
    run([sys.executable, os.path.join(ROOT, "tools", "precompute_reference.py"), "--data", packed, "--model",
         model_dir], env)
    precompute_s = time.perf_counter() - t0

    ids_path = os.path.join(work, "pair_ids.json")
    pair_ids = pair_token_ids(packed)
    with open(ids_path, "w", encoding="utf-8") as f:
        json.dump(pair_ids, f)
    from witscale.data.format import PackedDataset
    manifest = PackedDataset(packed).manifest
    return {"model": model_dir, "packed": packed, "pair_ids": ids_path, "pairs": len(pair_ids),
            "witscale_precompute_s": precompute_s, "manifest": manifest,
            "completion_tokens": sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pair_ids),
            "tokens": sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pair_ids)}


def pair_token_ids(packed: str) -> list[dict]:
    """Each pair as TRL's pre-tokenized columns, cut from witscale's own packed documents: the prompt is
    everything before the first response-side token (the DPO mask: prompt side 0, response side 1)."""
    import numpy as np

    from witscale.data.classes import RESPONSE_SIDE
    from witscale.data.format import PackedDataset

    ds = PackedDataset(packed)
    role = np.fromfile(os.path.join(packed, "doc_role.bin"), dtype=np.uint8)
    pair = np.fromfile(os.path.join(packed, "doc_pair.bin"), dtype=np.int64)
    response_side = np.array(sorted(int(c) for c in RESPONSE_SIDE))
    docs: dict[int, dict] = {}
    d = 0
    for row in range(len(ds)):
        start = 0
        for length in ds.doc_lengths(row):
            ids = np.asarray(ds.tokens[row, start:start + length]).tolist()
            cls = np.asarray(ds.classes[row, start:start + length])
            cut = int(np.flatnonzero(np.isin(cls, response_side))[0])
            entry = docs.setdefault(int(pair[d]), {})
            entry["prompt_ids"] = ids[:cut]
            entry["chosen_ids" if role[d] == 0 else "rejected_ids"] = ids[cut:]
            entry.setdefault("prompts", []).append(ids[:cut])
            start += int(length)
            d += 1
    out = []
    for k in sorted(docs):
        e = docs[k]
        if len(e["prompts"]) != 2 or e["prompts"][0] != e["prompts"][1]:
            raise SystemExit(f"pair {k}: chosen and rejected documents do not share their prompt tokens")
        out.append({"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]})
    return out


def padded_real_share(pair_ids: list[dict], micro_pairs: int, seed: int, trials: int = 20) -> float:
    """Real-token share of TRL's batches: ``micro_pairs`` random pairs, chosen and rejected stacked, each
    sequence padded to the batch's longest (its collator), averaged over random orders."""
    rng = random.Random(seed)
    lengths = [(len(p["prompt_ids"]) + len(p["chosen_ids"]), len(p["prompt_ids"]) + len(p["rejected_ids"]))
               for p in pair_ids]
    real = padded = 0
    for _ in range(trials):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        for s in range(0, len(order), micro_pairs):
            batch = [lengths[i] for i in order[s:s + micro_pairs]]
            real += sum(c + r for c, r in batch)
            padded += 2 * len(batch) * max(max(c, r) for c, r in batch)
    return real / padded


# ----------------------------------------------------------------------------------------------- processes
def child_env(threads: int, extra_path: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(cmd: list[str], env: dict) -> None:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} … failed (exit {res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-3000:]}")


def run_measured(cmd: list[str], env: dict, log_path: str) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in GiB of the process: its getrusage maximum via wait4)."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024 / 2 ** 30


# ----------------------------------------------------------------------------------------------- witscale
def witscale_child(spec: dict) -> None:
    """witscale/train.py as its own __main__, with Trainer.train_step timed (wall and CPU) into spec["out"]."""
    import atexit
    import runpy

    from witscale.training import trainer

    step = trainer.Trainer.train_step
    times: list[tuple[float, float]] = []

    def timed_step(self, batch):
        wall, cpu = time.perf_counter(), time.process_time()
        result = step(self, batch)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
        return result

    def dump():
        with open(spec["out"], "w", encoding="utf-8") as f:
            json.dump({"step_seconds": [w for w, _ in times], "step_cpu_seconds": [c for _, c in times]}, f)

    trainer.Trainer.train_step = timed_step
    atexit.register(dump)
    sys.argv = spec["argv"]
    runpy.run_path(sys.argv[0], run_name="__main__")


def witscale_side(prep: dict, work: str, args) -> dict:
    """The real entry point, one process (no launcher), ZeRO-0, the paper's DPO hyper-parameters."""
    out = os.path.join(work, "witscale_run")
    shutil.rmtree(out, ignore_errors=True)
    timing = os.path.join(work, "witscale_steps.json")
    rows_per_step = max(1, round(args.batch_pairs / prep["manifest"]["pairs_per_row"]))
    argv = [os.path.join(ROOT, "witscale", "train.py"), "--objective", "dpo", "--beta", str(BETA),
           "--data", prep["packed"], "--model", prep["model"], "--output-dir", out, "--ds_config",
           os.path.join(ROOT, "ds_configs", "zero0.json"), "--micro-batch-size", "1", "--grad-accum", str(rows_per_step),
           "--lr", str(LR), "--weight-decay", "0", "--warmup-ratio", "0.1", "--max-steps", str(args.steps),
           "--seed", str(args.seed), "--no-tensorboard", "--save-steps", "0", "--reference-model", prep["model"]]
    cmd = [sys.executable, os.path.abspath(__file__), "--_witscale-child", json.dumps({"argv": argv, "out": timing})]
    rc, wall, peak = run_measured(cmd, child_env(args.threads), os.path.join(work, "witscale.log"))
    if rc != 0:
        raise SystemExit(f"witscale failed (exit {rc}); log: {os.path.join(work, 'witscale.log')}\n"
                         + open(os.path.join(work, "witscale.log"), encoding="utf-8").read()[-3000:])
    recs = []
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r and not any(k.startswith("eval_") for k in r):
                recs.append(r)
    with open(timing, encoding="utf-8") as f:
        steps = json.load(f)
    if len(steps["step_seconds"]) != len(recs):
        raise SystemExit(f"witscale: {len(steps['step_seconds'])} timed steps but {len(recs)} metric records")
    pairs = sum(r["pairs"] for r in recs[args.warmup:])
    seconds, cpu = sum(steps["step_seconds"][args.warmup:]), sum(steps["step_cpu_seconds"][args.warmup:])
    return {"pairs_per_s": pairs / seconds, "pairs_per_cpu_s": pairs / cpu, "pairs_timed": pairs,
            "steps_timed": len(recs) - args.warmup, "step_seconds": seconds, "step_cpu_seconds": cpu,
            "peak_rss_gib": peak, "wall_s": wall, "rows_per_step": rows_per_step,
            "pairs_per_step": [r["pairs"] for r in recs], "losses": [r["loss"] for r in recs],
            "config": {"micro_batch_rows": 1, "grad_accum": rows_per_step, "seq_len": prep["manifest"]["seq_len"],
                       "ds_config": "zero0.json", "attention": "auto (CPU: sdpa_grouped)"}}


# ----------------------------------------------------------------------------------------------- TRL
def trl_side(prep: dict, work: str, args) -> dict:
    out = os.path.join(work, "trl_result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--_trl-child", json.dumps(
        {"model": prep["model"], "pair_ids": prep["pair_ids"], "out": out, "dir": os.path.join(work, "trl_run"),
         "batch_pairs": args.batch_pairs, "micro_pairs": args.trl_micro_pairs, "steps": args.steps,
         "seed": args.seed, "threads": args.threads})]
    rc, wall, peak = run_measured(cmd, child_env(args.threads, args.trl_path), os.path.join(work, "trl.log"))
    if rc != 0:
        raise SystemExit(f"TRL failed (exit {rc}); log: {os.path.join(work, 'trl.log')}\n"
                         + open(os.path.join(work, "trl.log"), encoding="utf-8").read()[-3000:])
    with open(out, encoding="utf-8") as f:
        res = json.load(f)
    timed, cpu = res["step_seconds"][args.warmup:], res["step_cpu_seconds"][args.warmup:]
    pairs = args.batch_pairs * len(timed)
    res.update(pairs_per_s=pairs / sum(timed), pairs_per_cpu_s=pairs / sum(cpu), pairs_timed=pairs,
               steps_timed=len(timed), step_seconds=sum(timed), step_cpu_seconds=sum(cpu), peak_rss_gib=peak,
               wall_s=wall)
    return res


def trl_child(spec: dict) -> None:
    """Runs inside the TRL environment (PYTHONPATH=build/bench-dpo-trl): DPOTrainer on the pre-tokenized pairs."""
    import torch
    torch.set_num_threads(spec["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    with open(spec["pair_ids"], encoding="utf-8") as f:
        pairs = json.load(f)
    dataset = Dataset.from_list(pairs)

    class PreTokenizedDPOTrainer(DPOTrainer):
        """The pairs are already witscale's token ids: skip TRL's prompt extraction, EOS and tokenization."""
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.c0, self.seconds, self.cpu_seconds = None, None, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)
            self.cpu_seconds.append(time.process_time() - self.c0)

    torch.manual_seed(spec["seed"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    accum = max(1, spec["batch_pairs"] // spec["micro_pairs"])
    config = DPOConfig(
        output_dir=spec["dir"], per_device_train_batch_size=spec["micro_pairs"], gradient_accumulation_steps=accum,
        max_steps=spec["steps"], learning_rate=LR, weight_decay=0.0, warmup_steps=0.1, lr_scheduler_type="cosine",
        beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True, precompute_ref_batch_size=spec["micro_pairs"],
        max_length=None, padding_free=False, bf16=False, fp16=False, use_cpu=True, max_grad_norm=0.0,
        report_to=[], logging_steps=10 ** 6, save_strategy="no", dataloader_num_workers=0, seed=spec["seed"],
        disable_tqdm=True, dataset_num_proc=None)
    timer = StepTimer()
    t0 = time.perf_counter()
    trainer = PreTokenizedDPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[timer])
    setup_s = time.perf_counter() - t0            # includes the reference log-prob pass
    trainer.train()
    with open(spec["out"], "w", encoding="utf-8") as f:
        json.dump({"step_seconds": timer.seconds, "step_cpu_seconds": timer.cpu_seconds, "setup_s": setup_s,
                   "trl_version": trl.__version__, "transformers_version": transformers.__version__,
                   "config": {"per_device_train_batch_size": spec["micro_pairs"], "gradient_accumulation_steps": accum,
                              "precompute_ref_log_probs": True, "padding_free": False, "max_length": None,
                              "loss_type": "sigmoid", "beta": BETA, "bf16": False, "max_grad_norm": 0.0}}, f)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--_trl-child":
        trl_child(json.loads(sys.argv[2]))
        return 0
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--_witscale-child":
        witscale_child(json.loads(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=128, help="preference pairs generated (default 128)")
    p.add_argument("--batch-pairs", type=int, default=32, help="pairs per optimizer step (the paper's 32)")
    p.add_argument("--trl-micro-pairs", type=int, default=8, help="TRL's per-device batch (pairs; accumulated)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    p.add_argument("--seq-len", type=int, default=1024, help="witscale's packed row length")
    p.add_argument("--median-tail", type=int, default=40, help="median words of a completion's verbose tail")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; the best is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-path", default=TRL_DIR, help=f"where TRL is installed (default {TRL_DIR})")
    p.add_argument("--only", choices=("witscale", "trl"), help="run one side only")
    p.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    if args.only != "witscale" and not os.path.isdir(os.path.join(args.trl_path, "trl")):
        p.error(f"TRL is not installed in {args.trl_path}: run `make bench-dpo-env` (or --only witscale)")
    work = args.keep or tempfile.mkdtemp(prefix="bench-dpo-")
    os.makedirs(work, exist_ok=True)
    try:
        prep = prepare(work, args)
        m = prep["manifest"]
        print(f"{prep['pairs']} pairs, {prep['tokens']} tokens ({prep['completion_tokens']} completion tokens), vocab "
              f"{m.get('tokenizer', {}).get('vocab_size', '?')}, Llama {args.hidden} × {args.layers} layers; witscale "
              f"rows of {m['seq_len']}: {m['pairs_per_row']:.2f} pairs/row, packing {m['packing_efficiency']:.1%}; "
              f"{args.batch_pairs} pairs per step, {args.steps} steps ({args.warmup} untimed), {args.threads} thread(s)")
        with open(prep["pair_ids"], encoding="utf-8") as f:
            trl_share = padded_real_share(json.load(f), args.trl_micro_pairs, args.seed)
        print(f"real-token share: witscale packed rows {m['packing_efficiency']:.1%} | TRL padded batches of "
              f"{args.trl_micro_pairs} pairs {trl_share:.1%} (padding alone bounds the speed-up near "
              f"{m['packing_efficiency'] / trl_share:.2f}× for token-linear cost)")
        res = {"setup": {k: prep[k] for k in ("pairs", "tokens", "completion_tokens", "witscale_precompute_s")},
               "args": vars(args), "real_token_share": {"witscale": m["packing_efficiency"], "trl": trl_share}}
        sides = [s for s in ("witscale", "trl") if args.only in (None, s)]
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for k in range(args.repeats):
            for side in sides:
                r = (witscale_side if side == "witscale" else trl_side)(prep, work, args)
                runs[side].append(r)
                print(f"  run {k + 1}/{args.repeats} {side:9s} {r['pairs_per_s']:7.2f} pairs/s, {r['pairs_per_cpu_s']:7.2f} "
                      f"pairs/CPU-s ({r['pairs_timed']:g} pairs in {r['step_seconds']:.1f} s, {r['step_cpu_seconds']:.1f} "
                      f"CPU-s of steps)   peak RSS {r['peak_rss_gib']:.2f} GiB   wall {r['wall_s']:.0f} s", flush=True)
        for side in sides:
            res[side] = max(runs[side], key=lambda r: r["pairs_per_cpu_s"])
            res[side]["best_pairs_per_s"] = max(r["pairs_per_s"] for r in runs[side])
            res[side]["runs"] = [{k: r[k] for k in ("pairs_per_s", "pairs_per_cpu_s", "peak_rss_gib")} for r in runs[side]]
            r = res[side]
            print(f"{side:9s} {r['pairs_per_cpu_s']:7.2f} pairs/CPU-s, {r['best_pairs_per_s']:7.2f} pairs/s (best of "
                  f"{args.repeats})   peak RSS {r['peak_rss_gib']:.2f} GiB")
        if "witscale" in res and "trl" in res:
            w, t = res["witscale"], res["trl"]
            res["speedup_cpu"] = w["pairs_per_cpu_s"] / t["pairs_per_cpu_s"]
            res["speedup_wall"] = w["best_pairs_per_s"] / t["best_pairs_per_s"]
            res["rss_ratio"] = w["peak_rss_gib"] / t["peak_rss_gib"]
            print(f"witscale / TRL: {res['speedup_cpu']:.2f}× pairs per CPU-second, {res['speedup_wall']:.2f}× pairs per "
                  f"wall-second (target ≥ 2×); {res['rss_ratio']:.2f}× peak RSS")
            print(f"TRL {t['trl_version']} (transformers {t['transformers_version']}): {json.dumps(t['config'])}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(res, f, indent=1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
