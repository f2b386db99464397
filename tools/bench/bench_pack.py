#!/usr/bin/env python3
"""Packing benchmark: efficiency and end-to-end tokens/s of tools/pack_dataset.py's pipeline on one file,
against pad-to-seq-len and pad-to-longest-in-batch baselines, plus a scale run (100k document lengths
resampled from the file's distribution) against the ceil(tokens / seq_len) lower bound.

``--compare-templates plain,chatml`` packs the same input with each template through one Hugging Face fast
tokenizer directory (``--tokenizer`` itself if it is one, else one converted from the SentencePiece model with
the ChatML special tokens added) and prints tokens/s per template, plus the baseline of tokenizing the same
records' text with ``datasets.map`` and that fast tokenizer (``--workers`` processes).

    python tools/bench/bench_pack.py                                   # generated corpus + tokenizer
    python tools/bench/bench_pack.py --input ../shared/data/alpaca_en_demo.json \
        --tokenizer ../shared/data/llama2_tokenizer.model
    python tools/bench/bench_pack.py --input ../shared/data/alpaca_en_demo.json \
        --tokenizer ../shared/data/llama2_tokenizer.model --compare-templates plain,chatml --workers 2

``--memory`` measures the streaming packer as a user runs it (``tools/pack_dataset.py`` in a subprocess) on
generated Alpaca-like JSONL at two sizes (``--memory-records``), against ``datasets.map`` tokenizing the same
records with the same fast tokenizer in the same run (``--workers`` processes each; ``--repeat`` runs of
each, interleaved, the fastest counting — a shared machine's load changes by the minute): tokens/s and peak RSS —
of its largest process (ru_maxrss) and of the whole process tree (PSS, sampled in one more run of each, which is
not timed: sampling costs CPU on the cores both sides use). The two sizes give
the memory's fixed part and its slope per document, extrapolated to the issue's 200,000 records, and likewise
each side's CPU: its fixed part (imports, tokenizer loading, process starts) and its tokens per CPU-second of the
records themselves, whose ratio is what the packer/map ratio tends to at 200,000 records:

    python tools/bench/bench_pack.py --memory --tokenizer ../shared/data/llama2_tokenizer.model --workers 2
    python tools/bench/bench_pack.py --memory --tokenizer ../shared/data/llama2_tokenizer.model --workers 2 \
        --memory-records 20000,200000          # the issue's 200,000 records, measured (≈ 8 minutes)

``--baseline-rev REV`` adds the packer of git revision REV (``git archive`` of this repository into the
temporary directory) to the interleaved runs: the speed-up of the code as it is over REV's, measured under the
same load, beside both packers' ratio to ``datasets.map``.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from witscale.data.bestfit import best_fit_decreasing  # noqa: E402
from witscale.data.pack import PackOptions, pack_files  # noqa: E402


def generated_corpus(tmp: str, n: int):
    from witscale.data.synthetic import generate_instruction_records, train_sentencepiece
    records = generate_instruction_records(n, seed=0)
    path = os.path.join(tmp, "generated.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    texts = [" ".join(v for v in r.values() if isinstance(v, str)) for r in records]
    return path, train_sentencepiece(texts, os.path.join(tmp, "tok"), vocab_size=1024)


CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]


def hf_tokenizer_dir(tokenizer: str, tmp: str) -> str:
    """A fast HF tokenizer directory holding the ChatML specials: `tokenizer` if it already is one, else one
    converted from the SentencePiece model (as a LLaMA tokenizer) with the specials added."""
    import shutil
    from transformers import AutoTokenizer
    if os.path.isdir(tokenizer):
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    else:
        src = os.path.join(tmp, "sp")
        os.makedirs(src)
        shutil.copy(tokenizer, os.path.join(src, "tokenizer.model"))
        with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer"}, f)
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    vocab = tok.get_vocab()
    if any(t not in vocab for t in CHATML_SPECIALS) or not os.path.isdir(tokenizer):
        tok.add_special_tokens({"additional_special_tokens": [t for t in CHATML_SPECIALS if t not in vocab]})
        tokenizer = os.path.join(tmp, "hf-tokenizer")
        tok.save_pretrained(tokenizer)
    return tokenizer


def _strings(x) -> list:
    """Every string value of a record, depth first (the text a plain tokenization pass would see)."""
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [s for v in x.values() for s in _strings(v)]
    if isinstance(x, list):
        return [s for v in x for s in _strings(v)]
    return []


def datasets_map_baseline(path: str, tokenizer_dir: str, workers: int) -> tuple[int, float]:
    """(tokens, seconds) of tokenizing each record's text with datasets.map and the fast tokenizer."""
    import datasets
    from transformers import AutoTokenizer
    datasets.disable_caching()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ds = datasets.load_dataset("json", data_files=path, split="train")

    def tokenize(batch):
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        return {"input_ids": tok(["\n".join(_strings(r)) for r in rows])["input_ids"]}
    out = ds.map(tokenize, batched=True, num_proc=workers if workers > 1 else None, remove_columns=ds.column_names)
    tokens = sum(len(ids) for ids in out["input_ids"])
    return tokens, time.perf_counter() - t0


