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
Written into a temporary directory next to the output and renamed into place: a half-written dataset never
sits at the output path.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import NamedTuple

import numpy as np

from witscale.data.classes import CLASS_NAMES, NUM_CLASSES, TokenClass, check_class_table, class_table
from witscale.data.errors import DataError
from witscale.data.bestfit import apply_long_policy, gather_index, layout_rows

FORMAT_VERSION = 1
_ARRAYS = {"tokens": "<i4", "classes": "u1", "weights": "<f4"}


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
                 counts: dict | None = None, skipped: list | None = None, overwrite: bool = False) -> dict:
    """Pack `corpus` into rows of `seq_len` and write the dataset at `output`; returns the manifest."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    if os.path.exists(output) and not overwrite:
        raise DataError("output already exists; pass --overwrite to replace it", output)
    lengths = np.diff(corpus.offsets)
    keep = lengths > 0
    pieces = apply_long_policy(lengths, seq_len, long_policy)
    nonempty = pieces.length > 0
    p_doc, p_start, p_len = pieces.doc[nonempty], pieces.start[nonempty], pieces.length[nonempty]
    layout = layout_rows(p_len, seq_len)
    num_rows = len(layout.row_offsets) - 1
    src = gather_index(corpus.offsets[p_doc[layout.order]] + p_start[layout.order], p_len[layout.order])
    dst = gather_index(layout.dest, p_len[layout.order])

    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.tmp-", dir=parent)
    try:
        total = num_rows * seq_len

        def fill(name, source, pad):
            arr = np.full(total, pad, dtype=_ARRAYS[name])
            arr[dst] = source[src]
            arr.tofile(os.path.join(tmp, f"{name}.bin"))
            return arr

        fill("tokens", corpus.tokens, pad_id)
        classes = fill("classes", corpus.classes, TokenClass.PAD)
        if corpus.weights is not None:
            fill("weights", corpus.weights, 0.0)
        p_len[layout.order].astype("<i4").tofile(os.path.join(tmp, "doc_lengths.bin"))
        layout.row_offsets.astype("<i8").tofile(os.path.join(tmp, "row_offsets.bin"))
        per_class = np.bincount(classes, minlength=NUM_CLASSES)
        num_tokens = int(p_len.sum())
        c = dict(counts or {})
        c.update(truncated=pieces.truncated, dropped=pieces.dropped, split=pieces.split)
        c["empty_documents"] = int((~keep).sum())
        manifest = {
            "format_version": FORMAT_VERSION, "seq_len": int(seq_len), "num_documents": int(len(p_len)),
            "num_rows": int(num_rows), "num_tokens": num_tokens,
            "packing_efficiency": num_tokens / total if total else 0.0,
            "tokens_per_class": {name: int(per_class[i]) for i, name in enumerate(CLASS_NAMES)},
            "class_table": class_table(),
            "tokenizer": tokenizer or {}, "template": template, "has_weights": corpus.weights is not None,
            "pad_id": int(pad_id), "long_policy": long_policy, "sources": sources or [], "counts": c,
            "skipped": skipped or [],
        }
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
            f.write("\n")
        _move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _move_into_place(tmp: str, output: str, overwrite: bool) -> None:
    if os.path.exists(output):
        if not overwrite:
            raise DataError("output already exists; pass --overwrite to replace it", output)
        old = tmp + ".old"
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)


class PackedRow(NamedTuple):
    tokens: np.ndarray
    classes: np.ndarray
    weights: np.ndarray | None
    doc_lengths: np.ndarray


class PackedDataset:
    """Read-only, memory-mapped view of a packed dataset directory."""

    def __init__(self, path: str):
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

    def __len__(self) -> int:
        return self.tokens.shape[0]

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
