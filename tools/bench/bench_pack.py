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
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
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
