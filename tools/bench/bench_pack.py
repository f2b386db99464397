#!/usr/bin/env python3
"""Packing benchmark: efficiency and end-to-end tokens/s of tools/pack_dataset.py's pipeline on one file,
against pad-to-seq-len and pad-to-longest-in-batch baselines, plus a scale run (100k document lengths
resampled from the file's distribution) against the ceil(tokens / seq_len) lower bound.

    python tools/bench/bench_pack.py                                   # generated corpus + tokenizer
    python tools/bench/bench_pack.py --input ../shared/data/alpaca_en_demo.json \
        --tokenizer ../shared/data/llama2_tokenizer.model
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


def pad_to_longest(lengths: np.ndarray, batch: int) -> int:
    """Padded capacity when batches of `batch` documents (in input order) are padded to their longest."""
    n = len(lengths)
    groups = np.arange(n) // batch
    longest = np.maximum.reduceat(lengths, np.arange(0, n, batch))
    return int((longest * np.bincount(groups)).sum())


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
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.input is None:
            args.input, generated_tok = generated_corpus(tmp, args.records)
            args.tokenizer = args.tokenizer or generated_tok
        if args.tokenizer is None:
            p.error("--tokenizer is required with --input")
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
