"""Growing a loaded model's vocabulary to the data's (``pack_dataset.py --add-special-tokens``).

Data packed with tokens the model's tokenizer lacked holds ids ``old_vocab .. new_vocab-1``. The model is built
with ``new_vocab`` rows (padded to the tp multiple as any vocabulary is, parallel/layers.py ``pad_vocab_size``)
and loaded from a checkpoint of ``old_vocab`` rows: the loader fills the rows past the file's with zeros
(the vocabulary-padding path of weights.py / hf_io.py). :func:`mean_init_new_rows` then sets rows
``old_vocab .. new_vocab-1`` of the embedding and of an untied LM head to the mean of the old rows — what
LLaMA-Factory and transformers' ``resize_token_embeddings(mean_resizing=True)`` start new tokens from, so a
new token's embedding is an average one and its logit starts near the average logit. Padding rows stay zero.

No rank gathers a matrix: each rank sums the old rows of what it holds — its tensor-parallel shard, or under
ZeRO-3 its partition of that shard (``p.ds_tensor``) — in row chunks, and the [hidden] sums are all-reduced
over the ZeRO-3 partition group and the tensor-parallel group. A tied LM head is the embedding's parameter:
grown once, still tied. Pipeline stages holding a copy of a tied embedding each grow theirs identically.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_ROW_CHUNK = 1024      # rows summed at a time: a bounded fp32 temporary at any vocabulary size


def _pieces(lo: int, hi: int, dim: int):
    """Elements [lo, hi) of a row-major [rows, dim] matrix as (head, body_rows, tail): a partial first row of
    ``head`` elements (from column lo % dim), ``body_rows`` whole rows, a partial last row of ``tail``."""
    head = min((-lo) % dim, hi - lo)
    body = (hi - lo - head) // dim
    return head, body, hi - lo - head - body * dim


def _add_column_sums(total: torch.Tensor, piece: torch.Tensor, lo: int, dim: int) -> None:
    """total[c] += the elements of ``piece`` (elements lo.. of the matrix) in column c, in fp32."""
    head, body, tail = _pieces(lo, lo + piece.numel(), dim)
    c = lo % dim
    if head:
        total[c:c + head] += piece[:head].float()
    rows = piece[head:head + body * dim].view(body, dim)
    for i in range(0, body, _ROW_CHUNK):
        total += rows[i:i + _ROW_CHUNK].sum(0, dtype=torch.float32)
    if tail:
        total[:tail] += piece[head + body * dim:].float()


def _fill_rows(piece: torch.Tensor, lo: int, dim: int, row: torch.Tensor) -> None:
    """Elements lo.. of the matrix (``piece``) := ``row`` in every row they cover."""
    head, body, tail = _pieces(lo, lo + piece.numel(), dim)
    c = lo % dim
    if head:
        piece[:head] = row[c:c + head]
    piece[head:head + body * dim].view(body, dim).copy_(row.expand(body, dim))
    if tail:
        piece[head + body * dim:] = row[:tail]


def _vocab_parameters(module: torch.nn.Module):
    """(layer, weight) of every vocabulary-parallel layer (embedding, LM head), each parameter once."""
    seen = set()
    for layer in module.modules():
        if hasattr(layer, "padded_vocab_size") and hasattr(layer, "vocab_start"):
            if id(layer.weight) not in seen:
                seen.add(id(layer.weight))
                yield layer, layer.weight


def _all_reduce(t: torch.Tensor, group) -> None:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)


def mean_init_new_rows(module: torch.nn.Module, old_vocab: int) -> int:
    """Rows ``old_vocab .. vocab_size-1`` of every vocabulary matrix := the mean of rows ``0 .. old_vocab-1``.
    Collective over each layer's tp group (and ZeRO-3 partition group). Returns the number of new rows."""
    grown = 0
    with torch.no_grad():
        for layer, p in _vocab_parameters(module):
            new_vocab = layer.vocab_size
            if new_vocab <= old_vocab:
                continue
            grown = new_vocab - old_vocab
            if hasattr(p, "ds_id"):          # ZeRO-3: this rank's partition of the flattened tp shard
                from witscale.model.weights import partition_range
                start, end = partition_range(p)
                flat, (rows, dim) = p.ds_tensor.narrow(0, 0, end - start), tuple(p.ds_shape)
                groups = (p.ds_process_group, layer.tp_group)
            else:
                flat, (rows, dim), groups = p.data.view(-1), tuple(p.shape), (layer.tp_group,)
                start, end = 0, flat.numel()
            # this rank holds elements [start, end) of its tp shard, whose row r is vocabulary id vocab_start + r

            def shard_elements(vocab_id: int) -> int:       # first element of that id's row, clipped to the shard
                return min(max(0, vocab_id - layer.vocab_start), rows) * dim
            old_end = shard_elements(old_vocab)
            total = torch.zeros(dim, dtype=torch.float32, device=flat.device)
            if min(end, old_end) > start:
                _add_column_sums(total, flat[:min(end, old_end) - start], start, dim)
            for group in groups:
                _all_reduce(total, group)
            mean = (total / old_vocab).to(flat.dtype)
            a, b = max(old_end, start), min(shard_elements(new_vocab), end)     # the new rows' elements here
            if b > a:
                _fill_rows(flat[a - start:b - start], a, dim, mean)
    return grown
