"""Tensor-parallel building blocks on real gloo ranks: the four comm functions against their definitions,
and each TP layer against its dense equivalent, forward and backward (input grads, and weight grads against
the matching slice of the dense grads). Four ranks per run: tp=2 as two TP groups {0,1},{2,3} (so group
rank ≠ global rank), and tp=4 as one group."""
import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from witscale.parallel import comm
from witscale.parallel.layers import (ColumnParallelLinear, LMHead, RowParallelLinear, VocabParallelEmbedding,
                                      VocabParallelLMHead, pad_vocab_size, shard_dense)

TOL = 1e-5


def _load(layer, dense_w, dense_b=None, rank=0, tp=1):
    with torch.no_grad():
        layer.weight.copy_(shard_dense(layer.weight, dense_w, rank, tp))
        if dense_b is not None:
            layer.bias.copy_(shard_dense(layer.bias, dense_b, rank, tp))


def _comm_checks(group, grank, tp, check):
    torch.manual_seed(1)
    base = torch.randn(3, 4 * tp)
    # copy_to_tp: forward identity, backward all-reduce (each rank sends a different upstream gradient)
    x = base.clone().requires_grad_()
    y = comm.copy_to_tp(x, group)
    check("copy.fwd", y, base)
    (y * (grank + 1)).sum().backward()
    check("copy.bwd", x.grad, torch.full_like(base, sum(range(1, tp + 1))))
    # reduce_from_tp: forward all-reduce, backward identity
    x = (base * (grank + 1)).requires_grad_()
    y = comm.reduce_from_tp(x, group)
    check("reduce.fwd", y, base * sum(range(1, tp + 1)))
    up = torch.randn_like(base)
    (y * up).sum().backward()
    check("reduce.bwd", x.grad, up)
    # scatter_to_tp_last_dim: forward own chunk, backward all-gather of the per-rank upstreams
    x = base.clone().requires_grad_()
    y = comm.scatter_to_tp_last_dim(x, group)
    check("scatter.fwd", y, base[:, grank * 4:(grank + 1) * 4])
    (y * (grank + 1)).sum().backward()
    want = torch.cat([torch.full((3, 4), float(r + 1)) for r in range(tp)], dim=-1)
    check("scatter.bwd", x.grad, want)
    # gather_from_tp_last_dim: forward all-gather, backward own chunk of this rank's upstream
    x = (torch.ones(3, 4) * (grank + 1)).requires_grad_()
    y = comm.gather_from_tp_last_dim(x, group)
    check("gather.fwd", y, want)
    up = torch.randn(3, 4 * tp) + grank
    (y * up).sum().backward()
    check("gather.bwd", x.grad, up[:, grank * 4:(grank + 1) * 4])
    with pytest.raises(ValueError, match=rf"last dimension 5 is not divisible by the tensor-parallel size {tp}"):
        comm.scatter_to_tp_last_dim(torch.zeros(2, 5), group)


def _linear_checks(group, grank, tp, check):
    torch.manual_seed(2)
    fin, fout = 8, 12
    w, b = torch.randn(fout, fin), torch.randn(fout)
    x = torch.randn(2, 5, fin)
    up = torch.randn(2, 5, fout)
    dx, dw_ = x.clone().requires_grad_(), w.clone().requires_grad_()
    db = b.clone().requires_grad_()
    ref = F.linear(dx, dw_, db)
    (ref * up).sum().backward()

    for gather in (False, True):
        col = ColumnParallelLinear(fin, fout, True, group, gather_output=gather)
        _load(col, w, b, grank, tp)
        rows, _ = col.shard_slice()
        check(f"col{gather}.slice_is_shard", col.weight, w[col.shard_slice()])
        xi = x.clone().requires_grad_()
        out = col(xi)
        check(f"col{gather}.fwd", out, ref if gather else ref[..., rows])
        (out * (up if gather else up[..., rows])).sum().backward()
        check(f"col{gather}.dx", xi.grad, dx.grad)
        check(f"col{gather}.dw", col.weight.grad, dw_.grad[rows])
        check(f"col{gather}.db", col.bias.grad, db.grad[rows])

    w2, b2 = torch.randn(fin, fout), torch.randn(fin)        # row-parallel: in = fout, out = fin
    ref2_x = torch.randn(2, 5, fout).requires_grad_()
    ref2_w, ref2_b = w2.clone().requires_grad_(), b2.clone().requires_grad_()
    ref2 = F.linear(ref2_x, ref2_w, ref2_b)
    up2 = torch.randn_like(ref2)
    (ref2 * up2).sum().backward()
    for parallel_in in (True, False):
        row = RowParallelLinear(fout, fin, True, group, input_is_parallel=parallel_in)
        _load(row, w2, b2, grank, tp)
        _, cols = row.shard_slice()
        check(f"row{parallel_in}.slice_is_shard", row.weight, w2[row.shard_slice()])
        xi = (ref2_x.detach()[..., cols] if parallel_in else ref2_x.detach()).clone().requires_grad_()
        out = row(xi)
        check(f"row{parallel_in}.fwd", out, ref2)                   # bias added once, not tp times
        (out * up2).sum().backward()
        check(f"row{parallel_in}.dx", xi.grad, ref2_x.grad[..., cols] if parallel_in else ref2_x.grad)
        check(f"row{parallel_in}.dw", row.weight.grad, ref2_w.grad[:, cols])
        check(f"row{parallel_in}.db", row.bias.grad, ref2_b.grad)

    bad_out = 6 if tp == 4 else 7
    with pytest.raises(ValueError, match=rf"output size \({bad_out}\) is not divisible by the tensor-parallel size {tp}"):
        ColumnParallelLinear(8, bad_out, tp_group=group)
    with pytest.raises(ValueError, match=rf"input size \(\d+\) is not divisible by the tensor-parallel size {tp}"):
        RowParallelLinear(tp + 1, 8, tp_group=group)


