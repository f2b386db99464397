"""Records → tokenized documents → packed dataset. The CLI (tools/pack_dataset.py) is a thin shell over
:func:`pack_files` (files, globs, dataset directories and Hub datasets: witscale/data/inputs.py);
:func:`pack_records` does the same for records already in memory. ``PackOptions.task="preference"`` reads
preference pairs instead (witscale/data/preference.py) and packs each pair whole, chosen then rejected."""
from __future__ import annotations

import collections
import gc
import hashlib
import itertools
import multiprocessing as mp
import os
import re
import time
from typing import Callable, Iterable, NamedTuple

import numpy as np

from witscale.data.errors import DataError, RecordError
from witscale.data.format import PackedWriter, check_output
from witscale.data.inputs import dataset_digest, iter_dataset, load_dataset_source, resolve_inputs
from witscale.data.preference import (PREFERENCE_FORMATS, TRUNCATION_MODES, PairDocuments, Truncation,
                                      detect_preference_format, normalize_pair, render_pair)
from witscale.data.readers import (FORMATS, SourceRecord, describe_format, detect_format, normalize_record,
                                   read_records, records_with_format)
from witscale.data.render import Renderer
from witscale.data.templates import Document
from witscale.data.tokenizer import load_tokenizer

MAX_SKIP_REASONS = 50


class PackOptions(NamedTuple):
    seq_len: int
    template: str = "plain"
    long_policy: str = "truncate"
    last_turn_only: bool = False
    system: str | None = None
    skip_invalid: bool = False
    workers: int = 1
    task: str = "sft"            # 'sft' | 'preference'
    max_skip_fraction: float = 0.05   # --skip-invalid: refuse the run when more records than this are skipped
    max_prompt_length: int | None = None   # preference: truncate a too-long pair as TRL does (None: refuse it)
    truncation_mode: str = "keep_end"      # preference: which end of the prompt to keep


class _Task(NamedTuple):
    fmt: str
    src: SourceRecord


# ------------------------------------------------------------------------------------- tokenizing (workers)
_RENDERER: Renderer | None = None
_OPTS: PackOptions | None = None


def _init_worker(tokenizer_path: str, opts: PackOptions, tokenizer=None) -> None:
    global _RENDERER, _OPTS
    _RENDERER, _OPTS = Renderer(opts.template, tokenizer or load_tokenizer(tokenizer_path)), opts


def _tokenize(task: _Task):
    """(a Document — a PairDocuments for preference data — or the RecordError (located) that the record raised,
    the record's content kinds for the input summary: Conversation.content_kinds(), () when it did not parse)."""
    src = task.src
    if isinstance(src.record, RecordError):
        return src.record, ()
    kinds = ()
    try:
        if task.fmt in PREFERENCE_FORMATS:
            chosen, rejected = normalize_pair(src.record, task.fmt, system=_OPTS.system)
            trunc = (Truncation(_OPTS.max_prompt_length, _OPTS.truncation_mode)
                     if _OPTS.max_prompt_length is not None else None)
            return render_pair(_RENDERER, chosen, rejected, _OPTS.seq_len, trunc), tuple(chosen.content_kinds())
        conv = normalize_record(src.record, task.fmt, last_turn_only=_OPTS.last_turn_only, system=_OPTS.system)
        kinds = tuple(conv.content_kinds())
        return _RENDERER(conv), kinds
    except RecordError as e:
        return e.located(src.file, src.where), kinds


def _tokenize_chunk(tasks: list) -> list:
    """``[_tokenize(t) for t in tasks]``, the SFT records' strings encoded in one batch (Renderer.render_many);
    preference pairs (rendered again when truncated) and unreadable records take the per-record path."""
    out: list = [None] * len(tasks)
    batch: list = []                                        # (index, kinds, Conversation)
    for i, task in enumerate(tasks):
        src = task.src
        if task.fmt in PREFERENCE_FORMATS or isinstance(src.record, RecordError):
            out[i] = _tokenize(task)
            continue
        try:
            conv = normalize_record(src.record, task.fmt, last_turn_only=_OPTS.last_turn_only, system=_OPTS.system)
        except RecordError as e:
            out[i] = e.located(src.file, src.where), ()
            continue
        batch.append((i, tuple(conv.content_kinds()), conv))
    docs = _RENDERER.render_many([conv for _, _, conv in batch])
    for (i, kinds, _), doc in zip(batch, docs):
        src = tasks[i].src
        out[i] = (doc.located(src.file, src.where) if isinstance(doc, RecordError) else doc), kinds
    return out


