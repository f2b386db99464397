"""Weights out, one path for every layout: the dense, HF-named tensors of the whole model, one at a time.

``iter_dense_tensors(module, topo, dtype)`` walks the model parameter by parameter, pipeline stage by
pipeline stage (the canonical order: stage 0's parameters in module order, then stage 1's …). For each
parameter the ranks of the stage that holds it cast their piece to the export dtype, gather its ZeRO-3
partitions to data-parallel rank 0 (one parameter at a time), then its tensor-parallel shards to the
stage's tp-rank 0 (point-to-point into one buffer: the other TP ranks never hold the dense tensor; a replicated
parameter — norms, k/v with fewer KV heads than tp — is tp-rank 0's copy), trim the vocabulary
padding and name it by HF's name (witscale/model/hf_names.py). That rank — the stage's owner, (pp=s,
dp=0, tp=0) — sends it to global rank 0 point-to-point (or, with ``everywhere=True``, broadcasts it to
every rank). Rank 0 yields ``(hf_name, tensor)`` on the host; the other ranks take part in the
collectives and yield nothing. At any moment a rank holds one gathered tensor: nothing is pickled, no
rank builds the whole model.

``dense_state_dict`` is its consumer for the tests that compare layouts: every rank gets the whole dense
fp32 state (small models only). The HF export (witscale/training/export.py) streams it into a
safetensors writer on rank 0.
"""
from __future__ import annotations

import json
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from witscale.model.hf_names import hf_name_fn


def _comm_device(p: torch.Tensor) -> torch.device:
    # NCCL moves device tensors only; a ZeRO-3 partition offloaded to the CPU goes through the GPU.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if p.device.type == "meta" else p.device


def _gather_flat(src: torch.Tensor, dtype: torch.dtype, ranks: list[int], index: int) -> Optional[torch.Tensor]:
    """Concatenate the flat pieces ``src`` (equal sizes) of the ranks ``ranks`` (global ranks, this one at
    ``index``) in the export dtype at ``ranks[0]``: one buffer there, each piece received straight into its
    place (point-to-point, so no backend-side staging copy); the root casts its own piece into the buffer
    without an intermediate copy. Returns the flat buffer at the root, None elsewhere."""
    src = src.detach().reshape(-1)
    if index != 0:
        dist.send(_as_bytes(src.to(dtype)), dst=ranks[0])
        return None
    n = src.numel()
    buf = torch.empty(len(ranks) * n, dtype=dtype, device=src.device)
    buf[:n].copy_(src)
    raw = buf.view(torch.uint8)
    step = raw.numel() // len(ranks)
    for i in range(1, len(ranks)):
        dist.recv(raw[i * step:(i + 1) * step], src=ranks[i])
    return buf


def _zero3_gather_partitions(p: torch.Tensor, dtype: torch.dtype, topo) -> Optional[torch.Tensor]:
    """A ZeRO-3 parameter's (tp-local) tensor at data-parallel rank 0, None elsewhere: the partitions
    (``ds_tensor``: elements [r·n, (r+1)·n) of the flattened parameter, zero-padded at the end), each cast
    to the export dtype, gathered to dp-rank 0 — unlike ``GatheredParameters``, no rank ever holds the
    whole parameter in the training dtype, and only dp-rank 0 holds it at all."""
    part = p.ds_tensor.detach().reshape(-1).to(_comm_device(p))
    # ZeRO partitions over dp × sp (under --sp; the dp group otherwise), in the group's rank order.
    ranks = list(topo.sp_dp_ranks)
    buf = _gather_flat(part, dtype, ranks, ranks.index(topo.rank))
    if buf is None:
        return None
    return buf[:p.ds_numel].reshape(tuple(p.ds_shape))


def _local_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _dense_shape(p: torch.Tensor, tp: int, vocab: int) -> tuple[int, ...]:
    shape = list(_local_shape(p))
    dim = getattr(p, "tp_split_dim", None)
    if dim is not None and tp > 1:
        shape[dim] *= tp
    if getattr(p, "padded_dense_rows", None) is not None and dim == 0:
        shape[0] = vocab
    return tuple(shape)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Communication moves raw bytes: every backend carries uint8 (gloo has no bf16 for some collectives).
    return t.contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buf: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    return buf.view(dtype).reshape(shape)


def _stage_params(module, topo) -> list[tuple[str, torch.nn.Parameter]]:
    """(hf_name, parameter) this rank's stage exports, in module order. A tied embedding lives on the
    first and the last stage: only its lowest stage exports it."""
    to_hf = hf_name_fn(module)
    out = []
    for name, p in module.named_parameters():
        if topo.pp > 1 and topo.pp_rank > 0 and name.startswith("tied_modules."):
            continue
        out.append((to_hf(name), p))
    return out