def _vocab_checks(group, grank, tp, check, vocab):
    torch.manual_seed(3)
    dim = 6
    w = torch.randn(vocab, dim)
    emb = VocabParallelEmbedding(vocab, dim, group)
    padded = pad_vocab_size(vocab, tp)
    check(f"emb{vocab}.padded", torch.tensor(float(emb.padded_vocab_size)), torch.tensor(float(padded)))
    _load(emb, w, None, grank, tp)
    real = emb.shard_slice()[0]
    n_real = real.stop - real.start
    check(f"emb{vocab}.slice_is_shard", emb.weight[:n_real], w[real])
    check(f"emb{vocab}.pad_rows_zero", emb.weight[n_real:], torch.zeros(emb.weight.shape[0] - n_real, dim))
    ids = torch.cat([torch.arange(vocab), torch.tensor([vocab - 1, 0, vocab - 1])]).view(2, -1)
    dense = w.clone().requires_grad_()
    ref = F.embedding(ids, dense)
    up = torch.randn_like(ref)
    (ref * up).sum().backward()
    out = emb(ids)
    check(f"emb{vocab}.fwd", out, ref)
    (out * up).sum().backward()
    check(f"emb{vocab}.dw", emb.weight.grad[:n_real], dense.grad[real])
    check(f"emb{vocab}.dw_pad", emb.weight.grad[n_real:], torch.zeros(emb.weight.shape[0] - n_real, dim))

    # The LM head's logits path (no labels): gathered, unpadded logits, and the hidden-state gradient.
    head = VocabParallelLMHead(vocab, dim, group)
    _load(head, w, None, grank, tp)
    hid = torch.randn(2, 3, dim)
    ref_h = hid.clone().requires_grad_()
    ref_logits = ref_h @ w.t()
    upl = torch.randn_like(ref_logits)
    (ref_logits * upl).sum().backward()
    hi = hid.clone().requires_grad_()
    logits = head(hi)
    check(f"head{vocab}.logits", logits, ref_logits)
    (logits * upl).sum().backward()
    check(f"head{vocab}.dh", hi.grad, ref_h.grad)


def _worker(rank, world, tp):
    import torch.distributed as dist

    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]   # every rank makes all
    group = groups[rank // tp]
    grank = dist.get_rank(group)
    diffs = {}

    def check(name, got, want):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        diffs[name] = float((got.detach().double() - want.detach().double()).abs().max()) if got.numel() else 0.0

    _comm_checks(group, grank, tp, check)
    _linear_checks(group, grank, tp, check)
    _vocab_checks(group, grank, tp, check, vocab=13)      # 13: padded at tp=2 (14) and tp=4 (16)
    _vocab_checks(group, grank, tp, check, vocab=5)       # tp=4: 8 rows, rank 3 holds only padding
    return diffs


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_comm_and_layers_match_dense(tp):
    results = run_distributed(_worker, 4, tp)
    for rank, diffs in enumerate(results):
        bad = {k: v for k, v in diffs.items() if v > TOL}
        assert not bad, f"rank {rank}: {bad}"
        assert len(diffs) == len(results[0]) >= 40


def test_tp1_is_plain_and_identity():
    torch.manual_seed(0)
    x = torch.randn(3, 8, requires_grad=True)
    for f in (comm.copy_to_tp, comm.reduce_from_tp, comm.scatter_to_tp_last_dim, comm.gather_from_tp_last_dim):
        assert f(x, None) is x
    col, row = ColumnParallelLinear(8, 6, True), RowParallelLinear(6, 8, False, input_is_parallel=False)
    assert torch.equal(col(x), F.linear(x, col.weight, col.bias))
    assert col.shard_slice() == (slice(0, 6), slice(None)) and row.shard_slice() == (slice(None), slice(0, 6))
    emb = VocabParallelEmbedding(11, 4)
    assert emb.padded_vocab_size == 11 and emb.weight.shape == (11, 4)
    assert torch.equal(emb(torch.tensor([3, 10])), emb.weight[[3, 10]])
    assert LMHead is VocabParallelLMHead


def test_slices_and_padding_without_a_group():
    assert [pad_vocab_size(v, tp) for v, tp in ((13, 1), (13, 2), (13, 4), (16, 4), (5, 4))] == [13, 14, 16, 16, 8]
    assert pad_vocab_size(32000, 8, multiple=64) == 32256
    assert pad_vocab_size(32000, 2, multiple=64) == 32000
    col = ColumnParallelLinear(8, 12)
    assert [col.shard_slice(r, 4)[0] for r in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)]
    assert RowParallelLinear(12, 8).shard_slice(2, 3) == (slice(None), slice(8, 12))
    emb = VocabParallelEmbedding(13, 4)
    assert [emb.vocab_range(r, 4) for r in range(4)] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert emb.shard_slice(3, 4)[0] == slice(12, 13)                  # one real row, three padding rows
    assert VocabParallelEmbedding(5, 4).shard_slice(3, 4)[0] == slice(5, 5)   # padding only
    with pytest.raises(ValueError, match=r"output size \(12\) is not divisible by the tensor-parallel size 5"):
        col.shard_slice(0, 5)
    with pytest.raises(ValueError, match="vocab=0"):
        pad_vocab_size(0, 2)