def compare_templates(args, tmp: str) -> None:
    tok_dir = hf_tokenizer_dir(args.tokenizer, tmp)
    print(f"input {args.input}  HF tokenizer {tok_dir}  workers {args.workers}")
    base = None
    for k, name in enumerate(args.compare_templates.split(",")):
        out = os.path.join(tmp, f"packed-{k}-{name}")
        m = pack_files([args.input], tok_dir, out,
                       PackOptions(seq_len=args.seq_len, template=name, workers=args.workers))
        t = m["timing"]
        rate = t["input_tokens"] / t["total_s"]
        base = base or t["total_s"]
        print(f"  pack --template {name:<8} {t['input_tokens']:>11,} tokens  {t['total_s']:7.2f} s  "
              f"{rate:>12,.0f} tokens/s  ({t['total_s'] / base:.2f}x the first template's time)")
    tokens, dt = datasets_map_baseline(args.input, tok_dir, args.workers)
    print(f"  datasets.map + fast tokenizer {tokens:>11,} tokens  {dt:7.2f} s  {tokens / dt:>12,.0f} tokens/s  "
          f"(text only: no template, classes, packing or writing)")


def pad_to_longest(lengths: np.ndarray, batch: int) -> int:
    """Padded capacity when batches of `batch` documents (in input order) are padded to their longest."""
    n = len(lengths)
    groups = np.arange(n) // batch
    longest = np.maximum.reduceat(lengths, np.arange(0, n, batch))
    return int((longest * np.bincount(groups)).sum())


# ------------------------------------------------------------------------------------ --memory: RSS and tokens/s
def alpaca_like_jsonl(path: str, n: int, seed: int = 0) -> str:
    """n Alpaca-shaped records of random words: about 540 LLaMA-2 tokens a record, the issue's Alpaca-like
    average (108.6M tokens in 200,000 records)."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=k)) for k in rng.integers(2, 9, 5000)]

    def text(mean):
        return " ".join(words[j] for j in rng.integers(0, len(words), max(1, int(rng.exponential(mean)))))
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": text(20), "input": text(10) if rng.random() < 0.4 else "",
                                "output": text(130)}) + "\n")
    return path


def measured(cmd: list, sample_memory: bool = False) -> dict:
    """Run cmd; its wall time, its CPU time (user + system, workers included: on a loaded machine the steadier
    measure of the work done), its stdout and the peak resident memory of its largest process (the ru_maxrss
    wait4 reports: exact). ``sample_memory``: also the peak of its whole process tree (the sum of PSS —
    forked workers share pages, which a sum of RSS would count once per process — from /proc/PID/smaps_rollup
    every 100 ms: a lower bound of the peak). Reading a process's PSS walks its page tables (≈ 3 ms for a
    process that imported torch): sampled runs are not timed runs — sampling every 20 ms through psutil took
    ≈ 40% of a core from the 2-core machine the two sides compete for."""
    import subprocess
    import threading
    import psutil
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"tree": 0}
    done = threading.Event()

    def pss(pid: int) -> int:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = sum(pss(p.pid) for p in [root] + root.children(recursive=True))
            except (psutil.Error, OSError, StopIteration):
                continue
            peak["tree"] = max(peak["tree"], rss)
            time.sleep(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    chunks = {}
    readers = [threading.Thread(target=lambda k, s: chunks.__setitem__(k, s.read()), args=(k, s), daemon=True)
               for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)       # (not proc.wait: wait4 gives this child's own rusage)
    done.set()
    for r in readers + ([sampler] if sample_memory else []):
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {chunks['err'].strip()[-2000:]}")
    return {"s": dt, "main": usage.ru_maxrss * 1024, "tree": peak["tree"], "out": chunks["out"],
            "cpu": usage.ru_utime + usage.ru_stime}      # its own and its waited-for children's (the workers')


_MAP_SCRIPT = r"""
import sys, datasets
from transformers import AutoTokenizer
def strings(x):  # bench_pack._strings: every string value of a record, depth first
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [s for v in x.values() for s in strings(v)]
    if isinstance(x, list):
        return [s for v in x for s in strings(v)]
    return []
