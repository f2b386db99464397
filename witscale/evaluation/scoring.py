"""Teacher-forced log-probabilities of many (prefix, continuation) pairs, packed into rows.

Each pair is one document of a packed row: positions restart at 0 and attention stays inside the document
(witscale's packed attention, ``cu_seqlens``), exactly as in training — so a row of many short pairs costs
one forward instead of one padded sequence each. From the final hidden states only the positions that
predict a continuation token are projected to the vocabulary, in chunks (``chunk`` tokens × vocabulary at a
time, log-softmax in fp32, or fp64 for an fp64 model), and ``log p(continuation | prefix) = Σ_t log p(y_t | prefix, y_<t)`` is summed in
fp64. Pairs are packed first-fit-decreasing into rows of at most ``max_tokens`` tokens (a longer pair gets a
row of its own).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from witscale.model import packed_positions


def pack_pairs(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of pairs per row, first-fit decreasing by length."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(0, max_tokens - n))
    return rows


@torch.inference_mode()
def continuation_logprobs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_tokens: int = 8192,
                          chunk: int = 1024, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """float64 [len(pairs)]: log p(continuation | prefix) under ``model`` (witscale CausalLM)."""
    for k, (prefix, cont) in enumerate(pairs):
        if len(prefix) == 0 or len(cont) == 0:
            raise ValueError(f"pair {k}: the prefix and the continuation must both be non-empty")
    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in pairs]
    result = np.zeros(len(pairs), dtype=np.float64)
    for row in pack_pairs(lengths, max_tokens):
        ids, pred_pos, targets, owner = [], [], [], []
        offset = 0
        for j, i in enumerate(row):
            prefix, cont = pairs[i]
            ids += list(prefix) + list(cont)
            first = offset + len(prefix) - 1                       # the position predicting cont[0]
            pred_pos.extend(range(first, first + len(cont)))
            targets.extend(cont)
            owner.extend([j] * len(cont))
            offset += lengths[i]
        seq = len(ids)
        position_ids, cu_seqlens, max_seqlen = packed_positions([[lengths[i] for i in row]], seq)
        hidden = model(torch.tensor([ids], dtype=torch.long, device=device), position_ids.to(device),
                       cu_seqlens.to(device), max_seqlen)[0]
        pred_pos_t = torch.tensor(pred_pos, dtype=torch.long, device=device)
        targets_t = torch.tensor(targets, dtype=torch.long, device=device)
        token_lp = torch.empty(len(targets), dtype=torch.float64, device=device)
        for s in range(0, len(targets), chunk):
            logits = model.compute_logits(hidden[pred_pos_t[s:s + chunk]])
            if logits.dtype in (torch.bfloat16, torch.float16):
                logits = logits.float()                             # fp32 softmax, as in training
            lp = torch.log_softmax(logits, dim=-1).gather(-1, targets_t[s:s + chunk, None])[:, 0]
            token_lp[s:s + chunk] = lp.double()
        sums = torch.zeros(len(row), dtype=torch.float64, device=device)
        sums.index_add_(0, torch.tensor(owner, dtype=torch.long, device=device), token_lp)
        result[row] = sums.cpu().numpy()
        if progress is not None:
            progress(len(row))
    return result