def _tokenize_chunk_packed(tasks: list):
    """``_tokenize_chunk(tasks)`` for the trip back from a worker process: the documents' ids, classes and
    weights concatenated into one array each (pickled as three buffers, not three arrays per document) and,
    per task, its outcome with each document replaced by its length (and whether it has weights).
    :func:`_unpack_chunk` gives back the list — its documents views into those arrays."""
    outcomes, ids, classes, weights = [], [], [], []

    def shelve(doc: Document):
        ids.append(doc.ids)
        classes.append(doc.classes)
        if doc.weights is not None:
            weights.append(doc.weights)
        return len(doc.ids), doc.weights is not None
    for out, kinds in _tokenize_chunk(tasks):
        if isinstance(out, Document):
            out = _Shelved((shelve(out),))
        elif isinstance(out, PairDocuments):
            out = _Shelved((shelve(out.chosen), shelve(out.rejected)), out.truncated)
        outcomes.append((out, kinds))
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return outcomes, cat(ids, np.int32), cat(classes, np.uint8), cat(weights, np.float32)


class _Shelved(NamedTuple):
    """A record's documents in a packed chunk: (length, has weights) of each — one, or a pair's two — and what
    of the pair was truncated."""
    docs: tuple
    truncated: tuple = ()


def _unpack_chunk(packed) -> list:
    """The inverse of :func:`_tokenize_chunk_packed`."""
    outcomes, ids, classes, weights = packed
    at = {"tokens": 0, "weights": 0}

    def take(length: int, has_weights: bool) -> Document:
        t, w = at["tokens"], at["weights"]
        at["tokens"] += length
        if has_weights:
            at["weights"] += length
        return Document(ids[t:t + length], classes[t:t + length], weights[w:w + length] if has_weights else None)
    out = []
    for o, kinds in outcomes:
        if isinstance(o, _Shelved):
            docs = [take(*d) for d in o.docs]
            o = docs[0] if len(docs) == 1 else PairDocuments(*docs, o.truncated)
        out.append((o, kinds))
    return out


# ------------------------------------------------------------------------------------------ orchestration
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _chunks(it: Iterable, size: int):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# the tokenizer pipeline's window: chunks of CHUNK_RECORDS records, at most IN_FLIGHT_PER_WORKER chunks per worker
# handed out and not yet consumed. Bounds the records and documents held between the reader and the writer
# (multiprocessing's Pool.imap would read the whole input ahead of slow workers).
CHUNK_RECORDS = 64
IN_FLIGHT_PER_WORKER = 4


def tokenize_tasks(tasks: Iterable[_Task], tokenizer_path: str, opts: PackOptions,
                   progress: Callable[[int], None] | None = None, tokenizer=None):
    """Yield (task index order) (Document or RecordError, content kinds); ordered whatever the worker count,
    reading the tasks lazily: at most ``workers × IN_FLIGHT_PER_WORKER`` chunks are out at a time.
    ``tokenizer``: the one already loaded, used in this process and by forked workers (spawned ones load theirs)."""
    if opts.workers <= 1:
        _init_worker(tokenizer_path, opts, tokenizer)
        for chunk in _chunks(tasks, CHUNK_RECORDS):
            results = _tokenize_chunk(chunk)
            if progress:
                progress(len(results))
            yield from results
        return
    ctx = mp.get_context("spawn" if os.name == "nt" else "fork")
    # forked workers inherit the tokenizer already loaded here (loading it again cost each worker ~0.5 s of CPU)
    inherited = tokenizer if ctx.get_start_method() == "fork" else None
    # the inherited objects (transformers, torch, the tokenizer: ~220k) out of the workers' garbage collections,
    # which would scan them and copy their pages: 13% fewer page faults, ~3% less CPU (not when the caller
    # froze objects of its own: unfreezing would release those too)
    freeze = inherited is not None and gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        yield from _tokenize_in_pool(ctx, tasks, tokenizer_path, opts, progress, inherited)
    finally:
        if freeze:
            gc.unfreeze()


def _tokenize_in_pool(ctx, tasks, tokenizer_path: str, opts: PackOptions, progress, inherited):
    with ctx.Pool(opts.workers, initializer=_init_worker, initargs=(tokenizer_path, opts, inherited)) as pool:
        pending = collections.deque()
        chunks = _chunks(tasks, CHUNK_RECORDS)
        while True:
            while len(pending) < opts.workers * IN_FLIGHT_PER_WORKER:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                pending.append(pool.apply_async(_tokenize_chunk_packed, (chunk,)))
            if not pending:
                return
            results = _unpack_chunk(pending.popleft().get())
            if progress:
                progress(len(results))
            yield from results


