"""The packed on-disk format (version 1) and its writer.

A directory with ``manifest.json`` and raw little-endian arrays:
  tokens.bin       int32   [num_rows, seq_len]
  classes.bin      uint8   [num_rows, seq_len]   (TokenClass; PAD after the last document of a row)
                                                 ids as in the manifest's class_table (name → id); a
                                                 manifest without one is the legacy 6-class table
  weights.bin      float32 [num_rows, seq_len]   optional: weights carried by the data (1.0 where absent)
  doc_lengths.bin  int32   [num_documents]       every document's length, row by row, in order
  row_offsets.bin  int64   [num_rows + 1]        CSR: row r holds doc_lengths[row_offsets[r]:row_offsets[r+1]],
                                                 laid out from position 0; the rest of the row is padding
Preference datasets (manifest ``"task": "preference"``; SFT manifests have no ``task``) add, per document:
  doc_pair.bin     int64   [num_documents]       the pair's index (input order, after skips)
  doc_role.bin     uint8   [num_documents]       0 chosen, 1 rejected; a pair's two documents are adjacent in
                                                 one row, chosen first (pairs are packed whole, never split)
  reference_logps.bin float64 [num_documents]   optional, added later by :func:`write_reference_logps`: each
                                                 completion's summed log-prob under the reference model; the
                                                 manifest's ``reference`` records what made it, and on what
                                                 data (``data``: :func:`content_digest` of the arrays)
Written into a temporary directory next to the output and swapped into place (witscale/data/output_dir.py):
a half-written dataset never sits at the output path, and only an earlier packed dataset (its manifest.json
has ``format_version``) or an empty directory is ever replaced, and only with ``overwrite``.
"""
from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from typing import NamedTuple

import numpy as np

from witscale.data.classes import CLASS_NAMES, NUM_CLASSES, TokenClass, check_class_table, class_table
from witscale.data.errors import DataError
from witscale.data.output_dir import (DirectoryWriter, OutputError, OutputKind, check_target, chmod_like_umask,
                                      os_error_line)
from witscale.data.bestfit import LONG_POLICIES, Pieces, apply_long_policy, gather_index, layout_rows

FORMAT_VERSION = 1
_ARRAYS = {"tokens": "<i4", "classes": "u1", "weights": "<f4"}
TASKS = ("sft", "preference")
CHOSEN, REJECTED = 0, 1            # doc_role values
REFERENCE_FILE = "reference_logps.bin"


def is_packed_dataset(path: str) -> bool:
    """Is ``path`` a witscale packed dataset (its manifest.json a JSON object with ``format_version``)?"""
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


PACKED_KIND = OutputKind("packed dataset", "witscale-pack", "manifest.json with format_version", is_packed_dataset)


def check_output(output: str, overwrite: bool) -> None:
    """Refuse (DataError, one line) an --output the packer must not replace: see output_dir.check_target."""
    try:
        check_target(output, PACKED_KIND, overwrite)
    except OutputError as e:
        raise DataError(str(e)) from None


