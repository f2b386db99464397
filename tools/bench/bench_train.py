#!/usr/bin/env python3
"""Training throughput: witscale (packed rows, per-document attention, fused weighted CE) against the
paper's reference style (a transformers model, unpacked sequences padded to the longest of each batch,
full-logits cross-entropy), on the same model, the same documents and the same weights, in one run.

    python tools/bench/bench_train.py                                   # generated corpus, own tokenizer
    python tools/bench/bench_train.py --input ../shared/data/alpaca_en_demo.json \
        --tokenizer ../shared/data/llama2_tokenizer.model --docs 256

Reports non-pad tokens per second of forward + backward + AdamW step for each, and their ratio. Both
paths see every document once per epoch with the same (λp, λr) weights. ``--compile`` also times witscale with
each decoder block compiled (train.py --compile) from the same weights on the same rows, after one untimed
epoch that compiles every shape, and prints its tokens/s ratio against eager.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def load_documents(args):
    """Tokenized documents (ids, classes) through witscale's own renderer, and the tokenizer path."""
    from witscale.data.readers import normalize_record, read_records
    from witscale.data.render import Renderer
    from witscale.data.tokenizer import load_tokenizer

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    if args.input:
        fmt, records = read_records(args.input, "auto")
        records = [r.record for r in records]
        tokenizer_path = args.tokenizer
    else:
        from witscale.data.synthetic import generate_instruction_records, train_sentencepiece
        records = generate_instruction_records(max(args.docs, 600), seed=0)
        fmt = "alpaca"
        texts = [" ".join(str(v) for v in r.values() if isinstance(v, str)) for r in records]
        tokenizer_path = train_sentencepiece(texts, tmp, vocab_size=2000)
    tok = load_tokenizer(tokenizer_path)
    renderer = Renderer("plain", tok)
    docs = []
    for r in records[:args.docs]:
        d = renderer(normalize_record(r, fmt))
        docs.append((d.ids[:args.seq_len].astype(np.int64), d.classes[:args.seq_len].astype(np.int64)))
    return docs, tok


def model_config(vocab: int, args) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                max_position_embeddings=args.seq_len, rms_norm_eps=1e-6, tie_word_embeddings=False)


def witscale_steps(docs, cfg_dict, table, args, compile_blocks: bool = False):
    """Packed rows of seq_len, micro-batches of ``rows_per_batch`` rows: yields (closure, real tokens)."""
    from witscale.data.loader import PackedLoader
    from witscale.data.format import PackedDataset, TokenizedCorpus, write_packed
    from witscale.model import CausalLM, ModelConfig, load_model_weights

    out = os.path.join(tempfile.mkdtemp(prefix="bench-packed-"), "packed")
    write_packed(out, TokenizedCorpus.from_documents([(i.astype(np.int32), c.astype(np.uint8), None) for i, c in docs]),
                 seq_len=args.seq_len, pad_id=0)
    ds = PackedDataset(out)
    cfg = ModelConfig.from_dict(cfg_dict)
    model = CausalLM(cfg)          # the automatic attention backend (CPU: sdpa_grouped)
    load_model_weights(model, cfg, model_dir=None, seed=0)
    if compile_blocks:
        from witscale.model.transformer import compile_decoder_blocks
        compile_decoder_blocks(model)
    loader = PackedLoader(ds, table, micro_batch_size=args.rows_per_batch, grad_accum=1, shuffle=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [loader.make_micro_batch(range(s, min(s + args.rows_per_batch, len(ds))))
               for s in range(0, len(ds), args.rows_per_batch)]

    def step(mb):
        stats = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, mb.weights,
                      mb.target_classes)
        n = max(1.0, float((mb.weights > 0).sum()))
        (stats.weighted_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, [(lambda mb=mb: step(mb), mb.real_tokens) for mb in batches], ds.manifest["packing_efficiency"]


def reference_steps(docs, cfg_dict, table, args):
    """The paper's style: batches of ``batch_docs`` documents padded to the longest, full logits + CE."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**cfg_dict)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps, real, padded = [], 0, 0
    for s in range(0, len(docs), args.batch_docs):
        group = docs[s:s + args.batch_docs]
        longest = max(len(i) for i, _ in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        mask = torch.zeros(len(group), longest, dtype=torch.long)
        w = torch.zeros(len(group), longest)
        for b, (i, c) in enumerate(group):
            ids[b, :len(i)] = torch.from_numpy(i)
            mask[b, :len(i)] = 1
            w[b, :len(i)] = torch.from_numpy(table[c])
        tokens = int(mask.sum())
        real += tokens
        padded += ids.numel()

        def step(ids=ids, mask=mask, w=w):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="none").view(ids.shape[0], -1)
            weights = w[:, 1:] * mask[:, 1:]
            ((nll * weights).sum() / (weights > 0).sum().clamp(min=1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps.append((step, tokens))
    return model, steps, real / padded


def timed(steps, epochs: int, warm_epoch: bool = False) -> float:
    for fn, _ in (steps if warm_epoch else steps[:1]):
        fn()                                    # warm-up (allocator, first-call costs; compiling each shape)
    tokens, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for fn, n in steps:
            fn()
            tokens += n
    return tokens / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="instruction data file (alpaca/prompt_response/messages/sharegpt)")
    p.add_argument("--tokenizer", help="tokenizer for --input")
    p.add_argument("--docs", type=int, default=192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-docs", type=int, default=8, help="reference batch size (documents)")
    p.add_argument("--rows-per-batch", type=int, default=1, help="witscale micro-batch (packed rows)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--prompt-weight", type=float, default=0.2)
    p.add_argument("--compile", action="store_true",
                   help="also time witscale with compiled decoder blocks and print the ratio to eager")
    args = p.parse_args(argv)
    if bool(args.input) != bool(args.tokenizer):
        p.error("--input and --tokenizer go together")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from witscale.data.weighting import build_weight_table
    table = build_weight_table(args.prompt_weight, 1.0)
    docs, tok = load_documents(args)
    cfg = model_config(tok.vocab_size, args)
    _, ours, packing = witscale_steps(docs, cfg, table, args)
    _, ref, ref_eff = reference_steps(docs, cfg, table, args)
    ours_tps = timed(ours, args.epochs)
    ref_tps = timed(ref, args.epochs)
    print(f"documents {len(docs)}, vocab {tok.vocab_size}, hidden {args.hidden} × {args.layers} layers, seq-len {args.seq_len}")
    print(f"real-token share: witscale packed {packing:.2%} | reference padded-per-batch({args.batch_docs}) {ref_eff:.2%}")
    print(f"witscale:  {ours_tps:10.0f} non-pad tokens/s")
    print(f"reference: {ref_tps:10.0f} non-pad tokens/s")
    print(f"speed-up:  {ours_tps / ref_tps:10.2f}×  (token-linear ceiling from padding alone: {packing / ref_eff:.2f}×)")
    if args.compile:
        _, compiled, _ = witscale_steps(docs, cfg, table, args, compile_blocks=True)
        compiled_tps = timed(compiled, args.epochs, warm_epoch=True)
        eager_tps = timed(ours, args.epochs, warm_epoch=True)     # again, after the same warm-up
        print(f"--compile: {compiled_tps:10.0f} non-pad tokens/s, {compiled_tps / eager_tps:.2f}× eager "
              f"({eager_tps:.0f} tokens/s in the same run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