def _peek(records):
    """(first record that parsed or None, the same iterator from the start)."""
    head = []
    for src in records:
        head.append(src)
        if not isinstance(src.record, RecordError):
            break
    first = head[-1].record if head and not isinstance(head[-1].record, RecordError) else None
    return first, itertools.chain(head, records)


def pack_files(inputs: list[str], tokenizer_path: str, output: str, opts: PackOptions, fmt: str = "auto",
               overwrite: bool = False, progress: Callable[[int], None] | None = None,
               on_format: Callable[[str, str], None] | None = None, split: str | None = None,
               subset: str | None = None) -> dict:
    """Read every input (files, globs, dataset directories, Hub datasets), tokenize, pack and write `output`.
    Returns the manifest plus a 'timing' entry (seconds; not written to disk, so that the output stays
    byte-identical across runs). `on_format(source, 'format (features)')` reports each detected format."""
    _check_output(output, overwrite)
    formats, detect = _task_formats(opts)
    sources_in = resolve_inputs(inputs, split, subset)
    tokenizer = load_tokenizer(tokenizer_path)
    Renderer(opts.template, tokenizer)          # a missing special token fails before any reading
    sources, streams = [], []
    for src in sources_in:
        if src.kind == "file":
            detected, records = read_records(src.path, fmt, formats=formats, detect=detect)
            source = {"path": src.path, "sha256": sha256_file(src.path)}
        else:
            ds = load_dataset_source(src)
            detected, records = records_with_format(src.name, iter_dataset(ds), fmt, formats=formats, detect=detect)
            source = {"path": src.path, "sha256": dataset_digest(ds), "split": src.split, "subset": src.subset}
        first, records = _peek(records)
        if on_format and fmt == "auto":
            on_format(src.name, describe_format(first, detected) if first is not None else detected)
        source.update(format=detected, records=0)
        sources.append(source)
        streams.append((detected, records, source))

    task_sources = collections.deque()     # the source of each task handed out, in order: results come in order

    def tasks():
        for detected, records, source in streams:
            for rec in records:
                source["records"] += 1
                task_sources.append(source)
                yield _Task(detected, rec)
    return _run(tasks(), tokenizer, tokenizer_path, output, opts, sources, overwrite, progress,
                task_sources.popleft)


def pack_records(records: list, tokenizer_path: str, output: str, opts: PackOptions, fmt: str = "auto",
                 overwrite: bool = False, name: str = "<records>") -> dict:
    """Pack in-memory records (dicts of one format) the same way as :func:`pack_files`."""
    _check_output(output, overwrite)
    tokenizer = load_tokenizer(tokenizer_path)
    Renderer(opts.template, tokenizer)
    if not records:
        raise DataError("no records", name)
    formats, detect = _task_formats(opts)
    if fmt == "auto":
        fmt = detect(records[0])
    elif fmt not in formats:
        raise DataError(f"unknown format {fmt!r} for --task {opts.task}; known formats: {', '.join(formats)}")
    tasks = (_Task(fmt, SourceRecord(name, f"record {i}", r)) for i, r in enumerate(records, 1))
    sources = [{"path": name, "sha256": None, "format": fmt, "records": len(records)}]
    return _run(tasks, tokenizer, tokenizer_path, output, opts, sources, overwrite, None, lambda: sources[0])


def _task_formats(opts: PackOptions):
    """(formats, detector) of the task; options that do not apply to it are refused."""
    if opts.task == "sft":
        if opts.max_prompt_length is not None:
            raise DataError("--max-prompt-length applies to --task preference only (SFT documents: --long)")
        return FORMATS, detect_format
    if opts.task != "preference":
        raise DataError(f"unknown task {opts.task!r}; known tasks: sft, preference")
    if opts.long_policy != "truncate":
        raise DataError(f"--long {opts.long_policy} does not apply to --task preference: a pair longer than a row "
                        f"is an error (or skipped with --skip-invalid), never cut")
    if opts.max_prompt_length is not None and opts.max_prompt_length < 1:
        raise DataError(f"--max-prompt-length must be at least 1, got {opts.max_prompt_length}")
    if opts.truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"unknown --truncation-mode {opts.truncation_mode!r}; known: {', '.join(TRUNCATION_MODES)}")
    if opts.last_turn_only:
        raise DataError("--last-turn-only does not apply to --task preference: the prompt's assistant turns are "
                        "always prompt-side, the completion's response-side")
    return PREFERENCE_FORMATS, detect_preference_format