class TokenizedCorpus(NamedTuple):
    """Tokenized documents, concatenated: document i is [offsets[i], offsets[i+1])."""
    tokens: np.ndarray          # int32
    classes: np.ndarray         # uint8
    weights: np.ndarray | None  # float32, or None when no record carried weights
    offsets: np.ndarray         # int64 [num_docs + 1]

    @classmethod
    def from_documents(cls, docs) -> "TokenizedCorpus":
        """From a list of (ids, classes, weights|None); the weight channel exists if any document has one."""
        lengths = np.array([len(d[0]) for d in docs], dtype=np.int64)
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([np.asarray(d[0], np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
        classes = np.concatenate([np.asarray(d[1], np.uint8) for d in docs]) if docs else np.zeros(0, np.uint8)
        weights = None
        if any(d[2] is not None for d in docs):
            weights = np.concatenate([np.asarray(d[2], np.float32) if d[2] is not None
                                      else np.ones(len(d[0]), np.float32) for d in docs])
        return cls(tokens, classes, weights, offsets)


def write_packed(output: str, corpus: TokenizedCorpus, *, seq_len: int, pad_id: int, long_policy: str = "truncate",
                 tokenizer: dict | None = None, template: str = "", sources: list | None = None,
                 counts: dict | None = None, skipped: list | None = None, overwrite: bool = False,
                 task: str = "sft", tokenizer_dir: str | None = None) -> dict:
    """Pack `corpus` into rows of `seq_len` and write the dataset at `output`; returns the manifest.

    ``task="preference"``: the corpus holds pairs, documents 2i (chosen) and 2i+1 (rejected) of pair i. Each
    pair is packed as ONE item of its total length (best-fit, like any document), so its two documents land
    adjacent in one row, chosen first; a pair longer than a row is an error (no long policy applies).
    The same rows as :class:`PackedWriter` fed the corpus' documents one by one (the streaming packer).
    ``tokenizer_dir``: a tokenizer extended by --add-special-tokens, copied in as ``tokenizer/``
    (witscale/data/added_tokens.py)."""
    _check_pack_args(output, seq_len, task, overwrite)
    try:
        writer = DirectoryWriter(output, PACKED_KIND, overwrite)
    except OutputError as e:
        raise DataError(str(e)) from None
    with writer:
        manifest = _write_rows(writer.tmp, _CorpusStore(corpus), np.diff(corpus.offsets), seq_len=seq_len,
                               pad_id=pad_id, long_policy=long_policy, task=task, meta=dict(
                                   tokenizer=tokenizer, template=template, sources=sources, counts=counts,
                                   skipped=skipped, tokenizer_dir=tokenizer_dir))
        writer.commit()
    return manifest


def _check_pack_args(output: str, seq_len: int, task: str, overwrite: bool) -> None:
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    check_output(output, overwrite)


class PackedWriter:
    """The streaming packer's output: documents added one at a time, in input order, then :meth:`finish`.

    A document's tokens, classes and weights are appended to spill files inside the output's temporary
    directory (written aside, docs/packed-format.md#atomic-write) and only its length stays in memory. At
    :meth:`finish` the rows are planned by best-fit decreasing over all the lengths — the same plan, hence
    the same bytes, as :func:`write_packed` on the whole corpus in memory — and written block by block
    (``PLACE_BLOCK_TOKENS`` tokens of rows at a time), each document read back from the spill files. Memory:
    a few words per document for the plan, plus one block; disk: the spill (9 bytes a token, removed before
    the swap) next to the output. Use as a context manager: leaving it by an exception removes everything
    it wrote, and the output path keeps what it held."""

    def __init__(self, output: str, *, seq_len: int, pad_id: int, long_policy: str = "truncate",
                 task: str = "sft", overwrite: bool = False):
        _check_pack_args(output, seq_len, task, overwrite)
        if task == "sft" and long_policy not in LONG_POLICIES:     # before any reading, not at finish
            raise DataError(f"unknown long-document policy {long_policy!r}; known: {', '.join(LONG_POLICIES)}")
        self._args = dict(seq_len=seq_len, pad_id=pad_id, long_policy=long_policy, task=task)
        try:
            self._writer = DirectoryWriter(output, PACKED_KIND, overwrite)
            self.spill = _DocumentSpill(self._writer.tmp)
        except OutputError as e:
            raise DataError(str(e)) from None
        except OSError as e:
            err = self._writer.error(e)
            self._writer.abort()
            raise err from None

    def add(self, ids, classes, weights=None) -> None:
        """Append one document (ids int32, classes uint8, weights float32 or None; equal lengths)."""
        self.spill.add(ids, classes, weights)

    @property
    def num_documents(self) -> int:
        return len(self.spill.lengths)

    def finish(self, *, tokenizer: dict | None = None, template: str = "", sources: list | None = None,
               counts: dict | None = None, skipped: list | None = None, tokenizer_dir: str | None = None) -> dict:
        """Plan and write the rows, swap the dataset into place; returns the manifest (``tokenizer_dir``: as
        :func:`write_packed`'s)."""
        self.spill.close()
        lengths = np.frombuffer(self.spill.lengths, dtype=np.int64)
        manifest = _write_rows(self._writer.tmp, self.spill, lengths, **self._args, meta=dict(
            tokenizer=tokenizer, template=template, sources=sources, counts=counts, skipped=skipped,
            tokenizer_dir=tokenizer_dir))
        self.spill.remove()
        self._writer.commit()
        return manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.spill.close()
        if exc_type is None and self._writer.tmp:      # left without finish(): nothing is swapped in
            self._writer.abort()
        return self._writer.__exit__(exc_type, exc, tb)


# rows planned, gathered and written per block: bounds the writer's memory whatever the dataset's size
PLACE_BLOCK_TOKENS = 1 << 22


class _CorpusStore:
    """Documents held in memory (a TokenizedCorpus), read by :func:`_write_rows`."""

    def __init__(self, corpus: TokenizedCorpus):
        self.arrays = {"tokens": corpus.tokens, "classes": corpus.classes, "weights": corpus.weights}
        self.has_weights = corpus.weights is not None

    def gather(self, name: str, src: np.ndarray, lengths: np.ndarray, dst: np.ndarray, out: np.ndarray) -> None:
        """out[dst_i : dst_i + n_i] = channel[src_i : src_i + n_i] for each piece i."""
        out[gather_index(dst, lengths)] = self.arrays[name][gather_index(src, lengths)]


class _DocumentSpill:
    """Documents appended to files (one per channel, input order; what the streaming packer holds of a
    document once tokenized is its length), read back piece by piece with pread."""

    def __init__(self, directory: str):
        self.paths = {name: os.path.join(directory, f".spill-{name}") for name in _ARRAYS}
        self.files = {name: open(self.paths[name], "wb", buffering=1 << 20) for name in ("tokens", "classes")}
        self.lengths = array.array("q")          # 8 bytes a document
        self.num_tokens = 0
        self.has_weights = False
        self._fds: dict = {}

    def add(self, ids, classes, weights) -> None:
        n = len(ids)
        if len(classes) != n or (weights is not None and len(weights) != n):
            raise ValueError(f"document {len(self.lengths)}: ids, classes and weights differ in length")
        if weights is not None and not self.has_weights:
            # the weight channel exists once any document has weights: 1.0 for every token before it
            self.files["weights"] = f = open(self.paths["weights"], "wb", buffering=1 << 20)
            ones = np.ones(min(self.num_tokens, 1 << 20), np.float32)
            for start in range(0, self.num_tokens, len(ones) or 1):
                f.write(ones[:min(len(ones), self.num_tokens - start)].tobytes())
            self.has_weights = True
        self.files["tokens"].write(np.asarray(ids, "<i4").tobytes())
        self.files["classes"].write(np.asarray(classes, "u1").tobytes())
        if self.has_weights:
            self.files["weights"].write((np.asarray(weights, "<f4") if weights is not None
                                         else np.ones(n, "<f4")).tobytes())
        self.lengths.append(n)
        self.num_tokens += n

    def close(self) -> None:
        """Close the files written and read (idempotent)."""
        for f in self.files.values():
            f.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def gather(self, name: str, src: np.ndarray, lengths: np.ndarray, dst: np.ndarray, out: np.ndarray) -> None:
        """out[dst_i : dst_i + n_i] = channel[src_i : src_i + n_i], read straight into `out` (no memory map:
        its pages would count in the resident set, the whole spill by the end)."""
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.paths[name], os.O_RDONLY)
        view, size = memoryview(out).cast("B"), out.itemsize
        for s, n, d in zip((src * size).tolist(), (lengths * size).tolist(), (dst * size).tolist()):
            if os.preadv(fd, [view[d:d + n]], s) != n:
                raise OSError(errno.EIO, "short read", self.paths[name])

    def remove(self) -> None:
        self.close()
        for path in self.paths.values():
            if os.path.exists(path):
                os.unlink(path)


def _write_rows(tmp: str, store, lengths: np.ndarray, *, seq_len: int, pad_id: int, long_policy: str, task: str,
                meta: dict) -> dict:
    """Plan the rows of the documents of `store` (their `lengths`, input order) and write every array and the
    manifest into `tmp`; returns the manifest."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    keep = lengths > 0
    if task == "preference":
        # the pieces are whole pairs: documents 2i and 2i+1 are contiguous in the corpus
        pieces, doc_lengths, doc_pair, pair_order = _pair_pieces(offsets, seq_len)
    else:
        pieces = apply_long_policy(lengths, seq_len, long_policy)
    nonempty = pieces.length > 0
    p_doc, p_start, p_len = pieces.doc[nonempty], pieces.start[nonempty], pieces.length[nonempty]
    layout = layout_rows(p_len, seq_len)
    num_rows = len(layout.row_offsets) - 1
    total = num_rows * seq_len
    channels = [("tokens", pad_id), ("classes", TokenClass.PAD)] + ([("weights", 0.0)] if store.has_weights else [])
    per_class = np.zeros(NUM_CLASSES, dtype=np.int64)
    rows_per_block = max(1, PLACE_BLOCK_TOKENS // seq_len)
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(open(os.path.join(tmp, f"{name}.bin"), "wb")) for name, _ in channels}
        for r0 in range(0, num_rows, rows_per_block):
            r1 = min(r0 + rows_per_block, num_rows)
            a, b = int(layout.row_offsets[r0]), int(layout.row_offsets[r1])
            order = layout.order[a:b]
            src = offsets[p_doc[order]] + p_start[order]
            dst = layout.dest[a:b] - r0 * seq_len
            for name, pad in channels:
                block = np.full((r1 - r0) * seq_len, pad, dtype=_ARRAYS[name])
                store.gather(name, src, p_len[order], dst, block)
                _write_block(files[name], block)
                if name == "classes":
                    per_class += np.bincount(block, minlength=NUM_CLASSES)[:NUM_CLASSES]
    if task == "preference":
        pairs = layout.order                      # pair indices in row order
        docs = pair_order(pairs)                  # their documents, chosen then rejected
        _write_array(os.path.join(tmp, "doc_lengths.bin"), doc_lengths[docs].astype("<i4"))
        _write_array(os.path.join(tmp, "doc_pair.bin"), doc_pair[docs].astype("<i8"))
        _write_array(os.path.join(tmp, "doc_role.bin"), (docs % 2).astype("u1"))
        _write_array(os.path.join(tmp, "row_offsets.bin"), (layout.row_offsets * 2).astype("<i8"))
        num_documents = len(docs)
    else:
        _write_array(os.path.join(tmp, "doc_lengths.bin"), p_len[layout.order].astype("<i4"))
        _write_array(os.path.join(tmp, "row_offsets.bin"), layout.row_offsets.astype("<i8"))
        num_documents = len(p_len)
    num_tokens = int(p_len.sum())
    c = dict(meta["counts"] or {})
    c.update(truncated=pieces.truncated, dropped=pieces.dropped, split=pieces.split)
    c["empty_documents"] = int((~keep).sum())
    manifest = {
        "format_version": FORMAT_VERSION, "seq_len": int(seq_len), "num_documents": int(num_documents),
        "num_rows": int(num_rows), "num_tokens": num_tokens,
        "packing_efficiency": num_tokens / total if total else 0.0,
        "tokens_per_class": {name: int(per_class[i]) for i, name in enumerate(CLASS_NAMES)},
        "class_table": class_table(),
        "tokenizer": meta["tokenizer"] or {}, "template": meta["template"], "has_weights": store.has_weights,
        "pad_id": int(pad_id), "long_policy": long_policy, "sources": meta["sources"] or [], "counts": c,
        "skipped": meta["skipped"] or [],
    }
    if task == "preference":
        # SFT manifests stay as they were (no 'task' key: an SFT dataset is byte-identical to before)
        manifest.update(task="preference", long_policy="none", num_pairs=int(num_documents // 2),
                        pairs_per_row=num_documents / 2 / num_rows if num_rows else 0.0)
    if meta.get("tokenizer_dir"):          # swapped in with the dataset or not at all
        from witscale.data.added_tokens import PACKED_TOKENIZER_DIR
        shutil.copytree(meta["tokenizer_dir"], os.path.join(tmp, PACKED_TOKENIZER_DIR))
    _write_manifest(tmp, manifest)
    return manifest


def _write_block(f, arr: np.ndarray) -> None:
    """Append arr's bytes to the open file f; a full disk is an OSError naming the file (see _write_array)."""
    try:
        f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
    except OSError as e:
        if e.filename is None:
            e.filename = f.name
        raise


def _write_array(path: str, arr: np.ndarray) -> None:
    """arr's bytes to path (what ndarray.tofile writes), but a full disk is an OSError with its errno and file
    name (tofile reports 'N requested and M written')."""
    try:
        with open(path, "wb") as f:
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
    except OSError as e:
        if e.filename is None:
            e.filename = path
        raise


def _pair_pieces(offsets: np.ndarray, seq_len: int):
    """(pieces = the pairs as whole items, document lengths, each document's pair, pairs → their documents)."""
    if (len(offsets) - 1) % 2:
        raise DataError("a preference corpus holds pairs: an even number of documents (chosen, rejected, ...)")
    doc_lengths = np.diff(offsets)
    num_pairs = len(doc_lengths) // 2
    pair_len = doc_lengths[0::2] + doc_lengths[1::2]
    if num_pairs and (int(doc_lengths.min()) < 2 or int(pair_len.max()) > seq_len):
        bad = int(np.argmax((pair_len > seq_len) | (doc_lengths.reshape(-1, 2).min(axis=1) < 2)))
        raise DataError(f"pair {bad} has documents of {doc_lengths[2 * bad]} + {doc_lengths[2 * bad + 1]} tokens: "
                        f"each needs at least 2 and both together at most a row (--seq-len {seq_len})")
    first_doc = np.arange(num_pairs, dtype=np.int64) * 2
    pieces = Pieces(first_doc, np.zeros(num_pairs, np.int64), pair_len.astype(np.int64), 0, 0, 0)
    doc_pair = np.repeat(np.arange(num_pairs, dtype=np.int64), 2)

    def pair_order(pairs: np.ndarray) -> np.ndarray:
        return (np.asarray(pairs, np.int64)[:, None] * 2 + np.arange(2)).reshape(-1)
    return pieces, doc_lengths, doc_pair, pair_order


def _write_manifest(directory: str, manifest: dict, name: str = "manifest.json") -> None:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _replace_file(dataset_dir: str, name: str, data: bytes) -> None:
    """Replace ``name`` in the dataset atomically: a temp file ``.<name>.tmp-*`` in the same directory (mode as
    the umask gives), flushed, renamed over it. An OSError (a full disk …) becomes one line naming the file;
    the old file stays and the temp file goes."""
    final = os.path.join(dataset_dir, name)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=dataset_dir)
        with os.fdopen(fd, "wb") as f:
            chmod_like_umask(tmp, directory=False)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"{final}: [Errno {e.errno}] {e.strerror} (the previous {name} is untouched)") \
                if e.errno else OutputError(f"{final}: {e}") from None
        raise


