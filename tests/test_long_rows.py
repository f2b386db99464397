"""Long packed rows (issue 24): the packer at --seq-len 1,048,576, and a loader that reads only its sp rank's part
of every row. The sharded loader's micro-batches are byte-equal to the whole-row loader's cut by the trainer
(sequence_shard_micro_batch), and its exact per-part counts add up to the whole batch's denominators."""
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests import test_train_cli_operations as operations
from witscale.data.classes import TokenClass
from witscale.data.format import PackedDataset, PackedWriter, TokenizedCorpus, write_packed
from witscale.data.loader import MicroBatch, PackedLoader, ShardCounts
from witscale.data.weighting import build_weight_table
from witscale.training.trainer import sequence_shard_micro_batch

CLASSES = np.array([TokenClass.TEMPLATE, TokenClass.PROMPT, TokenClass.RESPONSE, TokenClass.EOT], np.uint8)


def _documents(n: int, seed: int, max_len: int, weighted: bool, pairs: bool = False) -> list:
    """Documents of random length (some longer than a row, for --long split), random classes and — ``weighted`` —
    the data's own weights (random float32, some 0) on every other document."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(2 if pairs else 1, max_len))
        ids = rng.integers(3, 500, size=length).astype(np.int32)
        classes = CLASSES[rng.integers(0, len(CLASSES), size=length)]
        w = None
        if weighted and i % 2:
            w = rng.random(length).astype(np.float32) * 2
            w[rng.random(length) < 0.2] = 0.0
        docs.append((ids, classes, w))
    if pairs:                # chosen and rejected of a pair differ
        for i in range(1, n, 2):
            docs[i] = (docs[i][0] + 1, docs[i][1], docs[i][2])
    return docs


def _pack(path, docs, seq_len, long_policy="split", task="sft") -> PackedDataset:
    write_packed(str(path), TokenizedCorpus.from_documents(docs), seq_len=seq_len, pad_id=0, long_policy=long_policy,
                 task=task)
    return PackedDataset(str(path))


def _loaders(ds, table, sp, **kw):
    whole = PackedLoader(ds, table, **kw)
    return whole, [PackedLoader(ds, table, sp_size=sp, sp_rank=k, **kw) for k in range(sp)]


def _assert_same_micro_batch(got: MicroBatch, want: MicroBatch, where: str) -> None:
    for name in MicroBatch.TENSORS:
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, f"{where}: {name}"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {name} {a.dtype}{list(a.shape)} vs " \
                                                          f"{b.dtype}{list(b.shape)}"
        assert a.numpy().tobytes() == b.numpy().tobytes(), f"{where}: {name}"
    assert (got.max_seqlen, got.rows, got.real_tokens) == (want.max_seqlen, want.rows, want.real_tokens), where


def _check_sharded_equals_cut(whole: PackedLoader, ranks: list, steps: int, where: str) -> int:
    """Every step's micro-batches on every sp rank byte-equal to the whole rows cut for that rank, and the
    ranks' summed counts equal to the whole batch's denominators (every normalization's). Returns the number
    of documents crossing a cut (the test data must have some)."""
    sp = len(ranks)
    crossing = 0
    for step in range(steps):
        want = whole.batch_for(0, step)
        got = [loader.batch_for(0, step) for loader in ranks]
        for k, batch in enumerate(got):
            topo = SimpleNamespace(sp=sp, sp_rank=k)
            assert len(batch.micro_batches) == len(want.micro_batches)
            for m, (g, w) in enumerate(zip(batch.micro_batches, want.micro_batches)):
                assert g.sequence_shard == (k, sp)
                _assert_same_micro_batch(g, sequence_shard_micro_batch(w, topo), f"{where} step {step} rank {k} "
                                                                                 f"micro {m}")
                assert sequence_shard_micro_batch(g, topo) is g        # the trainer does not cut it again
            assert (batch.global_real_tokens, batch.global_capacity, batch.global_sum_sq_doc_lengths) == (
                want.global_real_tokens, want.global_capacity, want.global_sum_sq_doc_lengths)
        total = sum(batch.shard_counts for batch in got)
        for k, batch in enumerate(got):
            summed = batch.with_shard_counts_summed(total)
            assert summed.shard_counts is None
            assert summed.denominators == want.denominators, f"{where} step {step} rank {k}"
        assert want.shard_counts is None
        cut = whole.dataset.seq_len // sp
        for r in whole.global_batch_rows(0, step):
            ends = np.cumsum(whole.dataset.doc_lengths(int(r)))
            starts = ends - whole.dataset.doc_lengths(int(r))
            crossing += sum(int(((starts < c) & (ends > c)).sum()) for c in range(cut, whole.dataset.seq_len, cut))
    return crossing


@pytest.mark.parametrize("sp", [2, 3, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_sharded_loader_equals_the_whole_rows_cut(tmp_path, sp, weighted):
    """SFT rows with documents crossing the cuts and --long split pieces (documents longer than a row), with and
    without the data's weight channel, dp 2 × grad-accum 2: every rank's micro-batches and the denominators of
    every normalization (nonzero, weight_sum, tokens) are those of today's whole-row-then-cut path."""
    seq_len = 96
    ds = _pack(tmp_path / "d", _documents(80, seed=sp, max_len=150, weighted=weighted), seq_len)
    assert ds.manifest["counts"]["split"] > 0
    table = build_weight_table(0.3, 1.0)
    kw = dict(micro_batch_size=2, grad_accum=2, dp_size=2, seed=5)
    crossing = 0
    for dp_rank in (0, 1):
        whole, ranks = _loaders(ds, table, sp, dp_rank=dp_rank, **kw)
        crossing += _check_sharded_equals_cut(whole, ranks, whole.steps_per_epoch, f"sp {sp} dp {dp_rank}")
    assert crossing >= 4


def test_sharded_preference_rows_equal_the_whole_rows_cut(tmp_path):
    """DPO pairs (completions crossing the cut): doc_index cut with the row, doc_role / doc_pair /
    reference_logps whole, the global pair count on every rank."""
    ds = _pack(tmp_path / "p", _documents(40, seed=3, max_len=40, weighted=False, pairs=True), 80, "truncate",
               task="preference")
    table = build_weight_table(0.0, 1.0)
    whole, ranks = _loaders(ds, table, 2, micro_batch_size=2, grad_accum=1, seed=1)
    assert whole.preference
    assert _check_sharded_equals_cut(whole, ranks, whole.steps_per_epoch, "preference") >= 2
    assert ranks[1].batch_for(0, 0).denominators["pairs"] == whole.batch_for(0, 0).denominators["pairs"]


class _CountingArray:
    """A dataset array that records the bytes of every slice the loader asks it for."""

    def __init__(self, array, log: list):
        self.array, self.log = array, log
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        out = self.array[key]
        self.log.append(np.asarray(out).nbytes)
        return out


def test_each_sp_rank_reads_its_part_of_the_rows(tmp_path):
    """Bytes of tokens, classes and weights each sp rank requests for one step: 1/sp of the rows' per-token data
    plus one position per row (the label across the cut); the whole-row loader requests all of it."""
    seq_len, sp = 1024, 4
    ds = _pack(tmp_path / "d", _documents(30, seed=1, max_len=3000, weighted=True), seq_len)
    table = build_weight_table(0.3, 1.0)

    arrays = {name: getattr(ds, name) for name in ("tokens", "classes", "weights")}

    def read_bytes(**kw) -> int:
        log: list = []
        for name, array in arrays.items():
            setattr(ds, name, _CountingArray(array, log))
        PackedLoader(ds, table, micro_batch_size=2, grad_accum=2, seed=0, **kw).batch_for(0, 0)
        return sum(log)

    rows, per_token = 4, 4 + 1 + 4              # rows of a global batch; int32 + uint8 + float32 bytes a token
    assert read_bytes() == rows * seq_len * per_token
    for k in range(sp):
        part = read_bytes(sp_size=sp, sp_rank=k)
        extra = 0 if k == sp - 1 else rows * per_token   # one position past the part (none after the row's end)
        assert part == rows * (seq_len // sp) * per_token + extra, k


MILLION = 1 << 20


def test_a_million_token_row(tmp_path):
    """--seq-len 1,048,576: one 1M-token document fills a row (the streaming writer, spill and plan), a 2.5M-token
    one is split into rows as --long split does at any length, and shorter ones share rows by best fit; the dataset
    validates, and the sp 2 loader's parts of the full row equal the whole row cut."""
    rng = np.random.default_rng(0)
    lengths = [MILLION, 5 * MILLION // 2, 300_000, 700_000, 48_576, 1000]
    t0 = time.perf_counter()
    with PackedWriter(str(tmp_path / "m"), seq_len=MILLION, pad_id=0, long_policy="split") as writer:
        for n in lengths:
            writer.add(rng.integers(3, 30000, size=n).astype(np.int32), CLASSES[rng.integers(0, 4, size=n)])
        manifest = writer.finish()
    pack_s = time.perf_counter() - t0
    ds = PackedDataset(str(tmp_path / "m"))
    assert manifest["seq_len"] == MILLION and manifest["counts"]["split"] == 1
    docs = sorted(tuple(int(x) for x in ds.doc_lengths(r)) for r in range(len(ds)))
    # pieces 1M (whole doc), 1M, 1M, 0.5M of the long one; 700k + 300k + 48,576 = 1,048,576 exactly; 0.5M + 1000
    assert docs == sorted([(MILLION,), (MILLION,), (MILLION,), (300_000, 700_000, 48_576), (MILLION // 2, 1000)])
    assert manifest["num_tokens"] == sum(lengths)
    whole, ranks = _loaders(ds, build_weight_table(0.3, 1.0), 2, micro_batch_size=1, grad_accum=1, shuffle=False)
    _check_sharded_equals_cut(whole, ranks, 2, "1M rows")
    print(f"packed {sum(lengths)} tokens into {len(ds)} rows of {MILLION} in {pack_s:.2f}s")


def test_shard_counts_are_exact_and_order_free():
    """The per-part counts sum exactly (integers) and round once: equal to the float64 sum whenever that one is
    exact, and the same whatever the parts."""
    rng = np.random.default_rng(0)
    w = (rng.random(10_000) * 3).astype(np.float32)
    w[::7] = 0.0
    w[5] = np.float32(1e-40)                     # a subnormal
    labels = np.where(rng.random(10_000) < 0.1, -100, 1)
    whole = ShardCounts.of(labels, w)
    parts = sum(ShardCounts.of(labels[a:a + 777], w[a:a + 777]) for a in range(0, 10_000, 777))
    assert np.array_equal(whole, parts)
    got = ShardCounts.denominators(whole)
    predicted = labels != -100
    assert got["tokens"] == predicted.sum() and got["nonzero"] == (predicted & (w > 0)).sum()
    from fractions import Fraction
    exact = sum(Fraction(float(x)) for x in w[predicted])
    assert got["weight_sum"] == float(exact)
    with pytest.raises(ValueError, match="not finite"):
        ShardCounts.of(np.ones(2), np.array([1.0, np.inf], np.float32))


def test_a_micro_batch_cut_for_another_sp_rank_is_refused():
    mb = MicroBatch(*(torch.zeros(1, 4, dtype=torch.int64),) * 5, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
                    max_seqlen=8, sequence_shard=(1, 2))
    with pytest.raises(ValueError, match="cut for sp rank 1 of 2 on sp rank 0 of 2"):
        sequence_shard_micro_batch(mb, SimpleNamespace(sp=2, sp_rank=0))


def test_a_micro_batch_beyond_int32_cu_seqlens_is_refused():
    """B × S ≥ 2^31 tokens would wrap the int32 cu_seqlens silently: refused in one line when the loader is built."""
    rows = type("Rows", (), {"seq_len": MILLION, "__len__": lambda self: 4096})()
    PackedLoader(rows, build_weight_table(0.3, 1.0), micro_batch_size=2047, grad_accum=1)
    with pytest.raises(ValueError, match=r"^a micro-batch of 2048 rows × 1048576 tokens is 2\^31 tokens or more"):
        PackedLoader(rows, build_weight_table(0.3, 1.0), micro_batch_size=2048, grad_accum=1)


run_inputs = operations.run_inputs      # the session fixture: packed data, a tiny Llama config, the tokenizer


def test_train_refuses_a_micro_batch_beyond_int32_cu_seqlens_up_front(run_inputs, tmp_path):
    """witscale/train.py's plan_run, before any process group: one line naming the data."""
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig
    seq_len = PackedDataset(run_inputs["train"]).seq_len
    args = dict(zip(*[iter(operations._args(run_inputs, tmp_path, 2))] * 2))
    micro = -(-(1 << 31) // seq_len)                    # the fewest rows reaching 2^31 tokens
    args["--micro-batch-size"] = str(micro)
    with pytest.raises(UsageError) as e:
        plan_run(RunConfig.from_args(build_parser().parse_args([x for kv in args.items() for x in kv])), 1)
    assert str(e.value) == (f"--data {run_inputs['train']}: --micro-batch-size {micro} rows of "
                            f"{seq_len} tokens is 2^31 tokens or more, beyond the int32 cu_seqlens of packed "
                            f"attention: lower it")