datasets.disable_caching(); datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained(sys.argv[2], local_files_only=True)
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train")
def tokenize(batch):
    rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
    return {"input_ids": tok(["\n".join(strings(r)) for r in rows])["input_ids"]}
w = int(sys.argv[3])
out = ds.map(tokenize, batched=True, num_proc=w if w > 1 else None, remove_columns=ds.column_names)
print(sum(len(ids) for ids in out["input_ids"]))
"""


def baseline_tree(rev: str, tmp: str) -> str:
    """This repository's tree at git revision `rev`, unpacked under `tmp` (its tools put their own root first
    on sys.path, so its pack_dataset.py runs its own witscale)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dest = os.path.join(tmp, "baseline")
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", root, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def memory_benchmark(args, tmp: str) -> None:
    tok_dir = hf_tokenizer_dir(args.tokenizer, tmp)
    here = os.path.dirname(os.path.abspath(__file__))
    tool = os.path.join(os.path.dirname(here), "pack_dataset.py")
    packers = {"pack": tool}
    if args.baseline_rev:
        packers[args.baseline_rev] = os.path.join(baseline_tree(args.baseline_rev, tmp), "tools", "pack_dataset.py")
    print(f"tokenizer {tok_dir} (fast)  workers {args.workers}  seq-len {args.seq_len}  template {args.template}")
    print(f"{'':>30} {'records':>8} {'tokens':>11} {'s':>7} {'tokens/s':>10} {'RSS max 1':>9} {'PSS tree':>9} "
          f"{'CPU s':>7}")
    points = []
    for n in [int(x) for x in args.memory_records.split(",")]:
        data = alpaca_like_jsonl(os.path.join(tmp, f"alpaca-{n}.jsonl"), n)
        out = os.path.join(tmp, f"packed-{n}")
        cmds = {"map": [sys.executable, "-c", _MAP_SCRIPT, data, tok_dir, str(args.workers)],
                **{name: [sys.executable, packer, "--input", data, "--tokenizer", tok_dir, "--seq-len",
                          str(args.seq_len), "--template", args.template, "--workers", str(args.workers),
                          "--output", out, "--overwrite"] for name, packer in packers.items()}}
        runs = {name: [] for name in cmds}
        for _ in range(args.repeat):        # interleaved, best of each: the machine's load changes by the minute
            for name, cmd in cmds.items():
                runs[name].append(measured(cmd))
        trees = {name: measured(cmd, sample_memory=True) for name, cmd in cmds.items()}  # memory: one more run
        best = {name: dict(min(r, key=lambda x: x["s"]), main=max(x["main"] for x in r + [trees[name]]),
                           tree=trees[name]["tree"], cpu=min(x["cpu"] for x in r))
                for name, r in runs.items()}
        base, packed = best["map"], best["pack"]
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        tokens = int(np.fromfile(os.path.join(out, "doc_lengths.bin"), dtype=np.int32).sum())
        map_tokens = int(base["out"].split()[-1])
        mib = lambda b: f"{b / 2**20:.0f} MiB" if b else "-"  # noqa: E731
        for name, r, t in (("datasets.map + fast tokenizer", base, map_tokens), ("pack_dataset.py (streaming)", packed, tokens)):
            print(f"{name:>30} {n:>8} {t:>11,} {r['s']:>7.1f} {t / r['s']:>10,.0f} {mib(r['main']):>9} "
                  f"{mib(r['tree']):>9} {r['cpu']:>7.1f}")
        print(f"{'':>30} packed/map tokens/s: {(tokens / packed['s']) / (map_tokens / base['s']):.2f}x  "
              f"(tokens per CPU-second: {(tokens / packed['cpu']) / (map_tokens / base['cpu']):.2f}x)  "
              f"efficiency {100 * manifest['packing_efficiency']:.2f}%")
        for name in packers:
            if name != "pack":                # --baseline-rev: the same documents, so the same tokens
                b = best[name]
                print(f"{'baseline ' + name:>30} {n:>8} {tokens:>11,} {b['s']:>7.1f} {tokens / b['s']:>10,.0f} "
                      f"{mib(b['main']):>9} {mib(b['tree']):>9} {b['cpu']:>7.1f}")
                print(f"{'':>30} baseline/map tokens/s: {(tokens / b['s']) / (map_tokens / base['s']):.2f}x "
                      f"(per CPU-second: {(tokens / b['cpu']) / (map_tokens / base['cpu']):.2f}x); this code "
                      f"{b['s'] / packed['s']:.2f}x as fast ({b['cpu'] / packed['cpu']:.2f}x less CPU); each run's "
                      f"s, CPU s (map / this / {name}): "
                      + ", ".join(f"{x['s']:.1f}/{y['s']:.1f}/{z['s']:.1f}, "
                                  f"{x['cpu']:.1f}/{y['cpu']:.1f}/{z['cpu']:.1f}"
                                  for x, y, z in zip(runs["map"], runs["pack"], runs[name])))
        points.append((n, tokens, packed["tree"], map_tokens, base["cpu"], packed["cpu"]))
        import shutil
        shutil.rmtree(out)
    if len(points) >= 2:
        (n0, t0, r0, m0, c0, p0), (n1, t1, r1, m1, c1, p1) = points[0], points[-1]
        target = 200_000

        def extrapolated(tok0, cpu0, tok1, cpu1):
            """(tokens per CPU-second of the records themselves, the fixed CPU — imports (both import torch
            through transformers), tokenizer loading, process starts —, tokens per CPU-second at `target`)."""
            marginal = (tok1 - tok0) / (cpu1 - cpu0)
            fixed = cpu0 - tok0 / marginal
            tokens = tok1 / n1 * target
            return marginal, fixed, tokens / (fixed + tokens / marginal)
        (map_m, map_f, map_t), (pack_m, pack_f, pack_t) = extrapolated(m0, c0, m1, c1), extrapolated(t0, p0, t1, p1)
        print(f"\nper CPU-second, fit over {n0}..{n1} records: datasets.map {map_m:,.0f} tokens/s + {map_f:.1f} s "
              f"fixed, packer {pack_m:,.0f} tokens/s + {pack_f:.1f} s fixed; marginal packer/map {pack_m / map_m:.2f}x, "
              f"at {target:,} records {pack_t / map_t:.2f}x")
        per_record = max((r1 - r0) / (n1 - n0), 0.0)       # noise can make it negative: memory is flat
        fixed = r1 - per_record * n1
        print(f"\npacker tree PSS ~ {fixed / 2**20:.0f} MiB + {per_record:.0f} B/record (fit over {n0}..{n1} records); "
              f"at {target:,} records ({t1 / n1 * target / 1e6:.0f}M tokens): {(fixed + per_record * target) / 2**30:.2f} GiB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None, help="default: a generated corpus")
    p.add_argument("--tokenizer", default=None, help="default: a SentencePiece model trained on the generated corpus")
    p.add_argument("--records", type=int, default=20000, help="size of the generated corpus")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--template", default="plain")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--scale-docs", type=int, default=100_000)
    p.add_argument("--scale-seq-len", type=int, default=4096)
    p.add_argument("--compare-templates", default=None, metavar="T1,T2",
                   help="pack with each template through one HF tokenizer directory, plus a datasets.map baseline")
    p.add_argument("--memory", action="store_true",
                   help="tokens/s and peak RSS of pack_dataset.py against datasets.map, on generated data")
    p.add_argument("--memory-records", default="1000,4000", help="--memory: the two corpus sizes (records)")
    p.add_argument("--baseline-rev", default=None, metavar="REV",
                   help="--memory: also run the packer of git revision REV, interleaved (speed-up over it)")
    p.add_argument("--repeat", type=int, default=2,
                   help="--memory: runs of each, interleaved; the fastest counts, the largest memory")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.memory:
            if args.tokenizer is None:
                texts = [open(alpaca_like_jsonl(os.path.join(tmp, "sp.jsonl"), 2000), encoding="utf-8").read()]
                args.tokenizer = __import__("witscale.data.synthetic", fromlist=["x"]).train_sentencepiece(
                    texts[0].splitlines(), os.path.join(tmp, "tok"), vocab_size=1024)
            return memory_benchmark(args, tmp)
        if args.input is None:
            args.input, generated_tok = generated_corpus(tmp, args.records)
            args.tokenizer = args.tokenizer or generated_tok
        if args.tokenizer is None:
            p.error("--tokenizer is required with --input")
        if args.compare_templates:
            return compare_templates(args, tmp)
        out = os.path.join(tmp, "packed")
        m = pack_files([args.input], args.tokenizer, out,
                       PackOptions(seq_len=args.seq_len, template=args.template, workers=args.workers))
        lengths = np.fromfile(os.path.join(out, "doc_lengths.bin"), dtype=np.int32).astype(np.int64)
    t = m["timing"]
    tokens = int(lengths.sum())
    lower = -(-tokens // args.seq_len)
    print(f"input {args.input}  tokenizer {args.tokenizer}  template {args.template}  workers {args.workers}")
    print(f"{len(lengths)} documents, {tokens} tokens, length p50 {np.median(lengths):.0f} max {lengths.max()}")
    print(f"end-to-end: {t['total_s']:.2f} s ({t['tokenize_s']:.2f} s read+tokenize, {t['pack_write_s']:.2f} s "
          f"pack+write) = {t['input_tokens'] / t['total_s']:,.0f} tokens/s")
    print(f"\nseq_len {args.seq_len}                          rows/capacity     efficiency")
    print(f"  best-fit decreasing packing        {m['num_rows']:>9} rows     {100 * m['packing_efficiency']:6.2f}%  "
          f"(lower bound {lower} rows = {100 * tokens / (lower * args.seq_len):.2f}%)")
    print(f"  pad every document to seq_len      {len(lengths):>9} rows     "
          f"{100 * tokens / (len(lengths) * args.seq_len):6.2f}%")
    cap = pad_to_longest(lengths, 8)
    print(f"  pad to longest in batch of 8       {cap:>9} tokens   {100 * tokens / cap:6.2f}%")

    rng = np.random.default_rng(0)
    sample = rng.choice(np.minimum(lengths, args.scale_seq_len), size=args.scale_docs, replace=True)
    t0 = time.perf_counter()
    _, rows = best_fit_decreasing(sample, args.scale_seq_len)
    dt = time.perf_counter() - t0
    total = int(sample.sum())
    lb = -(-total // args.scale_seq_len)
    print(f"\nscale: {args.scale_docs} documents resampled, {total} tokens, seq_len {args.scale_seq_len}")
    print(f"  rows {rows} vs lower bound {lb} (+{100 * (rows - lb) / lb:.3f}%), efficiency "
          f"{100 * total / (rows * args.scale_seq_len):.3f}%, packing time {dt:.2f} s")


if __name__ == "__main__":
    main()