def _replace_manifest(dataset_dir: str, manifest: dict) -> None:
    """Rewrite manifest.json atomically (``_replace_file``)."""
    _replace_file(dataset_dir, "manifest.json", (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())


def _clean_temp_files(dataset_dir: str) -> None:
    """The temp files a crashed reference writer left (``.manifest.json.tmp-*``, ``.reference_logps.bin.tmp-*``);
    called under the reference lock, so no live writer owns them."""
    for name in os.listdir(dataset_dir):
        if name.startswith((".manifest.json.tmp-", f".{REFERENCE_FILE}.tmp-")):
            try:
                os.unlink(os.path.join(dataset_dir, name))
            except OSError:
                pass


# content_digest: arrays read whole (bytes per document or row) and arrays sampled (bytes per token)
_DIGEST_WHOLE = ("doc_lengths.bin", "row_offsets.bin", "doc_pair.bin", "doc_role.bin")
_DIGEST_SAMPLED = ("tokens.bin", "classes.bin", "weights.bin")
DIGEST_SAMPLES, DIGEST_BLOCK = 64, 1 << 16


def content_digest(dataset_dir: str) -> str:
    """sha256 of what a packed dataset holds, as the arrays on disk are now (through any symbolic link): the
    per-document and per-row arrays whole (a few bytes per document), and of each per-token array (GBs) its
    size and DIGEST_SAMPLES evenly spaced blocks — a few MB read in all. Reference log-probs record it when
    written and are refused when it changed: a dataset re-packed under the same path, or a run-private copy
    whose linked arrays were replaced, no longer matches. It tells datasets apart; it does not guard against
    a file edited at an unsampled offset."""
    digest = hashlib.sha256()
    for name in _DIGEST_WHOLE + _DIGEST_SAMPLED:
        path = os.path.join(dataset_dir, name)
        if not os.path.isfile(path):
            digest.update(f"{name}\0absent\0".encode())
            continue
        size = os.path.getsize(path)
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if name in _DIGEST_WHOLE or size <= DIGEST_SAMPLES * DIGEST_BLOCK:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                continue
            span = size - DIGEST_BLOCK
            for k in range(DIGEST_SAMPLES):
                f.seek(span * k // (DIGEST_SAMPLES - 1))
                digest.update(f.read(DIGEST_BLOCK))
    return digest.hexdigest()


@contextlib.contextmanager
def _reference_lock(dataset_dir: str):
    """One reference writer at a time per dataset (two jobs precomputing into the same shared directory would
    otherwise interleave their values and manifests). flock: local and most cluster filesystems honour it.
    The file stays (empty) after the writer is done, as ``.witscale.lock`` does (training/run_lock.py): deleting
    it would let a writer waiting on the unlinked inode and a newcomer locking a new file write at once."""
    fd = os.open(os.path.join(dataset_dir, ".reference.lock"), os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_reference_logps(dataset_dir: str, values, meta: dict) -> dict:
    """Store each completion's reference log-prob (float64 [num_documents]) in a preference dataset.

    Never leaves a half-written channel, nor values under another run's meta: (1) the manifest is rewritten
    without ``reference`` (any old values become unused), (2) the values go to a temp file renamed over
    reference_logps.bin, (3) the manifest is rewritten with ``reference`` = ``meta`` plus the values'
    sha256 and the data's :func:`content_digest`. A crash leaves the old channel, or none, or the new one —
    each with its own meta; concurrent writers take turns (a lock file). Returns the new manifest."""
    try:
        with _reference_lock(dataset_dir):
            return _write_reference_logps(dataset_dir, values, meta)
    except OSError as e:            # the lock file, reading the dataset: one line naming the file
        raise OutputError(os_error_line(e, dataset_dir)) from None


def _write_reference_logps(dataset_dir: str, values, meta: dict) -> dict:
    # old values, even damaged ones, get replaced; the arrays were validated when the pass opened them
    ds = PackedDataset(dataset_dir, load_reference=False, validate=False)
    _clean_temp_files(dataset_dir)
    if not ds.is_preference:
        raise DataError("reference log-probs belong to a preference dataset (pack_dataset.py --task preference)",
                        dataset_dir)
    values = np.asarray(values, dtype="<f8")
    expected = (int(ds.manifest["num_documents"]),)
    if values.shape != expected:
        raise DataError(f"reference log-probs: got shape {list(values.shape)}, the dataset has {expected[0]} "
                        f"documents", dataset_dir)
    if not np.isfinite(values).all():
        bad = int(np.argmin(np.isfinite(values)))
        raise DataError(f"reference log-probs: document {bad} has {values[bad]} (not finite)", dataset_dir)
    if not isinstance(meta, dict):
        raise DataError(f"reference meta must be a dict, got {type(meta).__name__}", dataset_dir)
    manifest = dict(ds.manifest)
    del ds
    if "reference" in manifest:
        manifest.pop("reference")
        _replace_manifest(dataset_dir, manifest)
    _replace_file(dataset_dir, REFERENCE_FILE, values.tobytes())
    manifest["reference"] = dict(meta, sha256=hashlib.sha256(values.tobytes()).hexdigest(),
                                 data=content_digest(dataset_dir))
    _replace_manifest(dataset_dir, manifest)
    return manifest


VALIDATE_CHUNK = 1 << 20     # elements per validation read: 4 MiB of int32 (cache-sized), whatever the dataset's size


def _chunks(path: str, dtype: str, elements: int, start: int = 0, stop: int | None = None):
    """(first element, array) over elements [start, stop) of a raw array file (stop None: to its end), read
    into one reused buffer of `elements` elements: memory stays bounded and no page of the file stays mapped
    in this process (a memory map of the whole dataset would hold every page it touched in the process's
    resident set). The array is overwritten by the next chunk: use it before asking for the next."""
    buf = np.empty(max(1, elements), dtype=dtype)
    first = start
    with open(path, "rb", buffering=0) as f:
        f.seek(start * buf.itemsize)
        while stop is None or first < stop:
            want = len(buf) if stop is None else min(len(buf), stop - first)
            view = memoryview(buf[:want]).cast("B")
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            count = got // buf.itemsize
            if count:
                yield first, buf[:count]
                first += count
            if got < len(view):
                return


def _check_ids(block: np.ndarray, limit: int | None, file: str, first_row: int, problem: str) -> None:
    """Ids of a [rows, seq_len] block within [0, limit) (limit None: only >= 0). One reduction: viewed as
    unsigned, a negative id is larger than any limit."""
    unsigned = block.view(block.dtype.str.replace("i", "u"))
    bound = limit if limit is not None else int(np.iinfo(block.dtype).max) + 1
    if block.size and int(unsigned.max()) >= bound:
        bad = (block < 0) | (block >= bound)
        row, col = np.unravel_index(int(np.argmax(bad)), block.shape)
        raise DataError(problem.format(value=int(block[row, col]), col=int(col)), file, f"row {first_row + row}")


def _check_weights(block: np.ndarray, file: str, first_row: int) -> None:
    """Weights finite and >= 0. One reduction: as uint32, every finite float >= +0 is at most 0x7F7FFFFF, and
    +inf, NaN and every negative (-0.0 too) are above it; a flagged block is decided with float semantics."""
    if block.size and int(block.view("<u4").max()) > 0x7F7FFFFF:
        bad = ~(np.isfinite(block) & (block >= 0))
        if bad.any():
            row, col = np.unravel_index(int(np.argmax(bad)), block.shape)
            raise DataError(f"weight {block[row, col]} at position {int(col)}: weights must be finite and >= 0",
                            file, f"row {first_row + row}")


class PackedRow(NamedTuple):
    tokens: np.ndarray
    classes: np.ndarray
    weights: np.ndarray | None
    doc_lengths: np.ndarray


class PackedDataset:
    """Read-only, memory-mapped view of a packed dataset directory. Opening it checks the manifest, the arrays'
    sizes and (``validate=True``, the default) every array's values (:meth:`validate`): a damaged dataset is
    refused, naming file and row, before anything trains on it."""

    def __init__(self, path: str, *, load_reference: bool = True, validate: bool = True,
                 shard: tuple[int, int] = (0, 1)):
        self.path = path
        if not os.path.isdir(path):
            raise DataError("not a packed dataset: no such directory", path)
        mpath = os.path.join(path, "manifest.json")
        try:
            with open(mpath, encoding="utf-8") as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise DataError("not a packed dataset (or an incomplete one): manifest.json is missing", path) from None
        except (OSError, ValueError) as e:
            raise DataError(f"manifest.json is unreadable: {e}", path) from None
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(f"unknown packed format_version {version!r}; this witscale reads version "
                            f"{FORMAT_VERSION}", path)
        try:
            self.seq_len = int(self.manifest["seq_len"])
            rows = int(self.manifest["num_rows"])
            ndocs = int(self.manifest["num_documents"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"manifest.json lacks a valid {e}", path) from None
        if self.seq_len < 2 or rows < 0 or ndocs < 0:
            raise DataError(f"manifest.json: seq_len {self.seq_len}, num_rows {rows}, num_documents {ndocs} are "
                            f"out of range", path)
        if not isinstance(self.manifest.get("tokenizer", {}), dict):
            raise DataError("manifest.json: 'tokenizer' is not an object", path)
        try:
            # the classes this data was packed with: ids 0..num_classes-1, a prefix of today's table
            self.class_names = check_class_table(self.manifest.get("class_table"))
        except ValueError as e:
            raise DataError(f"manifest.json: {e}", path) from None
        self.num_classes = len(self.class_names)
        self.has_weights = bool(self.manifest.get("has_weights"))
        shape = (rows, self.seq_len)
        self.tokens = self._map("tokens.bin", "<i4", shape)
        self.classes = self._map("classes.bin", "u1", shape)
        self.weights = self._map("weights.bin", "<f4", shape) if self.has_weights else None
        self._doc_lengths = self._map("doc_lengths.bin", "<i4", (ndocs,))
        self._row_offsets = np.asarray(self._map("row_offsets.bin", "<i8", (rows + 1,)))
        self.task = self.manifest.get("task", "sft")
        if self.task not in TASKS:
            raise DataError(f"manifest.json: unknown task {self.task!r} (known: {', '.join(TASKS)})", path)
        self.is_preference = self.task == "preference"
        self.doc_pair = self.doc_role = self.reference_logps = None
        if self.is_preference:
            self.doc_pair = self._map("doc_pair.bin", "<i8", (ndocs,))
            self.doc_role = self._map("doc_role.bin", "u1", (ndocs,))
            self.reference_logps = self._reference(ndocs) if load_reference else None
        if validate:
            self.validate(shard)

    def _map(self, name: str, dtype: str, shape: tuple):
        fpath = os.path.join(self.path, name)
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not os.path.isfile(fpath):
            raise DataError(f"incomplete packed dataset: {name} is missing", self.path)
        size = os.path.getsize(fpath)
        if size != expected:
            raise DataError(f"incomplete packed dataset: {name} has {size} bytes, expected {expected}", self.path)
        if expected == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(fpath, dtype=dtype, mode="r", shape=shape)

    def _reference(self, ndocs: int):
        """The reference log-probs (float64 memmap), or None when the manifest records none. Values without
        a manifest entry are an interrupted write_reference_logps: not used."""
        meta = self.manifest.get("reference")
        if not meta:
            return None
        values = self._map(REFERENCE_FILE, "<f8", (ndocs,))
        digest = meta.get("sha256") if isinstance(meta, dict) else None
        if digest is not None and hashlib.sha256(np.asarray(values).tobytes()).hexdigest() != digest:
            raise DataError(f"{REFERENCE_FILE} does not match the sha256 the manifest records for it (changed "
                            f"after tools/precompute_reference.py wrote it): recompute it", self.path)
        finite = np.isfinite(values)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise DataError(f"reference log-prob {values[bad]} of document {bad} is not finite: recompute it",
                            os.path.join(self.path, REFERENCE_FILE), f"row {self._row_of_document(bad)}")
        data = meta.get("data") if isinstance(meta, dict) else None
        if data is not None and content_digest(self.path) != data:
            raise DataError(f"{REFERENCE_FILE} was computed on other data: the dataset's arrays changed after "
                            f"tools/precompute_reference.py wrote it (re-packed, or a copy's linked arrays "
                            f"replaced): recompute it", self.path)
        return values

    # --- validation ----------------------------------------------------------------------------------
    def validate(self, shard: tuple[int, int] = (0, 1)) -> None:
        """Check every array's values against the manifest, as one-line DataErrors naming the file and the first
        bad row: the CSR structure (row_offsets from 0 to num_documents, each row at least one document;
        doc_lengths 1..seq_len, each row's sum within seq_len, the total = num_tokens), token ids in the
        tokenizer's vocabulary, class ids in the data's class table, weights finite and >= 0, preference rows
        holding whole (chosen, rejected) pairs. Vectorized, each file read once in chunks of VALIDATE_CHUNK
        elements (bounded memory whatever the size, :func:`_chunks`), one max-reduction per chunk of a
        per-token array (docs/packed-format.md#validation: the cost). Without it a bad offset is a numpy
        traceback or a silent zero-loss row, and a bad id or weight trains or fails only when its row is drawn.

        ``shard=(i, k)``: the per-token arrays (9 bytes a token) only for the i-th of k contiguous row ranges —
        each rank of a job its own, so the job reads the data once; the per-row and per-document arrays (a few
        bytes a document) always whole."""
        index, count = shard
        if not (count >= 1 and 0 <= index < count):
            raise ValueError(f"validation shard {index} of {count}")
        self._validate_structure()
        vocab = self.tokenizer_fingerprint.get("vocab_size")
        vocab = int(vocab) if isinstance(vocab, int) and vocab > 0 else None
        per_token = [("tokens.bin", "<i4", lambda block, file, row: _check_ids(
                          block, vocab, file, row, "token id {value} at position {col} is outside the tokenizer's "
                          "vocabulary " + (f"[0, {vocab})" if vocab else "(negative)"))),
                     ("classes.bin", "u1", lambda block, file, row: _check_ids(
                          block, self.num_classes, file, row, "class id {value} at position {col} is not in the "
                          f"data's class table (0..{self.num_classes - 1}: {', '.join(self.class_names)})"))]
        if self.has_weights:
            per_token.append(("weights.bin", "<f4", _check_weights))
        rows_per_chunk = max(1, VALIDATE_CHUNK // self.seq_len)
        first_row, stop_row = len(self) * index // count, len(self) * (index + 1) // count
        for name, dtype, check in per_token:
            file = self._file(name)
            for first, flat in _chunks(file, dtype, rows_per_chunk * self.seq_len, first_row * self.seq_len,
                                       stop_row * self.seq_len):
                check(flat.reshape(-1, self.seq_len), file, first // self.seq_len)
        if self.is_preference:
            self._validate_pairs()

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _row_of_document(self, doc: int) -> int:
        return int(np.searchsorted(self._row_offsets, doc, side="right")) - 1

    def _validate_structure(self) -> None:
        offsets, rows, seq_len = self._row_offsets, len(self), self.seq_len
        ndocs = len(self._doc_lengths)
        name = self._file("row_offsets.bin")
        if offsets[0] != 0:
            raise DataError(f"row_offsets start at {int(offsets[0])}, not 0", name, "row 0")
        steps = np.diff(offsets)
        if rows and int(steps.min()) < 1:
            r = int(np.argmax(steps < 1))
            what = "decrease" if steps[r] < 0 else "leave the row without documents"
            raise DataError(f"row_offsets {what} ({int(offsets[r])} then {int(offsets[r + 1])})", name, f"row {r}")
        if offsets[-1] != ndocs:
            raise DataError(f"row_offsets end at {int(offsets[-1])} but the manifest has num_documents {ndocs}",
                            name, f"row {rows - 1}" if rows else None)
        # each row's token count = the difference of doc_lengths' running sum at its offsets, found chunk by chunk
        name = self._file("doc_lengths.bin")
        ends = np.empty(rows + 1, dtype=np.int64)
        total = 0
        for a, chunk in _chunks(name, "<i4", VALIDATE_CHUNK):
            if int(chunk.min()) < 1 or int(chunk.max()) > seq_len:
                d = a + int(np.argmax((chunk < 1) | (chunk > seq_len)))
                raise DataError(f"document {d} has length {int(self._doc_lengths[d])}, outside 1..{seq_len} "
                                f"(seq_len)", name, f"row {self._row_of_document(d)}")
            before = np.cumsum(chunk, dtype=np.int64)
            before -= chunk                                   # tokens of this chunk before each document
            lo, hi = np.searchsorted(offsets, [a, a + len(chunk)], side="left")
            ends[lo:hi] = total + before[offsets[lo:hi] - a]
            total += int(before[-1]) + int(chunk[-1])
        ends[np.searchsorted(offsets, ndocs, side="left"):] = total
        used = np.diff(ends)
        if rows and int(used.max()) > seq_len:
            r = int(np.argmax(used > seq_len))
            raise DataError(f"the row's documents sum to {int(used[r])} tokens, more than seq_len {seq_len}",
                            name, f"row {r}")
        expected = self.manifest.get("num_tokens")
        if isinstance(expected, int) and expected != total:
            raise DataError(f"doc_lengths sum to {total} tokens but the manifest has num_tokens {expected}", name)

    def _validate_pairs(self) -> None:
        """Preference rows hold whole pairs, chosen then rejected of one pair (what write_packed lays out)."""
        offsets = self._row_offsets
        if (offsets % 2).any():
            r = max(0, int(np.argmax(offsets % 2)) - 1)
            raise DataError("not whole preference pairs: the row holds an odd number of documents",
                            self._file("row_offsets.bin"), f"row {r}")
        step = max(2, VALIDATE_CHUNK - VALIDATE_CHUNK % 2)    # even: a chunk holds whole pairs
        for (a, roles), (_, pairs) in zip(_chunks(self._file("doc_role.bin"), "u1", step),
                                          _chunks(self._file("doc_pair.bin"), "<i8", step)):
            bad_role = (roles[0::2] != CHOSEN) | (roles[1::2] != REJECTED)
            if bad_role.any():
                d = a + 2 * int(np.argmax(bad_role))
                raise DataError(f"not whole preference pairs: documents {d}, {d + 1} have roles "
                                f"{int(self.doc_role[d])}, {int(self.doc_role[d + 1])} (expected {CHOSEN}, "
                                f"{REJECTED})", self._file("doc_role.bin"), f"row {self._row_of_document(d)}")
            bad_pair = pairs[0::2] != pairs[1::2]
            if bad_pair.any():
                d = a + 2 * int(np.argmax(bad_pair))
                raise DataError(f"not whole preference pairs: documents {d}, {d + 1} belong to pairs "
                                f"{int(self.doc_pair[d])}, {int(self.doc_pair[d + 1])}", self._file("doc_pair.bin"),
                                f"row {self._row_of_document(d)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_pairs(self) -> int:
        return int(self.manifest.get("num_pairs", 0)) if self.is_preference else 0

    def doc_range(self, i: int) -> tuple[int, int]:
        """Row i's documents are [start, end) of the per-document arrays (doc_lengths, doc_pair, ...)."""
        return int(self._row_offsets[i]), int(self._row_offsets[i + 1])

    @property
    def tokenizer_fingerprint(self) -> dict:
        return self.manifest.get("tokenizer", {})

    def doc_lengths(self, i: int) -> np.ndarray:
        return np.asarray(self._doc_lengths[self._row_offsets[i]:self._row_offsets[i + 1]])

    def __getitem__(self, i: int) -> PackedRow:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i = i % len(self)
        return PackedRow(self.tokens[i], self.classes[i], self.weights[i] if self.weights is not None else None,
                         self.doc_lengths(i))