def _check_output(output: str, overwrite: bool) -> None:
    """Before any reading: refuse an output the packer must not replace (format.check_output)."""
    check_output(output, overwrite)


def skip_reason(e: RecordError) -> str:
    """The kind of a record's problem, for counting skips by reason: its message without the message index
    and with quoted values and numbers blanked ("messages[3]: unknown role 'robot'" → "unknown role '…'")."""
    problem = e.problem
    while True:
        head = _WHERE_IN_RECORD.match(problem)
        if not head:
            break
        problem = problem[head.end():]
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", problem))


_WHERE_IN_RECORD = re.compile(r"(?:(?:messages|conversations|tools|chosen|rejected)\[\d+\](?:\.\w+(?:\[\d+\])?)*"
                              r"|message \d+)(?::\s*|\s+)")


def content_summary(source: dict) -> str:
    """'50 records: 31 with tool calls, 12 with reasoning, …' for one source (its 'content' counts)."""
    c = source.get("content", {})
    parts = [f"{n} {'' if k == 'multi-turn' else 'with '}{k}" for k, n in c.items() if n]
    return f"{source['records']} records" + (": " + ", ".join(parts) if parts else "")


CONTENT_KINDS = ("tools", "tool calls", "tool results", "reasoning", "system", "multi-turn")


def _run(tasks, tokenizer, tokenizer_path, output, opts, sources, overwrite, progress, source_of) -> dict:
    """Tokenize the tasks as they are read, each document appended to the writer's spill as it comes (in
    input order: the output is the same whatever the worker count), then plan and write the rows."""
    t0 = time.perf_counter()
    reasons, n_read, n_skipped, by_reason = [], 0, 0, collections.Counter()
    pairs_truncated = {"prompt": 0, "completion": 0}
    for source in sources:
        source["content"] = dict.fromkeys(CONTENT_KINDS, 0)
    with PackedWriter(output, seq_len=opts.seq_len, pad_id=tokenizer.pad_id, long_policy=opts.long_policy,
                      task=opts.task, overwrite=overwrite) as writer:
        for out, kinds in tokenize_tasks(tasks, tokenizer_path, opts, progress, tokenizer):
            n_read += 1
            content = source_of()["content"]
            for k in kinds:
                content[k] += 1
            if isinstance(out, Document):
                writer.add(*out)
            elif isinstance(out, PairDocuments):
                writer.add(*out.chosen)               # documents 2i and 2i+1 of pair i
                writer.add(*out.rejected)
                for what in out.truncated:
                    pairs_truncated[what] += 1
            elif opts.skip_invalid and isinstance(out, RecordError):
                n_skipped += 1
                by_reason[skip_reason(out)] += 1
                if len(reasons) < MAX_SKIP_REASONS:
                    reasons.append(str(out))
            else:
                raise out
        by_reason = dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
        if n_skipped and n_skipped > opts.max_skip_fraction * n_read:
            worst = "; ".join(f"{n} {r}" for r, n in list(by_reason.items())[:3])
            raise DataError(f"--skip-invalid skipped {n_skipped} of {n_read} records "
                            f"({100 * n_skipped / n_read:.1f}%), more than --max-skip-fraction "
                            f"{opts.max_skip_fraction:g} allows; by reason: {worst}; first: {reasons[0]}")
        if not writer.num_documents:
            raise DataError(f"no usable records ({n_read} read, {n_skipped} skipped)")
        t1 = time.perf_counter()
        input_tokens = writer.spill.num_tokens
        manifest = writer.finish(tokenizer=tokenizer.fingerprint(), template=opts.template, sources=sources,
                                 counts={"records_read": n_read, "skipped": n_skipped,
                                         "skipped_by_reason": by_reason,
                                         **({"pairs_prompt_truncated": pairs_truncated["prompt"],
                                             "pairs_completion_truncated": pairs_truncated["completion"]}
                                            if opts.task == "preference" else {})},
                                 skipped=reasons, tokenizer_dir=tokenizer.extended_directory())
    t2 = time.perf_counter()
    manifest = dict(manifest)
    manifest["timing"] = {"tokenize_s": t1 - t0, "pack_write_s": t2 - t1, "total_s": t2 - t0,
                          "input_tokens": int(input_tokens)}
    return manifest
