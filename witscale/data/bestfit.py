"""Packing documents into fixed-length rows: best-fit decreasing over the whole dataset.

Documents are placed longest first (ties: input order) into the open row with the least remaining room that
still fits; rows are found through a sorted list of distinct remaining capacities (at most seq_len of them)
with a min-heap of row ids per capacity, so each placement costs O(log) and the result is deterministic.
"""
from __future__ import annotations

import bisect
import heapq
from typing import NamedTuple

import numpy as np

LONG_POLICIES = ("truncate", "drop", "split")


class Pieces(NamedTuple):
    """What gets packed: slices [start, start + length) of the tokenized documents."""
    doc: np.ndarray      # int64, index of the source document
    start: np.ndarray    # int64, offset inside that document
    length: np.ndarray   # int64
    truncated: int       # documents cut to seq_len
    dropped: int         # documents left out
    split: int           # documents cut into several pieces


def apply_long_policy(lengths: np.ndarray, seq_len: int, policy: str) -> Pieces:
    """Documents longer than seq_len: 'truncate' keeps the first seq_len tokens, 'drop' leaves them out,
    'split' cuts them into consecutive seq_len chunks, each packed as a document of its own."""
    if policy not in LONG_POLICIES:
        raise ValueError(f"unknown long-document policy {policy!r}; known: {', '.join(LONG_POLICIES)}")
    lengths = np.asarray(lengths, dtype=np.int64)
    long = lengths > seq_len
    n_long = int(long.sum())
    idx = np.arange(len(lengths), dtype=np.int64)
    if policy == "truncate":
        return Pieces(idx, np.zeros_like(idx), np.minimum(lengths, seq_len), n_long, 0, 0)
    if policy == "drop":
        keep = ~long
        return Pieces(idx[keep], np.zeros(int(keep.sum()), np.int64), lengths[keep], 0, n_long, 0)
    chunks = np.maximum((lengths + seq_len - 1) // seq_len, 1)
    doc = np.repeat(idx, chunks)
    first = np.repeat(np.cumsum(chunks) - chunks, chunks)
    start = (np.arange(len(doc), dtype=np.int64) - first) * seq_len
    return Pieces(doc, start, np.minimum(lengths[doc] - start, seq_len), 0, 0, n_long)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Row index of every item (int64) and the number of rows. Every length must be in [1, capacity]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must lie in [1, {capacity}]")
    order = np.argsort(-lengths, kind="stable")
    row_of = np.empty(len(lengths), dtype=np.int64)
    keys: list[int] = []                     # sorted remaining capacities that have an open row
    rows_with: dict[int, list[int]] = {}     # remaining capacity → min-heap of row ids
    num_rows = 0
    for i, size in _as_ints(order, lengths[order]):
        j = bisect.bisect_left(keys, size)
        if j == len(keys):
            row, left = num_rows, capacity - size
            num_rows += 1
        else:
            room = keys[j]
            heap = rows_with[room]
            row = heapq.heappop(heap)
            if not heap:
                del rows_with[room]
                keys.pop(j)
            left = room - size
        row_of[i] = row
        if left > 0:
            heap = rows_with.get(left)
            if heap is None:
                rows_with[left] = [row]
                bisect.insort(keys, left)
            else:
                heapq.heappush(heap, row)
    return row_of, num_rows


def _as_ints(*arrays: np.ndarray, chunk: int = 1 << 16):
    """zip of the arrays as Python ints, converted a chunk at a time (whole-array .tolist() would hold ~36
    bytes per element per array at once: GBs at tens of millions of documents)."""
    for a in range(0, len(arrays[0]), chunk):
        yield from zip(*(x[a:a + chunk].tolist() for x in arrays))


class Layout(NamedTuple):
    """Where every piece goes: pieces in row order (by row, then input order) and the CSR row offsets."""
    order: np.ndarray        # piece indices in output order
    row_offsets: np.ndarray  # int64 [num_rows + 1] into `order`
    dest: np.ndarray         # int64, flat destination offset (row * seq_len + position) per ordered piece


def layout_rows(lengths: np.ndarray, seq_len: int) -> Layout:
    row_of, num_rows = best_fit_decreasing(lengths, seq_len)
    order = np.lexsort((np.arange(len(row_of)), row_of))
    counts = np.bincount(row_of, minlength=num_rows)
    row_offsets = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=row_offsets[1:])
    ordered_len = np.asarray(lengths, dtype=np.int64)[order]
    within = np.cumsum(ordered_len) - ordered_len          # running position...
    row_start = np.repeat(within[row_offsets[:-1]] if num_rows else np.zeros(0, np.int64), counts)
    dest = row_of[order] * seq_len + (within - row_start)  # ...restarted at each row
    return Layout(order, row_offsets, dest)


def gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorized."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - first, lengths) + np.arange(total, dtype=np.int64)