def _send_meta(meta: list, owner: int, everywhere: bool, device) -> list:
    """The owner's list of (name, shape, dtype) to rank 0 (or every rank): JSON bytes, no pickle."""
    rank = dist.get_rank()
    if not everywhere and rank not in (owner, 0):
        return meta
    raw = json.dumps(meta).encode() if rank == owner else b""
    n = torch.tensor([len(raw)], dtype=torch.int64, device=device)
    if everywhere:
        dist.broadcast(n, src=owner)
    elif rank == owner:
        dist.send(n, dst=0)
    else:
        dist.recv(n, src=owner)
    buf = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device) if rank == owner
           else torch.empty(int(n.item()), dtype=torch.uint8, device=device))
    if everywhere:
        dist.broadcast(buf, src=owner)
    elif rank == owner:
        dist.send(buf, dst=0)
    else:
        dist.recv(buf, src=owner)
    return json.loads(bytes(buf.cpu().numpy()).decode())



def iter_dense_tensors(module: torch.nn.Module, topo, dtype: Optional[torch.dtype] = None, *,
                       everywhere: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective over all ranks: yields ``(hf_name, dense host tensor)`` for every parameter of the whole
    model, on rank 0 only (every rank with ``everywhere``), in the canonical order; ``dtype`` defaults to
    fp32. Every rank must exhaust the iterator. A yielded tensor may share storage with the live parameter
    (rank 0 only, tp = 1, dtype = the training dtype): consume it before the next optimizer step."""
    dtype = dtype or torch.float32
    cfg = module.config
    tp, pp = topo.tp, topo.pp
    rank = dist.get_rank()
    mine = _stage_params(module, topo)
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    for stage in range(pp):
        owner = topo.dims.rank_of(stage, 0, 0)
        in_stage = topo.pp_rank == stage
        meta = [[name, list(_dense_shape(p, tp, cfg.vocab_size))] for name, p in mine] if in_stage else None
        if owner != 0 or everywhere:
            meta = _send_meta(meta, owner, everywhere, device)
        for i, entry in enumerate(meta or []):
            name, shape = entry[0], tuple(entry[1])
            full = None
            if in_stage:
                full = _gather_to_owner(mine[i][1], dtype, tp, cfg.vocab_size, topo, copy=everywhere)
            if rank == owner:
                if tuple(full.shape) != shape:
                    raise RuntimeError(f"{name}: gathered shape {tuple(full.shape)}, expected {shape}")
            if everywhere:
                buf = _as_bytes(full) if rank == owner else torch.empty(
                    _nbytes(shape, dtype), dtype=torch.uint8, device=device)
                dist.broadcast(buf, src=owner)
                full = _from_bytes(buf, shape, dtype)
            elif owner != 0:
                if rank == owner:
                    dist.send(_as_bytes(full), dst=0)
                elif rank == 0:
                    buf = torch.empty(_nbytes(shape, dtype), dtype=torch.uint8, device=device)
                    dist.recv(buf, src=owner)
                    full = _from_bytes(buf, shape, dtype)
            if rank == 0 or everywhere:
                yield name, full.cpu()
            del full


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _gather_to_owner(p: torch.Tensor, dtype: torch.dtype, tp: int, vocab: int, topo, copy: bool):
    """On the ranks of the parameter's stage: the dense tensor at the stage's (dp 0, tp 0) rank, None
    elsewhere. ZeRO-3 partitions are gathered over the data-parallel group (all of its ranks take part);
    TP shards only within data-parallel replica 0, into one buffer at tp-rank 0 (a row-split parameter is
    then already the dense tensor; a column-split one is reordered with one copy). ``copy``: never return
    the live parameter's own storage."""
    dim = getattr(p, "tp_split_dim", None)
    split = dim is not None and tp > 1
    if hasattr(p, "ds_tensor"):
        local = _zero3_gather_partitions(p, dtype, topo)
        live = p.ds_tensor
    else:
        local = p.detach() if split else p.detach().to(dtype)    # a TP shard is cast inside the gather
        live = p
    if topo.dp_rank != 0 or topo.sp_rank != 0:
        return None
    if split:
        ranks = [topo.dims.rank_of(topo.pp_rank, topo.dp_rank, t) for t in range(tp)]
        buf = _gather_flat(local, dtype, ranks, topo.tp_rank)
        shape = _local_shape(p)
        del local
        if buf is None:
            return None
        stacked = buf.reshape((tp,) + shape)            # [tp, *local shape]
        if dim == 0:
            full = stacked.reshape((tp * shape[0],) + shape[1:])
        else:
            full = stacked.movedim(0, dim).reshape(shape[:dim] + (tp * shape[dim],) + shape[dim + 1:])
        del buf, stacked
    else:
        if topo.tp_rank != 0:
            return None
        shares = local.untyped_storage().data_ptr() == live.untyped_storage().data_ptr()
        full = local.clone() if copy and shares else local
    if getattr(p, "padded_dense_rows", None) is not None and dim == 0 and full.shape[0] != vocab:
        full = full[:vocab]       # a prefix of the rows: still contiguous, no copy
    return full


def dense_state_dict(module: torch.nn.Module, topo) -> dict[str, torch.Tensor]:
    """Dense HF-named fp32 host tensors of the WHOLE model, on every rank (collective over all ranks).
    For tests and small models: the export streams ``iter_dense_tensors`` instead."""
    return dict(iter_dense_tensors(module, topo, torch.float32, everywhere=True))
