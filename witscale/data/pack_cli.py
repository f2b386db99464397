"""Command line of tools/pack_dataset.py: argument parsing, progress and the final stats table."""
from __future__ import annotations

import argparse
import os
import sys
import time

from witscale.data.added_tokens import tokenizer_for_packing
from witscale.data.classes import CLASS_NAMES, LEGACY_CLASS_NAMES
from witscale.data.errors import DataError
from witscale.data.output_dir import OutputError, os_error_line
from witscale.data.bestfit import LONG_POLICIES
from witscale.data.pack import PackOptions, content_summary, pack_files
from witscale.data.preference import PREFERENCE_FORMATS
from witscale.data.readers import FORMATS
from witscale.data.templates import TEMPLATE_NAMES


def default_workers() -> int:
    """Every core this process may run on (its affinity mask: a Slurm step's share, not the node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # not Linux
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pack_dataset.py", description="Tokenize instruction data and pack it into "
                                "fixed-length rows with a token class per token (witscale packed format v1).",
                                epilog="Token classes: " + ", ".join(f"{n}={i}" for i, n in enumerate(CLASS_NAMES)) + ".")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="JSON array, JSONL or parquet files, globs ('data/*.jsonl'), dataset directories "
                        "(save_to_disk, or folders datasets.load_dataset reads) or Hugging Face dataset names")
    p.add_argument("--split", default=None, help="split of a dataset input (default: train, or its only split)")
    p.add_argument("--subset", default=None, help="configuration (subset) of a dataset input")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file or local HF tokenizer directory")
    p.add_argument("--seq-len", type=int, required=True, help="row length in tokens")
    p.add_argument("--output", required=True, help="output directory (written aside, then swapped into place)")
    p.add_argument("--task", default="sft", choices=("sft", "preference"),
                   help="sft: instruction records (default); preference: pairs {prompt|messages|conversations, "
                        "chosen, rejected}, each pair's two documents packed whole into one row, chosen first")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS + PREFERENCE_FORMATS)
    p.add_argument("--template", default="plain", choices=TEMPLATE_NAMES,
                   help="plain (the paper's), alpaca, chatml (Qwen; tools, <think>), llama3 (Llama 3.1 tools), tulu, "
                        "hf (the tokenizer's chat_template). Records with tools need chatml, llama3 or hf")
    p.add_argument("--add-special-tokens", action="store_true",
                   help="add the template's special tokens the tokenizer lacks (e.g. chatml's <|im_start|> to "
                        "LLaMA-2's); the extended tokenizer is saved in the packed directory and recorded in its "
                        "manifest, and training grows the model's vocabulary to match")
    p.add_argument("--long", default="truncate", choices=LONG_POLICIES, dest="long_policy",
                   help="documents longer than --seq-len (default truncate; --task sft only: a preference pair "
                        "longer than a row is an error, or skipped with --skip-invalid)")
    p.add_argument("--max-prompt-length", type=int, default=None, metavar="N",
                   help="--task preference: a pair longer than a row is truncated as TRL does: its prompt to at most "
                        "N tokens first (the same in both documents), then the completions from their end; the "
                        "manifest counts the pairs cut. Without it such a pair is an error")
    p.add_argument("--truncation-mode", default="keep_end", choices=("keep_end", "keep_start"),
                   help="which end of a truncated prompt to keep (default keep_end, as TRL)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"tokenizer processes (default: every core this process may use, {default_workers()} "
                        f"here); the output is the same bytes whatever the count")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip (and count, by reason) invalid records instead of failing")
    p.add_argument("--max-skip-fraction", type=float, default=0.05,
                   help="with --skip-invalid: fail (nothing written) when more than this fraction of the records "
                        "is skipped (default 0.05)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output: only an earlier packed dataset (or an empty directory); "
                        "anything else is refused, never deleted")
    p.add_argument("--last-turn-only", action="store_true",
                   help="earlier assistant turns of a multi-turn record become prompt-side")
    p.add_argument("--system", default=None, help="system prompt for records that have none")
    return p


class _Progress:
    """tqdm on a terminal, a plain line every `every` records otherwise."""

    def __init__(self, every: int = 10000):
        self.n, self.every, self.t0 = 0, every, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(unit=" rec", desc="tokenizing", file=sys.stderr)
            except ImportError:
                pass

    def __call__(self, k: int) -> None:
        before, self.n = self.n, self.n + k
        if self.bar is not None:
            self.bar.update(k)
        elif before // self.every != self.n // self.every:
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            print(f"tokenized {self.n} records ({rate:.0f} rec/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def stats_table(m: dict) -> str:
    c, t = m["counts"], m.get("timing", {})
    rows = [("records read", c["records_read"]), ("records skipped", c["skipped"]),
            ("documents truncated", c["truncated"]), ("documents dropped", c["dropped"]),
            ("documents split", c["split"]), ("documents packed", m["num_documents"]),
            ("rows", f"{m['num_rows']} × {m['seq_len']}"), ("tokens (non-pad)", m["num_tokens"])]
    rows += [(f"  {name}", n) for name, n in m["tokens_per_class"].items() if n or name in LEGACY_CLASS_NAMES]
    if m.get("task") == "preference":
        rows.insert(5, ("pairs packed", f"{m['num_pairs']} ({m['pairs_per_row']:.2f} per row)"))
        rows.insert(6, ("pairs truncated", f"{c.get('pairs_prompt_truncated', 0)} prompts, "
                                           f"{c.get('pairs_completion_truncated', 0)} completions"))
    rows.append(("packing efficiency", f"{100 * m['packing_efficiency']:.2f}%"))
    if t:
        rows.append(("throughput", f"{t['input_tokens'] / max(t['total_s'], 1e-9):,.0f} tokens/s "
                                   f"({t['total_s']:.2f} s)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    read = max(c["records_read"], 1)
    for reason, n in c.get("skipped_by_reason", {}).items():
        lines.append(f"skipped {n} ({100 * n / read:.1f}%): {reason}")
    for reason in m.get("skipped", [])[:10]:
        lines.append(f"skipped: {reason}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.seq_len < 2:
        print(f"error: --seq-len must be at least 2, got {args.seq_len}", file=sys.stderr)
        return 2
    if not 0 <= args.max_skip_fraction <= 1:
        print(f"error: --max-skip-fraction must be between 0 and 1, got {args.max_skip_fraction}", file=sys.stderr)
        return 2
    if args.workers is None:
        args.workers = default_workers()
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    opts = PackOptions(seq_len=args.seq_len, template=args.template, long_policy=args.long_policy,
                       last_turn_only=args.last_turn_only, system=args.system, skip_invalid=args.skip_invalid,
                       workers=args.workers, task=args.task, max_skip_fraction=args.max_skip_fraction,
                       max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode)
    progress = _Progress()
    try:
        tokenizer = args.tokenizer
        if args.add_special_tokens:     # a scratch copy with the template's missing tokens (added_tokens.py)
            tokenizer = tokenizer_for_packing(args.tokenizer, args.template)
        manifest = pack_files(args.input, tokenizer, args.output, opts, fmt=args.format,
                              overwrite=args.overwrite, progress=progress, split=args.split, subset=args.subset,
                              on_format=lambda path, fmt: print(f"{path}: detected format {fmt}", file=sys.stderr))
    except (DataError, OutputError) as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:        # reading an input: the file and the errno
        progress.close()
        print(f"error: {os_error_line(e, args.output)}", file=sys.stderr)
        return 2
    progress.close()
    if args.format == "auto":
        for source in manifest["sources"]:
            print(f"{source['path']}: {source['format']}, {content_summary(source)}", file=sys.stderr)
    print(stats_table(manifest))
    print(f"wrote {args.output}")
    return 0
