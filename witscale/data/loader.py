"""From packed rows to training micro-batches, and the global-batch loss denominators.

One optimizer step consumes a *global batch* of ``dp × grad_accum × micro_batch_size`` rows. The sampler
draws it from a seeded per-epoch permutation; every data-parallel rank draws the same permutation, so each
rank can compute the denominators of the whole global batch (count of non-zero-weight targets, weight sum,
target count) locally, without communication, before any forward pass (under --sp, a rank that reads only its
part of the rows counts that part exactly, ShardCounts, and the sp group sums the parts once per step). Every micro-batch on every rank and
pipeline stage is then divided by the same constant — the paper's objective, with no per-micro-batch or
per-rank normalization ("gradient accumulation bug").

Targets: the label at position t is the token at t+1 *of the same document*. The label that would cross
from a document's last token into the next document (or into padding) is dropped (-100). The weight of a
target is the class-table weight of the *predicted* token's class, times the data's explicit weight
channel when present.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch

from witscale.data.classes import NUM_CLASSES, TokenClass
from witscale.data.weighting import IGNORE_INDEX, denominators_of  # noqa: F401 - part of the loader's interface


@dataclass
class MicroBatch:
    input_ids: torch.Tensor       # [B, S] int64
    labels: torch.Tensor          # [B, S] int64, IGNORE_INDEX where nothing is predicted
    weights: torch.Tensor         # [B, S] float32, weight of the predicted token (0 where ignored)
    target_classes: torch.Tensor  # [B, S] int64, class of the predicted token (PAD where ignored)
    position_ids: torch.Tensor    # [B, S] int64, restarting at 0 for every document
    cu_seqlens: torch.Tensor      # [num_segments + 1] int32 over the flattened B*S tokens
    max_seqlen: int
    rows: list[int] = field(default_factory=list)
    real_tokens: int = 0          # non-pad input tokens
    # preference data only (None for SFT); D completions, P = D/2 pairs in this micro-batch:
    doc_index: torch.Tensor | None = None        # [B, S] int64, local completion of each target, -1: none
    doc_role: torch.Tensor | None = None         # [D] int64, 0 chosen / 1 rejected
    doc_pair: torch.Tensor | None = None         # [D] int64, local pair 0..P-1 (chosen and rejected share it)
    reference_logps: torch.Tensor | None = None  # [D] float64, the reference model's; NaN when the data has none
    # (sp_rank, sp) when the loader read only this sp rank's contiguous 1/sp of every row (PackedLoader(sp_size=…)):
    # the per-token tensors are [B, S/sp], cu_seqlens / max_seqlen / real_tokens stay the whole rows'.
    sequence_shard: tuple[int, int] | None = None

    TENSORS = ("input_ids", "labels", "weights", "target_classes", "position_ids", "cu_seqlens",
               "doc_index", "doc_role", "doc_pair", "reference_logps")

    def to(self, device: torch.device) -> "MicroBatch":
        """This micro-batch on ``device`` (the engine's). To a GPU the host tensors go through pinned memory
        with ``non_blocking``: the copy overlaps the previous micro-batch's work instead of stalling it."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        moved = {}
        for name in self.TENSORS:
            t = getattr(self, name)
            if t is None:
                continue
            if device.type == "cuda" and t.device.type == "cpu":
                t = t.pin_memory()
            moved[name] = t.to(device, non_blocking=True)
        return replace(self, **moved)

    def without_targets(self) -> "MicroBatch":
        """This micro-batch with nothing to predict and no completion: what a rank out of rows runs in a pass
        over a dataset (every rank must run as many forwards); it adds nothing to any sum, no pair either."""
        out = replace(self, labels=torch.full_like(self.labels, IGNORE_INDEX), weights=torch.zeros_like(self.weights))
        if self.doc_index is None:
            return out
        return replace(out, doc_index=torch.full_like(self.doc_index, -1), doc_role=self.doc_role[:0],
                       doc_pair=self.doc_pair[:0], reference_logps=self.reference_logps[:0])


@dataclass
class StepBatch:
    """What one optimizer step needs on this rank."""
    micro_batches: list[MicroBatch]
    denominators: dict[str, float]   # over the GLOBAL batch: 'nonzero', 'weight_sum', 'tokens' (+ 'pairs'
                                     # for preference data)
    global_real_tokens: int          # non-pad tokens in the global batch (throughput)
    global_capacity: int             # rows × seq_len of the global batch (packing efficiency)
    epoch: int
    step_in_epoch: int
    global_sum_sq_doc_lengths: float = 0.0   # Σ L² over the global batch's documents (attention FLOPs)
    # A loader that reads only its sp rank's part of the rows: this rank's part of the denominators as exact
    # integers (ShardCounts.of), summed over the sp group by the trainer once per step (``denominators``
    # holds only the counts every rank knows, e.g. 'pairs', until then). None: denominators are complete.
    shard_counts: np.ndarray | None = None

    def with_shard_counts_summed(self, total: np.ndarray) -> "StepBatch":
        """This batch with its denominators complete, ``total`` the sum of every sp rank's ``shard_counts``."""
        return replace(self, denominators={**self.denominators, **ShardCounts.denominators(total)},
                       shard_counts=None)


def row_targets(tokens: np.ndarray, classes: np.ndarray, explicit: np.ndarray | None,
                doc_lengths: np.ndarray, table: np.ndarray):
    """Labels, weights, target classes and position ids for one packed row (numpy, [S] each)."""
    seq_len = tokens.shape[0]
    ends = np.cumsum(doc_lengths, dtype=np.int64)
    used = int(ends[-1]) if len(ends) else 0
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    if used > 1:
        labels[: used - 1] = tokens[1:used]
    if used:
        labels[ends - 1] = IGNORE_INDEX          # a document's last token predicts nothing
    target_classes = np.zeros(seq_len, dtype=np.int64)
    target_classes[:-1] = classes[1:]
    ignored = labels == IGNORE_INDEX
    target_classes[ignored] = TokenClass.PAD
    weights = table[target_classes].astype(np.float32)
    if explicit is not None:
        weights[:-1] *= explicit[1:]
    weights[ignored] = 0.0
    positions = np.zeros(seq_len, dtype=np.int64)
    starts = ends - doc_lengths
    for s, e in zip(starts, ends):
        positions[s:e] = np.arange(e - s)
    if used < seq_len:
        positions[used:] = np.arange(seq_len - used)
    return labels, weights, target_classes, positions, used


def shard_bounds(seq_len: int, sp: int, sp_rank: int) -> tuple[int, int]:
    """[start, stop) of sp rank ``sp_rank``'s contiguous part of a row (parallel/sequence.sequence_shard's cut)."""
    if seq_len % sp:
        raise ValueError(f"row length {seq_len} is not divisible by --sp {sp}")
    n = seq_len // sp
    return sp_rank * n, (sp_rank + 1) * n


def shard_targets(tokens: np.ndarray, classes: np.ndarray, explicit: np.ndarray | None, doc_lengths: np.ndarray,
                  table: np.ndarray, start: int, stop: int, seq_len: int):
    """:func:`row_targets` of positions [start, stop) of a row, from the row's arrays read over
    [start, min(stop + 1, seq_len)) only: one position past the part, whose token, class and weight are the
    target of the part's last position (the token after a cut is predicted by the rank before it). The
    documents' lengths (the whole row's: a few numbers) place the document ends and positions. Equal, value for
    value, to row_targets' arrays sliced [start:stop] (tests/test_long_rows.py)."""
    n = stop - start
    ends = np.cumsum(doc_lengths, dtype=np.int64)
    used = int(ends[-1]) if len(ends) else 0
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    last = min(stop, used - 1)               # labels exist for t < used - 1
    if last > start:
        labels[:last - start] = tokens[1:last - start + 1]
    inside = ends[(ends - 1 >= start) & (ends - 1 < stop)] - 1
    labels[inside - start] = IGNORE_INDEX    # a document's last token predicts nothing
    target_classes = np.zeros(n, dtype=np.int64)
    shifted = min(stop, seq_len - 1) - start  # the row's last position has no next token
    target_classes[:shifted] = classes[1:shifted + 1]
    ignored = labels == IGNORE_INDEX
    target_classes[ignored] = TokenClass.PAD
    weights = table[target_classes].astype(np.float32)
    if explicit is not None:
        weights[:shifted] *= explicit[1:shifted + 1]
    weights[ignored] = 0.0
    t = np.arange(start, stop, dtype=np.int64)
    doc = np.searchsorted(ends, t, side="right")                 # the document of each position (k: pad tail)
    doc_starts = np.concatenate([[0], ends])
    positions = t - doc_starts[np.minimum(doc, len(ends))]       # the pad tail counts from `used` = ends[-1]
    return labels, weights, target_classes, positions, used


class ShardCounts:
    """This rank's part of the denominators (:func:`denominators_of`) as exact int64 numbers, so that the sp
    ranks' parts add up, in any order, to the whole rows' counts: [non-zero-weight targets, targets, then the
    weight sum as float32 mantissa sums per binary exponent]. A float64 sum of each part would round differently
    from the sum over the whole row; integers do not. :meth:`denominators` rounds the exact weight sum once
    (equal to denominators_of's float64 sum whenever that one is exact, else the correctly rounded sum:
    docs/packed-format.md#what-the-loader-derives-from-a-row)."""

    EXPONENTS = 255                 # biased exponents 1..254 of finite float32 (subnormals share 1's scale)
    SIZE = 2 + EXPONENTS

    @classmethod
    def of(cls, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
        predicted = labels != IGNORE_INDEX
        bits = np.ascontiguousarray(weights[predicted], dtype=np.float32).view(np.uint32)
        exponent = (bits >> 23) & 0xFF
        mantissa = (bits & 0x7FFFFF) | ((exponent > 0).astype(np.uint32) << 23)
        if len(exponent) and int(exponent.max()) == 0xFF:
            raise ValueError("a target weight is not finite")
        # bincount sums in float64: the mantissas' two 12-bit halves each stay exact up to 2^41 tokens
        exponent = np.maximum(exponent, 1)
        high = np.bincount(exponent, weights=mantissa >> 12, minlength=cls.EXPONENTS).astype(np.int64)
        low = np.bincount(exponent, weights=mantissa & 0xFFF, minlength=cls.EXPONENTS).astype(np.int64)
        out = np.zeros(cls.SIZE, dtype=np.int64)
        out[0] = np.count_nonzero(predicted & (weights > 0))
        out[1] = np.count_nonzero(predicted)
        out[2:] = (high << 12) + low
        return out

    @classmethod
    def denominators(cls, total: np.ndarray) -> dict[str, float]:
        """{'nonzero', 'weight_sum', 'tokens'} of the summed counts. A float32 of biased exponent e ≥ 1 and
        mantissa m is m · 2^(e−150): Σ = (Σ_e sum_e · 2^(e−1)) · 2^−149, an exact integer divided once
        (Python's int / int is correctly rounded)."""
        total = [int(x) for x in np.asarray(total, dtype=np.int64)]
        exact = sum(m << (e - 1) for e, m in enumerate(total[2:]) if m and e >= 1)
        return {"nonzero": float(total[0]), "weight_sum": exact / (1 << 149), "tokens": float(total[1])}


def segment_lengths(doc_lengths: np.ndarray, seq_len: int) -> list[int]:
    """Attention segments of a row: its documents, then the pad tail as a segment of its own."""
    lens = [int(x) for x in doc_lengths]
    used = sum(lens)
    if used < seq_len:
        lens.append(seq_len - used)
    return lens


class PackedLoader:
    """Deterministic, data-parallel-sharded sampler over packed rows, yielding one StepBatch per step.

    Rows are drawn without replacement from a permutation seeded by (seed, epoch); the remainder of an
    epoch that does not fill a global batch is skipped (logged by the trainer). ``state_dict`` records
    the position so that a resumed run draws exactly the same batches.
    """

    def __init__(self, dataset, weight_table: np.ndarray, *, micro_batch_size: int, grad_accum: int,
                 dp_size: int = 1, dp_rank: int = 0, seed: int = 0, shuffle: bool = True,
                 vocab_size: int | None = None, sp_size: int = 1, sp_rank: int = 0):
        self.dataset = dataset
        # sp_size > 1: read only sp rank `sp_rank`'s contiguous 1/sp of every row (plus one position past it):
        # micro-batches come cut (MicroBatch.sequence_shard) and the denominators as ShardCounts to sum over sp
        self.sp_size, self.sp_rank = sp_size, sp_rank
        self.shard = shard_bounds(dataset.seq_len, sp_size, sp_rank) if sp_size > 1 else None
        self.vocab_size = vocab_size      # token ids are checked against it row by row (None: not checked)
        self.table = np.asarray(weight_table, dtype=np.float32)
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_rows = micro_batch_size * grad_accum * dp_size
        if len(dataset) < self.global_rows:
            raise ValueError(
                f"the dataset has {len(dataset)} packed rows but one global batch needs {self.global_rows} "
                f"(micro-batch {micro_batch_size} × grad-accum {grad_accum} × data-parallel {dp_size})")
        if micro_batch_size * dataset.seq_len >= 1 << 31:
            # cu_seqlens are int32 over the micro-batch's B × S tokens (what flash-attn takes): they would wrap
            raise ValueError(f"a micro-batch of {micro_batch_size} rows × {dataset.seq_len} tokens is 2^31 tokens or "
                             f"more, beyond the int32 cu_seqlens of packed attention: lower the micro-batch size")
        self.steps_per_epoch = len(dataset) // self.global_rows
        self.preference = bool(getattr(dataset, "is_preference", False))
        self.epoch = 0
        self.step_in_epoch = 0
        self._order_epoch = None
        self._order = None

    # --- sampling ----------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def global_batch_rows(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        order = self._epoch_order(epoch)
        return order[step_in_epoch * self.global_rows:(step_in_epoch + 1) * self.global_rows]

    def rank_micro_rows(self, global_rows: np.ndarray, micro: int, dp_rank: int) -> np.ndarray:
        """Micro-batch `micro` of data-parallel rank `dp_rank` within a global batch."""
        start = (micro * self.dp_size + dp_rank) * self.micro_batch_size
        return global_rows[start:start + self.micro_batch_size]

    # --- assembly ----------------------------------------------------------------------------------
    def _row(self, index: int):
        """(tokens, doc_lengths, labels, weights, target_classes, positions, used) of one packed row — of this
        sp rank's part of it when the loader is sharded (the per-token arrays read over that part and one
        position past it only; doc_lengths always the whole row's)."""
        ds = self.dataset
        read = index if self.shard is None else (index, slice(self.shard[0], min(self.shard[1] + 1, ds.seq_len)))
        tokens, doc_lengths, classes = ds.tokens[read], ds.doc_lengths(index), ds.classes[read]
        explicit = ds.weights[read] if ds.weights is not None else None
        self._check_row(index, tokens, classes)
        if self.preference:
            self._check_pairs(index)
        if self.shard is None:
            return (tokens, doc_lengths) + row_targets(tokens, classes, explicit, doc_lengths, self.table)
        start, stop = self.shard
        return (tokens[:stop - start], doc_lengths) + shard_targets(tokens, classes, explicit, doc_lengths, self.table,
                                                                    start, stop, ds.seq_len)

    def _check_pairs(self, index: int) -> None:
        """A row of preference data must hold whole pairs, chosen then rejected of the same pair: a split or
        mixed pair would compare completions of different prompts (or lose one) without any error."""
        ds = self.dataset
        start, end = ds.doc_range(index)
        roles = np.asarray(ds.doc_role[start:end])
        pairs = np.asarray(ds.doc_pair[start:end])
        problem = None
        if (end - start) % 2:
            problem = f"an odd number of documents ({end - start})"
        elif not (np.array_equal(roles[0::2], np.zeros(len(roles) // 2)) and roles[1::2].all()):
            problem = f"roles {roles.tolist()} are not (chosen, rejected) pairs"
        elif not np.array_equal(pairs[0::2], pairs[1::2]):
            problem = f"documents of different pairs side by side (pairs {pairs.tolist()})"
        if problem:
            raise ValueError(f"{getattr(ds, 'path', 'packed data')}: row {index}: not whole preference pairs: "
                             f"{problem}; repack with tools/pack_dataset.py --task preference")

    def _check_row(self, index: int, tokens: np.ndarray, classes: np.ndarray) -> None:
        """Token ids and classes are checked here, on the host, once per row: in the loss the same check
        would cost a device→host sync per micro-batch. A bad id would give a silently wrong loss."""
        where = f"{getattr(self.dataset, 'path', 'packed data')}: row {index}"
        if len(tokens) and (int(tokens.min()) < 0 or (self.vocab_size is not None and int(tokens.max()) >= self.vocab_size)):
            raise ValueError(f"{where}: token ids span {int(tokens.min())}..{int(tokens.max())}, outside the "
                             f"model's vocabulary [0, {self.vocab_size})")
        known = getattr(self.dataset, "num_classes", NUM_CLASSES)   # the data's own class table
        if len(classes) and int(classes.max()) >= known:
            raise ValueError(f"{where}: token class {int(classes.max())} is unknown (classes are 0..{known - 1})")

    def make_micro_batch(self, rows, cache: dict | None = None) -> MicroBatch:
        seq_len = self.dataset.seq_len
        ids, labs, wts, tcs, poss, segs = [], [], [], [], [], []
        real = 0
        max_seqlen = 0
        for r in rows:
            r = int(r)
            tokens, doc_lengths, labels, weights, tclasses, positions, used = (
                cache[r] if cache is not None and r in cache else self._row(r))
            ids.append(np.asarray(tokens, dtype=np.int64))
            labs.append(labels)
            wts.append(weights)
            tcs.append(tclasses)
            poss.append(positions)
            row_segments = segment_lengths(doc_lengths, seq_len)
            segs.extend(row_segments)
            max_seqlen = max(max_seqlen, max(row_segments))
            real += used
        cu = np.zeros(len(segs) + 1, dtype=np.int32)
        np.cumsum(segs, out=cu[1:])
        preference = self._preference_tensors(rows, labs) if self.preference else {}
        shard = {"sequence_shard": (self.sp_rank, self.sp_size)} if self.shard is not None else {}
        return MicroBatch(
            input_ids=torch.from_numpy(np.stack(ids)),
            labels=torch.from_numpy(np.stack(labs)),
            weights=torch.from_numpy(np.stack(wts)),
            target_classes=torch.from_numpy(np.stack(tcs)),
            position_ids=torch.from_numpy(np.stack(poss)),
            cu_seqlens=torch.from_numpy(cu),
            max_seqlen=int(max_seqlen),
            rows=[int(r) for r in rows],
            real_tokens=real,
            **preference,
            **shard,
        )

    def _preference_tensors(self, rows, labels: list) -> dict:
        """doc_index / doc_role / doc_pair / reference_logps of the micro-batch of `rows` (their labels)."""
        ds = self.dataset
        start, stop = self.shard or (0, ds.seq_len)
        index_rows, roles, refs = [], [], []
        first = 0                                  # local index of the row's first completion
        for r, row_labels in zip(rows, labels):
            d0, d1 = ds.doc_range(int(r))
            lengths = np.asarray(ds.doc_lengths(int(r)), dtype=np.int64)
            # the completion of each position of [start, stop): its document, -1 on the pad tail
            doc = np.searchsorted(np.cumsum(lengths), np.arange(start, stop), side="right")
            index = np.where(doc < len(lengths), first + doc, -1)
            index[row_labels == IGNORE_INDEX] = -1   # a document's last token and padding predict nothing
            index_rows.append(index)
            roles.append(np.asarray(ds.doc_role[d0:d1], dtype=np.int64))
            if ds.reference_logps is not None:
                refs.append(np.asarray(ds.reference_logps[d0:d1], dtype=np.float64))
            else:
                refs.append(np.full(d1 - d0, np.nan))
            first += d1 - d0
        # rows hold whole pairs, chosen first (_check_pairs): the local pair of completion d is d // 2
        return {"doc_index": torch.from_numpy(np.stack(index_rows)),
                "doc_role": torch.from_numpy(np.concatenate(roles)),
                "doc_pair": torch.arange(first, dtype=torch.int64) // 2,
                "reference_logps": torch.from_numpy(np.concatenate(refs))}

    def batch_for(self, epoch: int, step_in_epoch: int) -> StepBatch:
        rows = self.global_batch_rows(epoch, step_in_epoch)
        # Every row of the global batch is read once: for the denominators (all ranks' rows) and, for
        # this rank's rows, again from the same arrays for its micro-batches.
        # A sharded loader reads its part of every row: its part of the counts, summed over sp by the trainer.
        cache = {int(r): self._row(int(r)) for r in rows}
        denominators, shard_counts = {}, None
        if self.shard is None:
            denominators = {"nonzero": 0.0, "weight_sum": 0.0, "tokens": 0.0}
            for _, _, labels, weights, _, _, _ in cache.values():
                for k, v in denominators_of(labels, weights).items():
                    denominators[k] += v
        else:
            shard_counts = sum((ShardCounts.of(entry[2], entry[3]) for entry in cache.values()),
                               np.zeros(ShardCounts.SIZE, dtype=np.int64))
        if self.preference:
            # every row holds whole pairs: the global batch's pairs are half its documents
            denominators["pairs"] = float(sum(len(entry[1]) for entry in cache.values()) // 2)
        real = sum(entry[-1] for entry in cache.values())
        sum_sq = float(sum(np.square(entry[1], dtype=np.float64).sum() for entry in cache.values()))
        micro = [self.make_micro_batch(self.rank_micro_rows(rows, m, self.dp_rank), cache)
                 for m in range(self.grad_accum)]
        return StepBatch(micro, denominators, real, len(rows) * self.dataset.seq_len, epoch, step_in_epoch, sum_sq,
                         shard_counts)

    def next_step(self) -> StepBatch:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        batch = self.batch_for(self.epoch, self.step_in_epoch)
        self.step_in_epoch += 1
        return batch

    def __iter__(self) -> Iterator[StepBatch]:
        while True:
            yield self.next_step()

    # --- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "num_rows": len(self.dataset), "global_rows": self.global_rows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_rows", len(self.dataset)), ("global_rows", self.global_rows),
                          ("seed", self.seed), ("shuffle", self.shuffle)):
            if state.get(key) != mine:
                raise ValueError(f"cannot resume the data position: checkpoint has {key}={state.get(key)}, "
                                 f"this run has {key}={mine}")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])


def check_model_compat(manifest: dict, model_config, data_path: str = "") -> None:
    """Refuse data tokenized with a tokenizer that does not fit the model (vocab size, special ids)."""
    fp = manifest.get("tokenizer") or {}
    where = f"data {data_path}" if data_path else "data"
    vocab = fp.get("vocab_size")
    if vocab is not None and vocab > model_config.vocab_size and grown_vocab_size(manifest, model_config) is None:
        raise ValueError(f"{where} was tokenized with a {vocab}-token vocabulary but the model's vocab_size is "
                         f"{model_config.vocab_size}: wrong tokenizer for this model")
    for key in ("bos_id", "eos_id"):
        theirs = fp.get(key)
        ours = getattr(model_config, key.replace("_id", "_token_id"), None)
        if isinstance(ours, (list, tuple)):
            ok = theirs in ours
        else:
            ok = ours is None or theirs is None or theirs == ours
        if not ok:
            raise ValueError(f"{where} has tokenizer {key}={theirs} but the model config says {ours}: "
                             f"wrong tokenizer for this model")


def grown_vocab_size(manifest: dict, model_config) -> int | None:
    """The vocabulary size the model grows to for data packed with --add-special-tokens
    (witscale/data/added_tokens.py): the data's, when it is larger than the model's and the tokens past the
    model's were added to a base tokenizer that fits the model. None: nothing to grow (or nothing allowed to)."""
    fp = manifest.get("tokenizer") or {}
    added, vocab = fp.get("added_tokens"), fp.get("vocab_size")
    if not isinstance(added, dict) or not isinstance(vocab, int) or vocab <= model_config.vocab_size:
        return None
    base = (added.get("base") or {}).get("vocab_size")
    return vocab if isinstance(base, int) and base <= model_config.vocab_size else None


def grow_model_config(manifest: dict, model_config):
    """(model config, its vocabulary size before growing or None): for data packed with --add-special-tokens
    whose vocabulary is larger than the model's, the config with the data's vocabulary — the model built from it
    and loaded with ``grow_from`` gets the new rows as the mean of the old (witscale/model/grow.py)."""
    vocab = grown_vocab_size(manifest, model_config)
    return (replace(model_config, vocab_size=vocab), model_config.vocab_size) if vocab else (model_config, None)


def data_tokenizer_dir(data_path: str | None, manifest: dict | None = None) -> str | None:
    """The extended tokenizer a packed dataset carries (--add-special-tokens), None for any other dataset:
    what the model was trained with, and what --export-hf copies."""
    from witscale.data.added_tokens import PACKED_TOKENIZER_DIR
    if not data_path:
        return None
    if manifest is None:
        try:
            with open(os.path.join(data_path, "manifest.json"), encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            return None
    path = os.path.join(data_path, PACKED_TOKENIZER_DIR)
    return path if (manifest.get("tokenizer") or {}).get("added_tokens") and os.path.isdir(path) else None


def check_tokenizer_identity(manifest: dict, source: str, where: str = "data", *, flag: str = "--model",
                             allow_mismatch: bool = False) -> str | None:
    """Refuse data packed with another tokenizer than the model's: the manifest's tokenizer digest against the
    digest of ``source``'s tokenizer files (a model directory, or a --tokenizer path), by the same function
    (tokenizer.vocabulary_digest), or, for data packed with --add-special-tokens, the digest of the tokenizer
    the packer extended (the manifest's ``added_tokens.base``). Vocabulary size and BOS/EOS
    (check_model_compat) cannot tell two tokenizers of one size apart. Returns a warning to log (a manifest
    without a digest, packed before it was recorded; a mismatch under ``allow_mismatch``), or None; raises
    ValueError (one line) on a mismatch.
    ``where`` names the data in the messages (e.g. '--data packed/train')."""
    from witscale.data.errors import TokenizerError
    from witscale.data.tokenizer import model_tokenizer, tokenizer_kinds

    if not tokenizer_kinds(source):
        return None              # a model directory without tokenizer files: nothing to compare
    fp = manifest.get("tokenizer") or {}
    ours = fp.get("digest")
    if not ours:
        return (f"{where} records no tokenizer digest (packed by an older witscale, or without a tokenizer): "
                f"its tokenizer is not compared with the model's; re-pack it to have it checked")
    skip = "pass --allow-tokenizer-mismatch to skip the check"
    try:
        tokenizer = model_tokenizer(source, fp.get("kind"))
    except TokenizerError as e:
        if allow_mismatch:
            return f"{flag} {source}: tokenizer not compared with {where}'s ({e}): --allow-tokenizer-mismatch"
        raise ValueError(f"{flag} {source}: cannot read its tokenizer to compare it with {where}'s: {e}; "
                         f"{skip}") from None
    theirs = tokenizer.fingerprint()["digest"]
    if theirs == ours:
        return None
    base = ((fp.get("added_tokens") or {}).get("base") or {}).get("digest")
    if theirs == base:      # the data's tokenizer is this one plus the special tokens the packer added
        return None
    message = (f"{where} was packed with another tokenizer than {flag}'s: the data's {fp.get('kind', '?')} "
               f"tokenizer has digest {ours[:16]}, {tokenizer.path} ({tokenizer.kind}) has {theirs[:16]} "
               f"(same vocabulary size and BOS/EOS do not make them the same tokenizer)")
    if allow_mismatch:
        return f"{message}; training anyway (--allow-tokenizer-mismatch)"
    raise ValueError(f"{message}: re-pack the data with the model's tokenizer, or {skip}")
