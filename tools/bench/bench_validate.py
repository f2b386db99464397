#!/usr/bin/env python3
"""Open-time validation cost (PackedDataset.validate, docs/packed-format.md#validation): writes a synthetic
packed dataset of --tokens tokens (tokens, classes, weights; documents of random lengths), then times opening
it without and with validation (page cache warm after the first: the dataset was just written) and reports
the resident set after each open (validation reads through a bounded buffer: it stays flat).

    python tools/bench/bench_validate.py --tokens 200_000_000 [--dir /scratch/x] [--seq-len 4096]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from witscale.data.classes import class_table  # noqa: E402
from witscale.data.format import FORMAT_VERSION, PackedDataset  # noqa: E402


def write_synthetic(out: str, tokens: int, seq_len: int, vocab: int) -> dict:
    """A valid dataset of about `tokens` tokens, written in row chunks (bounded memory)."""
    rows = max(1, tokens // seq_len)
    rng = np.random.default_rng(0)
    lengths = []
    with open(os.path.join(out, "tokens.bin"), "wb") as ft, open(os.path.join(out, "classes.bin"), "wb") as fc, \
            open(os.path.join(out, "weights.bin"), "wb") as fw:
        for start in range(0, rows, 4096):
            n = min(4096, rows - start)
            rng.integers(0, vocab, size=(n, seq_len), dtype=np.int32).astype("<i4").tofile(ft)
            rng.integers(0, 8, size=(n, seq_len), dtype=np.uint8).tofile(fc)
            np.ones((n, seq_len), "<f4").tofile(fw)
            for _ in range(n):      # 1..8 documents filling the row
                k = int(rng.integers(1, 9))
                cuts = np.sort(rng.choice(np.arange(1, seq_len), size=k - 1, replace=False)) if k > 1 else []
                lengths.append(np.diff(np.concatenate([[0], cuts, [seq_len]])).astype(np.int64))
    per_row = np.array([len(x) for x in lengths], np.int64)
    doc_lengths = np.concatenate(lengths)
    offsets = np.concatenate([[0], np.cumsum(per_row)])
    doc_lengths.astype("<i4").tofile(os.path.join(out, "doc_lengths.bin"))
    offsets.astype("<i8").tofile(os.path.join(out, "row_offsets.bin"))
    manifest = {"format_version": FORMAT_VERSION, "seq_len": seq_len, "num_rows": rows,
                "num_documents": int(len(doc_lengths)), "num_tokens": int(doc_lengths.sum()),
                "class_table": class_table(), "tokenizer": {"vocab_size": vocab}, "has_weights": True}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


def resident_mib() -> float:
    """This process's resident set now (Linux), file-backed mapped pages included."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=lambda s: int(s.replace("_", "")), default=200_000_000)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dir", default=None, help="where to write the dataset (default: a temp dir)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(dir=args.dir, prefix="bench-validate-")
    try:
        t = time.perf_counter()
        m = write_synthetic(root, args.tokens, args.seq_len, args.vocab)
        print(f"wrote {m['num_rows']} rows × {args.seq_len} ({m['num_rows'] * args.seq_len / 1e6:.0f}M tokens, "
              f"{m['num_documents']} documents) in {time.perf_counter() - t:.1f} s")
        nbytes = sum(os.path.getsize(os.path.join(root, n)) for n in os.listdir(root) if n.endswith(".bin"))
        for validate in (False, True, True, True):
            t = time.perf_counter()
            ds = PackedDataset(root, validate=validate)
            dt = time.perf_counter() - t
            print(f"open validate={validate}: {dt:.2f} s" + (f" = {nbytes / dt / 1e9:.2f} GB/s over "
                                                             f"{nbytes / 1e9:.2f} GB" if validate else "")
                  + f"; resident {resident_mib():.0f} MiB")
            del ds
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
